"""Reward scores as plain numpy functions on L2-normalised embeddings (the stage only feeds them).

- cosine(text, image): a dot product of the normalised embeddings, in the stages themselves
- directional similarity (CompoDiff): cos(E_img(target) - E_img(ref), E_txt(target caption) - E_txt(ref caption))
- self-retrieval: where a text ranks its own image among K distractor images, and the softmax probability it
  gives its own image (CLIP's logit scale as temperature). A raw cosine says how similar; this says whether the
  text picks out its image at all.
"""

from __future__ import annotations

import numpy as np


def directional(img_ref: np.ndarray, img_tgt: np.ndarray, txt_ref: np.ndarray, txt_tgt: np.ndarray) -> float:
    di = img_tgt - img_ref
    dt = txt_tgt - txt_ref
    denom = np.linalg.norm(di) * np.linalg.norm(dt)
    return float(di @ dt / denom) if denom > 0 else 0.0


def self_retrieval(texts: np.ndarray, own: np.ndarray, distractors: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """For each text row: rank of ``own`` among ``own`` + ``distractors`` (1 = best; ties count against it) and
    the softmax probability of ``own`` under logits ``scale * cosine``."""
    gallery = np.vstack([own[None, :], distractors]) if len(distractors) else own[None, :]
    sims = texts @ gallery.T  # [n_texts, 1 + k]
    rank = 1 + np.sum(sims[:, 1:] >= sims[:, :1], axis=1)
    logits = scale * sims
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    prob = probs[:, 0] / probs.sum(axis=1)
    return rank.astype(int), prob


def pick_distractors(bank: np.ndarray, bank_ids: list[str], own_id: str | None, k: int, seed: int) -> np.ndarray:
    """K distractors from the bank, never the sample's own image, drawn reproducibly from the sample's seed."""
    pool = bank
    candidates = [i for i, ident in enumerate(bank_ids) if ident != own_id]
    if not candidates:
        return np.zeros((0, pool.shape[1] if pool.ndim == 2 else 0), dtype=np.float32)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(candidates, size=min(k, len(candidates)), replace=False)
    return pool[np.sort(chosen)]


# Answerability (the judge answers a VQA query itself): SQuAD's answer normalisation, then exact match for a
# short target and token F1 otherwise; "3" vs "three" stays a miss (no number words: a judge says what it sees).
SHORT_ANSWER_WORDS = 3
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> list[str]:
    import string

    table = str.maketrans({c: " " for c in string.punctuation})
    return [w for w in text.lower().translate(table).split() if w not in _ARTICLES]


def answer_agreement(answer: str, target: str) -> float:
    """1.0 / 0.0 (normalised exact match) when the target has at most SHORT_ANSWER_WORDS words, else token F1."""
    from collections import Counter

    a, t = normalize_answer(answer), normalize_answer(target)
    if len(t) <= SHORT_ANSWER_WORDS:
        return float(a == t)
    common = sum((Counter(a) & Counter(t)).values())
    if not common:
        return 0.0
    precision, recall = common / len(a), common / len(t)
    return round(2 * precision * recall / (precision + recall), 6)

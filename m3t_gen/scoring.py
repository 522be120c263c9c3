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

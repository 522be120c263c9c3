"""reward: CLIP/SigLIP scores for the caption and every turn (GPU actor pool). Scores only; the filter stage
decides, so thresholds can change later without re-scoring (`m3t-gen refilter`).

Per text: cosine with its image, and self-retrieval (rank and softmax probability of its own image among K
distractors drawn from a pool of recently seen images in this actor, reproducibly from the sample's seed).
Turn text rule: classification and retrieval turns score their target (a label / the dense caption);
VQA turns score "query target" together, since the answer alone is often too short to describe the image.
Each image is embedded once per run: the embedding is reused for every text of its sample and as a distractor.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import numpy as np

from m3t_gen.clip import ClipEmbedder
from m3t_gen.config import PipelineConfig, Resources
from m3t_gen.generation import open_image
from m3t_gen.scoring import pick_distractors, self_retrieval
from m3t_gen.seeds import derive_seed
from m3t_gen.stages.base import RunContext, Stage


def turn_text(turn: dict[str, str]) -> str:
    if turn["type"] in ("classification", "retrieval"):
        return turn["target"]
    return f"{turn['query']} {turn['target']}"


def _r(x: float) -> float:
    return round(float(x), 6)


class RewardStage(Stage):
    name = "reward"

    @classmethod
    def resources(cls, config: PipelineConfig) -> Resources:
        return config.reward.resources

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        cfg = ctx.config.reward
        device = "cuda" if cfg.resources.num_gpus > 0 else "cpu"
        self.clip = ClipEmbedder(cfg.model, cfg.dtype, device)
        self.sr = cfg.self_retrieval
        self.pool: deque[tuple[str, np.ndarray]] = deque(maxlen=self.sr.pool_size)

    def process(self, rows: list[dict[str, Any]]) -> None:
        images = self.clip.embed_images([open_image(r) for r in rows])
        turns = [json.loads(r["turns"]) for r in rows]
        texts: list[str] = []
        for row, row_turns in zip(rows, turns):
            texts.append(row["caption"])
            texts.extend(turn_text(t) for t in row_turns)
        text_emb = self.clip.embed_texts(texts)
        # The batch's own images join the pool first, so even the first batch has distractors.
        for row, emb in zip(rows, images):
            self.pool.append((row["key"], emb))
        pool_keys = [k for k, _ in self.pool]
        pool = np.stack([e for _, e in self.pool])
        at = 0
        for i, (row, row_turns) in enumerate(zip(rows, turns)):
            n = 1 + len(row_turns)
            emb = text_emb[at:at + n]
            at += n
            sims = emb @ images[i]
            scores: dict[str, Any] = {"caption": _r(sims[0]), "turns": [_r(s) for s in sims[1:]]}
            if self.sr.enabled:
                seed = derive_seed(self.ctx.config.seed, self.name, row["key"])
                distractors = pick_distractors(pool, pool_keys, row["key"], self.sr.k, seed)
                rank, prob = self_retrieval(emb, images[i], distractors, self.clip.logit_scale)
                scores.update(k=int(len(distractors)), caption_rank=int(rank[0]), caption_prob=_r(prob[0]),
                              turn_ranks=[int(x) for x in rank[1:]], turn_probs=[_r(x) for x in prob[1:]])
            row["scores"] = json.dumps(scores)

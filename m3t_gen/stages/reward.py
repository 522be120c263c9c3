"""reward: CLIP image-text cosine for the caption and for every turn (GPU actor pool). Scores only; the
filter stage decides, so thresholds can change later without re-scoring.

Turn text rule: classification and retrieval turns score their target (a label / the dense caption);
VQA turns score "query target" together, since the answer alone is often too short to describe the image.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from m3t_gen.clip import ClipEmbedder
from m3t_gen.config import PipelineConfig, Resources
from m3t_gen.generation import open_image
from m3t_gen.stages.base import RunContext, Stage


def turn_text(turn: dict[str, str]) -> str:
    if turn["type"] in ("classification", "retrieval"):
        return turn["target"]
    return f"{turn['query']} {turn['target']}"


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

    def process(self, rows: list[dict[str, Any]]) -> None:
        images = self.clip.embed_images([open_image(r) for r in rows])
        turns = [json.loads(r["turns"]) for r in rows]
        texts: list[str] = []
        for row, row_turns in zip(rows, turns):
            texts.append(row["caption"])
            texts.extend(turn_text(t) for t in row_turns)
        text_emb = self.clip.embed_texts(texts)
        at = 0
        for i, (row, row_turns) in enumerate(zip(rows, turns)):
            n = 1 + len(row_turns)
            sims = text_emb[at:at + n] @ images[i]
            at += n
            row["scores"] = json.dumps({"caption": round(float(sims[0]), 6),
                                        "turns": [round(float(s), 6) for s in np.asarray(sims[1:])]})

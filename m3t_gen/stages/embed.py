"""embed: CLIP/SigLIP image embedding (and caption embedding) of every captioned image, once per run
(GPU actor pool). The reward stage scores texts against it; the CIR recipe pairs images with it."""

from __future__ import annotations

from typing import Any

import numpy as np

from m3t_gen.scoring.clip import ClipEmbedder
from m3t_gen.generation import open_image
from m3t_gen.stages.base import RunContext, Stage
from m3t_gen.stages.estimate import Estimating, Work


def to_bytes(vec: np.ndarray) -> bytes:
    return np.asarray(vec, dtype=np.float32).tobytes()


def from_bytes(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.float32)


class EmbedStage(Stage):
    name = "embed"
    section = "reward"  # same model as the reward: same placement
    model_role = "reward"
    writes = ("image_emb", "caption_emb")

    @classmethod
    def estimate(cls, est: Estimating) -> Work:
        return Work(1, 0, 0, False, speedup=2, speedup_why="image tower only")

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.clip = ClipEmbedder.for_run(ctx.config.reward)

    def process(self, rows: list[dict[str, Any]]) -> None:
        images = self.clip.embed_images([open_image(r) for r in rows])
        for row, img in zip(rows, images):
            row["image_emb"] = to_bytes(img)
        captioned = [r for r in rows if r["caption"]]  # single-stage M3T: the caption comes later, with the turns
        if captioned:
            for row, cap in zip(captioned, self.clip.embed_texts([r["caption"] for r in captioned])):
                row["caption_emb"] = to_bytes(cap)

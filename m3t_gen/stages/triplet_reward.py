"""triplet_reward: CLIP scores of a CIR triplet (GPU actor pool). Image and caption embeddings come from the
embed stage (each image embedded once per run); only the modification texts are embedded here.

- target_caption: target image vs target caption
- image_similarity: reference image vs target image
- directional (CompoDiff): cos(E_img(target) - E_img(ref), E_txt(target caption) - E_txt(ref caption))
- per modification: modification text vs target image
"""

from __future__ import annotations

from typing import Any

import numpy as np

from m3t_gen.scoring.clip import ClipEmbedder
from m3t_gen.scoring.measures import directional
from m3t_gen.stages.base import OnPairs, RunContext, Stage
from m3t_gen.stages.estimate import CLIP_MAX_TOKENS, Estimating, Work


class TripletRewardStage(OnPairs, Stage):
    name = "triplet_reward"
    section = "reward"
    model_role = "reward"
    writes = ("scores",)

    @classmethod
    def estimate(cls, est: Estimating) -> Work:
        """Per pair: the target caption and the modification texts as written."""
        texts = min(est.caption_out, CLIP_MAX_TOKENS) + est.clip_texts(est.cfg.cir.modify.n, est.work["modify"].output)
        return Work(est.cfg.cir.pairing.pairs_per_image, texts, 0, False, items="pairs")

    def __init__(self, ctx: RunContext) -> None:
        import ray

        super().__init__(ctx)
        self.clip = ClipEmbedder.for_run(ctx.config.reward)
        # The pool's image and caption embeddings, once per actor from the object store (not four per pair row):
        # one object per pool shard, in pool-row order (the driver never held them).
        bank = ctx.shared["pool_embeddings"]
        self.image_embs = np.concatenate(ray.get(bank["image"]))
        self.caption_embs = np.concatenate(ray.get(bank["caption"]))

    def process(self, rows: list[dict[str, Any]]) -> None:
        mods = [r["modifications"] for r in rows]
        texts = [m["text"] for row_mods in mods for m in row_mods]
        emb = self.clip.embed_texts(texts) if texts else None
        at = 0
        for row, row_mods in zip(rows, mods):
            ref, tgt = self.image_embs[row["ref_index"]], self.image_embs[row["tgt_index"]]
            ref_cap, tgt_cap = self.caption_embs[row["ref_index"]], self.caption_embs[row["tgt_index"]]
            mod_scores = [float(emb[at + i] @ tgt) for i in range(len(row_mods))]
            at += len(row_mods)
            row["scores"] = {
                "target_caption": round(float(tgt @ tgt_cap), 6),
                "image_similarity": round(float(ref @ tgt), 6),
                "directional": round(directional(ref, tgt, ref_cap, tgt_cap), 6),
                "modifications": [round(s, 6) for s in mod_scores],
            }

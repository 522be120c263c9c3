"""reward: CLIP/SigLIP scores for the caption and every turn (GPU actor pool). Scores only; the filter stage
decides, so thresholds can change later without re-scoring (`m3t-gen refilter`).

Per text: cosine with its image, and self-retrieval (rank and softmax probability of its own image among K
distractors drawn, reproducibly from the sample's seed, from a fixed bank: the first images of the configured
bank or of the run's input, read once per run and embedded once per actor; a sample never meets its own image as a distractor).
Turn text rule: classification and retrieval turns score their target (a label / the dense caption);
VQA turns score "query target" together, since the answer alone is often too short to describe the image.
Each image is embedded once: the embedding serves every text of its sample.
"""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image

from m3t_gen.scoring.clip import ClipEmbedder
from m3t_gen.config import ConfigError, PipelineConfig
from m3t_gen.scoring.measures import pick_distractors, self_retrieval
from m3t_gen.seeds import derive_seed
from m3t_gen.stages.base import RunContext, Stage
from m3t_gen.stages.estimate import CLIP_MAX_TOKENS, Estimating, Work
from m3t_gen.stages.embed import from_bytes
from m3t_gen.turns import scored_text


def _r(x: float) -> float:
    return round(float(x), 6)


def bank_images(cfg: PipelineConfig) -> tuple[list[str], list[bytes]]:
    """The self-retrieval distractor bank: the first ``bank_size`` distinct readable images of the configured
    bank (or of the run's input), as (source sha256s, JPEG bytes). Built once per run, through the reader: an
    image it cannot use is skipped, within the same byte budgets.

    A configured bank without one readable image is a config error (one line, exit 2). The run's own input
    without one is not: then no sample can reach the reward stage either, and the run ends with every sample
    rejected with its reason; the bank is empty (self-retrieval against no distractor: rank 1)."""
    from m3t_gen.stages.read import read_shard
    from m3t_gen.storage.sources import expand_inputs

    sr = cfg.reward.self_retrieval
    if sr.bank:
        cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"paths": sr.bank})})
    shards = expand_inputs(cfg, label="reward.self_retrieval.bank" if sr.bank else "input.paths")
    shas: list[str] = []
    images: list[bytes] = []
    reasons: Counter = Counter()
    for shard in shards:
        for row in read_shard(shard.path, shard.shard, cfg.input, cfg.read, None):
            if row["status"] == "ok" and row["source_sha256"] not in shas:
                shas.append(row["source_sha256"])
                images.append(row["image"])
            elif row["status"] == "rejected":
                reasons[row["reject_reason"]] += 1
            if len(images) >= sr.bank_size:
                break
        if len(images) >= sr.bank_size:
            break
    if not images and sr.bank:
        seen = ", ".join(f"{n} {r}" for r, n in reasons.most_common(3)) or "no entries"
        raise ConfigError(f"reward.self_retrieval.bank: no readable image in {len(shards)} input(s) ({seen}); "
                          "give other bank paths, or leave bank unset to draw distractors from the run's input")
    return shas, images


class RewardStage(Stage):
    name = "reward"
    section = "reward"
    model_role = "reward"
    writes = ("scores", "caption_emb")  # caption_emb: single-stage, the caption arrives after the embed stage

    @classmethod
    def enabled(cls, config: PipelineConfig) -> bool:
        return config.wants("m3t")

    @classmethod
    def estimate(cls, est: Estimating) -> Work:
        """CLIP reads the caption and every turn as written (each text cut at 77 tokens)."""
        texts = min(est.caption_out, CLIP_MAX_TOKENS)
        dialogue = est.work.get("dialogue")
        if dialogue is not None:
            texts += est.clip_texts(sum(est.cfg.dialogue.mix.values()), dialogue.output)
        return Work(1, texts, 0, False)

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        cfg = ctx.config.reward
        self.clip = ClipEmbedder.for_run(cfg)
        self.sr = cfg.self_retrieval
        if self.sr.enabled:
            # The bank's images are read once for the run (the driver hands them over through the object store);
            # each actor embeds them once with its own CLIP.
            if "reward_bank" in ctx.shared:
                import ray

                shas, images = ray.get(ctx.shared["reward_bank"])
            else:
                shas, images = bank_images(ctx.config)
            pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]  # the reader's own JPEGs
            self.bank_shas = shas
            # Empty only when the run's input has no readable image (bank_images): then no row comes here.
            self.bank = np.concatenate([self.clip.embed_images(pil[i:i + 64]) for i in range(0, len(pil), 64)]
                                       ) if pil else np.zeros((0, 0), np.float32)

    def process(self, rows: list[dict[str, Any]]) -> None:
        # Images were embedded once by the embed stage; the caption's embedding is reused too.
        images = np.stack([from_bytes(r["image_emb"]) for r in rows])
        turns = [r["turns"] for r in rows]
        texts: list[str] = []
        for row_turns in turns:
            texts.extend(scored_text(t) for t in row_turns)
        text_emb = self.clip.embed_texts(texts)
        missing = [r for r in rows if r["caption_emb"] is None]  # single-stage: captioned by the dialogue call
        if missing:
            for row, cap in zip(missing, self.clip.embed_texts([r["caption"] for r in missing])):
                row["caption_emb"] = cap.astype(np.float32).tobytes()
        at = 0
        for i, (row, row_turns) in enumerate(zip(rows, turns)):
            n = len(row_turns)
            emb = np.vstack([from_bytes(row["caption_emb"])[None, :], text_emb[at:at + n]])
            at += n
            sims = emb @ images[i]
            scores: dict[str, Any] = {"caption": _r(sims[0]), "turns": [_r(s) for s in sims[1:]]}
            if self.sr.enabled:
                seed = derive_seed(self.ctx.config.seed, self.name, row["key"])
                distractors = pick_distractors(self.bank, self.bank_shas, row["source_sha256"], self.sr.k, seed)
                rank, prob = self_retrieval(emb, images[i], distractors, self.clip.logit_scale)
                scores.update(k=int(len(distractors)), caption_rank=int(rank[0]), caption_prob=_r(prob[0]),
                              turn_ranks=[int(x) for x in rank[1:]], turn_probs=[_r(x) for x in prob[1:]])
            row["scores"] = scores

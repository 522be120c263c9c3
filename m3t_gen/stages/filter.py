"""filter: apply the configured thresholds to recorded scores (CPU). Turn level first (drop weak turns),
then sample level; every drop carries the score, its value and the threshold."""

from __future__ import annotations

import json
from typing import Any

from m3t_gen.config import FilterSpec, PipelineConfig
from m3t_gen.rows import reject
from m3t_gen.stages.base import RunContext, Stage


def apply_filter(row: dict[str, Any], spec: FilterSpec, stage: str = "filter") -> None:
    turns = json.loads(row["turns"])
    scores = json.loads(row["scores"])
    kept = 0
    for turn, score in zip(turns, scores["turns"], strict=True):
        turn["score"] = score
        if spec.min_turn_score is not None and score < spec.min_turn_score:
            turn["kept"] = False
            turn["reason"] = f"turn_score {score:.4f} < min_turn_score {spec.min_turn_score}"
        else:
            turn["kept"] = True
            turn.pop("reason", None)
            kept += 1
    row["turns"] = json.dumps(turns)
    kept_scores = [t["score"] for t in turns if t["kept"]]
    if kept < spec.min_turns:
        reject(row, stage, "too_few_turns", kept_turns=kept, min_turns=spec.min_turns,
               min_turn_score=spec.min_turn_score, turn_scores=scores["turns"])
        return
    mean = sum(kept_scores) / len(kept_scores)
    if spec.min_mean_score is not None and mean < spec.min_mean_score:
        reject(row, stage, "mean_score_below", score="mean_turn", value=mean, threshold=spec.min_mean_score)


class FilterStage(Stage):
    name = "filter"

    @classmethod
    def uses_actor(cls) -> bool:
        return False

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)

    def process(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            apply_filter(row, self.ctx.config.filter, self.name)

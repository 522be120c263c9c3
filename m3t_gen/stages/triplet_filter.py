"""triplet_filter: thresholds on a triplet's recorded scores (CPU tasks). Modification level first (privacy,
score), then triplet level; every drop carries the score, its value and the threshold."""

from __future__ import annotations

from typing import Any

from m3t_gen.config import TripletFilterSpec
from m3t_gen.text.checks import privacy_hit
from m3t_gen.rows import MODIFICATION, reject
from m3t_gen.stages.base import OnPairs, RuleFilter
from m3t_gen.stages.filter import judge_failure, judged_fields

TEXT_FIELDS = frozenset(f.name for f in MODIFICATION)


def apply_triplet_filter(row: dict[str, Any], spec: TripletFilterSpec, stage: str = "triplet_filter") -> None:
    mods = [dict(m) for m in row["modifications"]]
    scores = row["scores"]
    words = spec.privacy.word_lists() if spec.privacy.enabled else {}
    verdicts = row.get("verdicts") or [None] * len(mods)
    for mod, score, verdict in zip(mods, scores["modifications"], verdicts, strict=True):
        mod["score"] = score
        mod.update({k: v for k, v in judged_fields(verdict).items() if k in TEXT_FIELDS})  # no answerability here
        mod["kept"], mod["reason"] = True, None
        hit = privacy_hit(mod["text"], words) if words else None
        if hit:
            mod["kept"], mod["reason"] = False, f"privacy: mentions {hit[0]} ({hit[1]!r})"
        elif spec.min_modification_score is not None and score < spec.min_modification_score:
            mod["kept"], mod["reason"] = False, f"modification_score {score:.4f} < {spec.min_modification_score}"
        elif (failure := judge_failure(mod, spec)) is not None:
            mod["kept"], mod["reason"] = False, failure
    row["modifications"] = mods
    kept = sum(m["kept"] for m in mods)
    checks = (("target_caption", spec.min_target_caption_score), ("directional", spec.min_directional))
    for name, threshold in checks:
        if threshold is not None and scores[name] < threshold:
            reject(row, stage, f"{name}_below", score=name, value=scores[name], threshold=threshold)
            return
    if kept < spec.min_modifications:
        reject(row, stage, "too_few_modifications", kept=kept, min_modifications=spec.min_modifications,
               failures=[m.get("reason") for m in mods if not m["kept"]])


class TripletFilterStage(OnPairs, RuleFilter):
    name = "triplet_filter"
    section = "cir.filter"
    writes = ("modifications",)
    rule = staticmethod(apply_triplet_filter)

"""filter: apply the configured thresholds to recorded scores (CPU tasks). Turn level first (drop weak turns),
then sample level; every drop carries the score that failed, its value and the threshold.

A sample rejected here keeps its image and scores (written to OUT/filtered/), so `m3t-gen refilter` can apply
other thresholds later without re-scoring and reach exactly what a fresh run with them would have written.
"""

from __future__ import annotations

from typing import Any

from m3t_gen.config import FilterSpec, PipelineConfig, TripletFilterSpec
from m3t_gen.text.checks import privacy_hit
from m3t_gen.rows import OK, reject
from m3t_gen.stages.base import RuleFilter


def turn_failure(scores: dict[str, Any], i: int, spec: FilterSpec, turn: dict[str, Any]) -> str | None:
    if spec.privacy.enabled:
        hit = privacy_hit(f"{turn['query']} {turn['target']}", spec.privacy.word_lists())
        if hit:
            return f"privacy: mentions {hit[0]} ({hit[1]!r})"
    score = scores["turns"][i]
    if spec.min_turn_score is not None and score < spec.min_turn_score:
        return f"turn_score {score:.4f} < min_turn_score {spec.min_turn_score}"
    if spec.max_turn_rank is not None and scores.get("turn_ranks") and scores["turn_ranks"][i] > spec.max_turn_rank:
        return f"turn_rank {scores['turn_ranks'][i]} > max_turn_rank {spec.max_turn_rank}"
    if spec.min_turn_prob is not None and scores.get("turn_probs") and scores["turn_probs"][i] < spec.min_turn_prob:
        return f"turn_prob {scores['turn_probs'][i]:.4f} < min_turn_prob {spec.min_turn_prob}"
    return judge_failure(turn, spec) or answer_failure(turn, spec)


def judge_failure(item: dict[str, Any], spec: FilterSpec | TripletFilterSpec) -> str | None:
    """The judge's verdict on one turn or modification text against the thresholds both filters have (None: not
    judged, or kept)."""
    score = item.get("judge_score")
    if item.get("verdict") == "contradicted" and spec.drop_contradicted:
        return f"judge: contradicted ({item.get('judge_reason') or 'no reason given'})"
    if spec.min_judge_score is not None and score is not None and score < spec.min_judge_score:
        return f"judge_score {score} < min_judge_score {spec.min_judge_score}"
    return None


def answer_failure(turn: dict[str, Any], spec: FilterSpec) -> str | None:
    """The turn-only judge checks: answerable from the image, and the judge's own answer agreeing with the target."""
    if turn.get("verdict") == "not_answerable" and spec.drop_unanswerable:
        return f"judge: not answerable from the image ({turn.get('judge_reason') or 'no reason given'})"
    agreement = turn.get("agreement")
    if spec.min_answer_agreement is not None and agreement is not None and agreement < spec.min_answer_agreement:
        return (f"answer_agreement {agreement:.2f} < min_answer_agreement {spec.min_answer_agreement} "
                f"(judge: {turn.get('answer')!r})")
    return None


# Where each verdict key lives on the turn (or text) it judges; read both ways: the filter puts a verdict on its
# turn, a refilter takes it back off the turn in KEY.json.
JUDGED_FIELDS = {"verdict": "verdict", "judge_score": "score", "judge_reason": "reason", "answer": "answer",
                 "agreement": "agreement"}


def judged_fields(verdict: dict[str, Any] | None) -> dict[str, Any]:
    """A verdict record as the fields of the turn (or text) it judges."""
    v = verdict or {}
    return {field: v.get(key) for field, key in JUDGED_FIELDS.items()}


def verdict_of(item: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`judged_fields`: the verdict record a judged turn carries."""
    return {key: item.get(field) for field, key in JUDGED_FIELDS.items()}


def apply_filter(row: dict[str, Any], spec: FilterSpec, stage: str = "filter") -> None:
    """Decide one scored row in place: marks each turn kept/dropped, then rejects the row or leaves it ok."""
    scores = row["scores"]
    turns = [dict(t) for t in row["turns"]]
    verdicts = row.get("verdicts") or [None] * len(turns)
    for i, turn in enumerate(turns):
        turn.update(judged_fields(verdicts[i]))
        turn["score"] = scores["turns"][i]
        for extra, src in (("rank", "turn_ranks"), ("prob", "turn_probs")):
            turn[extra] = scores[src][i] if scores.get(src) else None
        turn["reason"] = turn_failure(scores, i, spec, turn)  # a refilter may loosen: decide afresh
        turn["kept"] = turn["reason"] is None
    row["turns"] = turns
    kept_scores = [t["score"] for t in turns if t["kept"]]
    # A refilter may loosen thresholds: start from a clean decision.
    row.update(status=OK, reject_stage=None, reject_reason=None, reject_detail=None)
    if spec.min_caption_score is not None and scores["caption"] < spec.min_caption_score:
        reject(row, stage, "caption_score_below", score="caption", value=scores["caption"],
               threshold=spec.min_caption_score, keep_image=True)
    elif len(kept_scores) < spec.min_turns:
        reject(row, stage, "too_few_turns", kept_turns=len(kept_scores), min_turns=spec.min_turns,
               turn_failures=[t.get("reason") for t in turns if not t["kept"]], keep_image=True)
    elif spec.min_mean_score is not None and sum(kept_scores) / len(kept_scores) < spec.min_mean_score:
        reject(row, stage, "mean_score_below", score="mean_turn", value=sum(kept_scores) / len(kept_scores),
               threshold=spec.min_mean_score, keep_image=True)


class FilterStage(RuleFilter):
    name = "filter"
    section = "filter"
    writes = ("turns",)  # each turn marked kept or dropped with its reason
    rule = staticmethod(apply_filter)

    @classmethod
    def enabled(cls, config: PipelineConfig) -> bool:
        return config.wants("m3t")


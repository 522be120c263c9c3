"""judge / triplet_judge: a vision-language model checks what was written against the image(s) (GPU actor pool).

CLIP cannot tell a right VQA answer from a wrong one ("how many boats? 3" and "... 2" score alike), so an MLLM
sees the image and ALL turns of a sample in one call and returns a verdict per turn (supported, contradicted,
not_answerable), a 1-5 score and a short reason, constrained to a JSON schema. Optionally (answerability) it
also answers each VQA query itself without seeing the written target, and the agreement with the target is
recorded. For a CIR triplet it sees the reference and the target image and judges each modification text.

Like the CLIP reward, the judge only records (``verdicts``, one per turn or text); the filter decides
(``filter.min_judge_score``, ``filter.drop_contradicted``...), so `m3t-gen refilter` re-decides without
re-judging. It runs before the filter on every generated turn, so a refilter that loosens another threshold
never revives an unjudged turn.
"""

from __future__ import annotations

import math
from typing import Any

from m3t_gen.backends.base import GenerationResult
from m3t_gen.config import PipelineConfig
from m3t_gen.generation import open_image, parse_json_answer
from m3t_gen.text.schemas import bounded_text
from m3t_gen.scoring.measures import answer_agreement
from m3t_gen.stages.base import EXAMPLE_PAIR, EXAMPLE_ROW, OnPairs, RunContext, SchemaCheck
from m3t_gen.stages.estimate import (CHARS_PER_TOKEN, CHAT_OVERHEAD, Estimating, Work, dialogue_output_bound,
                                     verdict_output_bound, with_reasoning)
from m3t_gen.stages.generating import GeneratingStage, user_message
from m3t_gen.stages.modify import load_pool_image
from m3t_gen.text.templates import load_template
from m3t_gen.turns import TURN_TYPES, turn_plan

VERDICTS = ("supported", "contradicted", "not_answerable")
JUDGE_SCORES = (1, 2, 3, 4, 5)


def verdict_decoding_schema(n: int, max_chars: int) -> dict[str, Any]:
    """The verdict schema narrowed to exactly ``n`` items and a reason bound, for constrained decoding."""
    item = {"type": "object",
            "properties": {"verdict": {"enum": list(VERDICTS)}, "score": {"enum": list(JUDGE_SCORES)},
                           "reason": bounded_text(max_chars)},
            "required": ["verdict", "score", "reason"], "additionalProperties": False}
    return {"type": "object",
            "properties": {"verdicts": {"type": "array", "items": item, "minItems": n, "maxItems": n}},
            "required": ["verdicts"], "additionalProperties": False}


def verdict_check(where: str, spec: Any, n: int) -> SchemaCheck:
    probe = {"verdicts": [{"verdict": "supported", "score": 4, "reason": "r"}] * n}
    return SchemaCheck(where, spec.schema_, probe, verdict_decoding_schema(n, spec.max_text_chars),
                       "well-formed verdicts", f"{n} verdicts per call")


def answers_decoding_schema(n: int, max_chars: int) -> dict[str, Any]:
    return {"type": "object",
            "properties": {"answers": {"type": "array", "items": bounded_text(max_chars), "minItems": n, "maxItems": n}},
            "required": ["answers"], "additionalProperties": False}


def template_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The fields the judge template may use (checked by ``m3t-gen validate``)."""
    return {"turns": [{"i": i, "type": t["type"], "query": t["query"], "target": t["target"]}
                      for i, t in enumerate(row["turns"])],
            "caption": row.get("caption") or "",
            "sample": {"key": row["key"], "width": row["width"], "height": row["height"], "text": row["text"] or ""}}


def answer_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The fields the answerability template may use: the queries whose turn type is checked by answering."""
    return {"queries": [{"i": i, "type": t["type"], "query": t["query"]} for i, t in enumerate(row["turns"])
                        if TURN_TYPES[t["type"]].answer_check],
            "sample": {"key": row["key"], "width": row["width"], "height": row["height"], "text": row["text"] or ""}}


def triplet_template_fields(row: dict[str, Any]) -> dict[str, Any]:
    return {"modifications": [{"i": i, "category": m["category"], "text": m["text"]}
                              for i, m in enumerate(row["modifications"])],
            "reference_caption": row["ref_caption"], "target_caption": row["tgt_caption"]}


def _parse_verdicts(result: GenerationResult, schemas: list[dict[str, Any]], reason_chars: int
                    ) -> tuple[list | None, str | None]:
    data, error = parse_json_answer(result, schemas)
    if error:
        return None, error
    return [{"verdict": v["verdict"], "score": int(v["score"]), "reason": " ".join(v["reason"].split())[:reason_chars]}
            for v in data["verdicts"]], None


class _Judge(GeneratingStage):
    """What both judges share: the verdict call with retries, the decoding schema per item count."""

    model_role = "judge"
    writes = ("verdicts", "judge_attempts")
    items: str  # the row field judged, one verdict per item

    def _verdicts(self, rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list, int]]:
        """Verdict calls grouped by item count (one decoding schema each); rows that fail are rejected in place."""
        done = []
        by_count: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            by_count.setdefault(len(row[self.items]), []).append(row)
        for n, group in sorted(by_count.items()):
            schema = verdict_decoding_schema(n, self.cfg.max_text_chars)
            done += self.generate(group, lambda row, result, s=schema: _parse_verdicts(
                result, [self.file_schema, s], self.cfg.max_text_chars), json_schema=schema)
        return done


class JudgeStage(_Judge):
    name = "judge"
    section = "judge"
    items = "turns"

    @classmethod
    def enabled(cls, config: PipelineConfig) -> bool:
        return config.wants("m3t") and config.judge is not None

    @classmethod
    def templates(cls, config: PipelineConfig) -> dict[str, str]:
        out = super().templates(config)
        if config.judge.answerability:
            out[f"{cls.name}.answer"] = config.judge.answer_template
        return out

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.answer_template = (load_template(self.cfg.answer_template, ctx.config.base_dir)
                                if self.cfg.answerability else None)

    @classmethod
    def images_per_request(cls, config: PipelineConfig) -> int:
        return 1

    @classmethod
    def _example(cls, config: PipelineConfig) -> dict[str, Any]:
        return dict(EXAMPLE_ROW, turns=[{"type": t["type"], "query": "q", "target": "t"}
                                        for t in turn_plan(config.dialogue.mix)])

    @classmethod
    def example_prompts(cls, config: PipelineConfig) -> list[tuple[str, str, dict[str, Any]]]:
        row = cls._example(config)
        checks = [("judge.template", config.judge.template, template_fields(row))]
        if config.judge.answerability:
            checks.append(("judge.answer_template", config.judge.answer_template, answer_fields(row)))
        return checks

    @classmethod
    def schema_check(cls, config: PipelineConfig) -> SchemaCheck:
        return verdict_check("judge.schema", config.judge, len(cls._example(config)["turns"]))

    @classmethod
    def estimate(cls, est: Estimating) -> Work:
        """Per image: one call with the image and every turn as written (+ one with the VQA queries,
        answerability)."""
        spec, count = est.cfg.judge, est.count(cls)
        plan = turn_plan(est.cfg.dialogue.mix)
        row = dict(EXAMPLE_ROW, turns=[{"type": t["type"], "query": "", "target": ""} for t in plan])
        turn_text = dialogue_output_bound(est.cfg) * est.fill  # the turns as written go back in
        vis = est.vision(spec.model.model)
        prompt = count(est.rendered(spec.template, template_fields(row))) + turn_text + vis + CHAT_OVERHEAD
        bound = verdict_output_bound(len(plan), spec)
        est.bounds.append(f"judge {bound} for {len(plan)} verdicts")
        if spec.answerability:
            n = sum(TURN_TYPES[t["type"]].answer_check for t in plan)
            prompt += count(est.rendered(spec.answer_template, answer_fields(row))) + turn_text / 2 + vis + CHAT_OVERHEAD
            answers = with_reasoning(4 + n * (math.ceil(spec.max_text_chars / CHARS_PER_TOKEN) + 2), spec)
            bound += answers
            est.bounds.append(f"answerability {answers} for {n} answers")
        return Work(1, prompt, est.output(cls.name, bound), True)

    def fields(self, row: dict[str, Any]) -> dict[str, Any]:
        return template_fields(row)

    @classmethod
    def read_images(cls, config: PipelineConfig, row: dict[str, Any]) -> list[Any]:
        return [open_image(row)]

    def _answer_messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        return user_message(self.answer_template.render(**answer_fields(row)), self.images(row))

    def _answers(self, rows: list[dict[str, Any]]) -> dict[int, list[str]]:
        """The judge's own answers to each checked query, by row (``id``); a row whose answers fail is rejected."""
        out: dict[int, list[str]] = {}
        by_count: dict[int, list[dict[str, Any]]] = {}
        for row in rows:
            n = len(answer_fields(row)["queries"])
            if n:
                by_count.setdefault(n, []).append(row)
        for n, group in sorted(by_count.items()):
            schema = answers_decoding_schema(n, self.cfg.max_text_chars)

            def parse(row: dict[str, Any], result: GenerationResult, s: dict[str, Any] = schema):
                data, error = parse_json_answer(result, [s])
                return (None, error) if error else ([" ".join(a.split()) for a in data["answers"]], None)

            # Seeds apart from the verdict call's (run seed + 1); tokens and rejections count as the judge's.
            for row, answers, _ in self.generate(group, parse, json_schema=schema, build=self._answer_messages,
                                                 seed_offset=1):
                out[id(row)] = answers
        return out

    def process(self, rows: list[dict[str, Any]]) -> None:
        judged = self._verdicts(rows)
        answers = self._answers([row for row, _, _ in judged]) if self.answer_template is not None else {}
        for row, verdicts, attempts in judged:
            if row["status"] != "ok":  # its answerability call failed: rejected there
                continue
            mine = iter(answers.get(id(row), []))
            for turn, verdict in zip(row["turns"], verdicts, strict=True):
                checked = self.answer_template is not None and TURN_TYPES[turn["type"]].answer_check
                answer = next(mine) if checked else None
                verdict.update(answer=answer,
                               agreement=answer_agreement(answer, turn["target"]) if answer is not None else None)
            row["verdicts"] = verdicts
            row["judge_attempts"] = attempts


class TripletJudgeStage(OnPairs, _Judge):
    name = "triplet_judge"
    section = "cir.judge"
    model_role = "triplet_judge"
    items = "modifications"

    @classmethod
    def enabled(cls, config: PipelineConfig) -> bool:
        return super().enabled(config) and config.cir.judge is not None

    @classmethod
    def images_per_request(cls, config: PipelineConfig) -> int:
        return 2

    @classmethod
    def _example(cls, config: PipelineConfig) -> dict[str, Any]:
        mods = [{"category": c, "text": "t"} for c in list(config.cir.modify.categories)[:1] * config.cir.modify.n]
        return dict(EXAMPLE_PAIR, modifications=mods)

    @classmethod
    def example_prompts(cls, config: PipelineConfig) -> list[tuple[str, str, dict[str, Any]]]:
        return [("cir.judge.template", config.cir.judge.template, triplet_template_fields(cls._example(config)))]

    @classmethod
    def schema_check(cls, config: PipelineConfig) -> SchemaCheck:
        return verdict_check("cir.judge.schema", config.cir.judge, config.cir.modify.n)

    @classmethod
    def estimate(cls, est: Estimating) -> Work:
        """Per pair: both images, both captions and the modification texts as written."""
        spec, jspec = est.cfg.cir.modify, est.cfg.cir.judge
        count = est.count(cls)
        mods = [{"category": next(iter(spec.categories)), "text": ""}] * spec.n
        text = est.rendered(jspec.template, triplet_template_fields(dict(EXAMPLE_PAIR, modifications=mods)))
        prompt = (count(text) + 2 * est.caption_out + est.work["modify"].output + 2 * est.vision(jspec.model.model)
                  + CHAT_OVERHEAD)
        bound = verdict_output_bound(spec.n, jspec)
        est.bounds.append(f"triplet_judge {bound} for {spec.n} verdicts per pair")
        return Work(est.cfg.cir.pairing.pairs_per_image, prompt, est.output(cls.name, bound), True, items="pairs")

    def fields(self, row: dict[str, Any]) -> dict[str, Any]:
        return triplet_template_fields(row)

    image_fields = ("ref_image", "tgt_image")

    @classmethod
    def read_images(cls, config: PipelineConfig, row: dict[str, Any]) -> list[Any]:
        return [load_pool_image(row["ref_image"]), load_pool_image(row["tgt_image"])]

    def process(self, rows: list[dict[str, Any]]) -> None:
        for row, verdicts, attempts in self._verdicts(rows):
            row["verdicts"] = [dict(v, answer=None, agreement=None) for v in verdicts]
            row["judge_attempts"] = attempts

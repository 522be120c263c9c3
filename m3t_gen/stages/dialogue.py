"""dialogue: a text LLM reads the dense caption and writes all typed query->target turns in ONE call
(M3T step 2), constrained to the JSON schema where the backend supports it and validated always."""

from __future__ import annotations

from typing import Any

from m3t_gen.backends.base import GenerationResult
from m3t_gen.config import PipelineConfig
from m3t_gen.generation import open_image, parse_json_answer
from m3t_gen.text.checks import degenerate_reason
from m3t_gen.text.schemas import dialogue_decoding_schema
from m3t_gen.stages.base import EXAMPLE_ROW, RunContext, SchemaCheck
from m3t_gen.stages.estimate import CHAT_OVERHEAD, Estimating, Work, dialogue_output_bound
from m3t_gen.stages.generating import GeneratingStage
from m3t_gen.turns import TURN_TYPES, turn_plan, writes_target

def template_fields(row: dict[str, Any], mix: dict[str, int]) -> dict[str, Any]:
    """The fields the dialogue template may use (checked by ``m3t-gen validate``); single-stage templates get
    no caption (there is none yet)."""
    return {
        "caption": row.get("caption") or "",
        "turns": turn_plan(mix),
        "sample": {"key": row["key"], "width": row["width"], "height": row["height"], "text": row["text"] or ""},
    }


class DialogueStage(GeneratingStage):
    name = "dialogue"
    section = "dialogue"
    model_role = "dialogue"
    writes = ("turns", "dialogue_attempts", "caption")  # caption: single-stage, the description it wrote

    @classmethod
    def enabled(cls, config: PipelineConfig) -> bool:
        return config.wants("m3t")

    @classmethod
    def images_per_request(cls, config: PipelineConfig) -> int:
        return int(config.dialogue.source == "image")

    @classmethod
    def example_prompts(cls, config: PipelineConfig) -> list[tuple[str, str, dict[str, Any]]]:
        return [("dialogue.template", config.dialogue.template, template_fields(EXAMPLE_ROW, config.dialogue.mix))]

    @classmethod
    def schema_check(cls, config: PipelineConfig) -> SchemaCheck:
        cfg = config.dialogue
        single = cfg.source == "image"
        probe = {"turns": [{"type": t["type"], "query": "q", **({"target": "t"} if writes_target(t["type"], single) else {})}
                           for t in turn_plan(cfg.mix)]}
        return SchemaCheck("dialogue.schema", cfg.schema_, probe,
                           dialogue_decoding_schema(cfg.mix, cfg.max_text_chars, single_stage=single),
                           "a well-formed dialogue for this mix", f"mix = {sum(cfg.mix.values())} turns")

    @classmethod
    def estimate(cls, est: Estimating) -> Work:
        cfg = est.cfg.dialogue
        count = est.count(cls)
        text = est.rendered(cfg.template, template_fields(EXAMPLE_ROW, cfg.mix))
        if cfg.source == "image":  # single stage: the image instead of a caption
            prompt = count(text) + est.vision(cfg.model.model) + CHAT_OVERHEAD
        else:  # the prompt holds the caption as written, not the example's
            prompt = count(text) - count(EXAMPLE_ROW["caption"]) + est.caption_out + CHAT_OVERHEAD
        bound = dialogue_output_bound(est.cfg)
        est.bounds.append(f"dialogue {bound} for {sum(cfg.mix.values())} turns")
        return Work(1, prompt, est.output(cls.name, bound), True)

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.from_image = self.cfg.source == "image"
        self.decoding_schema = dialogue_decoding_schema(self.cfg.mix, self.cfg.max_text_chars,
                                                        single_stage=self.from_image)
        self.expected_types = [t["type"] for t in turn_plan(self.cfg.mix)]

    def fields(self, row: dict[str, Any]) -> dict[str, Any]:
        return template_fields(row, self.cfg.mix)

    @classmethod
    def read_images(cls, config: PipelineConfig, row: dict[str, Any]) -> list[Any]:
        # single stage: the MLLM sees the image itself
        return [open_image(row)] if config.dialogue.source == "image" else []

    def _parse(self, row: dict[str, Any], result: GenerationResult) -> tuple[list | None, str | None]:
        data, error = parse_json_answer(result, [self.file_schema, self.decoding_schema])
        if error:
            return None, error
        turns = data["turns"]
        types = [t["type"] for t in turns]
        if types != self.expected_types:
            return None, f"wrong_turn_mix: got {types}"
        for turn in turns:
            for field in ("query", "target"):
                bad = degenerate_reason(turn.get(field, "x"))
                if bad:
                    return None, f"{bad}_turn: {turn['type']} {field} {turn[field][:120]!r}"
            if not writes_target(turn["type"], self.from_image):
                turn["target"] = row["caption"]  # M3T: the retrieval target IS the dense caption
        queries = [t["query"].strip().lower() for t in turns]
        if len(set(queries)) < len(queries):
            return None, "repeated_query: two turns ask the same question"
        return turns, None

    def process(self, rows: list[dict[str, Any]]) -> None:
        for row, turns, attempts in self.generate(rows, self._parse, json_schema=self.decoding_schema):
            row["turns"] = [{k: t[k] for k in ("type", "query", "target")} for t in turns]
            row["dialogue_attempts"] = attempts
            if self.from_image:  # the description written in the same call serves as the dense caption
                row["caption"] = next(t["target"] for t in turns if TURN_TYPES[t["type"]].target_is_caption)

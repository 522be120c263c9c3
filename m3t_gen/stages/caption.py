"""caption: an MLLM writes an objective dense caption of each image (M3T step 1). GPU actor pool."""

from __future__ import annotations

from typing import Any

from m3t_gen.backends.base import GenerationResult, get_backend
from m3t_gen.config import PipelineConfig
from m3t_gen.generation import generate_validated, open_image
from m3t_gen.quality import degenerate_reason
from m3t_gen.stages.base import EXAMPLE_ROW, RunContext, Stage
from m3t_gen.templates import load_template


def template_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The fields the caption template may use (checked by ``m3t-gen validate``)."""
    return {"sample": {"key": row["key"], "width": row["width"], "height": row["height"], "text": row["text"] or ""}}


class CaptionStage(Stage):
    name = "caption"
    section = "caption"
    model_role = "caption"
    generates = True
    writes = ("caption", "caption_attempts")

    @classmethod
    def enabled(cls, config: PipelineConfig) -> bool:
        return not config.single_stage()  # single-stage: the dialogue MLLM writes the description

    @classmethod
    def images_per_request(cls, config: PipelineConfig) -> int:
        return 1

    @classmethod
    def example_prompts(cls, config: PipelineConfig) -> list[tuple[str, str, dict[str, Any]]]:
        return [("caption.template", config.caption.template, template_fields(EXAMPLE_ROW))]

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.cfg = ctx.config.caption
        self.template = load_template(self.cfg.template, ctx.config.base_dir)
        self.backend = get_backend(self.cfg.model.backend)(self.cfg.model)

    def _messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        prompt = self.template.render(**template_fields(row))
        return [{"role": "user", "content": [{"type": "image", "image": open_image(row)},
                                             {"type": "text", "text": prompt}]}]

    def _parse(self, row: dict[str, Any], result: GenerationResult) -> tuple[str | None, str | None]:
        # Control characters (seen from weak models) have no place in a caption; whitespace folds to spaces.
        text = " ".join("".join(c for c in result.text if c.isprintable() or c.isspace()).split())
        bad = degenerate_reason(text, self.cfg.min_chars)
        if bad:
            return None, f"{bad}_caption: {text[:120]!r} (finish_reason={result.finish_reason})"
        return text, None

    def process(self, rows: list[dict[str, Any]]) -> None:
        for row, caption, attempts in generate_validated(
            self.backend, rows, stage=self.name, run_seed=self.ctx.config.seed, sampling=self.cfg.sampling,
            max_attempts=self.cfg.max_attempts, build_messages=self._messages, parse=self._parse,
        ):
            row["caption"] = caption
            row["caption_attempts"] = attempts

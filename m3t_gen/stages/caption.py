"""caption: an MLLM writes an objective dense caption of each image (M3T step 1). GPU actor pool."""

from __future__ import annotations

from typing import Any

from m3t_gen.backends.base import GenerationResult
from m3t_gen.config import PipelineConfig
from m3t_gen.generation import open_image
from m3t_gen.text.checks import degenerate_reason
from m3t_gen.stages.base import EXAMPLE_ROW
from m3t_gen.stages.estimate import CHAT_OVERHEAD, Estimating, Work
from m3t_gen.stages.generating import GeneratingStage


def template_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The fields the caption template may use (checked by ``m3t-gen validate``)."""
    return {"sample": {"key": row["key"], "width": row["width"], "height": row["height"], "text": row["text"] or ""}}


class CaptionStage(GeneratingStage):
    name = "caption"
    section = "caption"
    model_role = "caption"
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

    @classmethod
    def estimate(cls, est: Estimating) -> Work:
        cfg = est.cfg.caption
        prompt = est.count(cls)(est.rendered(cfg.template, template_fields(EXAMPLE_ROW)))
        est.bounds.append(f"caption max_tokens {cfg.sampling.max_tokens}")
        return Work(1, prompt + CHAT_OVERHEAD + est.vision(cfg.model.model), est.caption_out, True)

    def fields(self, row: dict[str, Any]) -> dict[str, Any]:
        return template_fields(row)

    @classmethod
    def read_images(cls, config: PipelineConfig, row: dict[str, Any]) -> list[Any]:
        return [open_image(row)]

    def _parse(self, row: dict[str, Any], result: GenerationResult) -> tuple[str | None, str | None]:
        # Control characters (seen from weak models) have no place in a caption; whitespace folds to spaces.
        text = " ".join("".join(c for c in result.text if c.isprintable() or c.isspace()).split())
        bad = degenerate_reason(text, self.cfg.min_chars)
        if bad:
            return None, f"{bad}_caption: {text[:120]!r} (finish_reason={result.finish_reason})"
        return text, None

    def process(self, rows: list[dict[str, Any]]) -> None:
        for row, caption, attempts in self.generate(rows, self._parse):
            row["caption"] = caption
            row["caption_attempts"] = attempts

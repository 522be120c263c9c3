"""The generating-stage base: what every stage that writes text with a model shares.

Caption, dialogue, modify and both judges render their section's template over the row's fields, show the model
the row's images (none, one or two) before the prompt, generate with the section's sampling, retries and decoding
schema (``m3t_gen.generation.generate_validated``: seeds per key and attempt, every failure a reason), then parse
and store. A subclass supplies only ``fields`` (what its template sees), ``images``, its parser and what it stores;
the construction of its backend, template and answer schema, and the user message, live here once.
"""

from __future__ import annotations

from typing import Any

from m3t_gen.backends.registry import get_backend
from m3t_gen.generation import Builder, Parser, generate_validated
from m3t_gen.text.schemas import load_schema
from m3t_gen.stages.base import RunContext, Stage
from m3t_gen.text.templates import load_template


def user_message(prompt: str, images: list[Any]) -> list[dict[str, Any]]:
    """One user turn: the images first (in order), then the prompt; a plain string when there is no image."""
    if not images:
        return [{"role": "user", "content": prompt}]
    return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                         {"type": "text", "text": prompt}]}]


class GeneratingStage(Stage):
    generates = True

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.cfg = self.settings(ctx.config)
        self.template = load_template(self.cfg.template, ctx.config.base_dir)
        schema = getattr(self.cfg, "schema_", None)
        self.file_schema = load_schema(schema, ctx.config.base_dir) if schema else None
        self.backend = get_backend(self.cfg.model.backend)(self.cfg.model)

    def fields(self, row: dict[str, Any]) -> dict[str, Any]:
        """The fields the section's template is rendered with (the same function `validate` checks)."""
        raise NotImplementedError

    def images(self, row: dict[str, Any]) -> list[Any]:
        """The images the model sees before the prompt."""
        return []

    def messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        return user_message(self.template.render(**self.fields(row)), self.images(row))

    def generate(self, rows: list[dict[str, Any]], parse: Parser, *, json_schema: dict[str, Any] | None = None,
                 build: Builder | None = None, seed_offset: int = 0) -> list[tuple[dict[str, Any], Any, int]]:
        """(row, parsed value, attempts) for the rows that succeeded; the others are rejected in place."""
        return generate_validated(
            self.backend, rows, stage=self.name, run_seed=self.ctx.config.seed + seed_offset,
            sampling=self.cfg.sampling, max_attempts=self.cfg.max_attempts, build_messages=build or self.messages,
            parse=parse, json_schema=json_schema)


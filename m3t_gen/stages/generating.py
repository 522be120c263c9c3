"""The generating-stage base: what every stage that writes text with a model shares.

Caption, dialogue, modify and both judges render their section's template over the row's fields, show the model
the row's images (none, one or two) before the prompt, generate with the section's sampling, retries and decoding
schema (``m3t_gen.generation.generate_validated``: seeds per key and attempt, every failure a reason), then parse
and store. A subclass supplies only ``fields`` (what its template sees), ``images``, its parser and what it stores;
the construction of its backend, template and answer schema, and the user message, live here once.

Decoding the images need not be the model actor's work: with ``resources.decode_cpus`` > 0 (off by default:
on a 2-vCPU CPU node it measured slower, docs/BENCHMARKS.md), a stage that shows images gets a Ray Data task
before its actor pool (``decode_ahead``) that decodes them (JPEG bytes, or pool images read by seek) into the
row's transient ``decoded`` field; ``images`` then only wraps those pixels. Decoding a 512 px JPEG takes ~2 ms,
more than vLLM's own work on the request (issue 27): in a task it runs beside the engine, on other cores, which
pays only where the node has cores to spare (the pixels also cross the object store).
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa

from m3t_gen.backends.registry import get_backend
from m3t_gen.config import PipelineConfig
from m3t_gen.generation import Builder, Parser, generate_validated, pack_images, unpack_images
from m3t_gen.rows import DECODED, OK
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
    transient: ClassVar[tuple[str, ...]] = ("decoded",)
    image_fields: ClassVar[tuple[str, ...]] = ("image",)  # what read_images reads

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

    @classmethod
    def read_images(cls, config: PipelineConfig, row: dict[str, Any]) -> list[Any]:
        """The images the model sees before the prompt, decoded from the row (RGB PIL images; no model needed:
        the decode task calls it)."""
        return []

    def images(self, row: dict[str, Any]) -> list[Any]:
        """``read_images``, from the pixels the decode task left in the row when it ran."""
        packed = row.get("decoded")
        return unpack_images(packed) if packed is not None else self.read_images(self.ctx.config, row)

    @classmethod
    def decodes_ahead(cls, config: PipelineConfig) -> bool:
        return cls.images_per_request(config) > 0 and cls.settings(config).resources.decode_cpus > 0

    @classmethod
    def decode_ahead(cls, batch: pa.Table, config: PipelineConfig) -> pa.Table:
        """The decode task: each live row's images into its ``decoded`` field. A row whose images fail to decode
        is left without, so the actor decodes it itself and fails or rejects it exactly as it would have."""
        status, values = batch.column("status").to_pylist(), []
        for i, row in enumerate(batch.select(cls.image_fields).to_pylist()):
            try:
                values.append(pack_images(cls.read_images(config, row)) if status[i] == OK else None)
            except Exception:
                values.append(None)
        at = batch.schema.get_field_index("decoded")
        return batch.set_column(at, batch.schema.field(at), pa.array(values, type=DECODED))

    def messages(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        return user_message(self.template.render(**self.fields(row)), self.images(row))

    def generate(self, rows: list[dict[str, Any]], parse: Parser, *, json_schema: dict[str, Any] | None = None,
                 build: Builder | None = None, seed_offset: int = 0) -> list[tuple[dict[str, Any], Any, int]]:
        """(row, parsed value, attempts) for the rows that succeeded; the others are rejected in place."""
        return generate_validated(
            self.backend, rows, stage=self.name, run_seed=self.ctx.config.seed + seed_offset,
            sampling=self.cfg.sampling, max_attempts=self.cfg.max_attempts, build_messages=build or self.messages,
            parse=parse, json_schema=json_schema)


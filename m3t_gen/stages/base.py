"""The one stage protocol.

A stage is a callable class: ``__init__`` does the heavy setup once per Ray actor (load a model, start an
engine), ``process(rows)`` works on the live rows of a batch in place, and ``__call__`` adapts that to
Ray Data's ``map_batches`` (Arrow batch in, Arrow batch out), passing rejected and marker rows through
and attributing the batch's time to its rows. Its Ray resources come from config (``resources()``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa

from m3t_gen.config import PipelineConfig, Resources
from m3t_gen.rows import OK, add_timing, to_table


@dataclass(frozen=True)
class RunContext:
    """What every stage needs to know about the run; picklable, shipped to each actor."""

    config: PipelineConfig
    config_hash: str
    template_hashes: dict[str, str] = field(default_factory=dict)
    model_names: dict[str, str] = field(default_factory=dict)


class Stage:
    name: ClassVar[str]
    row_schema: ClassVar[pa.Schema | None] = None  # None: the sample row schema (m3t_gen.rows.ROW_SCHEMA)

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    @classmethod
    def resources(cls, config: PipelineConfig) -> Resources:
        return Resources(batch_size=64, concurrency=1, num_gpus=0, num_cpus=0.25)

    @classmethod
    def enabled(cls, config: PipelineConfig) -> bool:
        return True

    @classmethod
    def uses_actor(cls) -> bool:
        """Actor pool (model held between batches) or stateless tasks."""
        return True

    def process(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        live = [r for r in rows if r["status"] == OK]
        if live:
            start = time.perf_counter()
            self.process(live)
            share = (time.perf_counter() - start) / len(live)
            for r in live:
                add_timing(r, self.name, share)
        return to_table(rows, self.row_schema)

"""The one stage protocol.

A stage is a callable class: ``__init__`` does the heavy setup once per Ray actor (load a model, start an
engine), ``process(rows)`` works on the live rows of a batch in place, and ``__call__`` adapts that to
Ray Data's ``map_batches`` (Arrow batch in, Arrow batch out), passing rejected and marker rows through
and attributing the batch's time to its rows. Its Ray resources come from config (``resources()``).

With ``resources.batches_in_flight > 1`` several ``__call__``s run at once in one actor's threads; ``process``
must then be thread-safe (stages keep no per-batch state on ``self``; backends handle concurrent calls).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import pyarrow as pa

from m3t_gen.config import PipelineConfig, Resources
from m3t_gen.rows import OK, PAIR_SCHEMA, add_timing, to_table


# What `m3t-gen validate` renders every template with, and `m3t-gen plan` counts prompt tokens from.
EXAMPLE_ROW = {
    "key": "example_000000", "width": 640, "height": 480, "text": "a photo of a cat on a sofa",
    "caption": "A grey cat lies on a red sofa next to a window; a lamp stands on the left.",
}
EXAMPLE_PAIR = {
    "ref_caption": "A red car parked on a street in front of a brick house.",
    "tgt_caption": "A blue car parked on a snowy street in front of a brick house.",
    "similarity": 0.81,
}


class SchemaCheck(NamedTuple):
    """A stage's answer schema as `validate` checks it: the file loads, and a well-formed answer for this config
    (``probe``) passes both it and the narrowed schema generation is constrained with."""

    where: str  # the config path of the schema file
    name: str
    probe: dict[str, Any]
    decoding: dict[str, Any]
    what: str  # the probe, in words (for the error)
    note: str  # what loading it showed (for the notes)


@dataclass(frozen=True)
class RunContext:
    """What every stage needs to know about the run; picklable, shipped to each actor."""

    config: PipelineConfig
    config_hash: str
    template_hashes: dict[str, str] = field(default_factory=dict)
    model_names: dict[str, str] = field(default_factory=dict)
    # Read-only data built once on the driver and handed to every actor through Ray's object store (ObjectRefs
    # by name; each actor ray.get()s them once, zero-copy for numpy arrays), e.g. the CIR pool's embeddings.
    shared: dict[str, Any] = field(default_factory=dict)


class SharedClock:
    """Splits an actor's wall time among the calls running in it at once, so that busy seconds summed over rows
    stay actor seconds (what ``m3t-gen plan`` divides by) when batches overlap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, float] = {}  # call token -> seconds charged so far
        self._last = time.perf_counter()

    def _advance(self) -> None:
        now = time.perf_counter()
        if self._running:
            share = (now - self._last) / len(self._running)
            for token in self._running:
                self._running[token] += share
        self._last = now

    def start(self) -> int:
        token = threading.get_ident()
        with self._lock:
            self._advance()
            self._running[token] = 0.0
        return token

    def stop(self, token: int) -> float:
        with self._lock:
            self._advance()
            return self._running.pop(token)


# Fields any stage may set on a row besides its declared ``writes``: the decision and the bookkeeping.
BOOKKEEPING = frozenset({"status", "reject_stage", "reject_reason", "reject_detail", "image", "timings", "tokens",
                         "workers", "reasoning"})


class Stage:
    """A stage's class is its one declaration: name, pass, config section, the model it runs (lineage, plan),
    whether it writes text from a template, the row fields it writes, when it is enabled and its resources.
    The recipe (m3t_gen/run/recipe.py) lists the stages in order; everything else reads these."""

    name: ClassVar[str]
    recipe_pass: ClassVar[str] = "sample"  # "sample": one row per image; "cir": one row per image pair
    section: ClassVar[str | None] = None  # dotted path of the stage's settings in the config
    model_role: ClassVar[str | None] = None  # the lineage key of the model it runs: caption, dialogue, modify, reward
    generates: ClassVar[bool] = False  # writes text with a generation model from the section's template
    writes: ClassVar[tuple[str, ...]] = ()  # row fields it sets (besides BOOKKEEPING); checked under M3T_GEN_CHECK_ROWS
    row_schema: ClassVar[pa.Schema | None] = None  # None: the sample row schema (m3t_gen.rows.ROW_SCHEMA)
    transient: ClassVar[tuple[str, ...]] = ()  # row fields made for this stage alone: cleared on the way out

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.clock = SharedClock()

    @classmethod
    def resources(cls, config: PipelineConfig) -> Resources:
        """From the section's ``resources`` (generation stages fill in the backend's batches in flight)."""
        section = cls.settings(config)
        if hasattr(section, "stage_resources"):
            return section.stage_resources()
        if isinstance(getattr(section, "resources", None), Resources):
            return section.resources
        return Resources(batch_size=64, concurrency=1, num_gpus=0, num_cpus=0.25)

    @classmethod
    def enabled(cls, config: PipelineConfig) -> bool:
        return True

    @classmethod
    def decodes_ahead(cls, config: PipelineConfig) -> bool:
        """Whether a Ray Data task decodes this stage's images before its actors (``GeneratingStage``)."""
        return False

    @classmethod
    def images_per_request(cls, config: PipelineConfig) -> int:
        """Images each of its model requests carries (validate checks the engine accepts that many; plan counts
        their vision tokens)."""
        return 0

    @classmethod
    def example_prompts(cls, config: PipelineConfig) -> list[tuple[str, str, dict[str, Any]]]:
        """(config path, template name, the fields it gets on the example row or pair) of every template it
        renders: `validate` checks each renders with exactly these fields."""
        return []

    @classmethod
    def schema_check(cls, config: PipelineConfig) -> SchemaCheck | None:
        return None

    @classmethod
    def estimate(cls, est: "Estimating") -> "Work | None":  # noqa: F821 - m3t_gen.stages.estimate
        """Its cost per input image for `m3t-gen plan` (prompt and output tokens, requests); every stage with a
        model answers (a test checks), stages without one return None."""
        return None

    @classmethod
    def templates(cls, config: PipelineConfig) -> dict[str, str]:
        """The prompt templates it renders, by lineage name (hashed into every sample, kept in the manifest)."""
        return {cls.name: cls.settings(config).template} if cls.generates else {}

    @classmethod
    def uses_actor(cls) -> bool:
        """Actor pool (model held between batches) or stateless tasks."""
        return True

    def process(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def _check_writes(self, before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
        allowed = BOOKKEEPING | set(self.writes)
        for old, new in zip(before, after):
            changed = {k for k in new if old.get(k) != new[k]}
            if not changed <= allowed:
                raise AssertionError(f"stage {self.name} set {sorted(changed - allowed)} on row {new.get('key')!r}, "
                                     f"which it does not declare in writes {self.writes}")

    @staticmethod
    def worker_id() -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def close(self) -> None:
        """Shut the stage's engine down (its processes, its GPU memory). Ray Data deletes the stage object when
        the actor pool winds down (``__ray_shutdown__``), which lands here."""
        backend = self.__dict__.pop("backend", None)
        if backend is not None:
            backend.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be half gone
            pass

    @classmethod
    def settings(cls, config: Any) -> Any:
        """The stage's config section (of a PipelineConfig or of its JSON dump in a manifest); None if absent."""
        node = config
        for part in (cls.section or "").split(".") if cls.section else []:
            node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
            if node is None:
                return None
        return node if cls.section else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        live = [r for r in rows if r["status"] == OK]
        if live:
            before = [dict(r) for r in live] if os.environ.get("M3T_GEN_CHECK_ROWS") else None
            token = self.clock.start()
            try:
                self.process(live)
            finally:
                seconds = self.clock.stop(token)
            if before is not None:
                self._check_writes(before, live)
            share = seconds / len(live)
            worker = self.worker_id() if self.uses_actor() else None
            for r in live:
                add_timing(r, self.name, share)
                if worker:
                    workers = json.loads(r.get("workers") or "{}")
                    workers[self.name] = worker
                    r["workers"] = json.dumps(workers)
        for r in rows:
            for field in self.transient:
                r[field] = None
        return to_table(rows, self.row_schema)


class OnPairs:
    """Mixed into a stage of the CIR pass: one row per mined image pair (the pair row schema), run when the
    recipe asks for CIR."""

    recipe_pass: ClassVar[str] = "cir"
    row_schema: ClassVar[pa.Schema | None] = PAIR_SCHEMA

    @classmethod
    def enabled(cls, config: PipelineConfig) -> bool:
        return config.wants("cir")


class RuleFilter(Stage):
    """A filter: stateless tasks (no model) that apply ``rule(row, its config section, stage name)`` to each
    live row. The rule decides from recorded scores only, so `m3t-gen refilter` re-runs it without a model."""

    rule: ClassVar[Any]  # a staticmethod

    @classmethod
    def uses_actor(cls) -> bool:
        return False

    def process(self, rows: list[dict[str, Any]]) -> None:
        spec = self.settings(self.ctx.config)
        for row in rows:
            self.rule(row, spec, self.name)

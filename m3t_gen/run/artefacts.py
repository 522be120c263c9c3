"""A run's artefacts as types: the manifest (``manifest.json``), the per-shard stats markers (``stats/<shard>.json``),
the CIR part stats (``triplet_stats/<part>.json``) and the negatives markers (``negatives_stats/<shard>.json``).

The writers build these objects and write ``dumps()``; every reader (the pipeline's resume and summary, refilter,
card, plan --from-run, inspect, export, the quality report) loads them with ``load`` / ``from_json`` and reads
attributes. The JSON is what the writers wrote before these types existed, byte for byte: the same keys in the same
order, so earlier outputs stay readable and nothing hashed changes.

Older runs (and outputs made by hand or by other tools) lack fields added later: ``from_json`` fills each missing
field from its default below, the one place those defaults live. Written back (refilter rewrites the manifest), a
record keeps the keys it was read with in their order, keys it does not know included; a field that was absent is
written only once it differs from its default.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, TypeVar

R = TypeVar("R", bound="Record")


def _json_name(f: dataclasses.Field) -> str:
    return f.metadata.get("json", f.name)


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


@dataclasses.dataclass
class Record:
    """Base of the artefact types. ``OPTIONAL`` fields are written only when set (not None); ``NESTED`` names the
    record type of a field that holds a record (or a list of them)."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset()
    NESTED: ClassVar[dict[str, type[Record]]] = {}
    ORDER: ClassVar[tuple[str, ...]] = ()  # the fields in the order they are written (default: declaration order)

    # How the record was read: the source's keys in order (None: built by a writer) and the keys it did not know.
    source_keys: tuple[str, ...] | None = dataclasses.field(default=None, repr=False, compare=False, kw_only=True)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False, kw_only=True)

    @classmethod
    def _fields(cls) -> list[dataclasses.Field]:
        own = [f for f in dataclasses.fields(cls) if f.name not in ("source_keys", "extra")]
        rank = {name: n for n, name in enumerate(cls.ORDER)}
        return sorted(own, key=lambda f: rank.get(f.name, len(rank)))  # stable: declaration order otherwise

    @classmethod
    def from_json(cls: type[R], data: Any) -> R:
        """The record from its JSON object; a missing (or null) field takes its default, a required one (no default)
        missing is a ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        values: dict[str, Any] = {}
        known = set()
        for f in cls._fields():
            key = _json_name(f)
            known.add(key)
            value = data.get(key)
            if value is None and f.name not in cls.OPTIONAL:
                value = _default(f)
                if value is dataclasses.MISSING:
                    raise ValueError(f"{cls.__name__}: no {key!r}")
            elif value is not None and f.name in cls.NESTED:
                kind = cls.NESTED[f.name]
                value = [kind.from_json(v) for v in value] if isinstance(value, list) else kind.from_json(value)
            values[f.name] = value
        return cls(**values, source_keys=tuple(data), extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def loads(cls: type[R], text: str | bytes) -> R:
        return cls.from_json(json.loads(text))

    def to_json(self) -> dict[str, Any]:
        """The JSON object as written: a record a writer built has its fields in declaration order (OPTIONAL ones
        only when set); a record that was read keeps the source's keys and their order, then the fields it gained."""
        by_key = {_json_name(f): f for f in self._fields()}
        order = list(self.source_keys or ()) + [k for k in by_key if k not in (self.source_keys or ())]
        out: dict[str, Any] = {}
        for key in order:
            if key in self.extra:
                out[key] = self.extra[key]
                continue
            f = by_key[key]
            value = getattr(self, f.name)
            if value is None and f.name in self.OPTIONAL:
                continue
            if self.source_keys is not None and key not in self.source_keys and value == _default(f):
                continue  # absent when read and still as it was: not written
            out[key] = _plain(value)
        return out

    def dumps(self) -> bytes:
        """The bytes the writers write (``indent=1``)."""
        return json.dumps(self.to_json(), indent=1).encode()


def config_value(config: Any, dotted: str, default: Any = None) -> Any:
    """A value of a run's config as JSON (the manifest's ``config``) by its dotted path (``"dialogue.mix"``);
    ``default`` where the config (an older run's, one made by hand) lacks it or holds null."""
    value = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            return default
    return value


# ------------------------------------------------------------------------------------------- per-shard markers


@dataclasses.dataclass
class PassStats(Record):
    """What a completion marker of the sample pass (a shard) or of the CIR pass (a part) counts: the per-stage table
    (``recipe.stage_table``) sums these over the shards or parts."""

    kept: int = 0
    rejected: int = 0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)  # "stage:reason" -> rows
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # actor seconds per stage
    stage_tokens: dict[str, int] = dataclasses.field(default_factory=dict)  # generated tokens and usage per stage
    rows_per_worker: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    config_hash: str = ""


@dataclasses.dataclass
class ShardStats(PassStats):
    """``stats/<shard>.json``: one input shard's counts, written last (the shard's completion marker)."""

    ORDER = ("shard", "source", "read", "kept", "pool", "rejected", "reasons", "turns_kept", "turns_dropped", "tars",
             "filtered_tars", "shard_errors", "skipped_entries", "repairs", "config_hash", "rows_per_worker",
             "stage_seconds", "stage_tokens")

    shard: str = dataclasses.field(kw_only=True)
    source: str = ""
    read: int = 0
    pool: int = 0  # images written to the CIR pool
    turns_kept: int = 0
    turns_dropped: int = 0
    tars: list[str] = dataclasses.field(default_factory=list)
    filtered_tars: list[str] = dataclasses.field(default_factory=list)
    shard_errors: list[str] = dataclasses.field(default_factory=list)
    skipped_entries: dict[str, int] = dataclasses.field(default_factory=dict)
    repairs: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TripletStats(PassStats):
    """``triplet_stats/<part>.json``: one CIR part's counts, written last (the part's completion marker)."""

    ORDER = ("part", "pairs", "kept", "rejected", "reasons", "stage_seconds", "stage_tokens", "rows_per_worker",
             "pool_fingerprint", "config_hash")

    part: str = dataclasses.field(kw_only=True)
    pairs: int = 0
    pool_fingerprint: str | None = None


@dataclasses.dataclass
class NegativeCounts(Record):
    """Mined candidates and their decisions: one shard's (``NegativesStats``) or every shard's (``NegativesSummary``)."""

    candidates: int = 0
    kept: int = 0
    dropped: int = 0
    turns: int = 0
    turns_with_negatives: int = 0
    kept_by_type: dict[str, int] = dataclasses.field(default_factory=dict)
    candidates_by_type: dict[str, int] = dataclasses.field(default_factory=dict)
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class NegativesStats(NegativeCounts):
    """``negatives_stats/<shard>.json``: one shard's mined candidates and decisions (the shard's marker)."""

    ORDER = ("shard", "fingerprint")

    shard: str = dataclasses.field(kw_only=True)
    fingerprint: str | None = None


# ------------------------------------------------------------------------------------------- the manifest


@dataclasses.dataclass
class StageRow(Record):
    """A row of a pass's per-stage table (the manifest's ``stages`` and ``cir.stages``)."""

    OPTIONAL = frozenset({"output_tokens", "requests", "prompt_tokens", "image_tokens", "reasoning_tokens"})

    stage: str
    rows_in: int = dataclasses.field(default=0, metadata={"json": "in"})
    kept: int = 0
    rejected: int = 0
    busy_seconds: float = 0.0
    output_tokens: int | None = None
    requests: int | None = None
    prompt_tokens: int | None = None
    image_tokens: int | None = None
    reasoning_tokens: int | None = None


@dataclasses.dataclass
class Totals(Record):
    """The sample pass over every input shard: read = kept + rejected."""

    read: int = 0
    kept: int = 0
    rejected: int = 0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    repairs: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped_entries: dict[str, int] = dataclasses.field(default_factory=dict)
    shard_errors: dict[str, list[str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CirSummary(Record):
    """The manifest's ``cir``: the pool, the pairs mined, the triplets kept and rejected, the CIR stages. Counts are
    None where unknown (a summary made of nothing)."""

    NESTED = {"stages": StageRow}

    pool: int | None = None
    pairs: int | None = None
    pool_fingerprint: str | None = None
    kept: int | None = None
    rejected: int | None = None
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    stages: list[StageRow] = dataclasses.field(default_factory=list)
    rows_per_worker: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class NegativesSummary(NegativeCounts):
    """The manifest's ``negatives``: the negatives markers of every shard summed."""

    ORDER = ("shards",)

    shards: int = 0

    @classmethod
    def of(cls, stats: list[NegativesStats]) -> NegativesSummary:
        out = cls(shards=len(stats))
        for name in ("candidates", "kept", "dropped", "turns", "turns_with_negatives"):
            setattr(out, name, sum(getattr(s, name) for s in stats))
        for name in ("kept_by_type", "candidates_by_type", "reasons"):
            total: dict[str, int] = {}
            for s in stats:
                for k, v in getattr(s, name).items():
                    total[k] = total.get(k, 0) + v
            setattr(out, name, dict(sorted(total.items())))
        return out


@dataclasses.dataclass
class Manifest(Record):
    """``manifest.json``: the config and lineage of a finished run, its counts and per-stage table, the CIR and
    negatives summaries, the quality report (m3t_gen/run/quality.py) and the refilters applied since."""

    OPTIONAL = frozenset({"cir", "negatives", "refilters", "quality"})
    NESTED = {"totals": Totals, "stages": StageRow, "cir": CirSummary, "negatives": NegativesSummary}

    name: str = ""
    recipe: str = ""
    config_hash: str = ""
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # the config as JSON (an older run's may
    versions: dict[str, str] = dataclasses.field(default_factory=dict)  # not validate today: read with setting())
    templates: dict[str, str] = dataclasses.field(default_factory=dict)  # stage -> template hash
    template_texts: dict[str, str] = dataclasses.field(default_factory=dict)  # stage -> the text used
    models: dict[str, str] = dataclasses.field(default_factory=dict)  # role -> model
    started: str | None = None
    finished: str | None = None
    wall_seconds: float | None = None
    shards: int = 0
    shards_this_run: int = 0
    totals: Totals = dataclasses.field(default_factory=Totals)
    stages: list[StageRow] = dataclasses.field(default_factory=list)
    cir: CirSummary | None = None
    negatives: NegativesSummary | None = None
    refilters: list[dict[str, Any]] | None = None  # [{set: [overrides], previous_config_hash}]
    quality: dict[str, Any] | None = None  # the quality report as m3t_gen/run/quality.py wrote it

    def setting(self, dotted: str, default: Any = None) -> Any:
        """A value of the run's config by its dotted path (``config_value``)."""
        return config_value(self.config, dotted, default)

    def recipe_parts(self) -> list[str]:
        """The recipe's parts ("m3t+cir" -> m3t, cir): the manifest's, else its config's, else m3t."""
        recipe = self.recipe or self.setting("recipe") or "m3t"
        return [part for part in str(recipe).split("+") if part]

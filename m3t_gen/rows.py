"""A sample is a plain dict; between stages it travels as a row of one fixed Arrow schema.

Every row read stays in the stream to the end: a stage works on rows whose status is ``ok`` and passes
the others through, so the writer sees each row once and rows read = kept + rejected holds by construction.
After the last row of an input shard the reader emits one ``marker`` row carrying the shard's row count,
which tells the writer when the shard is complete.

Values read by several stages are Arrow types, not JSON text: ``turns`` and ``modifications`` are lists of
structs, ``scores`` a struct, ``flags`` a list of strings (a row read back holds every struct field, the ones a
stage did not set as None; ``compact`` drops those). The per-stage bookkeeping maps (timings, tokens,
reasoning, workers) and the source's own metadata stay JSON: their keys are open (stage names, the source's
fields) and only the writer reads them.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

OK, REJECTED, MARKER = "ok", "rejected", "marker"

# One generated turn; the filter adds its decision and the scores behind it.
TURN = pa.struct([
    ("type", pa.string()), ("query", pa.string()), ("target", pa.string()),
    ("score", pa.float64()), ("rank", pa.int32()), ("prob", pa.float64()),  # CLIP cosine, self-retrieval
    ("verdict", pa.string()), ("judge_score", pa.int32()), ("judge_reason", pa.string()),  # the judge's
    ("answer", pa.string()), ("agreement", pa.float64()),                   # answerability
    ("kept", pa.bool_()), ("reason", pa.string()),                          # the filter's decision
])
# The judge's record for one turn or modification text (m3t_gen/stages/judge.py); the filter decides from it.
VERDICT = pa.struct([
    ("verdict", pa.string()), ("score", pa.int32()), ("reason", pa.string()),
    ("answer", pa.string()), ("agreement", pa.float64()),
])
# What the reward stage recorded (caption first, then one entry per turn); the filter decides from it.
SCORES = pa.struct([
    ("caption", pa.float64()), ("turns", pa.list_(pa.float64())),
    ("k", pa.int32()), ("caption_rank", pa.int32()), ("caption_prob", pa.float64()),  # self-retrieval, if on
    ("turn_ranks", pa.list_(pa.int32())), ("turn_probs", pa.list_(pa.float64())),
])
MODIFICATION = pa.struct([
    ("category", pa.string()), ("text", pa.string()),
    ("score", pa.float64()),
    ("verdict", pa.string()), ("judge_score", pa.int32()), ("judge_reason", pa.string()),
    ("kept", pa.bool_()), ("reason", pa.string()),
])
TRIPLET_SCORES = pa.struct([
    ("target_caption", pa.float64()), ("image_similarity", pa.float64()), ("directional", pa.float64()),
    ("modifications", pa.list_(pa.float64())),
])

# An image decoded ahead of a generating stage (8-bit RGB, row-major; ``m3t_gen.generation.pack_images``): a
# transient field, set by the decode task before a model stage and cleared by that stage, never written.
DECODED = pa.list_(pa.struct([("width", pa.int32()), ("height", pa.int32()), ("rgb", pa.large_binary())]))

ROW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),            # unique and stable: {shard_id}_{index in shard}
        ("shard", pa.string()),          # input shard id (work unit for resume and stats)
        ("source_key", pa.string()),     # the key as found in the input
        ("url", pa.string()),
        ("text", pa.string()),           # web alt-text; data only, never a template
        ("meta", pa.string()),           # the source's own metadata (img2dataset's KEY.json), JSON
        ("image", pa.binary()),          # JPEG (or the original bytes when nothing needed changing)
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("image_sha256", pa.string()),   # of the bytes written to the output
        ("source_sha256", pa.string()),  # of the bytes as read (exact dedupe)
        ("phash", pa.string()),          # 64-bit perceptual hash, hex (near-duplicate dedupe)
        ("reencoded", pa.bool_()),
        ("flags", pa.list_(pa.string())),  # repairs made (e.g. text_truncated)
        ("status", pa.string()),         # ok | rejected | marker
        ("reject_stage", pa.string()),
        ("reject_reason", pa.string()),
        ("reject_detail", pa.string()),  # JSON: the values behind the decision
        ("caption", pa.string()),
        ("caption_attempts", pa.int32()),
        ("image_emb", pa.binary()),      # CLIP image embedding, float32, L2-normalised (computed once per run)
        ("caption_emb", pa.binary()),    # CLIP text embedding of the caption
        ("turns", pa.list_(TURN)),
        ("dialogue_attempts", pa.int32()),
        ("scores", SCORES),
        ("verdicts", pa.list_(VERDICT)),  # the judge's, one per turn (judge stage on)
        ("judge_attempts", pa.int32()),
        ("timings", pa.string()),        # JSON {stage: seconds attributed to this row}
        ("tokens", pa.string()),         # JSON {stage: output tokens, "stage.prompt": ...}: see add_usage
        ("reasoning", pa.string()),      # JSON {stage: reasoning text of the accepted answer} (reasoning models)
        ("workers", pa.string()),        # JSON {stage: "host:pid"}: which actor served the row (balance, debugging)
        ("shard_rows", pa.int64()),      # marker rows only: rows the shard produced
        ("decoded", DECODED),            # transient: the images of the next generating stage, decoded ahead
    ]
)
COLUMNS = ROW_SCHEMA.names


def new_row(**fields: Any) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS)
    row.update(status=OK, flags=[], timings="{}")
    row.update(fields)
    return row


def reject(row: dict[str, Any], stage: str, reason: str, keep_image: bool = False, **detail: Any) -> None:
    row["status"] = REJECTED
    row["reject_stage"] = stage
    row["reject_reason"] = reason
    row["reject_detail"] = json.dumps(detail, default=str) if detail else None
    if not keep_image and row.get("image_emb") is None:
        # Not needed downstream; keeps the stream light. Kept when a refilter may revive the row (filter) or
        # when the image is embedded and may still serve the CIR image pool.
        row["image"] = None


class RowContractError(ValueError):
    """A stage set a field its row schema does not have (Arrow would drop it without a word)."""


def _struct_of(type_: pa.DataType) -> pa.StructType | None:
    """The struct a column holds (itself, or its list's items), whose dicts Arrow would trim silently."""
    if pa.types.is_list(type_):
        type_ = type_.value_type
    return type_ if pa.types.is_struct(type_) else None


def _nested_fields(schema: pa.Schema) -> dict[str, frozenset[str]]:
    return {f.name: frozenset(s.field(i).name for i in range(s.num_fields))
            for f in schema if (s := _struct_of(f.type)) is not None}


def _check_row(row: dict[str, Any], names: frozenset[str], nested: dict[str, frozenset[str]]) -> None:
    if not names.issuperset(row):
        extra = sorted(set(row) - names)
        raise RowContractError(f"row {row.get('key')!r} has field(s) {extra} that the row schema lacks: "
                               "add them to the schema in m3t_gen/rows.py (or do not set them)")
    for name, allowed in nested.items():
        value = row.get(name)
        for item in (value if isinstance(value, list) else [value]) if value is not None else ():
            if isinstance(item, dict) and not allowed.issuperset(item):
                raise RowContractError(f"row {row.get('key')!r}: {name} has field(s) {sorted(set(item) - allowed)} "
                                       "that its struct in m3t_gen/rows.py lacks")


def to_table(rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> pa.Table:
    schema = schema or ROW_SCHEMA
    names, nested = frozenset(schema.names), _nested_fields(schema)
    for row in rows:
        _check_row(row, names, nested)
    return pa.Table.from_pylist(rows, schema=schema)


def compact(value: dict[str, Any] | None) -> dict[str, Any]:
    """A struct read back from Arrow without the fields nobody set (None)."""
    return {k: v for k, v in (value or {}).items() if v is not None}



# Besides a stage's output tokens (key: the stage name), a row counts per stage the requests sent for it and what
# they held (key "<stage>.<kind>"), retries included: prompt tokens and, of those, image placeholder tokens (the
# evidence that an image reached the model), and reasoning tokens (part of the output tokens).
USAGE_KINDS = ("requests", "prompt", "image", "reasoning")


def add_tokens(row: dict[str, Any], stage: str, n: int, **usage: int | None) -> None:
    tokens = json.loads(row.get("tokens") or "{}")
    tokens[stage] = tokens.get(stage, 0) + int(n)
    for kind, value in usage.items():
        assert kind in USAGE_KINDS, kind
        if value is not None:
            tokens[f"{stage}.{kind}"] = tokens.get(f"{stage}.{kind}", 0) + int(value)
    row["tokens"] = json.dumps(tokens)


def usage_fields(tokens: dict[str, int], stage: str) -> dict[str, Any]:
    """A stage's token totals as summary-table fields: output_tokens, requests, prompt/image/reasoning tokens."""
    out: dict[str, Any] = {}
    if tokens.get(stage):
        out["output_tokens"] = tokens[stage]
    for kind in USAGE_KINDS:
        value = tokens.get(f"{stage}.{kind}")
        if value:
            out[kind if kind == "requests" else f"{kind}_tokens"] = value
    return out


def worker_counts(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """{stage: {worker: rows}} over rows that carry ``workers``: how the work spread over an actor pool."""
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        for stage, worker in json.loads(row.get("workers") or "{}").items():
            out.setdefault(stage, {})
            out[stage][worker] = out[stage].get(worker, 0) + 1
    return out


def add_timing(row: dict[str, Any], stage: str, seconds: float) -> None:
    timings = json.loads(row["timings"] or "{}")
    timings[stage] = timings.get(stage, 0.0) + seconds
    row["timings"] = json.dumps(timings)


# A CIR pair travels as one row of this schema through the modification, triplet-reward and triplet-filter stages.
PAIR_SCHEMA = pa.schema(
    [
        ("key", pa.string()),            # pair id: {ref_key}__{tgt_key}
        ("shard", pa.string()),          # the part (resume unit) this pair belongs to
        ("ref_key", pa.string()),
        ("tgt_key", pa.string()),
        ("ref_caption", pa.string()),
        ("tgt_caption", pa.string()),
        ("ref_image", pa.string()),      # "pool/<tar>:<offset>:<size>": read by seek when an MLLM sees the images
        ("tgt_image", pa.string()),
        ("similarity", pa.float64()),    # CLIP image-image cosine
        ("rank", pa.int32()),            # the target's rank among the reference's neighbours
        ("ref_index", pa.int64()),       # rows of the pool's embedding bank (handed to actors once, not per pair)
        ("tgt_index", pa.int64()),
        ("status", pa.string()),
        ("reject_stage", pa.string()),
        ("reject_reason", pa.string()),
        ("reject_detail", pa.string()),
        ("modifications", pa.list_(MODIFICATION)),
        ("modify_attempts", pa.int32()),
        ("scores", TRIPLET_SCORES),
        ("verdicts", pa.list_(VERDICT)),  # the judge's, one per modification text (cir.judge on)
        ("judge_attempts", pa.int32()),
        ("timings", pa.string()),
        ("tokens", pa.string()),
        ("reasoning", pa.string()),
        ("workers", pa.string()),
        ("image", pa.binary()),          # unused for pairs (kept so shared helpers see the same field names)
        ("decoded", DECODED),            # transient: both images, decoded ahead of a generating stage
    ]
)

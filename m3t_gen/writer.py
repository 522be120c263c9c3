"""write: rows -> WebDataset tars + parquet index + rejects + per-shard stats, atomically, per input shard.

Runs on the driver as rows stream out of the Ray pipeline. Each input shard's outputs are written under
temporary names and renamed once the shard's marker row has arrived and every row it announced has been
seen; ``stats/<shard>.json`` is written last and is the shard's completion marker, which resume checks.
(Ray Data's write_webdataset writes whatever blocks it gets; it cannot tell when an input shard is whole.)
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from m3t_gen import __version__
from m3t_gen.rows import MARKER, OK, REJECTED
from m3t_gen.stages.base import RunContext

TMP = ".tmp"
INDEX_ROW_GROUP = 1000  # small row groups: the HF dataset viewer fails on big ones


def sample_json(row: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    turns = json.loads(row["turns"])
    scores = json.loads(row["scores"])
    kept = [t for t in turns if t.get("kept", True)]
    dropped = [t for t in turns if not t.get("kept", True)]
    kept_scores = [t["score"] for t in kept]
    out = {
        "key": row["key"],
        "caption": row["caption"],
        "turns": [{k: t[k] for k in ("type", "query", "target", "score")} for t in kept],
        "scores": {
            "caption": scores["caption"],
            "mean_turn": sum(kept_scores) / len(kept_scores),
            "min_turn": min(kept_scores),
        },
        "image": {"width": row["width"], "height": row["height"], "sha256": row["image_sha256"],
                  "reencoded": bool(row["reencoded"])},
        "source": {"shard": row["shard"], "key": row["source_key"], "url": row["url"], "text": row["text"]},
        "lineage": {
            "models": ctx.model_names,
            "templates": ctx.template_hashes,
            "seed": ctx.config.seed,
            "attempts": {"caption": row["caption_attempts"], "dialogue": row["dialogue_attempts"]},
            "m3t_gen_version": __version__,
            "config_hash": ctx.config_hash,
        },
    }
    if dropped:
        out["dropped_turns"] = [{k: t[k] for k in ("type", "query", "target", "score", "reason")} for t in dropped]
    return out


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + TMP)
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class _ShardState:
    shard: str
    source: str
    seen: int = 0
    expected: int | None = None
    shard_errors: list[str] = field(default_factory=list)
    tar_paths: list[Path] = field(default_factory=list)
    tar: Any = None
    in_tar: int = 0
    index: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    stage_seconds: Counter = field(default_factory=Counter)


class OutputWriter:
    def __init__(self, out_dir: Path, ctx: RunContext, shard_sources: dict[str, str]) -> None:
        self.out = out_dir
        self.ctx = ctx
        self.sources = shard_sources
        self.per_tar = ctx.config.output.samples_per_tar
        self.open: dict[str, _ShardState] = {}
        self.finished: list[dict[str, Any]] = []
        for sub in ("shards", "index", "rejects", "stats"):
            (out_dir / sub).mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- streaming
    def consume(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            state = self.open.get(row["shard"])
            if state is None:
                state = self.open[row["shard"]] = _ShardState(row["shard"], self.sources.get(row["shard"], ""))
            if row["status"] == MARKER:
                state.expected = row["shard_rows"]
                if row["reject_detail"]:
                    state.shard_errors = json.loads(row["reject_detail"])["errors"]
            else:
                state.seen += 1
                for stage, seconds in json.loads(row["timings"] or "{}").items():
                    state.stage_seconds[stage] += seconds
                if row["status"] == OK:
                    self._write_sample(state, row)
                elif row["status"] == REJECTED:
                    state.rejects.append(self._reject_record(row))
                else:
                    raise ValueError(f"row {row['key']} has unknown status {row['status']!r}")
            if state.expected is not None and state.seen == state.expected:
                self._finish(state)
                del self.open[state.shard]

    def incomplete(self) -> list[str]:
        return sorted(self.open)

    # ---------------------------------------------------------------- per sample
    def _write_sample(self, state: _ShardState, row: dict[str, Any]) -> None:
        import webdataset as wds

        if state.tar is None or state.in_tar >= self.per_tar:
            self._close_tar(state)
            path = self.out / "shards" / f"{state.shard}-{len(state.tar_paths):04d}.tar"
            state.tar_paths.append(path)
            state.tar = wds.TarWriter(str(path.with_name(path.name + TMP)), encoder=False, mtime=0)
            state.in_tar = 0
        sample = sample_json(row, self.ctx)
        state.tar.write({"__key__": row["key"], "jpg": row["image"],
                         "json": json.dumps(sample, ensure_ascii=False).encode()})
        state.in_tar += 1
        state.index.append({
            "key": row["key"], "tar": state.tar_paths[-1].name, "source_shard": state.source,
            "source_key": row["source_key"], "url": row["url"], "width": row["width"], "height": row["height"],
            "caption_score": sample["scores"]["caption"], "mean_turn_score": sample["scores"]["mean_turn"],
            "turn_types": [t["type"] for t in sample["turns"]], "turn_scores": [t["score"] for t in sample["turns"]],
            "dropped_turns": len(sample.get("dropped_turns", [])),
            "source_sha256": row["source_sha256"], "phash": row["phash"],
        })

    def _reject_record(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"key": row["key"], "source_shard": self.sources.get(row["shard"], row["shard"]),
                "source_key": row["source_key"], "url": row["url"], "stage": row["reject_stage"],
                "reason": row["reject_reason"], "detail": row["reject_detail"]}

    def _close_tar(self, state: _ShardState) -> None:
        if state.tar is not None:
            state.tar.close()
            state.tar = None

    # ---------------------------------------------------------------- per shard
    def _finish(self, state: _ShardState) -> None:
        self._close_tar(state)
        for path in state.tar_paths:
            os.replace(path.with_name(path.name + TMP), path)
        self._write_parquet(self.out / "index" / f"{state.shard}.parquet", state.index, INDEX_SCHEMA)
        self._write_parquet(self.out / "rejects" / f"{state.shard}.parquet", state.rejects, REJECT_SCHEMA)
        reasons = Counter(f"{r['stage']}:{r['reason']}" for r in state.rejects)
        stats = {
            "shard": state.shard, "source": state.source, "read": state.seen, "kept": len(state.index),
            "rejected": len(state.rejects), "reasons": dict(sorted(reasons.items())),
            "turns_kept": sum(len(r["turn_types"]) for r in state.index),
            "turns_dropped": sum(r["dropped_turns"] for r in state.index),
            "tars": [p.name for p in state.tar_paths], "shard_errors": state.shard_errors,
            "stage_seconds": {k: round(v, 4) for k, v in state.stage_seconds.items()},
        }
        assert stats["read"] == stats["kept"] + stats["rejected"], stats  # conservation, by construction
        atomic_write_bytes(self.out / "stats" / f"{state.shard}.json", json.dumps(stats, indent=1).encode())
        self.finished.append(stats)

    @staticmethod
    def _write_parquet(path: Path, records: list[dict[str, Any]], schema: pa.Schema) -> None:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records, schema=schema), buf, row_group_size=INDEX_ROW_GROUP)
        atomic_write_bytes(path, buf.getvalue())


INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("tar", pa.string()), ("source_shard", pa.string()), ("source_key", pa.string()),
    ("url", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("caption_score", pa.float64()),
    ("mean_turn_score", pa.float64()), ("turn_types", pa.list_(pa.string())),
    ("turn_scores", pa.list_(pa.float64())), ("dropped_turns", pa.int32()),
    ("source_sha256", pa.string()), ("phash", pa.string()),
])
REJECT_SCHEMA = pa.schema([
    ("key", pa.string()), ("source_shard", pa.string()), ("source_key", pa.string()), ("url", pa.string()),
    ("stage", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
])

"""write: rows -> WebDataset tars + parquet index + rejects + per-shard stats, atomically, per input shard.

Runs on the driver as rows stream out of the Ray pipeline. Each input shard's outputs are written under
temporary names and renamed once the shard's marker row has arrived and every row it announced has been
seen; ``stats/<shard>.json`` is written last and is the shard's completion marker, which resume checks.
(Ray Data's write_webdataset writes whatever blocks it gets; it cannot tell when an input shard is whole.)
"""

from __future__ import annotations

import io
import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from m3t_gen import __version__
from m3t_gen.run.artefacts import ShardStats
from m3t_gen.rows import MARKER, OK, REJECTED, compact, worker_counts
from m3t_gen.stages.base import RunContext
from m3t_gen.stages.filter import JUDGED_FIELDS, FilterStage, verdict_of
from m3t_gen.storage.sources import escape_name
from m3t_gen.storage.store import Store

INDEX_ROW_GROUP = 1000  # small row groups: the HF dataset viewer fails on big ones


def sample_json(row: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """KEY.json. Turns carry ``i``, their position in the generated dialogue, so that kept and dropped turns
    (and the scores behind every decision) can be put back together by `m3t-gen refilter`."""
    turns = [compact(t) for t in row["turns"]]
    scores = compact(row["scores"])
    fields = ("type", "query", "target", "score", "rank", "prob", *JUDGED_FIELDS)
    kept = [dict({k: t[k] for k in fields if k in t}, i=i) for i, t in enumerate(turns) if t.get("kept", True)]
    dropped = [dict({k: t[k] for k in fields if k in t}, i=i, reason=t["reason"])
               for i, t in enumerate(turns) if not t.get("kept", True)]
    kept_scores = [t["score"] for t in kept]
    summary = {"caption": scores["caption"],
               "mean_turn": sum(kept_scores) / len(kept_scores) if kept_scores else None,
               "min_turn": min(kept_scores) if kept_scores else None}
    for extra in ("caption_rank", "caption_prob", "k"):
        if extra in scores:
            summary[extra] = scores[extra]
    out = {
        "key": row["key"],
        "caption": row["caption"],
        "turns": kept,
        "scores": summary,
        "image": {"width": row["width"], "height": row["height"], "sha256": row["image_sha256"],
                  "reencoded": bool(row["reencoded"]), "source_sha256": row["source_sha256"],
                  "phash": row["phash"]},
        "source": {"shard": row["shard"], "key": row["source_key"], "url": row["url"], "text": row["text"],
                   "meta": json.loads(row["meta"]) if row["meta"] else None},
        "lineage": {
            "models": ctx.model_names,
            "templates": ctx.template_hashes,
            "seed": ctx.config.seed,
            "attempts": {k: v for k, v in (("caption", row["caption_attempts"]),
                                           ("dialogue", row["dialogue_attempts"]),
                                           ("judge", row["judge_attempts"])) if v is not None},
            "m3t_gen_version": __version__,
            "config_hash": ctx.config_hash,
        },
    }
    flags = row["flags"] or []
    if flags:
        out["flags"] = flags  # repairs made on reading (docs/reasons.md): visible where the sample is
    if dropped:
        out["dropped_turns"] = dropped
    if row.get("reasoning"):
        out["reasoning"] = json.loads(row["reasoning"])
    if row["status"] == REJECTED:
        out["rejected"] = {"stage": row["reject_stage"], "reason": row["reject_reason"],
                           "detail": json.loads(row["reject_detail"]) if row["reject_detail"] else None}
    return out


def row_from_sample(sample: dict[str, Any], shard: str, image: bytes) -> dict[str, Any]:
    """Invert sample_json: the scored row as the filter stage saw it (before any decision)."""
    from m3t_gen.rows import new_row

    turns = sorted(sample["turns"] + sample.get("dropped_turns", []), key=lambda t: t["i"])
    s = sample["scores"]
    scores: dict[str, Any] = {"caption": s["caption"], "turns": [t["score"] for t in turns]}
    if all("rank" in t for t in turns) and "k" in s:
        scores.update(k=s["k"], caption_rank=s["caption_rank"], caption_prob=s["caption_prob"],
                      turn_ranks=[t["rank"] for t in turns], turn_probs=[t["prob"] for t in turns])
    verdicts = None
    if any("verdict" in t for t in turns):  # judged: the verdicts go back to where the judge stage put them
        verdicts = [verdict_of(t) for t in turns]
    img, src, lin = sample["image"], sample["source"], sample["lineage"]
    return new_row(
        key=sample["key"], shard=shard, source_key=src["key"], url=src["url"], text=src["text"], image=image,
        meta=json.dumps(src["meta"]) if src.get("meta") else None,
        width=img["width"], height=img["height"], image_sha256=img["sha256"], reencoded=img["reencoded"],
        source_sha256=img.get("source_sha256"), phash=img.get("phash"), caption=sample["caption"],
        caption_attempts=lin["attempts"].get("caption"), dialogue_attempts=lin["attempts"].get("dialogue"),
        turns=[{k: t[k] for k in ("type", "query", "target")} for t in turns],
        scores=scores, verdicts=verdicts, judge_attempts=lin["attempts"].get("judge"),
        reasoning=json.dumps(sample["reasoning"], ensure_ascii=False) if sample.get("reasoning") else None,
        flags=sample.get("flags", []),
    )


class TarSeries:
    """``FOLDER/<shard>-0000.tar``, ``-0001.tar``...: at most ``per_tar`` samples each, built in staging files
    and made visible only by ``commit``."""

    def __init__(self, store: Store, folder: str, shard: str, per_tar: int) -> None:
        self.store, self.folder, self.shard, self.per_tar = store, folder, shard, per_tar
        self.rels: list[str] = []
        self.writer: Any = None
        self.count = 0

    def write(self, key: str, image: bytes, meta: dict[str, Any]) -> str:
        import webdataset as wds

        if self.writer is None or self.count >= self.per_tar:
            self.close()
            rel = f"{self.folder}/{self.shard}-{len(self.rels):04d}.tar"
            self.rels.append(rel)
            self.writer = wds.TarWriter(str(self.store.staging(rel)), encoder=False, mtime=0)
            self.count = 0
        self.writer.write({"__key__": key, "jpg": image, "json": json.dumps(meta, ensure_ascii=False).encode()})
        self.count += 1
        return posixpath.basename(self.rels[-1])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def locations(self) -> dict[str, tuple[int, int]]:
        """key -> (offset, size) of KEY.jpg in the staged tars (headers only are read), before they are committed."""
        self.close()
        return member_locations([self.store.staging(rel) for rel in self.rels])

    def commit(self) -> list[str]:
        self.close()
        for rel in self.rels:
            self.store.commit(rel)
        return [posixpath.basename(rel) for rel in self.rels]


@dataclass
class _ShardState:
    shard: str
    source: str
    kept: TarSeries
    filtered: TarSeries
    pool: TarSeries
    seen: int = 0
    ok: int = 0
    pool_rows: list[dict[str, Any]] = field(default_factory=list)
    expected: int | None = None
    shard_errors: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    repairs: Counter = field(default_factory=Counter)
    workers: list[dict[str, Any]] = field(default_factory=list)
    index: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    stage_seconds: Counter = field(default_factory=Counter)
    stage_tokens: Counter = field(default_factory=Counter)


class OutputWriter:
    def __init__(self, out: Store | Path, ctx: RunContext, shard_sources: dict[str, str]) -> None:
        self.store = out if isinstance(out, Store) else Store(out)
        self.ctx = ctx
        # Paths as the index, rejects and stats hold them: UTF-8 text (a file name need not be; escape_name).
        self.sources = {shard: escape_name(path) for shard, path in shard_sources.items()}
        self.per_tar = ctx.config.output.samples_per_tar
        self.open: dict[str, _ShardState] = {}
        self.finished: list[ShardStats] = []
        self.m3t = ctx.config.wants("m3t")
        self.cir = ctx.config.wants("cir")
        self.store.makedirs(*(("shards", "filtered", "index", "rejects", "stats") + (("pool",) if self.cir else ())))

    # ---------------------------------------------------------------- streaming
    def consume(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            shard = row["shard"]
            state = self.open.get(shard)
            if state is None:
                state = self.open[shard] = _ShardState(
                    shard, self.sources.get(shard, ""), TarSeries(self.store, "shards", shard, self.per_tar),
                    TarSeries(self.store, "filtered", shard, self.per_tar),
                    TarSeries(self.store, "pool", shard, self.per_tar))
            if row["status"] == MARKER:
                state.expected = row["shard_rows"]
                detail = json.loads(row["reject_detail"] or "{}")
                state.shard_errors, state.skipped = detail.get("errors", []), detail.get("skipped", {})
            else:
                state.seen += 1
                state.repairs.update(row["flags"] or [])
                if row.get("workers"):
                    state.workers.append({"workers": row["workers"]})
                for stage, seconds in json.loads(row["timings"] or "{}").items():
                    state.stage_seconds[stage] += seconds
                state.stage_tokens.update(json.loads(row["tokens"] or "{}"))
                if self.cir and row["image_emb"] is not None and row["image"] is not None:
                    self._write_pool(state, row)
                if row["status"] == OK:
                    state.ok += 1
                    if self.m3t:
                        self._write_sample(state, row)
                elif row["status"] == REJECTED:
                    if row["reject_stage"] == FilterStage.name and row["image"] is not None:
                        # Scored but filtered out: kept aside so a refilter can revive it without re-scoring.
                        state.filtered.write(row["key"], row["image"], sample_json(row, self.ctx))
                    state.rejects.append(self._reject_record(row))
                else:
                    raise ValueError(f"row {row['key']} has unknown status {row['status']!r}")
            if state.expected is not None and state.seen == state.expected:
                self._finish(state)
                del self.open[shard]

    def incomplete(self) -> list[str]:
        return sorted(self.open)

    # ---------------------------------------------------------------- per sample
    def _write_sample(self, state: _ShardState, row: dict[str, Any]) -> None:
        sample = sample_json(row, self.ctx)
        tar = state.kept.write(row["key"], row["image"], sample)
        state.index.append({
            "key": row["key"], "tar": tar, "source_shard": state.source,
            "source_key": row["source_key"], "url": row["url"], "width": row["width"], "height": row["height"],
            "caption_score": sample["scores"]["caption"], "mean_turn_score": sample["scores"]["mean_turn"],
            "turn_types": [t["type"] for t in sample["turns"]], "turn_scores": [t["score"] for t in sample["turns"]],
            "dropped_turns": len(sample.get("dropped_turns", [])),
            "source_sha256": row["source_sha256"], "phash": row["phash"], "flags": sample.get("flags", []),
        })

    def _write_pool(self, state: _ShardState, row: dict[str, Any]) -> None:
        """The CIR image pool: every captioned, embedded image, whatever became of its dialogue."""
        meta = {"key": row["key"], "caption": row["caption"], "width": row["width"], "height": row["height"],
                "source": {"shard": row["shard"], "key": row["source_key"], "url": row["url"], "text": row["text"]}}
        tar = state.pool.write(row["key"], row["image"], meta)
        state.pool_rows.append({"key": row["key"], "tar": tar, "caption": row["caption"], "url": row["url"],
                                "image_emb": row["image_emb"], "caption_emb": row["caption_emb"]})

    def _reject_record(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"key": row["key"], "source_shard": self.sources.get(row["shard"], row["shard"]),
                "source_key": row["source_key"], "url": row["url"], "stage": row["reject_stage"],
                "reason": row["reject_reason"], "detail": row["reject_detail"],
                "source_sha256": row["source_sha256"], "phash": row["phash"]}

    # ---------------------------------------------------------------- per shard
    def _finish(self, state: _ShardState) -> None:
        tars = state.kept.commit()
        filtered = state.filtered.commit()
        if self.cir:
            locations = state.pool.locations()
            state.pool.commit()
            for rec in state.pool_rows:
                rec["offset"], rec["size"] = locations[rec["key"]]
            self._write_parquet(f"pool/{state.shard}.parquet", state.pool_rows, POOL_SCHEMA, pool=True)
        self._write_parquet(f"index/{state.shard}.parquet", state.index, INDEX_SCHEMA)
        self._write_parquet(f"rejects/{state.shard}.parquet", state.rejects, REJECT_SCHEMA)
        reasons = Counter(f"{r['stage']}:{r['reason']}" for r in state.rejects)
        stats = ShardStats(
            shard=state.shard, source=state.source, read=state.seen, kept=state.ok, pool=len(state.pool_rows),
            rejected=len(state.rejects), reasons=dict(sorted(reasons.items())),
            turns_kept=sum(len(r["turn_types"]) for r in state.index),
            turns_dropped=sum(r["dropped_turns"] for r in state.index),
            tars=tars, filtered_tars=filtered, shard_errors=state.shard_errors,
            skipped_entries=state.skipped, repairs=dict(sorted(state.repairs.items())),
            config_hash=self.ctx.config_hash, rows_per_worker=worker_counts(state.workers),
            stage_seconds={k: round(v, 4) for k, v in state.stage_seconds.items()},
            stage_tokens=dict(state.stage_tokens))
        assert stats.read == stats.kept + stats.rejected, stats  # conservation, by construction
        # Written last: the shard's completion marker (its tars and tables above are committed already).
        self.store.write_bytes(f"stats/{state.shard}.json", stats.dumps())
        self.finished.append(stats)

    def _write_parquet(self, rel: str, records: list[dict[str, Any]], schema: pa.Schema, pool: bool = False) -> None:
        table = pa.Table.from_pylist(records, schema=schema)
        if pool:
            # A pool shard carries its digest: the CIR pass fingerprints the pool from these, not from every
            # embedding again.
            from m3t_gen.run.pairing import POOL_DIGEST_KEY, pool_digest

            table = table.replace_schema_metadata({POOL_DIGEST_KEY: pool_digest(table).encode()})
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=INDEX_ROW_GROUP)
        self.store.write_bytes(rel, buf.getvalue())


INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("tar", pa.string()), ("source_shard", pa.string()), ("source_key", pa.string()),
    ("url", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("caption_score", pa.float64()),
    ("mean_turn_score", pa.float64()), ("turn_types", pa.list_(pa.string())),
    ("turn_scores", pa.list_(pa.float64())), ("dropped_turns", pa.int32()),
    ("source_sha256", pa.string()), ("phash", pa.string()), ("flags", pa.list_(pa.string())),
])
POOL_SCHEMA = pa.schema([
    ("key", pa.string()), ("tar", pa.string()), ("caption", pa.string()), ("url", pa.string()),
    ("image_emb", pa.binary()), ("caption_emb", pa.binary()),
    ("offset", pa.int64()), ("size", pa.int64()),  # where KEY.jpg's bytes sit in its tar: random access by seek
])


def member_locations(tars: list[Path]) -> dict[str, tuple[int, int]]:
    """key -> (byte offset, size) of KEY.jpg in the given tars (headers only are read)."""
    import tarfile

    out: dict[str, tuple[int, int]] = {}
    for path in tars:
        with tarfile.open(path) as tar:
            for info in tar:
                if info.name.endswith(".jpg"):
                    out[info.name[: -len(".jpg")]] = (info.offset_data, info.size)
    return out


REJECT_SCHEMA = pa.schema([
    ("key", pa.string()), ("source_shard", pa.string()), ("source_key", pa.string()), ("url", pa.string()),
    ("stage", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
    ("source_sha256", pa.string()), ("phash", pa.string()),  # set once read; lets dedupe resume exactly
])

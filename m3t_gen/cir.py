"""The CIR recipe after the image pool is built: mine pairs, write modification texts, score, filter, write.

pool/*.parquet (key, caption, CLIP image + caption embeddings; JPEGs in pool/*.tar)
  -> mine_pairs (FAISS, band + rank window)            driver
  -> parts of `triplets_per_file` pairs (resume unit)   driver
  -> modify -> triplet_reward -> triplet_filter          Ray Data (actor pools / tasks)
  -> triplets/part-N.jsonl + triplet_rejects/part-N.parquet + triplet_stats/part-N.json (written last)
For every part: pairs = kept triplets + rejected triplets.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m3t_gen import __version__
from m3t_gen.pairing import mine_pairs
from m3t_gen.rows import OK, PAIR_SCHEMA, REJECTED, usage_fields
from m3t_gen.stages.base import RunContext
from m3t_gen.stages.modify import ModifyStage
from m3t_gen.stages.triplet_filter import TripletFilterStage
from m3t_gen.stages.triplet_reward import TripletRewardStage
from m3t_gen.writer import atomic_write_bytes

CIR_STAGES = [ModifyStage, TripletRewardStage, TripletFilterStage]
TRIPLET_REJECT_SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.string()), ("target_image", pa.string()), ("stage", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("scores", pa.string()),
])


def load_pool(out: Path, shards: list[str]) -> pa.Table:
    from m3t_gen.writer import POOL_SCHEMA

    tables = [pq.read_table(out / "pool" / f"{s}.parquet") for s in sorted(shards)]
    return pa.concat_tables(tables) if tables else POOL_SCHEMA.empty_table()


def pair_rows(pool: pa.Table, ctx: RunContext) -> list[dict[str, Any]]:
    keys = pool.column("key").to_pylist() if pool.num_rows else []
    if len(keys) < 2:
        return []
    captions = pool.column("caption").to_pylist()
    out_dir = ctx.config.output.dir
    locs = [f"{out_dir}/pool/{t}:{o}:{n}" for t, o, n in zip(pool.column("tar").to_pylist(),
                                                            pool.column("offset").to_pylist(),
                                                            pool.column("size").to_pylist())]
    img = [np.frombuffer(b, dtype=np.float32) for b in pool.column("image_emb").to_pylist()]
    cap = pool.column("caption_emb").to_pylist()
    pairs = mine_pairs(np.stack(img), keys, ctx.config.cir.pairing, ctx.config.seed)
    per_part = ctx.config.cir.triplets_per_file
    rows = []
    for n, p in enumerate(pairs):
        rows.append({
            "key": f"{keys[p.ref]}__{keys[p.tgt]}", "shard": f"part-{n // per_part:05d}",
            "ref_key": keys[p.ref], "tgt_key": keys[p.tgt], "ref_caption": captions[p.ref],
            "tgt_caption": captions[p.tgt], "similarity": p.similarity, "rank": p.rank,
            "ref_image": locs[p.ref], "tgt_image": locs[p.tgt],
            "ref_emb": img[p.ref].tobytes(), "tgt_emb": img[p.tgt].tobytes(),
            "ref_caption_emb": cap[p.ref], "tgt_caption_emb": cap[p.tgt],
            "status": OK, "timings": "{}",
        })
    return rows


def triplet_json(row: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    mods = json.loads(row["modifications"])
    scores = json.loads(row["scores"])
    out = {
        "id": row["key"], "image": row["ref_key"], "target_image": row["tgt_key"],
        "modifications": [{"category": m["category"], "text": m["text"], "score": m["score"]} for m in mods if m["kept"]],
        "dropped_modifications": [{"category": m["category"], "text": m["text"], "score": m["score"],
                                   "reason": m["reason"]} for m in mods if not m["kept"]],
        "reference_caption": row["ref_caption"], "target_caption": row["tgt_caption"],
        "similarity": round(row["similarity"], 6), "rank": row["rank"],
        "scores": {k: scores[k] for k in ("target_caption", "image_similarity", "directional")},
        "lineage": {"models": {"caption": ctx.config.caption.model.model, "modify": ctx.config.cir.modify.model.model,
                               "reward": ctx.config.reward.model},
                    "templates": ctx.template_hashes, "seed": ctx.config.seed, "attempts": row["modify_attempts"],
                    "m3t_gen_version": __version__, "config_hash": ctx.config_hash},
    }
    if row.get("reasoning"):
        out["reasoning"] = json.loads(row["reasoning"])
    return out


class TripletWriter:
    """Per part: JSONL of kept triplets, parquet of rejected ones, stats last (the completion marker)."""

    def __init__(self, out: Path, ctx: RunContext, expected: dict[str, int]) -> None:
        self.out, self.ctx, self.expected = out, ctx, expected
        self.parts: dict[str, dict[str, list]] = {}
        for sub in ("triplets", "triplet_shards", "triplet_rejects", "triplet_stats"):
            (out / sub).mkdir(parents=True, exist_ok=True)

    def consume(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            part = self.parts.setdefault(row["shard"], {"kept": [], "rejected": [], "seconds": Counter(),
                                                        "tokens": Counter()})
            for stage, seconds in json.loads(row["timings"] or "{}").items():
                part["seconds"][stage] += seconds
            part["tokens"].update(json.loads(row["tokens"] or "{}"))
            if row["status"] == OK:
                part["kept"].append(json.dumps(triplet_json(row, self.ctx), ensure_ascii=False))
            elif row["status"] == REJECTED:
                part["rejected"].append({"id": row["key"], "image": row["ref_key"], "target_image": row["tgt_key"],
                                         "stage": row["reject_stage"], "reason": row["reject_reason"],
                                         "detail": row["reject_detail"], "scores": row["scores"]})
            if len(part["kept"]) + len(part["rejected"]) == self.expected[row["shard"]]:
                self._finish(row["shard"], part)

    def _write_tar(self, name: str, kept: list[str]) -> None:
        """The same triplets as WebDataset members (``<id>.json``): the format of the M3T shards, so that one
        dataset card can give both as configs (``datasets`` infers one builder per folder)."""
        import os

        import webdataset as wds

        path = self.out / "triplet_shards" / f"{name}.tar"
        tmp = path.with_name(path.name + ".tmp")
        with wds.TarWriter(str(tmp), encoder=False, mtime=0) as sink:
            for line in kept:
                sink.write({"__key__": json.loads(line)["id"], "json": line.encode()})
        os.replace(tmp, path)

    def _finish(self, name: str, part: dict[str, list]) -> None:
        kept = sorted(part["kept"])
        atomic_write_bytes(self.out / "triplets" / f"{name}.jsonl", ("\n".join(kept) + "\n" if kept else "").encode())
        self._write_tar(name, kept)
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(part["rejected"], schema=TRIPLET_REJECT_SCHEMA), buf)
        atomic_write_bytes(self.out / "triplet_rejects" / f"{name}.parquet", buf.getvalue())
        reasons = Counter(f"{r['stage']}:{r['reason']}" for r in part["rejected"])
        stats = {"part": name, "pairs": self.expected[name], "kept": len(kept), "rejected": len(part["rejected"]),
                 "reasons": dict(sorted(reasons.items())),
                 # Actor seconds and generated tokens per stage (retries included): `m3t-gen plan --from-run`.
                 "stage_seconds": {k: round(v, 4) for k, v in sorted(part["seconds"].items())},
                 "stage_tokens": dict(sorted(part["tokens"].items()))}
        assert stats["pairs"] == stats["kept"] + stats["rejected"], stats
        atomic_write_bytes(self.out / "triplet_stats" / f"{name}.json", json.dumps(stats, indent=1).encode())
        del self.parts[name]


def run_cir(cfg: Any, ctx: RunContext, out: Path, shards: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    import ray.data

    from m3t_gen.pipeline import apply_stages, init_ray

    pool = load_pool(out, shards)
    rows = pair_rows(pool, ctx)
    expected = Counter(r["shard"] for r in rows)
    todo = [r for r in rows if not (out / "triplet_stats" / f"{r['shard']}.json").exists()]
    log(f"m3t-gen cir: pool {pool.num_rows} images, {len(rows)} pairs in {len(expected)} part(s), "
        f"{len(todo)} pairs to run")
    writer = TripletWriter(out, ctx, dict(expected))
    if todo:
        init_ray(cfg)
        ds = ray.data.from_arrow(pa.Table.from_pylist(todo, schema=PAIR_SCHEMA))
        ds = apply_stages(ds, CIR_STAGES, cfg, ctx)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.consume(batch.to_pylist())
    if writer.parts:
        raise RuntimeError(f"CIR parts never completed: {sorted(writer.parts)}")
    stats = [json.loads((out / "triplet_stats" / f"{p}.json").read_text()) for p in sorted(expected)]
    reasons: Counter = Counter()
    for s in stats:
        reasons.update(s["reasons"])
    return {"pool": pool.num_rows, "pairs": len(rows), "kept": sum(s["kept"] for s in stats),
            "rejected": sum(s["rejected"] for s in stats), "reasons": dict(reasons),
            "stages": stage_table(stats, len(rows))}


def stage_table(stats: list[dict[str, Any]], pairs: int) -> list[dict[str, Any]]:
    """Per CIR stage over all parts: pairs in / kept / rejected, actor seconds, generated tokens (the shape of
    the sample stages' table in the manifest)."""
    rejected: Counter = Counter()
    seconds: Counter = Counter()
    tokens: Counter = Counter()
    for s in stats:
        for key, n in s["reasons"].items():
            rejected[key.split(":", 1)[0]] += n
        seconds.update(s.get("stage_seconds", {}))  # parts written before these fields existed have none
        tokens.update(s.get("stage_tokens", {}))
    table, rows_in = [], pairs
    for stage in CIR_STAGES:
        kept = rows_in - rejected[stage.name]
        entry = {"stage": stage.name, "in": rows_in, "kept": kept, "rejected": rejected[stage.name],
                 "busy_seconds": round(seconds.get(stage.name, 0.0), 2)}
        entry.update(usage_fields(tokens, stage.name))
        table.append(entry)
        rows_in = kept
    return table

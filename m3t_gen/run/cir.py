"""The CIR recipe after the image pool is built: mine pairs, write modification texts, score, filter, write.

pool/*.parquet (key, caption, CLIP image + caption embeddings; JPEGs in pool/*.tar)
  -> load_bank: each shard's embeddings into Ray's object store      Ray tasks
  -> submit_mining (exact kNN in tiles, band + rank window + draw)  Ray tasks (GPUs when given)
  -> write_pair_parts: parts of `triplets_per_file` pairs (resume)  one Ray task (the driver learns sizes)
  -> modify -> triplet_reward -> triplet_judge -> triplet_filter    Ray Data (actor pools / tasks)
  -> triplets/part-N.jsonl + triplet_rejects/part-N.parquet + triplet_stats/part-N.json (written last)
For every part: pairs = kept triplets + rejected triplets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m3t_gen import __version__
from m3t_gen.run.artefacts import CirSummary, StageRow, TripletStats
from m3t_gen.run.pairing import Bank, PairArrays, load_bank, mine_arrays, submit_mining
from m3t_gen.rows import MODIFICATION, OK, PAIR_SCHEMA, REJECTED, TRIPLET_SCORES, worker_counts
from m3t_gen.run.recipe import CIR_STAGES, apply_stages, init_ray, stage_table
from m3t_gen.stages.base import RunContext
from m3t_gen.storage.store import Store, stale_fingerprints

TRIPLET_REJECT_SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.string()), ("target_image", pa.string()), ("stage", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("scores", TRIPLET_SCORES),
    ("modifications", pa.list_(MODIFICATION)),  # what was written and each text's decision, for a refilter
])


POOL_TEXT = ["key", "caption", "tar", "offset", "size"]  # what the part writer reads of the pool: no embeddings


def load_pool(store: Store, shards: list[str]) -> pa.Table:
    """The pool's keys, captions and image locations (the part tables need them); the embeddings stay in the
    object store (``load_bank``)."""
    from m3t_gen.run.writer import POOL_SCHEMA

    tables = [pq.read_table(io.BytesIO(store.read_bytes(f"pool/{s}.parquet")), columns=POOL_TEXT)
              for s in sorted(shards)]
    return pa.concat_tables(tables) if tables else pa.schema([POOL_SCHEMA.field(c) for c in POOL_TEXT]).empty_table()


def pool_fingerprint(digests: list[str], cfg: Any) -> str:
    """What the pairs are mined from and how they are cut into parts: each pool shard's digest (its keys, captions
    and image embeddings, kept with the shard), the pairing settings (not where or how fast they run), the seed
    and the part size. A part written under another fingerprint is never resumed (the pool grew, a shard was
    redone, or the pairing changed)."""
    from m3t_gen.config import PairingSpec, placement_exclude

    h = hashlib.sha256()
    for digest in digests:
        h.update(digest.encode() + b"\x00")
    pairing = cfg.cir.pairing.model_dump(mode="json", exclude=placement_exclude(PairingSpec))
    spec = {"pairing": pairing, "seed": cfg.seed, "triplets_per_file": cfg.cir.triplets_per_file}
    h.update(json.dumps(spec, sort_keys=True).encode())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class PairParts:
    """The mined pairs cut into parts (the resume unit and the unit of work an actor takes). A part's table is
    built when it is asked for, so the pairs are held as four numeric columns, never every pair's keys and
    captions at once."""

    sizes: dict[str, int]  # part name -> pairs
    build: Callable[[int], pa.Table]  # part number -> the part's table

    @property
    def pairs(self) -> int:
        return sum(self.sizes.values())

    def table(self, name: str) -> pa.Table:
        return self.build(int(name.rsplit("-", 1)[1]))


def mine(bank: Bank, cfg: Any) -> list[Any]:
    """Object references to the mined pairs (``PairArrays``, any number of them, in any order: the part writer
    sorts them). Exact search: distributed over the cluster (``submit_mining``). The approximate indexes and
    ``bucket_size`` run on the driver, which then gathers the image embeddings."""
    import ray

    spec = cfg.cir.pairing
    if sum(bank.sizes) < 2:
        return []
    if spec.index == "exact" and spec.bucket_size is None:
        return submit_mining(bank, spec)
    image_embs = np.concatenate(ray.get(bank.image))
    seeds = np.concatenate(ray.get(bank.seeds))
    return [ray.put(mine_arrays(image_embs, seeds, spec, cfg.seed))]


def pool_locations(out_dir: str, pool: pa.Table, rows: np.ndarray) -> pa.Array:
    """Where pool rows' JPEGs sit: ``<out>/pool/<tar>:<offset>:<size>`` (what the stages' image reader opens),
    built for the rows asked for only (Arrow's string kernels: no Python string per pool row)."""
    import pyarrow.compute as pc

    parts = [pool.column(c).take(rows).cast(pa.string()) for c in ("tar", "offset", "size")]
    return pc.binary_join_element_wise(pc.binary_join_element_wise(f"{out_dir}/pool/", parts[0], ""),
                                       parts[1], parts[2], ":")


def pair_parts(pool: pa.Table, pairs: PairArrays, out_dir: str, per_part: int) -> PairParts:
    """Cut the pairs, in (reference key, rank) order, into parts of ``per_part``; each part's table holds keys,
    captions, where the two images sit in the pool tars (under ``out_dir``), similarity and rank, and the rows of
    the embedding bank. Nothing per pair holds an embedding."""
    import pyarrow.compute as pc

    if pool.num_rows < 2 or not len(pairs):
        return PairParts({}, lambda number: pa.table({}))
    key_rank = np.empty(pool.num_rows, dtype=np.int64)
    key_rank[pc.sort_indices(pool.column("key")).to_numpy()] = np.arange(pool.num_rows)
    pairs = pairs.in_key_order(key_rank)
    ref, tgt, sim, rank = pairs.ref, pairs.tgt, pairs.similarity.astype(np.float64), pairs.rank
    del pairs, key_rank
    key_col, cap_col = pool.column("key").combine_chunks(), pool.column("caption").combine_chunks()

    def build(number: int) -> pa.Table:
        start = number * per_part
        r, t = ref[start:start + per_part], tgt[start:start + per_part]
        ref_keys, tgt_keys = key_col.take(r), key_col.take(t)
        name = f"part-{number:05d}"
        columns = {
            "key": pc.binary_join_element_wise(ref_keys, tgt_keys, "__"),
            "shard": pa.array([name] * len(r)), "ref_key": ref_keys, "tgt_key": tgt_keys,
            "ref_caption": cap_col.take(r), "tgt_caption": cap_col.take(t),
            "ref_image": pool_locations(out_dir, pool, r), "tgt_image": pool_locations(out_dir, pool, t),
            "similarity": pa.array(sim[start:start + per_part]), "rank": pa.array(rank[start:start + per_part]),
            "ref_index": pa.array(r), "tgt_index": pa.array(t),
            "status": pa.array([OK] * len(r)), "timings": pa.array(["{}"] * len(r)),
        }
        return pa.table({f.name: columns[f.name].cast(f.type) if f.name in columns
                         else pa.nulls(len(r), f.type) for f in PAIR_SCHEMA}, schema=PAIR_SCHEMA)

    sizes = {f"part-{number:05d}": min(per_part, len(ref) - start)
             for number, start in enumerate(range(0, len(ref), per_part))}
    return PairParts(sizes, build)


def write_pair_parts(store: Store, shards: list[str], out_dir: str, per_part: int, done: set[str],
                     *pairs: PairArrays) -> dict[str, int]:
    """A Ray task (``pairs``: the miners' object references, resolved by Ray): the pool's keys, captions and image
    locations read here, the pairs cut into parts, every part not ``done`` written to pairs/<part>.parquet. Returns
    each part's size: all the driver learns of the pairs, so its memory does not grow with the pool."""
    parts = pair_parts(load_pool(store, shards), PairArrays.concat(list(pairs)), out_dir, per_part)
    store.makedirs("pairs")
    for name in parts.sizes:
        if name not in done:
            buf = io.BytesIO()
            pq.write_table(parts.table(name), buf)
            store.write_bytes(f"pairs/{name}.parquet", buf.getvalue())
    return parts.sizes


def read_pair_parts(batch: pa.Table, store: Store) -> Iterator[pa.Table]:
    """Ray Data UDF: part files in, their pairs out; one block per part, so K actors share the parts."""
    for rel in batch.column("rel").to_pylist():
        yield pq.read_table(io.BytesIO(store.read_bytes(rel)), schema=PAIR_SCHEMA)


def _mod_json(mod: dict[str, Any]) -> dict[str, Any]:
    out = {"category": mod["category"], "text": mod["text"], "score": mod["score"]}
    if mod.get("verdict") is not None:  # judged (cir.judge on)
        out.update(verdict=mod["verdict"], judge_score=mod["judge_score"], judge_reason=mod["judge_reason"])
    return out


def triplet_json(row: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    mods = row["modifications"]
    scores = row["scores"]
    out = {
        "id": row["key"], "image": row["ref_key"], "target_image": row["tgt_key"],
        "modifications": [_mod_json(m) for m in mods if m["kept"]],  # judged: with the verdict
        "dropped_modifications": [dict(_mod_json(m), reason=m["reason"]) for m in mods if not m["kept"]],
        "reference_caption": row["ref_caption"], "target_caption": row["tgt_caption"],
        "similarity": round(row["similarity"], 6), "rank": row["rank"],
        "scores": {k: scores[k] for k in ("target_caption", "image_similarity", "directional")},
        "lineage": {"models": {k: v for k, v in ctx.model_names.items()
                               if k in ("caption", "modify", "reward", "triplet_judge")},
                    "templates": ctx.template_hashes, "seed": ctx.config.seed, "attempts": row["modify_attempts"],
                    "m3t_gen_version": __version__, "config_hash": ctx.config_hash},
    }
    if row.get("reasoning"):
        out["reasoning"] = json.loads(row["reasoning"])
    return out


class TripletWriter:
    """Per part: JSONL of kept triplets, parquet of rejected ones, stats last (the completion marker)."""

    def __init__(self, store: Store, ctx: RunContext, expected: dict[str, int], fingerprint: str) -> None:
        self.store, self.ctx, self.expected, self.fingerprint = store, ctx, expected, fingerprint
        self.parts: dict[str, dict[str, list]] = {}
        store.makedirs(*CIR_OUTPUTS)

    def consume(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            part = self.parts.setdefault(row["shard"], {"kept": [], "rejected": [], "seconds": Counter(),
                                                        "tokens": Counter(), "workers": []})
            part["workers"].append({"workers": row["workers"]})
            for stage, seconds in json.loads(row["timings"] or "{}").items():
                part["seconds"][stage] += seconds
            part["tokens"].update(json.loads(row["tokens"] or "{}"))
            if row["status"] == OK:
                part["kept"].append(json.dumps(triplet_json(row, self.ctx), ensure_ascii=False))
            elif row["status"] == REJECTED:
                part["rejected"].append({"id": row["key"], "image": row["ref_key"], "target_image": row["tgt_key"],
                                         "stage": row["reject_stage"], "reason": row["reject_reason"],
                                         "detail": row["reject_detail"], "scores": row["scores"],
                                         "modifications": row["modifications"]})
            if len(part["kept"]) + len(part["rejected"]) == self.expected[row["shard"]]:
                self._finish(row["shard"], part)

    def _write_tar(self, name: str, kept: list[str]) -> None:
        """The same triplets as WebDataset members (``<id>.json``): the format of the M3T shards, so that one
        dataset card can give both as configs (``datasets`` infers one builder per folder)."""
        import webdataset as wds

        rel = f"triplet_shards/{name}.tar"
        with wds.TarWriter(str(self.store.staging(rel)), encoder=False, mtime=0) as sink:
            for line in kept:
                sink.write({"__key__": json.loads(line)["id"], "json": line.encode()})
        self.store.commit(rel)

    def _finish(self, name: str, part: dict[str, list]) -> None:
        kept = sorted(part["kept"])
        self.store.write_bytes(f"triplets/{name}.jsonl", ("\n".join(kept) + "\n" if kept else "").encode())
        self._write_tar(name, kept)
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(part["rejected"], schema=TRIPLET_REJECT_SCHEMA), buf)
        self.store.write_bytes(f"triplet_rejects/{name}.parquet", buf.getvalue())
        reasons = Counter(f"{r['stage']}:{r['reason']}" for r in part["rejected"])
        stats = TripletStats(
            part=name, pairs=self.expected[name], kept=len(kept), rejected=len(part["rejected"]),
            reasons=dict(sorted(reasons.items())),
            # Actor seconds and generated tokens per stage (retries included): `m3t-gen plan --from-run`.
            stage_seconds={k: round(v, 4) for k, v in sorted(part["seconds"].items())},
            stage_tokens=dict(sorted(part["tokens"].items())),
            rows_per_worker=worker_counts(part["workers"]), pool_fingerprint=self.fingerprint,
            config_hash=self.ctx.config_hash)
        assert stats.pairs == stats.kept + stats.rejected, stats
        self.store.write_bytes(f"triplet_stats/{name}.json", stats.dumps())  # marker, last
        del self.parts[name]


CIR_OUTPUTS = ("pairs", "triplets", "triplet_shards", "triplet_rejects", "triplet_stats")


def _drop_stale_parts(store: Store, fingerprint: str, log: Callable[[str], None]) -> None:
    """Parts mined from another pool cannot be resumed or mixed with new ones: the pass is redone whole."""
    stale = stale_fingerprints(store, "triplet_stats", "pool_fingerprint", fingerprint)
    if stale:
        log(f"m3t-gen cir: the image pool or the pairing changed since the CIR parts were written (fingerprint "
            f"{', '.join(sorted(stale))} -> {fingerprint}): the CIR pass is redone")
        for sub in ("triplet_stats",) + CIR_OUTPUTS:  # the markers first: a crash halfway leaves nothing resumable
            store.remove(sub)


def run_cir(cfg: Any, ctx: RunContext, out: Store | Path, shards: list[str],
            log: Callable[[str], None]) -> CirSummary:
    import ray
    import ray.data

    store = out if isinstance(out, Store) else Store(out)
    init_ray(cfg)
    # Every shard's embeddings go to the object store once (tasks); the driver keeps references and digests.
    bank = load_bank(store, [f"pool/{s}.parquet" for s in sorted(shards)], cfg.seed,
                     cfg.cir.pairing.resources.num_cpus)
    fingerprint = pool_fingerprint(bank.digests, cfg)
    _drop_stale_parts(store, fingerprint, log)
    done = {rel[len("triplet_stats/"):-len(".json")] for rel in store.files("triplet_stats", ".json")}
    # The pairs go from the miners' object references to the part files in one task: the driver learns sizes.
    write = ray.remote(num_cpus=cfg.cir.pairing.resources.num_cpus)(write_pair_parts)
    expected = ray.get(write.remote(store, sorted(shards), str(cfg.output.dir), cfg.cir.triplets_per_file, done,
                                    *mine(bank, cfg)))
    n_pairs = sum(expected.values())
    todo = [name for name in expected if name not in done]
    log(f"m3t-gen cir: pool {sum(bank.sizes)} images, {n_pairs} pairs in {len(expected)} part(s), "
        f"{sum(expected[p] for p in todo)} pairs in {len(todo)} part(s) to run (pool {fingerprint})")
    writer = TripletWriter(store, ctx, expected, fingerprint)
    if todo:
        for old in store.files("pairs", ".parquet"):
            if old[len("pairs/"):-len(".parquet")] not in expected:
                store.remove(old)  # a part of an earlier, interrupted mining that this pool does not have
        files = [f"pairs/{name}.parquet" for name in todo]
        run_ctx = dataclasses.replace(ctx, shared={**ctx.shared, "pool_embeddings": {"image": bank.image,
                                                                                    "caption": bank.caption}})
        ds = ray.data.from_items([{"rel": f} for f in files], override_num_blocks=len(files))
        ds = ds.map_batches(read_pair_parts, fn_kwargs={"store": store}, batch_size=1, batch_format="pyarrow",
                            num_cpus=cfg.read.num_cpus)
        ds = apply_stages(ds, CIR_STAGES, cfg, run_ctx)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.consume(batch.to_pylist())
    if writer.parts:
        raise RuntimeError(f"CIR parts never completed: {sorted(writer.parts)}")
    stats = [TripletStats.loads(store.read_text(f"triplet_stats/{p}.json")) for p in sorted(expected)]
    reasons: Counter = Counter()
    workers: dict[str, Counter] = {}
    for s in stats:
        reasons.update(s.reasons)
        for stage, counts in s.rows_per_worker.items():
            workers.setdefault(stage, Counter()).update(counts)
    return CirSummary(pool=sum(bank.sizes), pairs=n_pairs, pool_fingerprint=fingerprint,
                      kept=sum(s.kept for s in stats), rejected=sum(s.rejected for s in stats),
                      reasons=dict(reasons), stages=cir_stage_table(stats, n_pairs),
                      rows_per_worker={stage: dict(sorted(c.items())) for stage, c in workers.items()})


def cir_stage_table(stats: list[TripletStats], pairs: int) -> list[StageRow]:
    """Per CIR stage over all parts: pairs in / kept / rejected, actor seconds, generated tokens (the sample
    pass's table, every CIR stage listed)."""
    names = [s.name for s in CIR_STAGES]
    return stage_table(stats, names, pairs, always=frozenset(names))

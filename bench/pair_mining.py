"""CIR pair mining at scale (issue 13): time, peak memory and recall of each FAISS index choice on synthetic
CLIP-like embeddings, against exact search measured in the same run.

    python bench/pair_mining.py --sizes 100000 1000000 --indexes exact ivf hnsw [--dim 768]

Embeddings: a mixture of N/100 clusters in d dimensions (a point = its cluster centre + Gaussian noise, L2-
normalised; same-cluster cosine ~0.7, other pairs ~0), so that neighbours mean something as CLIP's do.
Each (size, index) runs in a fresh process: the real ``m3t_gen.run.pairing`` code with the band and rank window of
pipelines/cir.yaml (similarity 0.55-0.92, ranks 2..30, two partners per image). Reported: index build + search seconds (``neighbours``), the whole ``mine_pairs``
seconds (search + the per-reference seeded choice), the process's peak RSS above the embeddings themselves, and
on a sample of 1000 references: recall@31 of the returned neighbour lists against exact search, and the share of
chosen partners whose exact rank lies in the window. Above --max-exact (default 200K) exact search is timed on a
query sample and extrapolated, and ivf / hnsw are built on all N (timed) but searched on a 20K-query sample,
scaled to N (marked *). One JSON line per run, then a table.

    python bench/pair_mining.py --distributed --sizes 100000 --workers 2 --compare

--distributed: the run's own exact miner (issue 23; load_bank + submit_mining in Ray tasks, one torch thread each)
on pool shards of the same embeddings, then the part files (write_pair_parts: one task), timed end to end; the driver's peak RSS; the baseline,
measured in the same run after the mining: one core's rate for the bare bf16 tile product, and the mining's
ratio to it (effective FLOP/s over workers x bare rate); with --compare, the chosen pairs against FAISS's exact
fp32 search and the same draw (count of differences).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synthetic(n: int, d: int, seed: int = 0):
    """CLIP-like: a shared mean direction (unrelated images still have cosine ~0.3, as CLIP's do), N/50 concepts of
    uneven size (log-normal weights) and spread (noise norm 0.8-1.4), so same-concept cosines are ~0.5-0.7 and the
    near-duplicate and band edges of the recipe fall inside the data."""
    import numpy as np

    rng = np.random.default_rng(seed)
    concepts = max(1, n // 50)
    mean = rng.standard_normal(d).astype(np.float32)
    mean /= np.linalg.norm(mean)
    centres = rng.standard_normal((concepts, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.8, 1.4, concepts).astype(np.float32)
    weights = rng.lognormal(0.0, 1.0, concepts)
    weights /= weights.sum()
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 65536):
        m = min(65536, n - start)
        z = rng.choice(concepts, size=m, p=weights)
        noise = rng.standard_normal((m, d), dtype=np.float32) * (spread[z, None] / np.sqrt(d))
        block = mean + centres[z] + noise
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def bare_product_gflops(d: int, precision: str, seconds: float = 3.0) -> float:
    """The baseline: one core's rate for the bare tile product the miner runs (2,048 x 16,384 x d, bf16 where
    the miner would use it), without any selection, on this box now."""
    import torch

    from m3t_gen.run.knn import reduced_precision_pays

    dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and reduced_precision_pays("cpu")) \
        else torch.float32
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    q, t = torch.randn(2048, d).to(dtype), torch.randn(16384, d).to(dtype)
    out = torch.empty(2048, 16384, dtype=dtype)
    torch.mm(q, t.T, out=out)  # warm-up (kernel selection)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(q, t.T, out=out)
        n += 1
    rate = n * 2 * 2048 * 16384 * d / (time.perf_counter() - start) / 1e9
    torch.set_num_threads(threads)
    return rate


def rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class Peak:
    def __init__(self) -> None:
        self.value = rss_gb()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.value = max(self.value, rss_gb())
            time.sleep(0.05)

    def done(self) -> float:
        self.stop.set()
        self.thread.join()
        return max(self.value, rss_gb())


def one(n: int, d: int, kind: str, max_exact: int, sample: int = 1000) -> dict:
    import faiss
    import numpy as np

    from m3t_gen.config import PairingSpec
    from m3t_gen.run.pairing import mine_pairs, neighbours

    x = synthetic(n, d)
    keys = [f"k{i:08d}" for i in range(n)]
    spec = PairingSpec(index=kind, min_similarity=0.55, max_similarity=0.92, min_rank=2, max_rank=30,
                       pairs_per_image=2)
    k = spec.max_rank + 1
    rng = np.random.default_rng(7)
    probe = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    t = time.perf_counter()
    exact_sims, exact_nbrs = flat.search(x[probe], k)
    exact_sample_s = time.perf_counter() - t
    del flat
    base = rss_gb()
    result = {"bench": "pair_mining", "n": n, "dim": d, "index": kind, "threads": faiss.omp_get_max_threads()}
    if kind == "exact" and n > max_exact:
        result.update(extrapolated=True, search_s=round(exact_sample_s * n / len(probe), 1),
                      peak_above_data_gb=round(4 * n * d / 2**30, 2), recall=1.0, partner_in_window=1.0)
        return result
    peak = Peak()
    if n > max_exact:
        # Above --max-exact: the index is built on all N (timed), its search timed on a query sample and scaled
        # to N queries; recall as always on the probe sample. mine_pairs is not run (its choice step costs
        # ~30 us per reference on top of the search, measured at 100K).
        from m3t_gen.run.pairing import build_index

        t = time.perf_counter()
        index = build_index(x, spec, 0)
        build_s = time.perf_counter() - t
        queries = np.sort(rng.choice(n, size=min(n, 20_000), replace=False))
        t = time.perf_counter()
        index.search(x[queries], k)
        per_query = (time.perf_counter() - t) / len(queries)
        _, nbrs_probe = index.search(x[probe], k)
        result["peak_above_data_gb"] = round(peak.done() - base, 2)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(nbrs_probe, exact_nbrs)]))
        result.update(extrapolated=True, build_s=round(build_s, 1), search_s=round(build_s + per_query * n, 1),
                      recall=round(recall, 4), partner_in_window=None)
        return result
    t = time.perf_counter()
    sims, nbrs = neighbours(x, k, spec, 0)
    search_s = time.perf_counter() - t
    del sims
    t = time.perf_counter()
    pairs = mine_pairs(x, keys, spec, 0)
    mine_s = time.perf_counter() - t
    result["peak_above_data_gb"] = round(peak.done() - base, 2)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(nbrs[probe], exact_nbrs)]))
    chosen: dict[int, list[int]] = {}
    for p in pairs:
        chosen.setdefault(p.ref, []).append(p.tgt)
    in_window = []
    for row, ref in enumerate(probe):
        # Each chosen partner's exact rank is inside the window (it is in the band by construction).
        exact_list = [int(j) for j in exact_nbrs[row] if j != ref][: spec.max_rank]
        in_window += [t in exact_list[spec.min_rank - 1:] for t in chosen.get(int(ref), [])]
    result.update(search_s=round(search_s, 1), mine_pairs_s=round(mine_s, 1), pairs=len(pairs),
                  recall=round(recall, 4), partner_in_window=round(float(np.mean(in_window)), 4) if in_window else None)
    return result


def distributed(n: int, d: int, workers: int, shard_rows: int, block_rows: int, tile_rows: int, compare: bool,
                precision: str, sample_blocks: int = 0) -> dict:
    """The run's own exact miner (issue 23): a synthetic pool written as pool/*.parquet shards, then load_bank +
    submit_mining in Ray tasks (``workers`` CPUs, one torch thread per task) + the part files (write_pair_parts,
    one task, as the CIR pass runs it), timed end to end; the driver's peak RSS; with ``compare``, the chosen pairs
    against FAISS's exact fp32 search + the same draw; with ``sample_blocks``, only that many reference blocks are
    mined and the times scaled to all blocks (each block streams the whole bank: blocks cost alike)."""
    import tempfile

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from m3t_gen.config import PairingResources, PairingSpec
    from m3t_gen.run.cir import write_pair_parts
    from m3t_gen.run.pairing import POOL_DIGEST_KEY, PairArrays, key_seeds, load_bank, select_pairs, submit_mining
    from m3t_gen.run.writer import POOL_SCHEMA
    from m3t_gen.storage.store import Store

    x = synthetic(n, d)
    keys = [f"s{i // shard_rows:05d}_{i:08d}" for i in range(n)]
    tmp = Path(tempfile.mkdtemp(prefix="mining-"))
    (tmp / "pool").mkdir()
    rels = []
    for shard, start in enumerate(range(0, n, shard_rows)):
        rows = range(start, min(start + shard_rows, n))
        emb = [x[i].tobytes() for i in rows]
        table = pa.table({"key": [keys[i] for i in rows], "tar": ["t.tar"] * len(emb),
                          "caption": [""] * len(emb), "url": [None] * len(emb), "image_emb": emb,
                          "caption_emb": emb, "offset": [0] * len(emb), "size": [1] * len(emb)}, schema=POOL_SCHEMA)
        table = table.replace_schema_metadata({POOL_DIGEST_KEY: f"bench-{shard}".encode()})
        rels.append(f"pool/{shard:05d}.parquet")
        pq.write_table(table, tmp / rels[-1])
    spec = PairingSpec(min_similarity=0.55, max_similarity=0.92, min_rank=2, max_rank=30, pairs_per_image=2,
                       precision=precision, resources=PairingResources(block_rows=block_rows, tile_rows=tile_rows))
    del x
    import gc

    gc.collect()
    base = rss_gb()
    # The bank (image + caption embeddings, N x d x 8 bytes) must fit the object store, or Ray spills it to disk
    # while loading and restores it on the miners' gets: what is measured is then the disk.
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
             object_store_memory=max(2 * 1024 ** 3, int(n * d * 8 * 1.25)))
    peak = Peak()
    t = time.perf_counter()
    store = Store(tmp)
    bank = load_bank(store, rels, run_seed=0)
    ray.wait(bank.image, num_returns=len(bank.image), fetch_local=False)
    load_s = time.perf_counter() - t
    refs = submit_mining(bank, spec)
    n_blocks = len(refs)
    if sample_blocks:
        # Every block streams the whole bank, so blocks cost alike: time the first `sample_blocks` (run
        # `workers` at a time) and scale to all of them (reported as extrapolated).
        for ref in refs[sample_blocks:]:
            ray.cancel(ref)
        refs = refs[:sample_blocks]
        ray.wait(refs, num_returns=len(refs))
    else:
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
    mine_s = time.perf_counter() - t
    # The part files, as the CIR pass writes them: one task reads the pool's keys/captions and the miners' pairs.
    write = ray.remote(num_cpus=1)(write_pair_parts)
    sizes = ray.get(write.remote(store, [r[len("pool/"):-len(".parquet")] for r in rels], str(tmp), 1000, set(),
                                 *refs))
    total_s = time.perf_counter() - t
    scale = n_blocks / len(refs)  # 1 unless sampled: the load once, the rest scaled (the parts' pool read too)
    mine_s, total_s = load_s + (mine_s - load_s) * scale, load_s + (total_s - load_s) * scale
    n_pairs = round(sum(sizes.values()) * scale)
    driver_peak = peak.done()
    pairs = PairArrays.concat(ray.get(refs)) if compare else None
    ray.shutdown()
    bare = bare_product_gflops(d, precision)
    result = {"bench": "pair_mining", "engine": "distributed", "n": n, "dim": d, "workers": workers,
              "precision": precision, "block_rows": block_rows, "tile_rows": tile_rows, "pairs": n_pairs,
              "blocks": n_blocks, "blocks_timed": len(refs), "extrapolated": scale != 1,
              "mine_s": round(mine_s, 1), "end_to_end_s": round(total_s, 1),
              "gflops": round(2 * n * n * d / mine_s / 1e9, 1),
              "bare_product_gflops_per_core": round(bare, 1),
              "ratio_to_bare_products": round(2 * n * n * d / mine_s / 1e9 / (bare * workers), 3),
              "driver_rss_before_gb": round(base, 3), "driver_peak_gb": round(driver_peak, 3)}
    if compare:
        import faiss

        x = synthetic(n, d)
        index = faiss.IndexFlatIP(d)
        index.add(x)
        k = spec.max_rank
        sims = np.empty((n, k), np.float32)
        nbrs = np.empty((n, k), np.int64)
        for start in range(0, n, 8192):
            q = x[start:start + 8192]
            s, i = index.search(q, k + 8)
            for r in range(len(q)):
                row = start + r
                # FAISS's fp32 answer in the canonical order: exact (float64, rounded) score desc, index asc.
                cand = [j for j in i[r] if j != row and j >= 0]
                exact = (x[cand].astype(np.float64) @ x[row].astype(np.float64)).astype(np.float32)
                order = sorted(range(len(cand)), key=lambda c: (-exact[c], cand[c]))[:k]
                nbrs[row] = [cand[c] for c in order]
                sims[row] = [exact[c] for c in order]
        want = select_pairs(sims, nbrs, key_seeds(keys, 0), np.arange(n), spec)
        got = set(zip(pairs.ref.tolist(), pairs.tgt.tolist(), pairs.rank.tolist()))
        ref = set(zip(want.ref.tolist(), want.tgt.tolist(), want.rank.tolist()))
        diff = len(got ^ ref)  # pairs (with their rank) in one answer and not the other
        result["differences_vs_faiss_exact"] = diff
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--distributed", action="store_true", help="the run's exact miner in Ray tasks (issue 23)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--block-rows", type=int, default=16_384)
    ap.add_argument("--tile-rows", type=int, default=16_384)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--compare", action="store_true", help="count pairs that differ from FAISS exact fp32")
    ap.add_argument("--sample-blocks", type=int, default=0, help="mine only this many blocks; scale the times")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--indexes", nargs="+", default=["exact", "ivf", "hnsw"])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--max-exact", type=int, default=200_000, help="above: exact search is extrapolated")
    ap.add_argument("--one", nargs=2, metavar=("N", "INDEX"))
    args = ap.parse_args()
    if args.distributed:
        for n in args.sizes:
            for w in args.workers:
                print(json.dumps(distributed(n, args.dim, w, args.shard_rows, args.block_rows, args.tile_rows,
                                             args.compare, args.precision, args.sample_blocks)), flush=True)
        return
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.dim, args.one[1], args.max_exact)), flush=True)
        return
    rows = []
    for n in args.sizes:
        for kind in args.indexes:
            cmd = [sys.executable, __file__, "--one", str(n), kind, "--dim", str(args.dim),
                   "--max-exact", str(args.max_exact)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith('{"bench"')), None)
            if line is None:
                print(json.dumps({"bench": "pair_mining", "n": n, "index": kind, "error": proc.stderr[-500:]}))
                continue
            print(line, flush=True)
            rows.append(json.loads(line))
    print(f"{'N':>9} {'index':>6} {'search s':>9} {'mine s':>8} {'peak GB':>8} {'recall':>7} {'in window':>9}")
    for r in rows:
        print(f"{r['n']:>9} {r['index']:>6} {r['search_s']:>9}{'*' if r.get('extrapolated') else ' '}"
              f"{r.get('mine_pairs_s', '-'):>7} {r['peak_above_data_gb']:>8} {r['recall']:>7} {r['partner_in_window']!s:>9}")


if __name__ == "__main__":
    main()

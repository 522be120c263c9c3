"""CIR pair mining: for each reference image, a target among its CLIP neighbours inside a similarity band and a
rank window (SPN4CIR: not the nearest, whose near-duplicates make useless triplets), drawn reproducibly.

Cost: an exact inner-product index (FAISS IndexFlatIP) holds N x d float32: 4*N*d bytes (1M images x 768 dims
= 3 GB) and a search costs O(N^2 d). At scale choose ``index: ivf`` (inverted lists: each query scans nprobe of
nlist clusters, ~N*nprobe/nlist vectors) or ``index: hnsw`` (a neighbour graph; more memory, fastest search), or
``bucket_size`` (exact within consecutive buckets of B images: time O(N*B*d), partners only inside a bucket).
Measured time, memory and recall against exact search: bench/pair_mining.py, docs/BENCHMARKS.md. Ranks are
positions among the neighbours the index returns (approximate for ivf/hnsw); band and window apply to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from m3t_gen.config import PairingSpec
from m3t_gen.seeds import derive_seed


@dataclass(frozen=True)
class Pair:
    ref: int
    tgt: int
    similarity: float
    rank: int


def mine_pairs(embs: np.ndarray, keys: list[str], spec: PairingSpec, run_seed: int) -> list[Pair]:
    """``embs``: [N, d] L2-normalised; returns pairs sorted by (ref key, rank)."""
    n = len(keys)
    bucket = spec.bucket_size or max(n, 1)
    pairs: list[Pair] = []
    for start in range(0, n, bucket):
        idx = np.arange(start, min(start + bucket, n))
        pairs += _mine_bucket(embs[idx], [keys[i] for i in idx], idx, spec, run_seed)
    return sorted(pairs, key=lambda p: (keys[p.ref], p.rank))


SEARCH_BATCH = 65536  # queries per search call: bounds the distance buffers FAISS allocates


def build_index(data: np.ndarray, spec: PairingSpec, run_seed: int):
    """A FAISS inner-product index over ``data`` ([N, d] float32, L2-normalised: inner product = cosine)."""
    import faiss

    n, d = data.shape
    if spec.index == "hnsw":
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(spec.ef_search, spec.max_rank + 1)
    elif spec.index == "ivf" and n >= 2 * 39:
        nlist = spec.nlist or int(4 * np.sqrt(n))
        nlist = max(1, min(nlist, n // 39))  # FAISS wants >= 39 training points per cluster
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(derive_seed(run_seed, "pair-index", str(n)))
        # k-means costs sample x nlist x d per iteration: 50 points per cluster trains well (measured) and keeps
        # training a small part of the pass.
        train = data[np.sort(rng.choice(n, size=min(n, 50 * nlist), replace=False))]
        index.train(train)
        index.nprobe = min(spec.nprobe, nlist)
    else:
        index = faiss.IndexFlatIP(d)
    index.add(data)
    return index


def neighbours(data: np.ndarray, k: int, spec: PairingSpec, run_seed: int) -> tuple[np.ndarray, np.ndarray]:
    index = build_index(data, spec, run_seed)
    sims = np.empty((len(data), k), dtype=np.float32)
    nbrs = np.empty((len(data), k), dtype=np.int64)
    for start in range(0, len(data), SEARCH_BATCH):
        sims[start:start + SEARCH_BATCH], nbrs[start:start + SEARCH_BATCH] = index.search(
            data[start:start + SEARCH_BATCH], k)
    return sims, nbrs


def _mine_bucket(embs: np.ndarray, keys: list[str], global_idx: np.ndarray, spec: PairingSpec,
                 run_seed: int) -> list[Pair]:
    n = len(keys)
    if n < 2:
        return []
    data = np.ascontiguousarray(embs, dtype=np.float32)
    k = min(n, spec.max_rank + 1)  # +1: an image finds itself first
    sims, nbrs = neighbours(data, k, spec, run_seed)
    out: list[Pair] = []
    for i in range(n):
        candidates = []
        rank = 0
        for sim, j in zip(sims[i], nbrs[i]):
            if j == i or j < 0:
                continue
            rank += 1
            if spec.min_rank <= rank <= spec.max_rank and spec.min_similarity <= sim <= spec.max_similarity:
                candidates.append((int(j), float(sim), rank))
        if not candidates:
            continue
        rng = np.random.default_rng(derive_seed(run_seed, "pair", keys[i]))
        picks = rng.choice(len(candidates), size=min(spec.pairs_per_image, len(candidates)), replace=False)
        for p in sorted(picks):
            j, sim, rank = candidates[p]
            out.append(Pair(int(global_idx[i]), int(global_idx[j]), sim, rank))
    return out

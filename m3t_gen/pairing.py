"""CIR pair mining: for each reference image, a target among its CLIP neighbours inside a similarity band and a
rank window (SPN4CIR: not the nearest, whose near-duplicates make useless triplets), drawn reproducibly.

Cost: an exact inner-product index (FAISS IndexFlatIP) holds N x d float32: 4*N*d bytes (1M images x 768 dims
= 3 GB) and a search costs O(N^2 d). Set ``bucket_size`` at scale: pairs are then mined within consecutive
buckets of that many images (memory 4*B*d, time O(N*B*d)), trading some partner quality for linear cost.
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


def _mine_bucket(embs: np.ndarray, keys: list[str], global_idx: np.ndarray, spec: PairingSpec,
                 run_seed: int) -> list[Pair]:
    import faiss

    n = len(keys)
    if n < 2:
        return []
    data = np.ascontiguousarray(embs, dtype=np.float32)
    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    k = min(n, spec.max_rank + 1)  # +1: an image finds itself first
    sims, nbrs = index.search(data, k)
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

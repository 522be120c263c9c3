"""CIR pair mining: for each reference image, a target among its CLIP neighbours inside a similarity band and a
rank window (SPN4CIR: not the nearest, whose near-duplicates make useless triplets), drawn reproducibly.

Exact search (the default) is a matrix product, 2*N^2*d FLOP: ``submit_mining`` splits the references into
blocks, one Ray task each (on a GPU when ``cir.pairing.resources.num_gpus`` gives it one), and streams the pool's
embeddings past each block in tiles from Ray's object store (``m3t_gen.run.knn``: tiles multiplied in bf16 where
that is fast, the answer exactly the fp32 one). The driver holds object references only: never the N x d bank, the
N x k neighbour lists or the pairs (a Ray task cuts them into part files: ``run.cir.write_pair_parts``).
``index: ivf`` / ``hnsw`` (FAISS, approximate) and ``bucket_size`` (exact within consecutive buckets) stay as
options, run on the driver. Ranks are positions among the neighbours (approximate for ivf/hnsw); band and window
apply to them; the partner is drawn with a seed from the reference's key. Time, memory and exactness:
bench/pair_mining.py, docs/BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from m3t_gen.config import PairingSpec
from m3t_gen.seeds import derive_seed

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa


@dataclass(frozen=True)
class Pair:
    ref: int
    tgt: int
    similarity: float
    rank: int


@dataclass
class PairArrays:
    """Pairs as four columns (what the driver keeps: 28 bytes a pair), in (reference, rank) order."""

    ref: np.ndarray  # int64 pool row of the reference image
    tgt: np.ndarray  # int64 pool row of the target image
    similarity: np.ndarray  # float32
    rank: np.ndarray  # int32, 1 = the nearest other image

    def __len__(self) -> int:
        return len(self.ref)

    @staticmethod
    def concat(parts: list["PairArrays"]) -> "PairArrays":
        if not parts:
            return PairArrays(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32),
                              np.zeros(0, np.int32))
        return PairArrays(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ref", "tgt", "similarity",
                                                                                        "rank")))

    def in_key_order(self, key_rank: np.ndarray) -> "PairArrays":
        """Sorted by (reference key, rank); ``key_rank``: each pool row's position in key order."""
        order = np.lexsort((self.rank, key_rank[self.ref]))
        return PairArrays(self.ref[order], self.tgt[order], self.similarity[order], self.rank[order])

    def as_pairs(self) -> list[Pair]:
        return [Pair(int(r), int(t), float(s), int(k)) for r, t, s, k in
                zip(self.ref, self.tgt, self.similarity, self.rank)]


def key_seeds(keys: list[str], run_seed: int) -> np.ndarray:
    """The partner draw's seed of each reference, from its key (not its position): the same image draws the same
    partner in any pool order, block or worker."""
    return np.fromiter((derive_seed(run_seed, "pair", k) for k in keys), dtype=np.uint64, count=len(keys))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-mixed uint64 per input (vectorised; wraps around by design)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def select_pairs(sims: np.ndarray, nbrs: np.ndarray, seeds: np.ndarray, ref_rows: np.ndarray,
                 spec: PairingSpec) -> PairArrays:
    """Per reference (row): its neighbours in rank order (self excluded; -1 = none), the ones inside the rank
    window and the similarity band are candidates, and up to ``pairs_per_image`` of them are drawn without
    replacement: the candidates with the smallest hash of (reference seed, rank). Vectorised over all rows."""
    n, k = nbrs.shape
    if n == 0 or k == 0:
        return PairArrays.concat([])
    rank = np.broadcast_to(np.arange(1, k + 1, dtype=np.int32), (n, k))
    valid = ((nbrs >= 0) & (rank >= spec.min_rank) & (rank <= spec.max_rank)
             & (sims >= spec.min_similarity) & (sims <= spec.max_similarity))
    draw = _mix(seeds[:, None] * np.uint64(1 << 20) + rank.astype(np.uint64))
    draw = np.where(valid, draw, np.uint64(0xFFFFFFFFFFFFFFFF))
    take = min(spec.pairs_per_image, k)
    pick = np.argsort(draw, axis=1, kind="stable")[:, :take]
    picked_valid = np.take_along_axis(valid, pick, axis=1)
    pick = np.sort(np.where(picked_valid, pick, k), axis=1)  # chosen ranks in order; k marks "no pick"
    rows, cols = np.nonzero(pick < k)
    cols = pick[rows, cols]
    return PairArrays(ref=np.asarray(ref_rows, dtype=np.int64)[rows], tgt=nbrs[rows, cols].astype(np.int64),
                      similarity=sims[rows, cols].astype(np.float32), rank=(cols + 1).astype(np.int32))


def mine_pairs(embs: np.ndarray, keys: list[str], spec: PairingSpec, run_seed: int) -> list[Pair]:
    """One process, the whole pool in memory (tests, benchmarks). ``embs``: [N, d] L2-normalised; returns pairs
    sorted by (ref key, rank)."""
    key_rank = np.empty(len(keys), dtype=np.int64)
    key_rank[np.argsort(np.asarray(keys, dtype=object), kind="stable")] = np.arange(len(keys))
    return mine_arrays(embs, key_seeds(keys, run_seed), spec, run_seed).in_key_order(key_rank).as_pairs()


def mine_arrays(embs: np.ndarray, seeds: np.ndarray, spec: PairingSpec, run_seed: int) -> PairArrays:
    """Pairs of the pool ``embs`` in one process (``bucket_size``: within consecutive buckets only; ivf / hnsw),
    in (reference row, rank) order; ``seeds``: each reference's draw seed (``key_seeds``)."""
    n = len(embs)
    bucket = spec.bucket_size or max(n, 1)
    parts = []
    for start in range(0, n, bucket):
        idx = np.arange(start, min(start + bucket, n))
        if len(idx) < 2:
            continue
        data = np.ascontiguousarray(embs[idx], dtype=np.float32)
        sims, nbrs = neighbours(data, min(len(idx) - 1, spec.max_rank), spec, run_seed)
        parts.append(select_pairs(sims, np.where(nbrs >= 0, idx[np.maximum(nbrs, 0)], -1), seeds[idx], idx, spec))
    return PairArrays.concat(parts)


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
    """Each row's ``k`` nearest other rows, (similarity desc, index asc): -1 where there are fewer. Exact search
    is the tiled kernel (m3t_gen.run.knn); ivf / hnsw ask FAISS for one more and drop the row itself."""
    if spec.index == "exact":
        from m3t_gen.run.knn import exact_topk, tiles_of

        return exact_topk(data, np.arange(len(data)), tiles_of(data, TILE_ROWS), k, precision=first_rung(spec, "cpu"))
    index = build_index(data, spec, run_seed)
    sims = np.empty((len(data), k + 1), dtype=np.float32)
    nbrs = np.empty((len(data), k + 1), dtype=np.int64)
    for start in range(0, len(data), SEARCH_BATCH):
        sims[start:start + SEARCH_BATCH], nbrs[start:start + SEARCH_BATCH] = index.search(
            data[start:start + SEARCH_BATCH], k + 1)
    own = nbrs == np.arange(len(data))[:, None]
    # Drop the row itself (wherever the index put it; else the last, the (k+1)-th).
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)
    keep = np.ones_like(own)
    keep[np.arange(len(data)), drop] = False
    return sims[keep].reshape(len(data), k), nbrs[keep].reshape(len(data), k)


TILE_ROWS = 16384  # bank rows multiplied at once by one worker: [block x TILE_ROWS] scores


# ------------------------------------------------------------------------------------ distributed, exact


def embedding_matrix(pool: "pa.Table", column: str) -> np.ndarray:
    """[N, d] float32 from a column of float32 bytes, read straight from the Arrow buffers (no per-row objects;
    chunk by chunk, as a binary column over 2 GB cannot be one chunk)."""
    blocks = []
    for chunk in pool.column(column).chunks:
        if len(chunk) == 0:
            continue
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)[chunk.offset: chunk.offset + len(chunk) + 1]
        widths = np.diff(offsets)
        if chunk.null_count or not np.all(widths == widths[0]) or widths[0] % 4:
            raise ValueError(f"pool column {column}: embeddings of unequal size or missing")
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
        blocks.append(data.view(np.float32).reshape(len(chunk), widths[0] // 4))
    return np.concatenate(blocks) if blocks else np.zeros((0, 0), dtype=np.float32)


POOL_DIGEST_KEY = b"m3t_gen.pool_digest"  # parquet metadata of pool/<shard>.parquet: what the fingerprint reads


def pool_digest(table) -> str:
    """What one pool shard contributes to the pool fingerprint: its keys, captions and image embeddings."""
    import hashlib

    h = hashlib.sha256()
    for column in ("key", "caption"):
        h.update("\x00".join(str(v) for v in table.column(column).to_pylist()).encode())
        h.update(b"\x01")
    for chunk in table.column("image_emb").chunks:
        for value in chunk.to_pylist():
            h.update(value or b"")
    return h.hexdigest()


def _load_tile(store, rel: str, run_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, int]:
    """One pool shard, read by a Ray task: its image and caption embeddings (float32 [n, d]), its references' draw
    seeds, its digest (from the file's metadata; computed for pools written before it was kept) and its rows."""
    import io

    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(store.read_bytes(rel)), columns=["key", "caption", "image_emb", "caption_emb"])
    meta = table.schema.metadata or {}
    digest = meta[POOL_DIGEST_KEY].decode() if POOL_DIGEST_KEY in meta else pool_digest(table)
    return (embedding_matrix(table, "image_emb"), embedding_matrix(table, "caption_emb"),
            key_seeds(table.column("key").to_pylist(), run_seed), digest, table.num_rows)


@dataclass
class Bank:
    """The pool's embeddings in Ray's object store, one object per pool shard (pool-row order): what mining and
    the triplet_reward actors read. The driver holds references, sizes and digests only."""

    image: list[Any]
    caption: list[Any]
    seeds: list[Any]
    sizes: list[int]
    digests: list[str]

    @property
    def offsets(self) -> list[int]:
        return [int(x) for x in np.concatenate([[0], np.cumsum(self.sizes)])[:-1]]


def load_bank(store, rels: list[str], run_seed: int, num_cpus: float = 1) -> Bank:
    import ray

    load = ray.remote(num_cpus=num_cpus, num_returns=5)(_load_tile)
    loaded = [load.remote(store, rel, run_seed) for rel in rels]
    cols = list(zip(*loaded)) if loaded else [[]] * 5
    return Bank(image=list(cols[0]), caption=list(cols[1]), seeds=list(cols[2]), digests=ray.get(list(cols[3])),
                sizes=ray.get(list(cols[4])))


def _mine_block(shard: np.ndarray, shard_seeds: np.ndarray, start: int, end: int, offset: int,
                bank: list[tuple[int, Any]], spec: PairingSpec, use_gpu: bool, tile_rows: int) -> PairArrays:
    """One Ray task: the best max_rank neighbours of a block of references (rows start..end of a pool shard whose
    first row is pool row ``offset``; the shard arrives zero-copy from the object store) among the whole bank
    (tiles fetched one at a time), then the band, the window and the draw."""
    import ray

    from m3t_gen.run.knn import device_for, exact_topk

    def tiles():  # fetched one shard at a time from the object store (zero-copy), once per pass
        for start, ref in bank:
            tile = ray.get(ref)
            for t in range(0, len(tile), tile_rows):
                yield start + t, tile[t:t + tile_rows]
            del tile

    device = device_for(use_gpu)
    rows = np.arange(offset + start, offset + end)
    sims, nbrs = exact_topk(shard[start:end], rows, tiles, spec.max_rank, device=device,
                            precision=first_rung(spec, device))
    return select_pairs(sims, nbrs, shard_seeds[start:end], rows, spec)


def first_rung(spec: PairingSpec, device: str) -> str:
    """The precision exact search starts at: bf16 where it is fast (or asked for), else fp32; rows it cannot
    certify climb the ladder (m3t_gen.run.knn)."""
    from m3t_gen.run.knn import reduced_precision_pays

    if spec.precision == "bf16" or (spec.precision == "auto" and reduced_precision_pays(device)):
        return "bf16"
    return "fp32"


def submit_mining(bank: Bank, spec: PairingSpec) -> list[Any]:
    """Exact pairs over the whole pool, mined by Ray tasks: the references cut into blocks of
    ``resources.block_rows``, one task each (``num_gpus`` per task: K GPUs take 1/K of the blocks each), each
    streaming every shard's embeddings past its block. Returns the tasks' object references (each a block's
    ``PairArrays``, in reference-row order): the pairs stay in the object store until the part writer reads them."""
    import ray

    res = spec.resources
    tiles = list(zip(bank.offsets, bank.image))
    mine = ray.remote(num_cpus=res.num_cpus, num_gpus=res.num_gpus or None)(_mine_block)
    return [mine.remote(emb, seeds, start, min(start + res.block_rows, size), offset, tiles, spec,
                        bool(res.num_gpus), res.tile_rows)
            for offset, size, emb, seeds in zip(bank.offsets, bank.sizes, bank.image, bank.seeds)
            for start in range(0, size, res.block_rows)]


def mine_pool(bank: Bank, spec: PairingSpec) -> PairArrays:
    """``submit_mining``'s pairs gathered (tests, benchmarks): in (reference row, rank) order."""
    import ray

    return PairArrays.concat(ray.get(submit_mining(bank, spec)))

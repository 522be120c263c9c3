import numpy as np
import pytest

from m3t_gen.config import PairingSpec
from m3t_gen.run.pairing import mine_pairs


def _embs(n=40, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(embs, i):
    sims = embs @ embs[i]
    order = [j for j in np.argsort(-sims, kind="stable") if j != i]
    return sims, order


def test_pairs_respect_band_and_rank_window_and_never_self():
    embs = _embs()
    keys = [f"k{i:03d}" for i in range(len(embs))]
    spec = PairingSpec(min_similarity=-0.2, max_similarity=0.6, min_rank=2, max_rank=6, pairs_per_image=2)
    pairs = mine_pairs(embs, keys, spec, run_seed=0)
    assert pairs
    for p in pairs:
        assert p.ref != p.tgt
        sims, order = _brute(embs, p.ref)
        assert abs(sims[p.tgt] - p.similarity) < 1e-5
        assert -0.2 <= p.similarity <= 0.6
        assert 2 <= p.rank <= 6 and order.index(p.tgt) + 1 == p.rank
    per_ref = {}
    for p in pairs:
        per_ref.setdefault(p.ref, []).append(p.tgt)
    assert all(len(v) <= 2 and len(set(v)) == len(v) for v in per_ref.values())


def test_near_duplicates_above_the_band_are_excluded():
    embs = _embs(10)
    embs[1] = embs[0] + 1e-4
    embs[1] /= np.linalg.norm(embs[1])
    keys = [f"k{i}" for i in range(10)]
    pairs = mine_pairs(embs, keys, PairingSpec(min_similarity=-1, max_similarity=0.95, max_rank=9), 0)
    assert not any({p.ref, p.tgt} == {0, 1} for p in pairs)


def test_deterministic_and_bucketed():
    embs = _embs(30)
    keys = [f"k{i:02d}" for i in range(30)]
    spec = PairingSpec(min_similarity=-1, max_similarity=1, max_rank=5)
    assert mine_pairs(embs, keys, spec, 7) == mine_pairs(embs, keys, spec, 7)
    bucketed = mine_pairs(embs, keys, PairingSpec(min_similarity=-1, max_similarity=1, max_rank=5, bucket_size=10), 7)
    assert bucketed and all(p.ref // 10 == p.tgt // 10 for p in bucketed)


def test_tiny_pool_gives_no_pairs():
    assert mine_pairs(_embs(1), ["a"], PairingSpec(), 0) == []


def test_approximate_indexes_keep_band_and_window_and_find_the_exact_neighbours():
    """ivf and hnsw: every pair still satisfies the band and the rank window (ranks among what the index returns),
    and on clustered data almost all neighbours they return are the exact ones."""
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(20, 32))
    x = (centers[rng.integers(0, 20, 2000)] + 0.3 * rng.normal(size=(2000, 32))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    keys = [f"k{i:05d}" for i in range(len(x))]
    from m3t_gen.run.pairing import neighbours

    exact_sims, exact = neighbours(x, 11, PairingSpec(), 0)
    for kind in ("ivf", "hnsw"):
        spec = PairingSpec(index=kind, min_similarity=0.3, max_similarity=0.99, min_rank=2, max_rank=10, nprobe=8)
        sims, nbrs = neighbours(x, 11, spec, 0)
        recall = np.mean([len(set(a) & set(b)) / 11 for a, b in zip(nbrs, exact)])
        assert recall > 0.9, (kind, recall)
        pairs = mine_pairs(x, keys, spec, run_seed=0)
        assert len(pairs) > 1500
        for p in pairs:
            assert p.ref != p.tgt and 0.3 <= p.similarity <= 0.99 and 2 <= p.rank <= 10
            assert abs(float(x[p.ref] @ x[p.tgt]) - p.similarity) < 1e-4
        assert mine_pairs(x, keys, spec, run_seed=0) == pairs  # reproducible


def test_pair_parts_are_built_one_at_a_time_when_asked_for():
    """The driver keeps the mined pairs as numeric columns; a part's table (keys, captions, locations) exists only
    while it is written."""
    import numpy as np
    import pyarrow as pa

    from m3t_gen.config import load_config
    from m3t_gen.rows import PAIR_SCHEMA
    from m3t_gen.run.cir import pair_parts
    rng = np.random.default_rng(0)
    n = 40
    emb = rng.normal(size=(n, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pool = pa.table({"key": [f"k{i}" for i in range(n)], "caption": [f"c{i}" for i in range(n)],
                     "tar": ["t.tar"] * n, "offset": list(range(n)), "size": [1] * n})
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_config(root / "pipelines" / "smoke.yaml", ["cir.triplets_per_file=7",
                                                           "cir.pairing={min_similarity: -1.0, max_similarity: 0.999}"])
    from m3t_gen.run.pairing import key_seeds, mine_arrays

    parts = pair_parts(pool, mine_arrays(emb, key_seeds(pool.column("key").to_pylist(), 0), cfg.cir.pairing, 0),
                       "/out", cfg.cir.triplets_per_file)
    assert parts.pairs == sum(parts.sizes.values()) > 7 and set(parts.sizes.values()) <= set(range(1, 8))
    built = [parts.table(name) for name in parts.sizes]
    # Where the stages' image reader finds each JPEG, and the pair's key, from the pool rows the part names.
    first = built[0].to_pylist()[0]
    ref = int(first["ref_index"])
    assert first["ref_image"] == f"/out/pool/t.tar:{ref}:1" and first["key"] == f"{first['ref_key']}__{first['tgt_key']}"
    assert all(t.schema == PAIR_SCHEMA for t in built)
    assert [t.num_rows for t in built] == list(parts.sizes.values())
    keys = [k for t in built for k in t.column("key").to_pylist()]
    assert len(set(keys)) == len(keys) == parts.pairs
    assert all(set(t.column("shard").to_pylist()) == {name} for t, name in zip(built, parts.sizes))


# ------------------------------------------------------------------------------ the exact tiled kernel


def _reference_topk(x: np.ndarray, k: int):
    """Brute force: float64 dot products rounded to float32, order (score desc, index asc), self excluded."""
    s = (x.astype(np.float64) @ x.T.astype(np.float64)).astype(np.float32)
    np.fill_diagonal(s, -np.inf)
    idx = np.stack([np.lexsort((np.arange(len(x)), -row))[:k] for row in s])
    return np.take_along_axis(s, idx, axis=1), idx


def _clip_like(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32) + 2 * rng.standard_normal(d).astype(np.float32)
    x[n // 3], x[2 * n // 3], x[7] = x[5], x[5], x[8]  # exact ties: three copies of one image, two of another
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("precision", ["bf16", "fp32", "float64"])
@pytest.mark.parametrize("tile", [257, 1000, 5000])
def test_tiled_search_is_exact_with_ties_at_any_tile_size_and_precision(precision, tile):
    """The kernel returns exactly the brute-force answer, ties included (lower index first), whatever the tile
    size and the precision it starts at: candidates are re-scored in float64, and rows a rung cannot certify
    are searched again one rung up."""
    from m3t_gen.run.knn import exact_topk, tiles_of

    x = _clip_like(3000, 64)
    want_v, want_i = _reference_topk(x, 11)
    passes = {}
    got_v, got_i = exact_topk(x, np.arange(len(x)), tiles_of(x, tile), 11, precision=precision, margin=4,
                              passes=passes)
    assert (got_i == want_i).all() and (got_v == want_v).all()
    if precision == "bf16":
        # dense near-ties on this data and a short list: the certificate fails for some rows, which climb
        assert 0 < passes["fp32"] < len(x)


def test_certificate_fails_where_it_must():
    """A row whose k-th neighbour ties with rows left outside the list cannot be certified at any fast rung (the
    bound is > 0): it is the float64 rung that answers it, lower indices first."""
    from m3t_gen.run.knn import TopK, exact_topk, tiles_of

    x = _clip_like(400, 16, seed=2)
    x[100:130] = x[50]  # 31 copies of one image: every row's neighbour list is full of exact ties
    top = TopK(x, np.arange(len(x)), 5, precision="fp32", margin=3)
    for offset, rows in tiles_of(x, 64)():
        top.add(offset, rows)
    assert 50 in top.unsure()
    passes = {}
    got_v, got_i = exact_topk(x, np.arange(len(x)), tiles_of(x, 64), 5, precision="bf16", margin=3, passes=passes)
    want_v, want_i = _reference_topk(x, 5)
    assert (got_i == want_i).all() and (got_v == want_v).all() and passes["float64"] > 0
    assert list(got_i[50]) == [100, 101, 102, 103, 104]


def test_pairs_are_the_same_whatever_the_blocking():
    """The draw depends on the reference's key seed, not on which block or worker mined it."""
    from m3t_gen.run.pairing import PairArrays, key_seeds, select_pairs
    from m3t_gen.run.knn import exact_topk, tiles_of

    x = _clip_like(600, 32, seed=3)
    keys = [f"k{i:04d}" for i in range(len(x))]
    spec = PairingSpec(min_similarity=-1, max_similarity=0.99, min_rank=2, max_rank=9, pairs_per_image=3)
    seeds = key_seeds(keys, 5)
    whole = mine_pairs(x, keys, spec, 5)
    blocks = []
    for start in range(0, len(x), 128):
        rows = np.arange(start, min(start + 128, len(x)))
        sims, nbrs = exact_topk(x[rows], rows, tiles_of(x, 100), spec.max_rank, precision="bf16")
        blocks.append(select_pairs(sims, nbrs, seeds[rows], rows, spec))
    assert PairArrays.concat(blocks).as_pairs() == whole  # keys here sort as the rows do
    per_ref = np.bincount([p.ref for p in whole], minlength=len(x))
    assert per_ref.max() == 3 and (per_ref >= 1).all()


@pytest.mark.slow
def test_distributed_mining_equals_the_exact_faiss_search(tmp_path):
    """mine_pool over pool shards in Ray tasks (blocks of references, tiles of the bank from the object store,
    bf16 tiles on this AMX CPU) chooses exactly the pairs that FAISS's exact fp32 search and the same draw give;
    the digests in the pool files are what the loader reports."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from m3t_gen.config import PairingResources
    from m3t_gen.run.pairing import (POOL_DIGEST_KEY, PairArrays, key_seeds, load_bank, mine_pool, pool_digest,
                                     select_pairs)
    from m3t_gen.run.writer import POOL_SCHEMA
    from m3t_gen.storage.store import Store

    x = _clip_like(2500, 48, seed=11)
    keys = [f"s{i // 700}_{i:05d}" for i in range(len(x))]
    (tmp_path / "pool").mkdir()
    rels, digests = [], []
    for shard, start in enumerate(range(0, len(x), 700)):  # 4 shards of uneven size
        rows = range(start, min(start + 700, len(x)))
        table = pa.Table.from_pylist([{"key": keys[i], "tar": "t.tar", "caption": f"c{i}", "url": None,
                                       "image_emb": x[i].tobytes(), "caption_emb": x[i].tobytes(), "offset": 0,
                                       "size": 1} for i in rows], schema=POOL_SCHEMA)
        if shard != 2:  # shard 2 as an older writer left it: no digest kept, the loader computes it
            table = table.replace_schema_metadata({POOL_DIGEST_KEY: pool_digest(table).encode()})
        digests.append(pool_digest(table))
        rels.append(f"pool/{shard}.parquet")
        pq.write_table(table, tmp_path / rels[-1])
    spec = PairingSpec(min_similarity=0.1, max_similarity=0.99, min_rank=2, max_rank=12, pairs_per_image=2,
                       resources=PairingResources(block_rows=300, tile_rows=512))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        bank = load_bank(Store(tmp_path), rels, run_seed=4)
        assert bank.digests == digests and bank.sizes == [700, 700, 700, 400]
        got = mine_pool(bank, spec)
    finally:
        ray.shutdown()
    # Reference: FAISS exact search (fp32), ties put in index order, the same draw.
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, nbrs = index.search(x, 30)
    rows = []
    for i in range(len(x)):
        order = sorted((j for j in nbrs[i] if j != i), key=lambda j: (-float(sims[i][list(nbrs[i]).index(j)]), j))
        rows.append(order[: spec.max_rank])
    ref_nbrs = np.array(rows)
    ref_sims = np.take_along_axis((x.astype(np.float64) @ x.T.astype(np.float64)).astype(np.float32), ref_nbrs, 1)
    want = select_pairs(ref_sims, ref_nbrs, key_seeds(keys, 4), np.arange(len(x)), spec)
    assert len(got) == len(want) > 2 * len(x) * 0.9
    assert (got.ref == want.ref).all() and (got.tgt == want.tgt).all() and (got.rank == want.rank).all()
    assert np.array_equal(got.similarity, want.similarity)
    assert isinstance(got, PairArrays)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU (runs where one is lent)")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_gpu_search_equals_the_brute_force(precision):
    """The same kernel on a GPU (cuBLAS products, reductions in fp32 forced) gives exactly the CPU's answer."""
    from m3t_gen.run.knn import device_for, exact_topk, tiles_of

    x = _clip_like(3000, 64)
    want_v, want_i = _reference_topk(x, 11)
    got_v, got_i = exact_topk(x, np.arange(len(x)), tiles_of(x, 1000), 11, device=device_for(True),
                              precision=precision, margin=4)
    assert (got_i == want_i).all() and (got_v == want_v).all()

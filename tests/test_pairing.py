import numpy as np

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
    from m3t_gen.run.pipeline import make_context

    rng = np.random.default_rng(0)
    n = 40
    emb = rng.normal(size=(n, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pool = pa.table({"key": [f"k{i}" for i in range(n)], "caption": [f"c{i}" for i in range(n)],
                     "tar": ["t.tar"] * n, "offset": list(range(n)), "size": [1] * n})
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_config(root / "pipelines" / "smoke.yaml", ["cir.triplets_per_file=7",
                                                           "cir.pairing={min_similarity: -1.0, max_similarity: 0.999}"])
    parts = pair_parts(pool, emb, make_context(cfg))
    assert parts.pairs == sum(parts.sizes.values()) > 7 and set(parts.sizes.values()) <= set(range(1, 8))
    built = [parts.table(name) for name in parts.sizes]
    assert all(t.schema == PAIR_SCHEMA for t in built)
    assert [t.num_rows for t in built] == list(parts.sizes.values())
    keys = [k for t in built for k in t.column("key").to_pylist()]
    assert len(set(keys)) == len(keys) == parts.pairs
    assert all(set(t.column("shard").to_pylist()) == {name} for t, name in zip(built, parts.sizes))

"""Mining cost of the negatives pass (issue 24): the pass's own Ray tasks (m3t_gen.run.negatives.submit_mining:
per shard, an exact kNN of each turn type's targets among that type's targets of every shard, and of its images
among every image) over synthetic CLIP-like embeddings of a run with ``--turns`` kept turns in the published mix
(7 per image), in ``--shards`` output shards, ``--workers`` single-thread tasks at a time. The CLIP embedding and
scoring of the pass are not in it (they run on the reward's actors; plan budgets them).

Baseline, measured in the same run: one core's bare bf16 (or fp32) tile product (bench/pair_mining.py); the
ratio is the mining's FLOP rate over ``workers`` bare products. Exactness: for ``--check`` queries per turn type,
the candidates the tasks returned against a float64 numpy search over every other image's targets of the type.

    python bench/negatives_mining.py --turns 100000 --workers 2
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def shards_of(turns: int, shards: int, d: int):
    """ShardTurns of a run with ``turns`` kept turns (the default mix: 7 per image) in ``shards`` shards."""
    import numpy as np

    from m3t_gen.run.negatives import ShardTurns, Texts
    from m3t_gen.turns import DEFAULT_MIX, TURN_TYPE_NAMES
    from pair_mining import synthetic

    per_image = sum(DEFAULT_MIX.values())
    images = turns // per_image
    codes = [TURN_TYPE_NAMES.index(t) for t, c in DEFAULT_MIX.items() for _ in range(c)]
    image_emb = synthetic(images, d, seed=1)
    target_emb = synthetic(images * per_image, d, seed=2)
    out = []
    bounds = np.linspace(0, images, shards + 1).astype(int)
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        n = b - a
        rows = np.arange(a * per_image, b * per_image)
        out.append(ShardTurns(
            keys=Texts.of([f"s{s:04d}_{i:08d}" for i in range(a, b)]), image_emb=image_emb[a:b].copy(),
            caption_emb=target_emb[rows[::per_image]].copy(), sample=np.repeat(np.arange(n, dtype=np.int32), per_image),
            turn=np.tile(np.arange(per_image, dtype=np.int32), n), kind=np.tile(np.array(codes, np.int8), n),
            queries=Texts.of([""] * len(rows)), targets=Texts.of([f"t{r}" for r in rows]),
            target_emb=target_emb[rows].copy(), positive=np.zeros(len(rows), np.float32)).by_kind())  # as the pass stores them
    return out


def check(shards, got: dict, checks: int) -> int:
    """Differences between the tasks' candidates and a float64 search, for ``checks`` queries per type of shard 0
    (candidates of the default band: every rank 1..max_rank within the per-turn limit)."""
    import numpy as np

    from m3t_gen.turns import TURN_TYPE_NAMES

    diffs = 0
    for found in got[0][0]:
        rows = found["row"]
        code = int(shards[0].kind[rows[0]])
        emb = np.concatenate([s.target_emb[s.of_kind(code)] for s in shards]).astype(np.float64)
        owner = np.concatenate([[f"{j}:{x}" for x in s.sample[s.of_kind(code)]] for j, s in enumerate(shards)])
        own_rows = shards[0].of_kind(code)
        for q in np.unique(rows)[:checks]:
            n = int(np.flatnonzero(own_rows == q)[0])
            sims = emb @ emb[n]
            order = [m for m in np.lexsort((np.arange(len(sims)), -sims.astype(np.float32)))
                     if owner[m] != owner[n]][:int((rows == q).sum())]
            want = [shards[int(o.split(":")[0])].keys[int(o.split(":")[1])] for o in owner[order]]
            have = [src for r, src in zip(rows, found["source"]) if r == q]
            diffs += want != have
        assert TURN_TYPE_NAMES[code]
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--check", type=int, default=50, help="queries per turn type checked against float64 search")
    args = ap.parse_args()

    import numpy as np
    import ray

    from m3t_gen.config import NegativesSpec
    from m3t_gen.run.negatives import Bank, submit_mining
    from m3t_gen.turns import DEFAULT_MIX
    from pair_mining import Peak, bare_product_gflops

    shards = shards_of(args.turns, args.shards, args.dim)
    spec = NegativesSpec(candidates=args.candidates)
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
             object_store_memory=max(2 * 1024 ** 3, int(args.turns * args.dim * 4 * 2)))
    bank = Bank([ray.put(s) for s in shards], np.stack([s.counts() for s in shards]))
    peak = Peak()
    t = time.perf_counter()
    refs = submit_mining(bank, spec, max(DEFAULT_MIX.values()), list(range(len(shards))))
    got = {n: (ray.get(text), ray.get(image)) for n, (text, image) in refs.items()}
    mine_s = time.perf_counter() - t
    driver_peak = peak.done()
    ray.shutdown()
    counts = bank.counts.sum(axis=0)
    flops = float(sum(2.0 * c * c * args.dim for c in counts))
    bare = bare_product_gflops(args.dim, spec.precision)
    candidates = sum(len(f["row"]) for text, _ in got.values() for f in text)
    print(json.dumps({
        "bench": "negatives_mining", "turns": int(counts[:-1].sum()), "images": int(counts[-1]), "dim": args.dim,
        "shards": args.shards, "workers": args.workers, "text_candidates": candidates,
        "image_candidates": sum(len(i["sample"]) for _, i in got.values()), "mine_s": round(mine_s, 1),
        "gflop": round(flops / 1e9, 1), "gflops": round(flops / mine_s / 1e9, 1),
        "bare_product_gflops_per_core": round(bare, 1),
        "ratio_to_bare_products": round(flops / mine_s / 1e9 / (bare * args.workers), 3),
        "driver_peak_gb": round(driver_peak, 3),
        "differences_vs_float64_search": check(shards, got, args.check)}))


if __name__ == "__main__":
    main()

"""The CIR pass at scale (issue 13): how the pairs spread over the modify actors, and the driver's memory as the
pair count grows.

    python bench/cir_pass.py --images 2000 --concurrency 2 --compare-pairs 1 10
    python bench/cir_pass.py --out DIR --images 200 --shards 4 --pairs-per-image 2 --concurrency 3   # one pass

A synthetic image pool (``pool/<shard>.parquet`` as the sample pass writes it: keys, captions, L2-normalised
image and caption embeddings of the tiny CLIP's width) is built once under --out; then the real CIR pass runs on
it (`m3t_gen.run.cir.run_cir`: pair mining, part files, Ray Data with the modify / triplet_reward / triplet_filter
stages, tiny random-weight models; the modify stage writes from captions with a small token budget, so most
answers are rejected, which costs the pass the same bookkeeping). Printed (one JSON line per pass): pairs, parts,
rows per modify actor and their balance (max / min), the driver's RSS before the pass and its peak during it
(sampled every 20 ms). --compare-pairs runs one pass per pairs-per-image value, each in a fresh process, and
prints the ratio of the driver's peak growth (peak - before) to the first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_pool(out: Path, images: int, shards: int, dim: int, seed: int = 0) -> list[str]:
    """``shards`` pool files of images/shards images each; existing files are kept (so a larger --shards adds
    to the pool, as a re-run over more input does)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from m3t_gen.run.writer import POOL_SCHEMA

    (out / "pool").mkdir(parents=True, exist_ok=True)
    words = ["red", "blue", "car", "house", "dog", "tree", "street", "snow", "beach", "cat", "lamp", "sofa"]
    per = images // shards
    names = []
    for s in range(shards):
        name = f"syn-{s:06d}"
        names.append(name)
        path = out / "pool" / f"{name}.parquet"
        if path.exists():
            continue
        rng = np.random.default_rng(seed * 1000 + s)
        img = rng.normal(size=(per, dim)).astype(np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        cap = img + 0.5 * rng.normal(size=(per, dim)).astype(np.float32)
        cap /= np.linalg.norm(cap, axis=1, keepdims=True)
        rows = [{"key": f"{name}_{i:06d}", "tar": f"{name}-0000.tar", "url": None, "offset": 0, "size": 0,
                 "caption": " ".join(rng.choice(words, 6)), "image_emb": img[i].tobytes(),
                 "caption_emb": cap[i].tobytes()} for i in range(per)]
        pq.write_table(pa.Table.from_pylist(rows, schema=POOL_SCHEMA), path)
    return names


def pass_config(out: Path, pairs_per_image: int, concurrency: int, per_part: int, max_tokens: int):
    import yaml

    from m3t_gen.config import PipelineConfig

    data = yaml.safe_load((ROOT / "pipelines" / "smoke.yaml").read_text())
    data.update(recipe="cir", name="cir-bench")
    data.pop("dialogue", None)
    data.pop("judge", None)
    data.pop("negatives", None)  # mined for M3T turns
    data["cir"].pop("judge", None)  # the pass's distribution of pairs over modify actors is measured, not the judge
    data["input"]["paths"] = [str(ROOT / "data" / "smoke" / "*.tar")]
    data["output"]["dir"] = str(out)
    data["cir"]["pairing"] = {"min_similarity": -1.0, "max_similarity": 0.999, "min_rank": 1,
                              "max_rank": max(5, pairs_per_image), "pairs_per_image": pairs_per_image}
    data["cir"]["triplets_per_file"] = per_part
    modify = data["cir"]["modify"]
    modify["max_attempts"] = 1
    modify["sampling"]["max_tokens"] = max_tokens
    modify["resources"].update(concurrency=concurrency, num_cpus=0.2)
    data["reward"]["resources"]["num_cpus"] = 0.2
    data["base_dir"] = str(ROOT / "pipelines")
    return PipelineConfig.model_validate(data)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def one_pass(args: argparse.Namespace) -> dict:
    from m3t_gen.run.pipeline import make_context, write_owner_file
    from m3t_gen.run.recipe import init_ray
    from m3t_gen.testing.tiny_models import TINY_CLIP_DIM

    out = Path(args.out)
    shards = build_pool(out, args.images, args.shards, TINY_CLIP_DIM)
    cfg = pass_config(out, args.pairs_per_image, args.concurrency, args.per_part, args.max_tokens)
    if not (out / ".m3t-gen").exists():
        write_owner_file(out, cfg)
    from m3t_gen.run.cir import run_cir

    init_ray(cfg)
    log_lines: list[str] = []
    before = rss_mb()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    summary = run_cir(cfg, make_context(cfg), out, shards, log_lines.append)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    workers = summary.rows_per_worker.get("modify", {})
    counts = sorted(workers.values())
    return {"bench": "cir_pass", "images": args.images, "pairs_per_image": args.pairs_per_image,
            "pairs": summary.pairs, "parts": len(list((out / "triplet_stats").glob("*.json"))),
            "concurrency": args.concurrency, "rows_per_modify_actor": counts,
            "balance_max_over_min": round(counts[-1] / counts[0], 3) if counts else None,
            "driver_rss_before_mb": round(before, 1), "driver_rss_peak_mb": round(peak[0], 1),
            "wall_s": round(wall, 1), "log": log_lines, "kept": summary.kept, "rejected": summary.rejected,
            "pool_fingerprint": summary.pool_fingerprint}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="output folder (a temporary one per pass when absent)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--pairs-per-image", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--per-part", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--compare-pairs", type=int, nargs="+")
    args = ap.parse_args()
    if not args.compare_pairs:
        if not args.out:
            import tempfile

            args.out = tempfile.mkdtemp(prefix="cir-bench-")
        print(json.dumps(one_pass(args)), flush=True)
        return
    import tempfile

    results = []
    for p in args.compare_pairs:
        cmd = [sys.executable, __file__, "--out", tempfile.mkdtemp(prefix="cir-bench-"), "--images", str(args.images),
               "--shards", str(args.shards), "--pairs-per-image", str(p), "--concurrency", str(args.concurrency),
               "--per-part", str(args.per_part), "--max-tokens", str(args.max_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith('{"bench"')), None)
        if line is None:
            raise SystemExit(proc.stdout[-2000:] + proc.stderr[-4000:])
        result = json.loads(line)
        result.pop("log")
        results.append(result)
        print(json.dumps(result), flush=True)
    growth = [r["driver_rss_peak_mb"] - r["driver_rss_before_mb"] for r in results]
    peaks = [r["driver_rss_peak_mb"] for r in results]
    print(json.dumps({"bench": "cir_pass_memory", "pairs": [r["pairs"] for r in results],
                      "driver_peak_ratio": round(peaks[-1] / peaks[0], 3),
                      "driver_growth_mb": growth}), flush=True)


if __name__ == "__main__":
    main()

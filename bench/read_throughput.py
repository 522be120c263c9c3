"""Read-stage throughput and memory (issue 3), ratios against a bare Pillow loop measured in the same run.

    python bench/read_throughput.py [--images-per-shard 200] [--shards 8] [--repeats 3]

1. bare:   one process, a plain loop over the same tars doing the same per-image work (tarfile, Pillow decode,
           EXIF check, RGB, min side, re-encode when needed, sha256, perceptual hash);
2. ray x1: the pipeline's read stage (Ray Data map_batches over input shards) with one task at a time; the
           driver consumes the rows (on 2 cores it competes with the read tasks: that is part of the figure);
3. ray x2: the same with two tasks at a time (2 cores); bare x2: the bare loop in two processes, the ceiling
           for "2 workers" on this machine;
4. memory: peak RSS of the whole process tree (driver + Ray) reading N shards vs 10N shards.
Prints one JSON line: medians with min and max over the repeats, and the ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def make_shards(out: Path, shards: int, per_shard: int, seed: int = 0) -> list[str]:
    """Distinct JPEGs (random crops of the bundled real photos, 400-900 px) in img2dataset layout."""
    import skimage.data as sk
    from sklearn.datasets import load_sample_images

    bases = [Image.fromarray(getattr(sk, n)()).convert("RGB") for n in
             ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")]
    bases += [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(shards):
        path = out / f"bench-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                img = bases[rng.integers(len(bases))]
                w, h = img.size
                cw, ch = int(w * rng.uniform(0.6, 1)), int(h * rng.uniform(0.6, 1))
                x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
                crop = img.crop((x, y, x + cw, y + ch))
                scale = rng.uniform(400, 900) / max(crop.size)
                crop = crop.resize((max(1, int(crop.width * scale)), max(1, int(crop.height * scale))))
                buf = io.BytesIO()
                crop.save(buf, format="JPEG", quality=int(rng.integers(70, 95)))
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"photo {s}-{i}".encode())):
                    info = tarfile.TarInfo(f"{s:04d}{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def bare_loop(paths: list[str], min_side: int) -> int:
    """The same per-image work as the read stage, with nothing around it."""
    import imagehash

    n = 0
    for path in paths:
        with tarfile.open(path, "r|*") as tar:
            for info in tar:
                data = tar.extractfile(info).read()
                if not info.name.endswith(".jpg"):
                    continue
                img = Image.open(io.BytesIO(data))
                img.load()
                if img.getexif().get(0x0112, 1) not in (1, None):
                    img = ImageOps.exif_transpose(img)
                if img.mode != "RGB":
                    img = img.convert("RGB")
                if max(img.size) < min_side:
                    continue
                hashlib.sha256(data).hexdigest()
                hashlib.sha256(data).hexdigest()
                str(imagehash.phash(img))
                n += 1
    return n


def bare_two_processes(paths: list[str], min_side: int) -> int:
    """The ceiling for 2 workers on this machine: the bare loop in two processes, half the shards each."""
    from multiprocessing import get_context

    with get_context("spawn").Pool(2) as pool:
        return sum(pool.starmap(bare_loop, [(paths[0::2], min_side), (paths[1::2], min_side)]))


def ray_read(paths: list[str], tasks: int, min_side: int) -> int:
    import ray

    from m3t_gen.config import InputSpec, ReadSpec
    from m3t_gen.stages.read import read_shards

    ds = ray.data.from_items([{"shard": Path(p).stem, "path": p} for p in paths], override_num_blocks=len(paths))
    ds = ds.map_batches(read_shards, batch_size=1, batch_format="pyarrow", num_cpus=1, concurrency=tasks,
                        fn_kwargs={"input_spec": InputSpec(paths=paths), "spec": ReadSpec(min_side=min_side),
                                   "limit": None})
    n = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        n += sum(1 for s in batch.column("status").to_pylist() if s == "ok")
    return n


def timed(fn, *args) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t, n


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}


def memory_child(paths_file: str) -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    paths = json.loads(Path(paths_file).read_text())
    print(ray_read(paths, 2, 64))


def peak_rss(paths: list[str], tmp: Path) -> float:
    from peak_rss import measure

    f = tmp / f"paths-{len(paths)}.json"
    f.write_text(json.dumps(paths))
    return measure([sys.executable, __file__, "--memory-child", str(f)], quiet=True, interval=0.1)["peak_rss_gib"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--images-per-shard", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-child")
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    import ray

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = make_shards(tmp, args.shards, args.images_per_shard)
        ray.init(num_cpus=2, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_read(paths[:1], 1, 64)  # warm the workers: start-up is not throughput
        res: dict[str, list[float]] = {"bare": [], "bare_x2": [], "ray_x1": [], "ray_x2": []}
        counts = set()
        for _ in range(args.repeats):
            for name, fn, extra in (("bare", bare_loop, ()), ("bare_x2", bare_two_processes, ()),
                                    ("ray_x1", ray_read, (1,)), ("ray_x2", ray_read, (2,))):
                if name.startswith("bare"):
                    secs, n = timed(fn, paths, 64)
                else:
                    secs, n = timed(fn, paths, *extra, 64)
                res[name].append(n / secs)
                counts.add(n)
        ray.shutdown()
        small = paths[:2]
        (tmp / "big").mkdir()
        big = make_shards(tmp / "big", 20, args.images_per_shard, seed=1)
        mem_small, mem_big = peak_rss(small, tmp), peak_rss(big, tmp)
    med = {k: statistics.median(v) for k, v in res.items()}
    print(json.dumps({
        "bench": "read_throughput", "images": args.shards * args.images_per_shard, "ok_counts": sorted(counts),
        "cores": os.cpu_count(),
        "images_per_s": {k: summary(v) for k, v in res.items()},
        "ratio_ray_x1_vs_bare": round(med["ray_x1"] / med["bare"], 3),
        "ratio_ray_x2_vs_ray_x1": round(med["ray_x2"] / med["ray_x1"], 3),
        "ratio_bare_x2_vs_bare": round(med["bare_x2"] / med["bare"], 3),
        "peak_rss_gib": {"2_shards": round(mem_small, 2), "20_shards": round(mem_big, 2)},
        "ratio_peak_rss_10x_input": round(mem_big / mem_small, 3),
    }))


if __name__ == "__main__":
    main()

"""Peak memory of a whole run (issues 3 and 7): the smoke pipeline (both recipes, tiny models, real engines) over
N images and over 10N images, peak RSS summed over the whole process tree (driver, Ray, actors, vLLM engine),
in one run. Streaming means the 10x run should need about the same memory. Prints one JSON line.

    python bench/pipeline_memory.py [--images 40] [--factor 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_rss import measure  # noqa: E402
from read_throughput import make_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(inputs: str, out: Path, recipe: str) -> dict:
    cmd = [sys.executable, "-m", "m3t_gen.cli", "run", str(ROOT / "pipelines" / "smoke.yaml"), "--input", inputs,
           "--output", str(out), "--set", "ray.progress=false", "--set", f"recipe={recipe}"]
    result = measure(cmd, quiet=True)
    manifest = json.loads((out / "manifest.json").read_text()) if result["rc"] == 0 else {}
    return {**result, "read": manifest.get("totals", {}).get("read")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--recipe", default="m3t")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        per_shard = args.images // 2
        (tmp / "small").mkdir()
        (tmp / "big").mkdir()
        make_shards(tmp / "small", 2, per_shard, seed=0)
        make_shards(tmp / "big", 2 * args.factor, per_shard, seed=1)
        small = run(str(tmp / "small" / "*.tar"), tmp / "out-small", args.recipe)
        big = run(str(tmp / "big" / "*.tar"), tmp / "out-big", args.recipe)
    print(json.dumps({"bench": "pipeline_memory", "recipe": args.recipe, "small": small, "big": big,
                      "ratio_peak_rss": round(big["peak_rss_gib"] / small["peak_rss_gib"], 3)}))


if __name__ == "__main__":
    main()

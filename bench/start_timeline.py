"""Where a run's start-up time goes: run a pipeline (default: the small-shard run, README command 1) with
M3T_GEN_START_TRACE set, and report for every stage actor when, counted from the command's start, its constructor
began, its model was loaded ("built") and its first batch arrived, with the run's wall time and the peak RSS of its
whole process tree (bench/peak_rss.py). Prints one JSON line.

    python bench/start_timeline.py [--repeats 2] [-- m3t-gen run pipelines/smoke.yaml --output DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_rss import measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def one_run(cmd: list[str], out: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.jsonl"
        os.environ["M3T_GEN_START_TRACE"] = str(trace)
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        result = measure(cmd, quiet=True)
        events = [json.loads(line) for line in trace.read_text().splitlines()] if trace.exists() else []
    stages: dict[str, dict[str, float]] = {}
    for e in events:
        # Several actors of one stage: the last to be built / to get a batch is when the pool was all up.
        slot = stages.setdefault(e["stage"], {})
        slot[e["event"]] = round(max(slot.get(e["event"], 0.0), e["t"] - t0), 1)
    return {**result, "stages": stages}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    argv = sys.argv[1:]
    cmd = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    out = None
    if not cmd:
        out = Path(tempfile.gettempdir()) / "m3t-start-timeline"
        cmd = [str(Path(sys.executable).parent / "m3t-gen"), "run", str(ROOT / "pipelines" / "smoke.yaml"),
               "--output", str(out)]
    runs = [one_run(cmd, out) for _ in range(args.repeats)]
    walls = [r["wall_s"] for r in runs]
    print(json.dumps({"bench": "start_timeline", "cmd": " ".join(cmd), "wall_s_median": statistics.median(walls),
                      "wall_s": walls, "peak_rss_gib": [r["peak_rss_gib"] for r in runs],
                      "rc": [r["rc"] for r in runs], "stages": [r["stages"] for r in runs]}))
    return max(r["rc"] for r in runs)


if __name__ == "__main__":
    sys.exit(main())

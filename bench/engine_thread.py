"""Engine steps by thread (issue 27): the same vLLM engine (CPU platform, engine core inline) driven with one
``LLM.chat`` over the same number of rows, first from the first thread that ran its operators, then from another
thread while the first one's OpenMP pool is still alive (what an actor did before: engine built in
``__init__`` on Ray's main thread, stepped by the backend's feeder thread), alternating, on distinct rows.

    python bench/engine_thread.py --stage caption --rows 1536 --repeats 2

torch's OpenMP pool belongs to the thread that runs an operator; with two pools on a 2-vCPU box libgomp has more
threads than CPUs and stops spinning between parallel regions. Prints one JSON line: seconds in ``engine.step``
and output tok/s per side, and the other thread's figure over the first's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generation_efficiency as ge  # noqa: E402  (the same rows, config and bare engine call)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", default="caption", choices=["dialogue", "caption", "judge", "triplet_judge"])
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from m3t_gen.run.pipeline import make_context

    cfg = ge.config(args.stage, "vllm", 256, 1, 2)
    stage_cls, make_rows = ge._stage(args.stage)
    stage = stage_cls(make_context(cfg))  # its backend's engine; ge._bare_engine stops the feeder, whose pool goes
    generate = ge._bare_engine(stage.backend)
    steps = [0.0]
    step = stage.backend.llm.llm_engine.step

    def timed_step():
        t = time.perf_counter()
        try:
            return step()
        finally:
            steps[0] += time.perf_counter() - t
    stage.backend.llm.llm_engine.step = timed_step
    generate(ge._requests(stage, make_rows(8, 10**6)))  # warm-up: this thread's OpenMP pool now exists

    runs: dict[str, list[dict]] = {"first thread": [], "other thread": []}
    start = 0

    def side(name: str) -> None:
        nonlocal start
        rows = make_rows(args.rows, start)
        start += args.rows
        reqs = ge._requests(stage, rows)
        steps[0] = 0.0
        t = time.perf_counter()
        tokens = generate(reqs)
        wall = time.perf_counter() - t
        runs[name].append({"wall_s": round(wall, 2), "step_s": round(steps[0], 2), "tok_s": round(tokens / wall, 1)})

    for _ in range(args.repeats):
        side("first thread")
        other = threading.Thread(target=side, args=("other thread",))
        other.start()
        other.join()
    stage.backend.close()
    med = {k: statistics.median(r["tok_s"] for r in v) for k, v in runs.items()}
    print(json.dumps({"bench": "engine_thread", "stage": args.stage, "rows": args.rows, "runs": runs,
                      "tok_s_median": med,
                      "other_over_first": round(med["other thread"] / med["first thread"], 3)}), flush=True)


if __name__ == "__main__":
    main()

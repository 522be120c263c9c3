"""Run a command and report its wall time and the peak summed RSS of its whole process tree (Ray's raylet,
workers and vLLM engine processes included), sampled every 0.2 s. Prints one JSON line.

    python bench/peak_rss.py -- m3t-gen run pipelines/smoke.yaml --output out/smoke
"""

import json
import subprocess
import sys
import time

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def main(argv: list[str]) -> int:
    cmd = argv[argv.index("--") + 1:] if "--" in argv else argv
    start = time.perf_counter()
    child = subprocess.Popen(cmd)
    proc = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(0.2)
    wall = time.perf_counter() - start
    print(json.dumps({"cmd": " ".join(cmd), "rc": child.returncode, "wall_s": round(wall, 1),
                      "peak_rss_gib": round(peak / 2**30, 2)}))
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

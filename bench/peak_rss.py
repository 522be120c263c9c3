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


def measure(cmd: list[str], quiet: bool = False, interval: float = 0.2) -> dict:
    """Run ``cmd``; its exit code, wall seconds and the peak RSS of its process tree in GiB."""
    start = time.perf_counter()
    out = subprocess.DEVNULL if quiet else None
    child = subprocess.Popen(cmd, stdout=out, stderr=out)
    proc = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(interval)
    return {"rc": child.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(peak / 2**30, 2)}


def main(argv: list[str]) -> int:
    cmd = argv[argv.index("--") + 1:] if "--" in argv else argv
    result = measure(cmd)
    print(json.dumps({"cmd": " ".join(cmd), **result}))
    return result["rc"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

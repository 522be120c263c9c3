"""Kill -9 a run at several points, resume it: the final output equals a clean run's, each key once, no
temporary files left, stats add up."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import webdataset as wds

from conftest import ROOT, kill_tree, run_cli  # noqa: E402

pytestmark = pytest.mark.slow


def _keys(out: Path) -> list[str]:
    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    return [s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False)] if tars else []


def _has_tmp(out: Path) -> bool:
    return any(out.rglob("*.tmp"))


def _stats_count(out: Path) -> int:
    return len(list((out / "stats").glob("*.json"))) if (out / "stats").exists() else 0


# When to pull the plug (wall = the clean run's wall time): before Ray is even up; in the middle, while models
# generate and tars are being written; late, once a shard is done or the CIR phase runs. (A file-based trigger
# such as "a *.tmp tar exists" is too brief on this small input to be caught reliably by polling.)
KILL_POINTS = {
    "startup": lambda out, t, wall: t > 3,
    "generating": lambda out, t, wall: t > 0.55 * wall or _has_tmp(out),
    "late": lambda out, t, wall: _stats_count(out) >= 1 or t > 0.85 * wall,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_and_resume_equals_clean_run(point, smoke_run, tmp_path):
    clean, _ = smoke_run
    wall = json.loads((clean / "manifest.json").read_text())["wall_seconds"]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "m3t_gen.cli", "run", str(ROOT / "pipelines" / "smoke.yaml"), "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    start, killed = time.time(), False
    while proc.poll() is None and time.time() - start < 600:
        if KILL_POINTS[point](out, time.time() - start, wall):
            kill_tree(proc.pid)
            killed = True
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed, f"the run finished before reaching kill point {point}"
    assert not (out / "manifest.json").exists()  # it really was interrupted before the end

    resumed = run_cli("run", str(ROOT / "pipelines" / "smoke.yaml"), "--output", str(out))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    keys = _keys(out)
    assert len(keys) == len(set(keys)), "a key was written twice"
    assert sorted(keys) == sorted(_keys(clean))
    assert not _has_tmp(out)
    for path in (out / "stats").glob("*.json"):
        s = json.loads(path.read_text())
        assert s["read"] == s["kept"] + s["rejected"]
    m_clean = json.loads((clean / "manifest.json").read_text())
    m = json.loads((out / "manifest.json").read_text())
    assert m["totals"] == m_clean["totals"]

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


def _written(out: Path) -> dict[str, int]:
    """What the run has written so far, by the files that mark its progress."""
    def count(sub: str, pattern: str) -> int:
        return len(list((out / sub).glob(pattern))) if (out / sub).is_dir() else 0
    return {"owner": int((out / ".m3t-gen").exists()), "stats": count("stats", "*.json"),
            "pairs": count("pairs", "*.parquet"), "triplet_stats": count("triplet_stats", "*.json"),
            "manifest": int((out / "manifest.json").exists())}


# When to pull the plug, read from what the run has written (not from timings, which differ between machines and
# with what else runs): the output is claimed and nothing else is finished (Ray and the engines are starting);
# one input shard is finished (its stats, the completion marker, exist) and the pass goes on; the CIR pass has
# written its pair parts (the sample pass is done) and works on triplets.
KILL_POINTS = {
    "claimed": lambda w: w["owner"] == 1,
    "shard_done": lambda w: w["stats"] >= 1,
    "cir_started": lambda w: w["pairs"] >= 1,
}
# What must hold when the kill landed, or the point was not the one named.
AT_KILL = {
    "claimed": lambda w: w["stats"] == 0,
    "shard_done": lambda w: w["stats"] >= 1 and w["pairs"] == 0,
    "cir_started": lambda w: w["stats"] == 2 and w["manifest"] == 0,
}


def _run_until(out: Path, point: str, log: Path) -> dict[str, int]:
    """Start the small-shard run on ``out`` and kill -9 its whole process tree at ``point``; what it had written."""
    cmd = [sys.executable, "-m", "m3t_gen.cli", "run", str(ROOT / "pipelines" / "smoke.yaml"), "--output", str(out)]
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=dict(os.environ))
        start, at_kill = time.time(), None
        while proc.poll() is None and time.time() - start < 600:
            if KILL_POINTS[point](_written(out)):
                kill_tree(proc.pid)
                at_kill = _written(out)
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    assert at_kill is not None, f"the run finished before reaching kill point {point}:\n{log.read_text()[-3000:]}"
    assert AT_KILL[point](at_kill), f"killed at {point}, but the output then held {at_kill}"
    assert not (out / "manifest.json").exists()  # it really was interrupted before the end
    return at_kill


def test_killed_at_every_point_and_resumed_equals_clean_run(smoke_run, tmp_path):
    """One output through a hard life: each run is killed -9 at the next point, and the next run resumes what the
    killed one left (its lock, its *.tmp files, its finished shards), until the last run finishes it. The result
    equals a clean run's."""
    clean, _ = smoke_run
    out = tmp_path / "out"
    seen = {}
    for point in KILL_POINTS:
        log = tmp_path / f"{point}.log"
        seen[point] = _run_until(out, point, log)
        if point == "cir_started":  # it resumed from the shard(s) the previous run finished, not from scratch
            done = seen["shard_done"]["stats"]
            assert f"{done} already done, {2 - done} to run" in log.read_text(), log.read_text()[-3000:]

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
    # The same decisions and texts, sample by sample and triplet by triplet (seeds derive from keys, not timing).
    assert _decisions(out) == _decisions(clean)


def _rounded(value):
    """CLIP scores of one image differ in the 7th digit with the batch it was embedded in (BLAS blocking): compare
    what was decided and written, with scores to 4 decimals."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _decisions(out: Path) -> dict[str, str]:
    tars = sorted(str(p) for p in (out / "shards").glob("*.tar")) + sorted(str(p) for p in (out / "filtered").glob("*.tar"))
    found = {}
    for sample in wds.WebDataset(tars, shardshuffle=False):
        meta = json.loads(sample["json"])
        found[sample["__key__"]] = json.dumps(_rounded({k: meta.get(k) for k in ("caption", "turns", "dropped_turns",
                                                                                 "scores")}), sort_keys=True)
    for part in sorted((out / "triplets").glob("*.jsonl")):
        for line in part.read_text().splitlines():
            t = json.loads(line)
            found[f"{t['image']}->{t['target_image']}"] = json.dumps(_rounded(t.get("modifications")), sort_keys=True)
    return found

"""The CIR pass over a synthetic pool (bench/cir_pass.py builds it as the sample pass writes it): pairs reach
every modify actor in many parts, a resumed pass redoes only the missing part, and a pool that changed since the
parts were written makes the pass start over instead of mixing two pools."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _pass(out: Path, shards: int, concurrency: int = 2) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "cir_pass.py"), "--out", str(out), "--images", str(50 * shards),
           "--shards", str(shards), "--pairs-per-image", "2", "--concurrency", str(concurrency), "--per-part", "10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith('{"bench"')), None)
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(line)


def _parts(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "triplet_stats").glob("*.json"))}


def test_parts_spread_over_actors_resume_and_pool_change(tmp_path):
    out = tmp_path / "out"
    first = _pass(out, shards=4)
    assert first["pairs"] == 400 and first["parts"] == 40
    # The two modify actors shared the 40 parts evenly (one block per part; before, one block held them all): the
    # pool's actors took work only once both were up (PoolRendezvous), not first come, all served. (Two actors on
    # the two cores: equally fast. A third would get a smaller share of the CPUs, and Ray Data rightly gives the
    # faster ones more.)
    served = first["rows_per_modify_actor"]
    assert len(served) == 2 and max(served) <= 1.2 * min(served), served
    assert sum(first["rows_per_modify_actor"]) == 400
    parts = _parts(out)
    assert {p["pool_fingerprint"] for p in parts.values()} == {first["pool_fingerprint"]}
    assert sum(p["pairs"] for p in parts.values()) == 400 == sum(p["kept"] + p["rejected"] for p in parts.values())
    # Pairs travel without embeddings: the part files hold rows of the embedding bank instead.
    import pyarrow.parquet as pq

    pair_file = pq.read_table(out / "pairs" / "part-00000.parquet")
    assert "ref_emb" not in pair_file.column_names and pair_file.column("ref_index").type == "int64"

    (out / "triplet_stats" / "part-00007.json").unlink()
    before = {name: (out / "triplets" / f"{name}.jsonl").stat().st_mtime_ns for name in parts}
    resumed = _pass(out, shards=4)
    assert "400 pairs in 40 part(s), 10 pairs in 1 part(s) to run" in resumed["log"][0]
    after = {name: (out / "triplets" / f"{name}.jsonl").stat().st_mtime_ns for name in parts}
    assert [n for n in parts if before[n] != after[n]] == ["part-00007"]

    grown = _pass(out, shards=5)  # the same output, a pool with one more shard: new pairs, new parts
    assert grown["pool_fingerprint"] != first["pool_fingerprint"]
    assert any("the CIR pass is redone" in line for line in grown["log"])
    parts = _parts(out)
    assert {p["pool_fingerprint"] for p in parts.values()} == {grown["pool_fingerprint"]}
    assert sum(p["pairs"] for p in parts.values()) == grown["pairs"] == 500
    assert len(list((out / "pairs").glob("*.parquet"))) == len(parts) == 50

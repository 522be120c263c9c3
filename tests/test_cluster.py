"""Cluster mode on one machine: a Ray cluster of several nodes (ray.cluster_utils.Cluster, each node its own
raylet and object store), joined by `m3t-gen run` through RAY_ADDRESS; and a worker node killed mid-run.

Isolation from other Ray users of this machine: the cluster lives under a private RAY_TMPDIR, so its
``ray_current_cluster`` address file (which a plain ``ray.init()`` would join) is not the machine-wide one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "pipelines" / "smoke.yaml"
SMOKE_READ = 19
SMOKE_SHARDS = 2
OBJECT_STORE = 200 * 1024 * 1024  # per node; the smoke run moves a few MB
RUN_TIMEOUT = 900  # a smoke run takes 1-3 min here; a hang (e.g. an actor with no room to restart) fails

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_tmpdir(monkeypatch):
    # Short path: Ray's unix sockets live under it (108-byte limit).
    d = tempfile.mkdtemp(prefix="m3tc-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", d)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (Path(d) / "ray").mkdir()
    yield str(Path(d) / "ray")  # Ray's temp dir: sessions, logs, sockets, the cluster address file
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _tiny_models_built():
    # Build once here rather than in several actors at once on different nodes.
    from m3t_gen.models import TINY_KINDS, tiny_cache_dir
    from m3t_gen.testing.tiny_models import ensure_tiny_model

    for kind in TINY_KINDS:
        ensure_tiny_model(kind, tiny_cache_dir())


@contextmanager
def local_cluster(tmpdir: str, head_cpus: int, worker_cpus: list[int]):
    from ray.cluster_utils import Cluster

    common = {"object_store_memory": OBJECT_STORE}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "temp_dir": tmpdir, "include_dashboard": False, **common})
    try:
        workers = [cluster.add_node(num_cpus=n, **common) for n in worker_cpus]
        cluster.wait_for_nodes()
        yield cluster, workers
    finally:
        cluster.shutdown()


def start_run(cluster, out: Path, log: Path, *sets: str) -> subprocess.Popen:
    # Placement and fault tolerance are under test, not the judges: two engines fewer per run.
    cmd = [sys.executable, "-m", "m3t_gen.cli", "run", str(SMOKE), "--output", str(out), "--set", "judge=null",
           "--set", "cir.judge=null"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, RAY_ADDRESS=cluster.address)
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))


def wait_run(proc: subprocess.Popen, log: Path, timeout: float = RUN_TIMEOUT) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"run did not finish in {timeout} s:\n{log.read_text()[-6000:]}")
    text = log.read_text()
    assert proc.returncode == 0, text[-8000:]
    return text


def map_workers(cluster) -> list[dict]:
    """Ray Data's actors (one per stage replica) from the GCS actor table, with their node and state."""
    table = cluster.global_state.actor_table(None)
    return [a for a in table.values() if a["ActorClassName"].startswith("MapWorker(")]


def check_output(out: Path) -> dict:
    """Conservation per input shard and overall; every key read is accounted for exactly once."""
    import webdataset as wds

    manifest = json.loads((out / "manifest.json").read_text())
    totals = manifest["totals"]
    assert totals["read"] == SMOKE_READ
    assert totals["read"] == totals["kept"] + totals["rejected"]
    stats = [json.loads(p.read_text()) for p in sorted((out / "stats").glob("*.json"))]
    assert len(stats) == SMOKE_SHARDS
    for s in stats:
        assert s["read"] == s["kept"] + s["rejected"], s
        index_keys = pq.read_table(out / "index" / f"{s['shard']}.parquet").column("key").to_pylist()
        reject_keys = pq.read_table(out / "rejects" / f"{s['shard']}.parquet").column("key").to_pylist()
        both = Counter(index_keys + reject_keys)
        assert [k for k, n in both.items() if n > 1] == []
        assert set(both) == {f"{s['shard']}_{i:06d}" for i in range(s["read"])}
        assert len(index_keys) == s["kept"] and len(reject_keys) == s["rejected"]
    kept_tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    kept_keys = [x["__key__"] for x in wds.WebDataset(kept_tars, shardshuffle=False)] if kept_tars else []
    filtered_tars = sorted(str(p) for p in (out / "filtered").glob("*.tar"))
    filtered_keys = [x["__key__"] for x in wds.WebDataset(filtered_tars, shardshuffle=False)] if filtered_tars else []
    assert len(kept_keys) == totals["kept"]
    all_keys = kept_keys + filtered_keys
    assert len(set(all_keys)) == len(all_keys), [k for k, n in Counter(all_keys).items() if n > 1]
    assert not list(out.rglob("*.tmp"))
    return manifest


def test_run_joins_a_multi_node_cluster(ray_tmpdir, tmp_path):
    out, log = tmp_path / "out", tmp_path / "run.log"
    t0 = time.perf_counter()
    # 1 + 1 CPUs: the smoke run's stage actors ask for more CPUs (0.25 dedupe + 0.5 per model stage) than one
    # node has, so they must span both nodes. `ray.num_cpus: 2` in smoke.yaml applies to a local Ray only.
    with local_cluster(ray_tmpdir, head_cpus=1, worker_cpus=[1]) as (cluster, workers):
        head_id, address = cluster.head_node.node_id, cluster.address
        proc = start_run(cluster, out, log)
        text = wait_run(proc, log)
        actors = map_workers(cluster)
    check_output(out)
    assert "total: read 19 = kept" in text
    assert f"Connecting to existing Ray cluster at address: {address}" in text  # joined, no local Ray
    stages = {a["ActorClassName"] for a in actors}
    assert {f"MapWorker(MapBatches({s}))" for s in ("CaptionStage", "DialogueStage", "RewardStage")} <= stages
    nodes = {a["Address"]["NodeID"] for a in actors}
    assert nodes == {head_id, workers[0].node_id}, (nodes, head_id, workers[0].node_id)
    print(f"multi-node run: {time.perf_counter() - t0:.0f} s; actors by node: "
          f"{Counter(a['Address']['NodeID'][:8] for a in actors)}")


def wait_for_actor_on(cluster, node, proc, when: str, timeout: float = 600) -> str | None:
    """Wait until a stage actor on ``node`` is ALIVE (``running``: its model is loaded and batches flow to it)
    or has been in its constructor for 1 s (``starting``: loading a model / starting an engine, the long phase
    of a real GPU actor). Returns the actor's class name."""
    first_seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        now = time.monotonic()
        for a in map_workers(cluster):
            if a["Address"]["NodeID"] != node.node_id:
                continue
            if when == "running" and a["State"] == "ALIVE":
                return a["ActorClassName"]
            if when == "starting" and a["State"] == "PENDING_CREATION":
                if now - first_seen.setdefault(a["ActorID"], now) >= 1.0:
                    return a["ActorClassName"]
        time.sleep(0.2)
    return None


@pytest.mark.parametrize("when", ["running", "starting"])
def test_run_survives_losing_a_worker_node(ray_tmpdir, tmp_path, when):
    out, log = tmp_path / "out", tmp_path / "run.log"
    t0 = time.perf_counter()
    # Head 1 CPU, a worker of 2 CPUs and the victim of 1 CPU. Ray Data spreads the stage actors over the nodes
    # (SPREAD); the victim is killed (no graceful shutdown) while one of them runs or starts there, before any
    # input shard has finished. The survivors (3 CPUs) have room for every stage actor at once: an actor lost
    # with its node is only restarted where its resources are free (see docs/cluster.md).
    with local_cluster(ray_tmpdir, head_cpus=1, worker_cpus=[2, 1]) as (cluster, workers):
        victim = workers[1]
        proc = start_run(cluster, out, log)
        actor = wait_for_actor_on(cluster, victim, proc, when)
        assert actor is not None, f"no stage actor {when} on the victim node:\n" + log.read_text()[-4000:]
        done_before = len(list((out / "stats").glob("*.json")))
        assert proc.poll() is None and done_before < SMOKE_SHARDS, "the run ended before the kill"
        cluster.remove_node(victim, allow_graceful=False)
        killed_at = time.perf_counter() - t0
        text = wait_run(proc, log)
        actors = map_workers(cluster)
    manifest = check_output(out)
    assert "total: read 19 = kept" in text
    # The actors that were on the dead node came back elsewhere (Ray Data's default: max_restarts=-1).
    restarted = [a for a in actors if a["NumRestarts"] > 0]
    assert restarted, actors
    assert all(a["Address"]["NodeID"] != victim.node_id for a in restarted)
    print(f"fault run ({when}): {time.perf_counter() - t0:.0f} s; killed the node of {actor} at {killed_at:.0f} s "
          f"with {done_before}/{SMOKE_SHARDS} shards done; restarted: "
          f"{[(a['ActorClassName'], a['NumRestarts']) for a in restarted]}; reasons: {manifest['totals']['reasons']}")

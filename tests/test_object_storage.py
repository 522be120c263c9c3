"""Outputs (and inputs) on object storage: a real S3-compatible server (moto's server mode, started here on
loopback, spoken to over HTTP through s3fs as any S3 endpoint would be). The same guarantees as a local folder:
nothing half-written counts as done, a run killed with SIGKILL resumes with every key once, one writer at a time,
and card / export / inspect / refilter work on the URL."""

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, kill_tree

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port; the environment every process (Ray workers too) inherits."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    deadline = time.time() + 30
    while True:
        try:
            fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
            fs.mkdir("input")
            fs.mkdir("runs")
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.3)
    for tar in sorted((ROOT / "data" / "smoke").glob("*.tar")):
        fs.put_file(str(tar), f"input/smoke/{tar.name}")
    yield fs
    server.kill()
    server.wait()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """The small-shard recipe (both recipes) on the transformers backend: the storage is under test, not vLLM."""
    data = yaml.safe_load((ROOT / "pipelines" / "smoke.yaml").read_text())
    data["input"]["paths"] = ["s3://input/smoke/*.tar"]
    data["caption"]["model"] = {"backend": "transformers", "model": "tiny:vlm"}
    data["dialogue"]["model"] = {"backend": "transformers", "model": "tiny:lm"}
    data["dialogue"]["sampling"]["max_tokens"] = 400
    data.pop("judge")
    data["cir"].pop("judge")
    path = tmp_path_factory.mktemp("s3cfg") / "s3.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "m3t_gen.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def _keys(fs, prefix: str) -> list[str]:
    keys = []
    for path in sorted(fs.find(f"{prefix}/shards")):
        if path.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as tar:
                keys += [m.name[: -len(".json")] for m in tar.getmembers() if m.name.endswith(".json")]
    return keys


def _check_complete(fs, prefix: str) -> dict:
    manifest = json.loads(fs.cat_file(f"{prefix}/manifest.json"))
    names = set(fs.find(prefix))
    for stats_path in fs.glob(f"{prefix}/stats/*.json"):
        stats = json.loads(fs.cat_file(stats_path))
        assert stats["read"] == stats["kept"] + stats["rejected"]
        for tar in stats["tars"] + stats["filtered_tars"]:  # a marker vouches only for files that exist
            assert f"{prefix}/{'shards' if tar in stats['tars'] else 'filtered'}/{tar}" in names
    assert not [n for n in names if n.endswith(".tmp")]
    return manifest


@pytest.fixture(scope="module")
def clean_run(s3, pipeline):
    proc = _cli("run", pipeline, "--output", "s3://runs/clean")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return "runs/clean"


def test_run_to_s3_then_tools_read_it(s3, clean_run, pipeline, tmp_path):
    manifest = _check_complete(s3, clean_run)
    t = manifest["totals"]
    assert t["read"] == 19 == t["kept"] + t["rejected"]
    keys = _keys(s3, clean_run)
    assert len(keys) == len(set(keys)) == t["kept"]
    assert manifest["cir"]["pairs"] > 0 and s3.glob(f"{clean_run}/triplet_stats/*.json")
    assert not s3.exists(f"{clean_run}/.m3t-gen.lock")  # released at the end
    resumed = _cli("run", pipeline, "--output", f"s3://{clean_run}")
    assert resumed.returncode == 0 and "2 already done, 0 to run" in resumed.stderr

    card = _cli("card", f"s3://{clean_run}")
    assert card.returncode == 0, card.stderr[-3000:]
    assert s3.exists(f"{clean_run}/README.md") and s3.glob(f"{clean_run}/card/*.png")
    export = _cli("export", f"s3://{clean_run}", "--format", "muco", "--to", tmp_path / "muco")
    assert export.returncode == 0, export.stderr[-3000:]
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "muco" / "finetune" / "M3T" / "M3T_generated_sentence.parquet").num_rows == t["kept"]
    page = _cli("inspect", f"s3://{clean_run}", "--html", tmp_path / "page.html")
    assert page.returncode == 0 and (tmp_path / "page.html").stat().st_size > 10_000


def test_refilter_on_s3(s3, clean_run, tmp_path):
    prefix = "runs/refilter"
    # A copy of the finished run (refilter rewrites what it re-decides; the clean run stays for the other tests).
    s3.copy(f"{clean_run}/", f"{prefix}/", recursive=True)
    s3.invalidate_cache()
    before = json.loads(s3.cat_file(f"{prefix}/manifest.json"))
    refilter = _cli("refilter", f"s3://{prefix}", "--set", "filter.min_turns=7")
    assert refilter.returncode == 0, refilter.stderr[-3000:]
    after = _check_complete(s3, prefix)
    assert after["refilters"][0]["set"] == ["filter.min_turns=7"]
    assert after["totals"]["read"] == before["totals"]["read"]
    assert after["totals"]["kept"] <= before["totals"]["kept"]
    assert len(_keys(s3, prefix)) == after["totals"]["kept"]
    assert s3.glob(f"{prefix}/triplet_stats/*.json")  # CIR results carried


def test_kill_9_mid_run_on_s3_then_resume_each_key_once(s3, clean_run, pipeline):
    prefix = "runs/killed"
    cmd = [sys.executable, "-m", "m3t_gen.cli", "run", str(pipeline), "--output", f"s3://{prefix}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    start, killed = time.time(), False
    while proc.poll() is None and time.time() - start < 600:
        s3.invalidate_cache()
        if s3.glob(f"{prefix}/stats/*.json"):
            kill_tree(proc.pid)
            killed = True
            break
        time.sleep(0.2)
    proc.wait(timeout=60)
    assert killed, "the run finished before a shard was done"
    assert not s3.exists(f"{prefix}/manifest.json")
    assert s3.exists(f"{prefix}/.m3t-gen.lock")  # the dead run's lease is still there ...
    resumed = _cli("run", pipeline, "--output", f"s3://{prefix}")  # ... and does not block: its holder is dead
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "1 already done, 1 to run" in resumed.stderr or "2 already done" in resumed.stderr
    manifest = _check_complete(s3, prefix)
    keys = _keys(s3, prefix)
    assert len(keys) == len(set(keys)), "a key was written twice"
    assert sorted(keys) == sorted(_keys(s3, clean_run))
    assert manifest["totals"] == json.loads(s3.cat_file(f"{clean_run}/manifest.json"))["totals"]


def test_second_writer_on_s3_is_refused_while_the_first_lives(s3, pipeline):
    from m3t_gen.storage.store import Store, lock_output

    prefix = "s3://runs/leased"
    lease = lock_output(Store(prefix))
    try:
        # Another process (this host, a live holder) is refused in one line, exit 2.
        proc = _cli("run", pipeline, "--output", prefix)
        assert proc.returncode == 2 and "another m3t-gen run is writing this output" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    finally:
        lease.release()
    assert not s3.exists("runs/leased/.m3t-gen.lock")


def test_dedupe_resumes_from_shards_finished_on_s3(s3, pipeline):
    """A resumed run's dedupe stage is seeded from the finished shards' index and rejects wherever the output
    lives: a duplicate across the restart is caught on object storage too (it read a local path before)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from m3t_gen.config import load_config
    from m3t_gen.run.writer import INDEX_SCHEMA, REJECT_SCHEMA
    from m3t_gen.stages.base import RunContext
    from m3t_gen.stages.dedupe import DedupeStage

    prefix = "runs/dedupe-seed"
    s3.pipe_file(f"{prefix}/stats/a-000000.json", b'{"shard": "a-000000"}')
    for name, schema, rows in (("index", INDEX_SCHEMA, [{"key": "a-000000_000000", "source_sha256": "sha-kept",
                                                          "phash": "0f0f0f0f0f0f0f0f"}]),
                               ("rejects", REJECT_SCHEMA, [{"key": "a-000000_000001", "stage": "filter",
                                                            "reason": "too_few_turns", "source_sha256": "sha-filtered",
                                                            "phash": "f0f0f0f0f0f0f0f0"}])):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
        s3.pipe_file(f"{prefix}/{name}/a-000000.parquet", buf.getvalue())
    cfg = load_config(pipeline, [f"output.dir=s3://{prefix}"])
    stage = DedupeStage(RunContext(config=cfg, config_hash="x"))
    assert stage.index.find("sha-kept", "0000000000000000")[:2] == ("exact", "a-000000_000000")
    assert stage.index.find("sha-filtered", "0000000000000000")[:2] == ("exact", "a-000000_000001")

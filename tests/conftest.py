import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Every stage in every test run (Ray workers inherit it) checks that it set only the row fields it declares.
os.environ.setdefault("M3T_GEN_CHECK_ROWS", "1")


@pytest.fixture(scope="session", autouse=True)
def _tiny_model_cache(tmp_path_factory):
    # Tiny models are built once per test session (seconds) unless the caller shares a cache.
    if "M3T_GEN_CACHE" not in os.environ:
        os.environ["M3T_GEN_CACHE"] = str(tmp_path_factory.mktemp("m3t-cache"))
    yield


@pytest.fixture
def smoke_yaml() -> Path:
    return ROOT / "pipelines" / "smoke.yaml"


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its children (Ray workers, engine cores): a crash, not a shutdown."""
    import signal

    import psutil

    proc = psutil.Process(pid)
    family = [proc] + proc.children(recursive=True)
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def run_cli(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    """`m3t-gen ARGS` in a subprocess, as a user would run it."""
    cmd = [sys.executable, "-m", "m3t_gen.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One clean smoke run per test session, shared by every test that reads a finished output."""
    out = tmp_path_factory.mktemp("smoke") / "out"
    proc = run_cli("run", str(ROOT / "pipelines" / "smoke.yaml"), "--output", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out, proc


def small_pipeline(tmp_path: Path, **changes) -> Path:
    """pipelines/smoke.yaml written to ``tmp_path/pipeline.yaml`` with its input made absolute and ``changes``
    (``section__key=value``) applied: a valid config to break one thing in."""
    data = yaml.safe_load((ROOT / "pipelines" / "smoke.yaml").read_text())
    data["input"]["paths"] = [str(ROOT / "data" / "smoke" / "*.tar")]
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def one_line_exit_2(args: list[str], fragment: str) -> str:
    """`m3t-gen ARGS` (click's runner) refuses: exit code 2, one line on stderr holding ``fragment``, no traceback."""
    from click.testing import CliRunner

    from m3t_gen.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert "Traceback" not in result.output and len(err.splitlines()) == 1, err
    assert fragment in err, err
    return err


FLOATS = ("similarity", "score", "positive")  # CLIP on CPU may differ in the last bits from run to run


def assert_same_candidates(a, b):
    """The same candidates with the same decisions; their scores equal up to CLIP's run-to-run noise."""
    from m3t_gen.run.negatives import CANDIDATE_SCHEMA
    import numpy as np

    exact = [c for c in CANDIDATE_SCHEMA.names if c not in FLOATS]
    assert a.select(exact).equals(b.select(exact))
    for c in FLOATS:
        np.testing.assert_allclose(a.column(c).to_numpy(), b.column(c).to_numpy(), atol=1e-5)


def assert_same_turns(a, b):
    """KEY.json turns equal, their negatives' scores up to CLIP's run-to-run noise."""
    strip = lambda turns: [{k: v for k, v in t.items() if k != "negatives"} for t in turns]  # noqa: E731
    assert strip(a) == strip(b)
    for ta, tb in zip(a, b):
        na, nb = ta.get("negatives", []), tb.get("negatives", [])
        assert [(n["text"], n["source"], n["rank"]) for n in na] == [(n["text"], n["source"], n["rank"]) for n in nb]
        for x, y in zip(na, nb):
            assert x["score"] == pytest.approx(y["score"], abs=1e-5)
            assert x["similarity"] == pytest.approx(y["similarity"], abs=1e-5)

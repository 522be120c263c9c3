import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _tiny_model_cache(tmp_path_factory):
    # Tiny models are built once per test session (seconds) unless the caller shares a cache.
    if "M3T_GEN_CACHE" not in os.environ:
        os.environ["M3T_GEN_CACHE"] = str(tmp_path_factory.mktemp("m3t-cache"))
    yield


@pytest.fixture
def smoke_yaml() -> Path:
    return ROOT / "pipelines" / "smoke.yaml"

"""Model references and where they resolve to.

A reference is one of:
- ``tiny:<kind>`` — a tiny random-weight model built locally on first use and cached
  (kinds: ``qwen2_5_vl``, ``vlm``, ``lm``, ``qwen3``, ``clip``); used by the small-shard test mode and the tests;
- a local directory holding a Hugging Face-format checkpoint;
- a Hugging Face hub id ``org/name`` (loaded by the engine; needs the hub or a local HF cache).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from m3t_gen.testing.tiny_models import KINDS as TINY_KINDS  # noqa: E402  (tiny_models imports no engine)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_reference(ref: str) -> str | None:
    """Return an error message if ``ref`` is not a well-formed model reference, else None."""
    if ref.startswith("tiny:"):
        kind = ref[len("tiny:"):]
        if kind not in TINY_KINDS:
            return f"unknown tiny model {kind!r} (expected one of: {', '.join(TINY_KINDS)})"
        return None
    if ref.startswith(("/", "./", "../", "~")) or os.sep in ref and Path(ref).expanduser().exists():
        path = Path(ref).expanduser()
        if not path.is_dir():
            return f"model directory {ref!r} does not exist"
        if not (path / "config.json").exists():
            return f"model directory {ref!r} has no config.json"
        return None
    if _HUB_ID.match(ref):
        return None
    return f"{ref!r} is neither tiny:<kind>, an existing local directory, nor a hub id 'org/name'"


def tiny_cache_dir() -> Path:
    return Path(os.environ.get("M3T_GEN_CACHE", Path.home() / ".cache" / "m3t-gen")) / "tiny-models"


def resolve(ref: str) -> str:
    """Return what the engines load: a local directory for tiny models (built if missing), else ``ref``."""
    if ref.startswith("tiny:"):
        from m3t_gen.testing.tiny_models import ensure_tiny_model

        return str(ensure_tiny_model(ref[len("tiny:"):], tiny_cache_dir()))
    return str(Path(ref).expanduser()) if ref.startswith(("/", "./", "../", "~")) else ref


def torch_dtype(name: str, device: str = "cpu") -> Any:
    """The torch dtype of a config dtype (already canonical: m3t_gen.config.Dtype); ``auto``: half precision on a
    GPU, float32 on CPU."""
    import torch

    if name == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, name)

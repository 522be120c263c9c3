"""Backends by name: the built-in ones and any registered at run time. This module imports the backends and none
of them imports it (no cycle); the engines themselves (torch, vllm, httpx) are imported lazily inside each
backend, so listing names stays cheap. A new backend: its file, and one line in ``_builtin``.
"""

from __future__ import annotations

import functools

from m3t_gen.backends.base import Backend

_EXTRA: dict[str, type[Backend]] = {}


@functools.lru_cache(maxsize=1)
def _builtin() -> dict[str, type[Backend]]:
    from m3t_gen.backends.openai_backend import OpenAIBackend
    from m3t_gen.backends.transformers_backend import TransformersBackend
    from m3t_gen.backends.vllm_backend import VLLMBackend

    return {b.name: b for b in (OpenAIBackend, TransformersBackend, VLLMBackend)}


def register(cls: type[Backend]) -> type[Backend]:
    """Add a backend defined outside this package (a plugin, a test) under its ``name``."""
    _EXTRA[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    _EXTRA.pop(name, None)


def backend_names() -> list[str]:
    return sorted({**_builtin(), **_EXTRA})


def get_backend(name: str) -> type[Backend]:
    backends = {**_builtin(), **_EXTRA}
    try:
        return backends[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r} (expected one of: {', '.join(sorted(backends))})") from None

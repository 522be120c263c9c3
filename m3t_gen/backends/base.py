"""The one protocol every text-generation backend speaks.

A request is a list of OpenAI-style chat messages whose image parts carry PIL images
(``{"type": "image", "image": PIL.Image}``), plus sampling settings, a per-request seed and an optional
JSON schema. A backend answers each request with text. Each backend converts image parts to its own
form (vLLM: ``image_pil`` parts; OpenAI servers: data URLs; transformers: processor inputs).

Backends register themselves by name; the config picks one by that name. A backend module owns an
``Options`` pydantic model for its engine-specific settings (validated before anything loads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


@dataclass
class GenerationRequest:
    messages: list[dict[str, Any]]
    seed: int
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    json_schema: dict[str, Any] | None = None


@dataclass
class GenerationResult:
    text: str
    output_tokens: int = 0
    finish_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Backend:
    """Subclass, set ``name`` and ``Options``, implement ``generate``; register with ``@register``.

    ``__init__`` does the heavy setup (load weights, start the engine) once per Ray actor.
    """

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    supports_images: ClassVar[bool] = True

    def __init__(self, spec: "ModelSpec") -> None:  # noqa: F821 - see m3t_gen.config.ModelSpec
        self.spec = spec
        self.options = self.Options.model_validate(spec.options)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        raise NotImplementedError


_REGISTRY: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    _REGISTRY[cls.name] = cls
    return cls


def backend_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_backend(name: str) -> type[Backend]:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r} (expected one of: {', '.join(sorted(_REGISTRY))})") from None


def _load_builtin() -> None:
    # Importing the modules runs their @register; the engines themselves are imported lazily inside them,
    # so listing backends never pulls in torch or vllm.
    from m3t_gen.backends import openai_backend, transformers_backend, vllm_backend  # noqa: F401

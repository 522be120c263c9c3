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
from typing import Any, Callable, ClassVar

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
    """One answer. ``text`` is the answer alone; a reasoning model's reasoning is in ``reasoning``.
    ``output_tokens`` counts every generated token (reasoning included); ``prompt_tokens`` / ``image_tokens``
    what the model read (image placeholder tokens included: the evidence that an image reached it).
    ``finish_reason == "error"``: the backend could not serve the request; ``error`` says why and ``retriable``
    whether a retry can change that (a prompt that is too long cannot)."""

    text: str
    output_tokens: int = 0
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    image_tokens: int | None = None
    reasoning: str | None = None
    reasoning_tokens: int = 0
    error: str | None = None
    retriable: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failed(cls, error: str, retriable: bool) -> "GenerationResult":
        return cls(text="", finish_reason="error", error=error[:500], retriable=retriable)


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Backend:
    """Subclass, set ``name`` and ``Options``, implement ``generate``; list it in ``m3t_gen.backends.registry``.

    ``__init__`` does the heavy setup (load weights, start the engine) once per Ray actor.
    """

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    # Can honour ModelSpec.reasoning (schema after the reasoning, reasoning split from the answer).
    supports_reasoning: ClassVar[bool] = False
    # Batches an actor should hand this backend at once (resources.batches_in_flight when unset). More than one
    # only pays where the engine can take a second batch while the first runs (vLLM's running batch, a server);
    # generate() must then be safe to call from several threads.
    batches_in_flight: ClassVar[int] = 1
    # Distributions whose versions the manifest records when a stage runs this backend.
    packages: ClassVar[tuple[str, ...]] = ()

    # Capabilities, read from a model's validated options (``Options``): what validate and plan need to know
    # about an engine without starting it. A new backend overrides what differs from these defaults.
    @classmethod
    def images_per_request_limit(cls, options: BaseModel) -> int | None:
        """The most images the engine accepts in one request (None: no limit of its own)."""
        return None

    @classmethod
    def devices_per_replica(cls, options: BaseModel) -> int:
        """GPUs one engine spans (tensor x pipeline parallel)."""
        return 1

    def __init__(self, spec: "ModelSpec") -> None:  # noqa: F821 - see m3t_gen.config.ModelSpec
        self.spec = spec
        self.options = self.Options.model_validate(spec.options)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the engine (processes, GPU memory) now; the stage calls it when its actor ends."""


def convert_messages(
    messages: list[dict[str, Any]],
    image_part: Callable[[Any], dict[str, Any]],
    image_kinds: tuple[str, ...] = ("image",),
    passthrough: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """Walk chat messages and rewrite their content parts for one backend: strings and text parts become text
    parts, image parts of ``image_kinds`` (carrying a PIL image under their own type name) go through
    ``image_part``, part types in ``passthrough`` are copied as they are. Returns new dicts; the input is not
    modified. Malformed messages and parts raise with the message index or part type."""

    def part(p: Any) -> dict[str, Any]:
        if isinstance(p, str):
            return {"type": "text", "text": p}
        if not isinstance(p, dict):
            raise TypeError(f"content part must be a dict or str, got {type(p).__name__}")
        kind = p.get("type")
        if kind == "text":
            return {"type": "text", "text": p["text"]}
        if kind in image_kinds:
            from PIL import Image

            image = p.get(kind)
            if not isinstance(image, Image.Image):
                raise TypeError(f"image part must carry a PIL.Image under {kind!r}, got {type(image).__name__}")
            return image_part(image)
        if kind in passthrough:
            return dict(p)
        raise ValueError(f"unsupported content part type {kind!r} (expected 'text' or 'image')")

    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise ValueError(f"message {i} must be a dict with a 'role'")
        new = dict(msg)
        content = msg.get("content")
        if isinstance(content, list):
            new["content"] = [part(p) for p in content]
        elif content is not None and not isinstance(content, str):
            raise TypeError(f"message {i}: content must be a string or a list of parts")
        out.append(new)
    return out

"""Generate, validate, retry with a new seed, and finally reject with the reason: shared by every LLM stage."""

from __future__ import annotations

import io
from typing import Any, Callable

from PIL import Image

from m3t_gen.backends.base import Backend, GenerationRequest, GenerationResult
from m3t_gen.config import Sampling
from m3t_gen.rows import add_tokens, reject
from m3t_gen.seeds import derive_seed
from m3t_gen.text.templates import TemplateError

# parse(row, result) -> (value, None) when usable, (None, reason) when not.
Parser = Callable[[dict[str, Any], GenerationResult], tuple[Any, str | None]]
Builder = Callable[[dict[str, Any]], list[dict[str, Any]]]


def open_image(row: dict[str, Any]) -> Image.Image:
    img = Image.open(io.BytesIO(row["image"]))
    img.load()
    return img.convert("RGB")


def pack_images(images: list[Image.Image]) -> list[dict[str, Any]]:
    """RGB images as ``rows.DECODED`` values: their pixels as they are, so ``unpack_images`` gives the same
    images back (the model sees what it would have seen decoding them itself)."""
    for im in images:
        if im.mode != "RGB":
            raise ValueError(f"pack_images takes RGB images, got {im.mode}")
    return [{"width": im.width, "height": im.height, "rgb": im.tobytes()} for im in images]


def unpack_images(packed: list[dict[str, Any]]) -> list[Image.Image]:
    return [Image.frombytes("RGB", (p["width"], p["height"]), p["rgb"]) for p in packed]


def generate_validated(
    backend: Backend,
    rows: list[dict[str, Any]],
    *,
    stage: str,
    run_seed: int,
    sampling: Sampling,
    max_attempts: int,
    build_messages: Builder,
    parse: Parser,
    json_schema: dict[str, Any] | None = None,
) -> list[tuple[dict[str, Any], Any, int]]:
    """Returns (row, value, attempts) for rows that succeeded; the others are marked rejected in place.

    A backend error (the request was refused, the server failed, the engine died) is ``backend_error`` with the
    backend's message, retried only when the backend says a retry can change it. A reasoning model's answer is
    parsed without its reasoning; the accepted answer's reasoning goes to ``row["reasoning"]`` unless the model's
    ``reasoning.keep`` is off."""
    import json

    spec = getattr(backend, "spec", None)
    keep_reasoning = getattr(getattr(spec, "reasoning", None), "keep", True)
    done: list[tuple[dict[str, Any], Any, int]] = []
    messages: dict[int, list[dict[str, Any]]] = {}
    pending = []
    for r in rows:
        try:
            messages[id(r)] = build_messages(r)
            pending.append(r)
        except TemplateError as e:  # a branch validate could not see fails on this row's values: this row only
            reject(r, stage, "template_error", detail=str(e))
    last_error: dict[int, str] = {}
    for attempt in range(max_attempts):
        if not pending:
            break
        requests = [
            GenerationRequest(
                messages=messages[id(r)],
                seed=derive_seed(run_seed, stage, r["key"], attempt),
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                json_schema=json_schema,
            )
            for r in pending
        ]
        results = backend.generate(requests)
        still: list[dict[str, Any]] = []
        for row, result in zip(pending, results, strict=True):
            add_tokens(row, stage, result.output_tokens, requests=1, prompt=result.prompt_tokens,
                       image=result.image_tokens, reasoning=result.reasoning_tokens)
            if result.finish_reason == "error":
                if not result.retriable:
                    reject(row, stage, "backend_error", attempts=attempt + 1, detail=result.error)
                    continue
                value, error = None, f"backend_error: {result.error}"
            elif result.reasoning and not result.text:
                value, error = None, (f"reasoning_unfinished: no answer after {result.reasoning_tokens} reasoning "
                                      f"tokens (finish_reason={result.finish_reason})")
            else:
                value, error = parse(row, result)
            if error is None:
                done.append((row, value, attempt + 1))
                if keep_reasoning and result.reasoning:
                    texts = json.loads(row.get("reasoning") or "{}")
                    texts[stage] = result.reasoning
                    row["reasoning"] = json.dumps(texts, ensure_ascii=False)
            else:
                last_error[id(row)] = error
                still.append(row)
        pending = still
    for row in pending:
        reason, _, detail = last_error[id(row)].partition(": ")
        reject(row, stage, reason, attempts=max_attempts, detail=detail or None)
    return done


def parse_json_answer(result: GenerationResult, schemas: list[dict[str, Any]]) -> tuple[Any, str | None]:
    """JSON that passes every schema (the file's and the narrowed decoding one), or (None, reason)."""
    import json

    from m3t_gen.text.schemas import validation_error

    try:
        data = json.loads(result.text)
    except json.JSONDecodeError as e:
        return None, f"invalid_json: {e.msg} at char {e.pos} (finish_reason={result.finish_reason})"
    for schema in schemas:
        error = validation_error(data, schema)
        if error:
            return None, f"schema_mismatch: {error}"
    return data, None

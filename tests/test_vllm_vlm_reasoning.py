"""The production engine paths on the production architectures, smaller: the real vLLM engine (CPU build) running
the tiny Qwen2.5-VL with images, the tiny LLaVA, and the tiny Qwen3 as a reasoning writer (thinking on and off);
an engine that dies mid-batch. Every engine here is the project's own ``VLLMBackend``."""

from __future__ import annotations

import json
import time

import jsonschema
import pytest
from PIL import Image

pytestmark = pytest.mark.slow
pytest.importorskip("vllm")

from m3t_gen.backends.base import GenerationRequest  # noqa: E402
from m3t_gen.backends.vllm_backend import VLLMBackend  # noqa: E402
from m3t_gen.config import ModelSpec  # noqa: E402

CPU = {"enforce_eager": True, "max_model_len": 2048, "engine_args": {"kv_cache_memory_bytes": 128 * 2**20}}
_STR = {"type": "string", "pattern": "^[ !#-\\[\\]-~]{1,24}$"}
CAPTION_SCHEMA = {"type": "object", "properties": {"caption": _STR, "objects": {"type": "array", "items": _STR,
                  "minItems": 1, "maxItems": 3}}, "required": ["caption", "objects"], "additionalProperties": False}


def _backend(model: str, options: dict | None = None, **extra) -> VLLMBackend:
    t0 = time.perf_counter()
    backend = VLLMBackend(ModelSpec(backend="vllm", model=model, options={**CPU, **(options or {})}, **extra))
    print(f"\nvLLM engine start ({model}): {time.perf_counter() - t0:.1f} s")
    return backend


def _image_request(image, seed=1, **kw) -> GenerationRequest:
    content = [{"type": "image", "image": image}, {"type": "text", "text": "Describe the image."}]
    return GenerationRequest(messages=[{"role": "user", "content": content}], seed=seed, **kw)


def _images():
    from skimage import data

    return {"red": Image.new("RGB", (640, 480), (220, 20, 20)), "blue": Image.new("RGB", (640, 480), (20, 20, 220)),
            "astronaut": Image.fromarray(data.astronaut())}


@pytest.fixture(scope="module")
def qwen_vl():
    backend = _backend("tiny:qwen2_5_vl")
    yield backend
    backend.close()


def test_qwen2_5_vl_images_reach_the_model(qwen_vl):
    """The image is in the prompt (its placeholder expanded to one token per 28x28 px, as transformers' own
    processor counts them) and changes what the model writes; greedy decoding starts with the same token as
    transformers' with the same weights, processor and image (later tokens of a random model sit on near-ties
    that batch shape and kernels decide)."""
    from transformers import AutoProcessor

    from m3t_gen.backends.transformers_backend import TransformersBackend
    from m3t_gen.models import resolve

    images = _images()
    reqs = [_image_request(im, temperature=0.0, max_tokens=8) for im in images.values()]
    got = dict(zip(images, qwen_vl.generate(reqs)))
    processor = AutoProcessor.from_pretrained(resolve("tiny:qwen2_5_vl"))
    for name, image in images.items():
        grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
        assert got[name].image_tokens == int(grid.prod()) // 4 > 0, name
        assert got[name].prompt_tokens > got[name].image_tokens
    assert got["red"].text != got["blue"].text
    hf = TransformersBackend(ModelSpec(backend="transformers", model="tiny:qwen2_5_vl", options={"device": "cpu"}))
    ref = dict(zip(images, hf.generate(reqs)))
    tok = processor.tokenizer
    for name in images:
        assert ref[name].image_tokens == got[name].image_tokens
        ours, theirs = (tok(r.text, add_special_tokens=False)["input_ids"][:1] for r in (got[name], ref[name]))
        assert ours == theirs, (name, got[name].text, ref[name].text)


def test_qwen2_5_vl_json_schema_with_an_image(qwen_vl):
    reqs = [_image_request(_images()["astronaut"], seed=s, temperature=1.0, max_tokens=300,
                           json_schema=CAPTION_SCHEMA) for s in (1, 2, 3)]
    results = qwen_vl.generate(reqs)
    for res in results:
        assert res.finish_reason == "stop", res
        jsonschema.validate(json.loads(res.text), CAPTION_SCHEMA)
    assert len({r.text for r in results}) > 1


def test_qwen2_5_vl_too_many_images_fails_alone(qwen_vl):
    """A request vLLM refuses (two images, limit 1) is a non-retriable backend error; its batch-mates run."""
    im = _images()["red"]
    two = GenerationRequest(messages=[{"role": "user", "content": [{"type": "image", "image": im},
                                                                   {"type": "image", "image": im}]}], seed=1)
    ok, bad = qwen_vl.generate([_image_request(im, max_tokens=4), two])
    assert ok.finish_reason == "length" and ok.output_tokens == 4
    assert bad.finish_reason == "error" and not bad.retriable and "image" in bad.error.lower()


def test_llava_loads_in_vllm():
    backend = _backend("tiny:vlm")
    try:
        (res,) = backend.generate([_image_request(_images()["astronaut"], temperature=0.0, max_tokens=4)])
        assert res.image_tokens == 16 and res.output_tokens == 4
    finally:
        backend.close()


# ------------------------------------------------------------------------------------------------ reasoning

PAIR_SCHEMA = {"type": "object", "properties": {"query": _STR, "target": _STR}, "required": ["query", "target"],
               "additionalProperties": False}


def _ask(seed: int) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": "Write one query and its target as JSON."}],
                             seed=seed, temperature=1.0, max_tokens=400, json_schema=PAIR_SCHEMA)


def test_reasoning_writer_thinking_on_and_off():
    """Thinking on: the model reasons (up to the budget, then vLLM forces </think>), and the JSON grammar applies
    only to the answer after it; the reasoning comes back apart. Thinking off: the template's empty reasoning
    block; the answer is constrained from its first token."""
    budget = 16
    # The engine core in its own process (vLLM's layout on GPUs), so that it can be killed below.
    on = _backend("tiny:qwen3", {"engine_process": "separate"}, reasoning={"parser": "qwen3", "budget": budget})
    try:
        results = on.generate([_ask(s) for s in range(4)])
        for res in results:
            assert res.finish_reason == "stop", res
            jsonschema.validate(json.loads(res.text), PAIR_SCHEMA)
            assert res.reasoning and "</think>" not in res.text and "</think>" not in res.reasoning
            assert budget <= res.reasoning_tokens <= budget + 4
            assert res.output_tokens > res.reasoning_tokens
        # Engine death: the batch in flight is rejected by name (not retried blindly), the next batch gets a new
        # engine.
        import psutil

        cores = [p for p in psutil.Process().children(recursive=True) if "EngineCore" in p.name()]
        assert cores, [p.name() for p in psutil.Process().children(recursive=True)]
        for p in cores:
            p.kill()
        time.sleep(1.0)
        dead = on.generate([_ask(10), _ask(11)])
        assert all(r.finish_reason == "error" and not r.retriable and "died" in r.error for r in dead), dead
        again = on.generate([_ask(12)])
        assert on.restarts == 1 and again[0].finish_reason == "stop"
        jsonschema.validate(json.loads(again[0].text), PAIR_SCHEMA)
    finally:
        on.close()
    off = _backend("tiny:qwen3", reasoning={"parser": "qwen3", "thinking": False})
    try:
        for res in off.generate([_ask(s) for s in range(3)]):
            assert res.finish_reason == "stop"
            jsonschema.validate(json.loads(res.text), PAIR_SCHEMA)
            assert (res.reasoning, res.reasoning_tokens) == ("", 0)  # the template closed the reasoning block
    finally:
        off.close()
    import psutil

    assert not [p for p in psutil.Process().children(recursive=True)
                if "EngineCore" in p.name() and p.status() != psutil.STATUS_ZOMBIE]  # close() ended them

"""The vLLM backend: message and sampling conversion (fast, no engine) and a real engine on tiny:lm (slow).

The real-engine tests run the project's own ``VLLMBackend`` in the pytest process. On CPU vLLM always starts
its engine core and worker with the ``spawn`` start method, which re-imports the parent's ``__main__``; both
``pytest`` and ``python -m pytest`` have a ``__main__`` guard there, so nothing else is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from m3t_gen.backends.base import GenerationRequest, get_backend
from m3t_gen.backends.vllm_backend import VLLMBackend, VLLMOptions, sampling_kwargs, to_vllm_messages

# Strings the grammar must close: a random model never emits a closing quote by itself, and xgrammar's
# maxLength lets control bytes through; a character class with a bound does both. The class is positive
# (printable ASCII but " and \, then all of Unicode but the surrogates, as literal characters): with a negated
# class such as [^"\\\x00-\x1f] xgrammar 0.2.8 also accepts UTF-8-encoded surrogates (ED A1 B6) and overlong
# 4-byte sequences (F0 8E A9 A0), which decode to one U+FFFD per byte, so the text breaks the length bound.
_STR = {"type": "string", "pattern": "^[ !#-\\[\\]-~\u00a0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]{1,40}$"}
PAIRS_SCHEMA = {
    "type": "object",
    "properties": {
        "pairs": {
            "type": "array",
            "minItems": 3,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"query": _STR, "target": _STR},
                "required": ["query", "target"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["pairs"],
    "additionalProperties": False,
}

# What a CPU machine needs: gpu_memory_utilization is the share of RAM on CPU (vLLM's 0.9 default fails at
# start); enforce_eager skips the torch.compile warm-up (halves the engine start on 2 cores).
ROOT = Path(__file__).resolve().parents[1]
CPU_OPTIONS = {"gpu_memory_utilization": 0.2, "enforce_eager": True}


# ------------------------------------------------------------------------------------------------ fast


def test_registered():
    assert get_backend("vllm") is VLLMBackend
    assert VLLMBackend.Options is VLLMOptions


def test_import_is_cheap():
    # Listing backends / validating configs must not pull in vLLM or torch.
    code = (
        "import sys, m3t_gen.backends.vllm_backend; "
        "print(sorted(m for m in ('vllm', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert out.stdout.strip() == "[]"


def test_to_vllm_messages_image_and_text():
    image = Image.new("RGB", (32, 24), (200, 30, 30))
    messages = [
        {"role": "system", "content": "You describe images."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "text", "text": "Describe the image."},
                "And be brief.",
            ],
        },
    ]
    out = to_vllm_messages(messages)
    assert out == [
        {"role": "system", "content": "You describe images."},
        {
            "role": "user",
            "content": [
                {"type": "image_pil", "image_pil": image},
                {"type": "text", "text": "Describe the image."},
                {"type": "text", "text": "And be brief."},
            ],
        },
    ]
    assert out[1]["content"][0]["image_pil"] is image  # the image itself, not a copy or an encoding
    assert messages[1]["content"][0] == {"type": "image", "image": image}  # input untouched


def test_to_vllm_messages_rejects_bad_parts():
    with pytest.raises(TypeError, match="PIL.Image"):
        to_vllm_messages([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"}]}])
    with pytest.raises(ValueError, match="unsupported content part type 'audio'"):
        to_vllm_messages([{"role": "user", "content": [{"type": "audio", "audio": b""}]}])
    with pytest.raises(ValueError, match="role"):
        to_vllm_messages([{"content": "hi"}])


def test_sampling_kwargs():
    req = GenerationRequest(messages=[], seed=1234, max_tokens=77, temperature=0.3, top_p=0.9, json_schema=PAIRS_SCHEMA)
    assert sampling_kwargs(req) == {
        "n": 1, "seed": 1234, "temperature": 0.3, "top_p": 0.9, "max_tokens": 77, "json_schema": PAIRS_SCHEMA,
    }


def test_to_sampling_params():
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from m3t_gen.backends.vllm_backend import to_sampling_params

    req = GenerationRequest(messages=[], seed=1234, max_tokens=77, temperature=0.3, top_p=0.9, json_schema=PAIRS_SCHEMA)
    sp = to_sampling_params(req)
    assert isinstance(sp, SamplingParams)
    assert (sp.seed, sp.max_tokens, sp.temperature, sp.top_p, sp.n) == (1234, 77, 0.3, 0.9, 1)
    assert sp.structured_outputs is not None and sp.structured_outputs.json == PAIRS_SCHEMA

    plain = to_sampling_params(GenerationRequest(messages=[], seed=5))
    assert plain.structured_outputs is None and plain.seed == 5 and plain.max_tokens == 256


def test_options():
    o = VLLMOptions()
    assert (o.tensor_parallel_size, o.pipeline_parallel_size, o.max_model_len) == (1, 1, None)
    assert (o.gpu_memory_utilization, o.enforce_eager, o.max_num_seqs) == (0.9, False, None)
    assert (o.limit_images_per_prompt, o.structured_outputs_backend, o.engine_args) == (1, "xgrammar", {})
    assert VLLMOptions.model_validate({"engine_args": {"swap_space": 1}}).engine_args == {"swap_space": 1}
    with pytest.raises(ValueError, match="gpu_mem"):
        VLLMOptions.model_validate({"gpu_mem": 0.2})
    with pytest.raises(ValueError, match="engine_args may not set dtype, max_model_len"):
        VLLMOptions.model_validate({"engine_args": {"max_model_len": 512, "dtype": "half"}})
    with pytest.raises(ValueError):
        VLLMOptions.model_validate({"structured_outputs_backend": "regex-magic"})


# ------------------------------------------------------------------------------------------ real engine

ENGINE_START_S: dict[str, float] = {}


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("vllm")
    from m3t_gen.config import ModelSpec

    spec = ModelSpec(backend="vllm", model="tiny:lm", options=CPU_OPTIONS)
    t0 = time.perf_counter()
    backend = VLLMBackend(spec)
    ENGINE_START_S["tiny:lm"] = time.perf_counter() - t0
    print(f"\nvLLM engine start (tiny:lm, incl. building the model if not cached): {ENGINE_START_S['tiny:lm']:.1f} s")
    yield backend
    backend.close()


def _pairs_request(seed: int) -> GenerationRequest:
    return GenerationRequest(
        messages=[
            {"role": "system", "content": "Answer with JSON only."},
            {"role": "user", "content": [{"type": "text", "text": "Write three query/target pairs."}]},
        ],
        seed=seed,
        max_tokens=1500,  # 6 strings of <= 40 characters; byte-level tokens can be one byte of a character
        temperature=1.0,
        json_schema=PAIRS_SCHEMA,
    )


@pytest.mark.slow
def test_engine_json_schema_and_seeds(engine):
    import jsonschema

    seeds = [11, 12, 13, 14]
    requests = [_pairs_request(s) for s in seeds]
    # A free-text request in the same batch: no schema, stops at max_tokens.
    requests.append(GenerationRequest(messages=[{"role": "user", "content": "Hello"}], seed=3, max_tokens=12))

    first = engine.generate(requests)
    assert len(first) == len(requests)
    for seed, res in zip(seeds, first):
        assert res.finish_reason == "stop", (seed, res)
        assert res.output_tokens > 0
        jsonschema.validate(json.loads(res.text), PAIRS_SCHEMA)
    assert len({r.text for r in first[: len(seeds)]}) > 1  # different seeds, different answers
    free = first[-1]
    assert free.output_tokens == 12 and free.finish_reason == "length"

    second = engine.generate(requests)
    assert [r.text for r in second] == [r.text for r in first]  # same seed, same text
    assert [r.output_tokens for r in second] == [r.output_tokens for r in first]


@pytest.mark.slow
def test_engine_empty_batch(engine):
    assert engine.generate([]) == []

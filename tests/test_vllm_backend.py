"""The vLLM backend: message and sampling conversion (fast, no engine) and a real engine on tiny:lm (slow).

The real-engine tests run the project's own ``VLLMBackend`` in the pytest process. On CPU, vLLM always starts
its engine core and worker with the ``spawn`` start method, which re-imports the parent's ``__main__``; the
``pytest`` script and ``python -m pytest`` both guard their ``__main__``, so nothing else is needed.
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

from m3t_gen.backends.base import GenerationRequest
from m3t_gen.backends.registry import get_backend
from m3t_gen.backends.vllm_backend import VLLMBackend, VLLMOptions, sampling_kwargs, to_vllm_messages

ROOT = Path(__file__).resolve().parents[1]

# Strings the grammar must close: a random model never emits a closing quote by itself, and xgrammar's
# maxLength lets control bytes through; a character class with a bound does both. The class is positive
# (printable ASCII but " and \, then all of Unicode but the surrogates, as literal characters): with a negated
# class such as [^"\\\x00-\x1f], xgrammar 0.2.8 also accepts UTF-8-encoded surrogates (ED A1 B6) and overlong
# 4-byte sequences (F0 8E A9 A0); they decode to one U+FFFD per byte, and the text breaks the length bound.
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

# CPU settings. A fixed KV cache size: otherwise vLLM reserves gpu_memory_utilization x the NUMA node's RAM
# (its 0.9 default fails at start) and gives the KV cache what the worker's RSS leaves of it. enforce_eager
# skips the torch.compile warm-up, which halves the engine start on 2 cores.
CPU_OPTIONS = {"enforce_eager": True, "engine_args": {"kv_cache_memory_bytes": 256 * 2**20}}


# ------------------------------------------------------------------------------------------------ fast


def test_registered():
    assert get_backend("vllm") is VLLMBackend
    assert VLLMBackend.Options is VLLMOptions


def test_import_is_cheap():
    # Listing backends and validating configs must not pull in vLLM or torch.
    code = "import sys, m3t_gen.backends.vllm_backend; print(sorted({'vllm', 'torch'} & set(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
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
    # What LLM.chat gets for a VLM request: vLLM's own part for an in-memory image.
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


def _request(**kw) -> GenerationRequest:
    defaults = {"seed": 1234, "max_tokens": 77, "temperature": 0.3, "top_p": 0.9}
    return GenerationRequest(messages=[], **{**defaults, **kw})


def test_sampling_kwargs():
    assert sampling_kwargs(_request(json_schema=PAIRS_SCHEMA)) == {
        "n": 1, "seed": 1234, "temperature": 0.3, "top_p": 0.9, "max_tokens": 77, "json_schema": PAIRS_SCHEMA,
    }


def test_to_sampling_params():
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from m3t_gen.backends.vllm_backend import to_sampling_params

    sp = to_sampling_params(_request(json_schema=PAIRS_SCHEMA))
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
    assert VLLMOptions.model_validate(CPU_OPTIONS).engine_args == {"kv_cache_memory_bytes": 256 * 2**20}
    with pytest.raises(ValueError, match="gpu_mem"):
        VLLMOptions.model_validate({"gpu_mem": 0.2})
    with pytest.raises(ValueError, match="engine_args may not set dtype, max_model_len"):
        VLLMOptions.model_validate({"engine_args": {"max_model_len": 512, "dtype": "half"}})
    with pytest.raises(ValueError):
        VLLMOptions.model_validate({"structured_outputs_backend": "regex-magic"})


# ------------------------------------------------------------------------------------------ real engine


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("vllm")
    from m3t_gen.config import ModelSpec

    import psutil

    # vLLM's own process layout (engine core and worker in child processes), as on GPUs; the pipeline's actors
    # run the engine inline on CPU (engine_process: auto), and test_engine_in_ray_data_actor compares the two.
    spec = ModelSpec(backend="vllm", model="tiny:lm", options={**CPU_OPTIONS, "engine_process": "separate"})
    t0 = time.perf_counter()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    backend = VLLMBackend(spec)
    print(f"\nvLLM engine start (tiny:lm, building it if not cached): {time.perf_counter() - t0:.1f} s")
    # vLLM names its engine core and worker processes VLLM::... (multiprocessing's resource tracker, also a child
    # now, lives until this process exits, as it does in any program that used multiprocessing).
    engine_procs = [p for p in psutil.Process().children(recursive=True)
                    if p.pid not in before and p.name().startswith("VLLM::")]
    assert engine_procs, "engine_process: separate started no engine process"
    yield backend
    backend.close()
    # close() ends the engine's processes now, not at interpreter exit.
    gone, alive = psutil.wait_procs(engine_procs, timeout=60)
    assert not alive, f"engine processes left after close(): {[p.pid for p in alive]}"


def _pairs_request(seed: int) -> GenerationRequest:
    return GenerationRequest(
        messages=[
            {"role": "system", "content": "Answer with JSON only."},
            {"role": "user", "content": [{"type": "text", "text": "Write three query/target pairs."}]},
        ],
        seed=seed,
        max_tokens=1500,  # 6 strings of <= 40 characters; a byte-level token can be one byte of a character
        temperature=1.0,
        json_schema=PAIRS_SCHEMA,
    )


def _hello(seed: int = 3, max_tokens: int = 12) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": "Hello"}], seed=seed, max_tokens=max_tokens)


@pytest.mark.slow
def test_engine_json_schema_and_seeds(engine):
    import jsonschema

    seeds = [11, 12, 13, 14]
    requests = [_pairs_request(s) for s in seeds] + [_hello()]  # and a free-text request in the same batch

    first = engine.generate(requests)
    assert len(first) == len(requests)
    for seed, res in zip(seeds, first):
        assert res.finish_reason == "stop", (seed, res)
        assert res.output_tokens > 0
        jsonschema.validate(json.loads(res.text), PAIRS_SCHEMA)
    assert len({r.text for r in first[: len(seeds)]}) > 1  # different seeds, different answers
    assert (first[-1].output_tokens, first[-1].finish_reason) == (12, "length")

    second = engine.generate(requests)
    assert [r.text for r in second] == [r.text for r in first]  # same seed, same text
    assert [r.output_tokens for r in second] == [r.output_tokens for r in first]


@pytest.mark.slow
def test_engine_bad_request_fails_alone(engine):
    too_long = GenerationRequest(messages=[{"role": "user", "content": "word " * 5000}], seed=1, max_tokens=4)
    ok, bad = engine.generate([_hello(seed=7), too_long])
    assert ok.finish_reason == "length" and ok.output_tokens == 12
    assert (bad.finish_reason, bad.output_tokens) == ("error", 0)
    assert "maximum context length" in bad.error and not bad.retriable  # too long on every try
    # Every request failing means a setting is wrong: that raises.
    with pytest.raises(Exception, match="maximum context length"):
        engine.generate([too_long, too_long])
    assert engine.generate([]) == []


@pytest.mark.slow
def test_engine_text_only_model_refuses_images(engine):
    image = Image.new("RGB", (32, 32))
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]
    request = GenerationRequest(messages=[{"role": "user", "content": content}], seed=1)
    with pytest.raises(ValueError, match="text-only model"):
        engine.generate([request])


@pytest.mark.slow
def test_engine_in_ray_data_actor(engine):
    """The deployment shape: the backend built in a Ray Data actor (map_batches with a callable class), its
    engine core inline in the actor (engine_process: auto on CPU): same seed, same text as the fixture's engine
    in vLLM's separate processes."""
    ray = pytest.importorskip("ray")
    import ray.data

    options = CPU_OPTIONS

    class Generate:  # defined here so that Ray pickles it by value
        def __init__(self):
            from m3t_gen.backends.vllm_backend import VLLMBackend
            from m3t_gen.config import ModelSpec

            self.backend = VLLMBackend(ModelSpec(backend="vllm", model="tiny:lm", options=options))

        def __call__(self, batch):
            from m3t_gen.backends.base import GenerationRequest

            hello = [{"role": "user", "content": "Hello"}]
            requests = [GenerationRequest(hello, seed=int(s), max_tokens=12) for s in batch["seed"]]
            results = self.backend.generate(requests)
            batch["text"] = [r.text for r in results]
            batch["output_tokens"] = [r.output_tokens for r in results]
            return batch

    env = {k: os.environ[k] for k in ("M3T_GEN_CACHE", "PYTHONPATH") if k in os.environ}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        ds = ray.data.from_items([{"seed": s} for s in (3, 4, 5, 6)])
        pool = ray.data.ActorPoolStrategy(size=1)
        rows = ds.map_batches(Generate, batch_size=2, compute=pool, num_cpus=1).take_all()
    finally:
        ray.shutdown()
    rows = {r["seed"]: r for r in rows}
    assert sorted(rows) == [3, 4, 5, 6]
    assert all(r["output_tokens"] == 12 for r in rows.values())
    # Same seed, same text as the in-process engine.
    assert rows[3]["text"] == engine.generate([_hello(3)])[0].text


@pytest.mark.slow
def test_engine_many_seeded_long_prompts_in_one_batch(engine):
    """Regression: vLLM 0.32 on CPU killed the engine ("CPU Generator does not use offset") when a batch of
    seeded requests needed chunked prefill; the backend keeps prompts whole on CPU."""
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    reqs = [GenerationRequest(messages=[{"role": "user", "content": " ".join(words[(i + j) % 8] for j in range(300))}],
                              seed=i, max_tokens=16, temperature=0.8) for i in range(40)]  # ~12k prompt tokens
    results = engine.generate(reqs)
    assert len(results) == 40 and all(r.output_tokens > 0 and r.finish_reason != "error" for r in results)
    again = engine.generate(reqs[:3])
    assert [r.text for r in again] == [r.text for r in results[:3]]


@pytest.mark.slow
def test_engine_concurrent_callers_share_the_engine(engine):
    """batches_in_flight > 1: several threads call generate at once; the feeder puts their requests into one
    running engine (the second batch starts before the first ends) and each caller gets its own answers."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [[_hello(seed=100 * b + i, max_tokens=24 + 8 * i) for i in range(6)] for b in range(3)]
    serial = [engine.generate(b) for b in batches]
    before = dict(engine.feeder.stats)
    with ThreadPoolExecutor(3) as pool:
        concurrent = list(pool.map(engine.generate, batches))
    assert engine.feeder.stats["jobs"] - before["jobs"] == 3
    assert engine.feeder.stats["peak_jobs"] >= 2  # the batches were in the engine together
    for got, want in zip(concurrent, serial):
        assert [r.output_tokens for r in got] == [r.output_tokens for r in want]
        assert [r.text for r in got] == [r.text for r in want]  # per-request seeds: batching changes nothing


@pytest.mark.slow
def test_engine_concurrent_bad_batch_fails_alone(engine):
    """A batch vLLM refuses while adding it fails in its own caller only (then is retried one by one there);
    a batch running beside it is untouched."""
    from concurrent.futures import ThreadPoolExecutor

    too_long = GenerationRequest(messages=[{"role": "user", "content": "word " * 5000}], seed=1, max_tokens=4)
    good = [_hello(seed=s, max_tokens=40) for s in range(8)]
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(engine.generate, good)
        b = pool.submit(engine.generate, [_hello(seed=9), too_long])
        good_out, mixed = a.result(timeout=300), b.result(timeout=300)
    assert all(r.finish_reason == "length" and r.output_tokens == 40 for r in good_out)
    assert mixed[0].output_tokens == 12 and mixed[1].finish_reason == "error"

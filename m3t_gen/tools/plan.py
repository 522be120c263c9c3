"""`m3t-gen plan`: a dry run that estimates tokens and GPU-hours per stage, to budget a run before starting it.

Nothing loads a model or starts Ray. Per image, each stage gives its own estimate (``Stage.estimate``, helpers in
m3t_gen/stages/estimate.py; this module has no per-stage branch):

- prompt tokens: the stage's real template rendered with the example row of ``m3t-gen validate``, counted with
  the model's own tokenizer when it is on this machine (a local checkpoint directory, or a tiny model already
  built), else as characters / 4; plus ``CHAT_OVERHEAD`` tokens of chat markup. The dialogue prompt holds the
  caption: the example caption is replaced by the caption stage's estimated output length.
- vision tokens (caption): the image is taken at ``read.max_side`` on its longer side (``--image-side`` when
  unset) with a 4:3 aspect, and one token per ``--vision-px`` x ``--vision-px`` pixels: 28 for the Qwen2-VL
  family (14-px patches merged 2x2), which is the default; tiny:vlm uses its fixed 16.
- output tokens: an upper bound: caption ``sampling.max_tokens``; dialogue the smaller of
  ``sampling.max_tokens`` and what the schema allows (per turn a query and a target of at most
  ``dialogue.max_text_chars`` characters, no target for retrieval, plus JSON markup). ``--fill F`` budgets for
  a share F of that bound instead; ``--from-run`` uses the tokens the run actually generated per image
  (retries included) when it ran the same model with the same max_tokens.
- reward / embed / triplet_reward (CLIP): no generated tokens; their texts (each at most 77 tokens) are their
  prompt tokens and their throughput is in images (pairs) per second.
- CIR recipes: ``modify`` writes ``cir.modify.n`` texts per mined pair, ``pairing.pairs_per_image`` pairs per
  image (every image paired: an upper bound); its stages count pairs, not images, and run in a second pass.

Throughput per GPU comes, in this order of precedence, from ``--throughput stage=value``, from a finished
run's manifest (``--from-run OUTPUT``: rows in / busy seconds per stage replica, divided by the GPUs each
replica had; the same run also gives the share of images that reach each stage; CIR stages from its
``cir.stages`` table, in pairs), or from the defaults below.
GPU-hours = images / (images per second per GPU) / 3600, where images per second = output tokens per second
/ output tokens per image. The wall-clock estimate divides each stage's GPU-hours by its GPUs
(``resources.num_gpus`` x ``concurrency``; for vLLM at least tensor x pipeline parallel size per replica);
the stages of a pass stream concurrently, so a pass takes about as long as its slowest stage. A stage with
``num_gpus: 0`` (the small-shard mode) is planned in CPU actor-hours at ``1/CPU_SLOWDOWN`` of the GPU rate.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from m3t_gen.config import ConfigError, PipelineConfig
from m3t_gen.run.recipe import STAGES as STAGE_CLASSES
from m3t_gen.stages.estimate import CHAT_OVERHEAD, TINY_IMAGE_TOKENS, Estimating, Work, local_model_dir



def _model_stages(recipe_pass: str) -> tuple[str, ...]:
    from m3t_gen.run.recipe import CIR_STAGES, SAMPLE_STAGES

    return tuple(s.name for s in (SAMPLE_STAGES if recipe_pass == "sample" else CIR_STAGES) if s.model_role)


# Model stages a plan can hold, as the recipe declares them (which ones run depends on the config: planned_stages).
SAMPLE_PASS = _model_stages("sample")
CIR_PASS = _model_stages("cir")  # a second pass over the mined pairs, after the sample pass
STAGES = ("read",) + SAMPLE_PASS + ("pair_mining",) + CIR_PASS  # pair_mining: between the passes (GFLOP/s)


# Output tokens per second per GPU for offline batch generation with vLLM (bf16, one 80 GB H100-class GPU, large
# batches so continuous batching stays full), by model size class (billions of parameters; for a mixture of
# experts, the active parameters). Each row names the published figure it follows; the defaults sit below the
# figures (conservative): this pipeline runs offline batches with long prompts (a dialogue prompt holds the
# caption, a caption prompt ~1.7k image tokens) and long outputs (hundreds to ~2.4k tokens), in bf16, and
# validates every answer. They are not a measurement of this pipeline: measure a few thousand images on the target
# hardware and plan with --from-run.
#
# The anchor, 7-9B: Llama-3.1-8B-Instruct reached 5,777 output tok/s offline on one H100 with vLLM 0.10.0 (FP8
# weights; MLPerf Inference v5.1, Red Hat's submission: redhat.com/en/blog/efficient-and-reproducible-llm-
# inference-red-hat-mlperf-inference-v51-results). 4,000 is 0.7 of it (bf16 weights, longer outputs).
# Rows marked "scaled" have no like-for-like published vLLM figure here: the 8B anchor times 8 / the class's
# size (decode at full batch costs about 2 x parameters FLOP per token); under 2B less than that, as small models
# are bound by the scheduler and sampling on the CPU rather than by the GPU (the vLLM v0.6.0 performance update,
# blog.vllm.ai/2024/09/05/perf-update.html, profiled Llama-3-8B on one H100 spending most of its time outside the
# GPU before that release's fixes).


class GenRate(NamedTuple):
    """One size class: up to ``limit_b`` billion (active) parameters, ``tok_s`` output tokens/s per GPU."""

    limit_b: float
    tok_s: float
    label: str
    source: str


_ANCHOR = "Llama-3.1-8B 5,777 tok/s on 1 H100, vLLM 0.10.0 offline, FP8 (MLPerf Inference v5.1, Red Hat)"
GEN_TOKENS_PER_S: list[GenRate] = [
    GenRate(0.1, 30000, "<0.1B", "the tiny test models (tiny:*): not a published figure"),
    GenRate(2, 12000, "<=2B", f"scaled from {_ANCHOR} by 8/2, less 25 %: small models are CPU-bound"),
    GenRate(4, 8000, "<=4B", f"scaled from {_ANCHOR} by 8/4"),
    GenRate(9, 4000, "7-9B", f"0.7 x {_ANCHOR}"),
    GenRate(15, 2300, "<=15B", f"scaled from {_ANCHOR} by 8/14"),
    GenRate(35, 1000, "<=35B", f"scaled from {_ANCHOR} by 8/32"),
    GenRate(80, 450, "<=80B", f"scaled from {_ANCHOR} by 8/72 per GPU"),
    GenRate(math.inf, 200, ">80B", f"scaled from {_ANCHOR} by 8/160 per GPU"),
]
# A captioner (VLM) at the rate of a text LLM of its size class: its image prefill does not hold a 7B VLM below
# the 8B LLM figure. vLLM serving Qwen2.5-VL-7B-Instruct on one GPU reached 7,747 output tok/s with a 1080p image
# and ~1k-token prompt per request and ~1k output tokens, all requests at once (sgl-project/sglang#9812, the
# vllm-chat backend of sglang.bench_serving); the 7-9B default, 4,000, is 0.52 of it.
VISION_FACTOR = 1.0
VISION_SOURCE = "Qwen2.5-VL-7B 7,747 tok/s, vLLM serving on 1 GPU, 1080p image per request (sgl-project/sglang#9812)"
# Mixtures of experts whose names do not say their active parameters (as Qwen3-30B-A3B does).
KNOWN_ACTIVE_PARAMS = {"gpt-oss-20b": 3.6, "gpt-oss-120b": 5.1}
ASSUMED_SIZE_B = 8.0  # when the size cannot be told from the name or a local config
# CLIP / SigLIP scoring, images per second per GPU (bf16, the image tower + 8 short texts per image, 224 px). Each
# class at the published image-tower-only figure of one RTX 4090 (timm, huggingface/pytorch-image-models
# results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv: AMP, batch 1024, PyTorch 2.4): an H100-class GPU is
# about twice as fast, and the 8 texts cost about as much as the image again.
CLIP_IMAGES_PER_S = {"base": 2500.0, "large": 650.0, "huge": 350.0}
CLIP_SOURCES = {
    "base": "ViT-B/16 CLIP 2,784 img/s (B/32 10,128)",
    "large": "ViT-L/14 CLIP 658 img/s (SigLIP L/16-256 626)",
    "huge": "ViT-H/14 CLIP 346 img/s (SigLIP so400m/14 464)",
}
CLIP_SOURCE = "image tower on 1 RTX 4090, timm benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv"
# Devices without a GPU (a stage with num_gpus: 0): CPU actors are this many times slower.
CPU_SLOWDOWN = 50.0
# Exact pair mining (2 N^2 d FLOP of tile products + selection), FLOP/s per device. GPU: an estimate, a third of an
# H100's 989 TFLOP/s dense bf16 peak (tile products with a selection pass, not a bare GEMM). CPU: measured end to
# end on a 2-core AVX-512-bf16 box, 1M x 768 mined by 2 single-thread tasks in 2,274 s: 675 GFLOP/s, per core
# (docs/BENCHMARKS.md, issue 23).
MINING_FLOPS_GPU = 330e12
MINING_FLOPS_CPU_CORE = 337e9
# read (decode, EXIF, RGB, checks, re-encode when downscaled, sha256, perceptual hash) in CPU seconds per
# image: 5 ms of CPU time measured on the bundled smoke photos (300-1400 px, read.max_side 512 or 1344);
# budgeted at twice that for larger web JPEGs.
READ_SECONDS_PER_IMAGE = 0.01


@dataclass
class StagePlan:
    stage: str
    device: str  # gpu | cpu
    images: float  # items: images, or pairs for the CIR stages (modify, triplet_reward)
    prompt_tokens_per_image: float
    output_tokens_per_image: float
    prompt_tokens: float
    output_tokens: float
    throughput: float  # tok/s per device (caption, dialogue), images/s per device (reward), s/image (read)
    throughput_unit: str
    throughput_source: str
    images_per_second_per_device: float
    gpus_per_replica: float
    replicas: int
    gpu_hours: float  # 0 for CPU stages
    device_hours: float  # GPU-hours, or CPU-(actor/core)-hours for CPU stages
    wall_hours: float | None
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    name: str
    pipeline: str
    images: int
    stages: list[StagePlan]
    total_gpu_hours: float
    total_gpus: float
    wall_hours: float
    bottleneck: str
    read_cpu_hours: float
    read_cores_needed: float
    balanced_gpus: dict[str, float]
    assumptions: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ model classes


def model_size_b(model_ref: str) -> tuple[float, str]:
    """(billions of (active) parameters, how that was found)."""
    if model_ref.startswith("tiny:"):
        return 0.001, "tiny"
    name = model_ref.rstrip("/").split("/")[-1].lower()
    if name in KNOWN_ACTIVE_PARAMS:
        return KNOWN_ACTIVE_PARAMS[name], f"{KNOWN_ACTIVE_PARAMS[name]}B active (MoE)"
    active = re.search(r"(?:^|[-_.])a(\d+(?:\.\d+)?)b(?![a-z])", name)
    if active:
        return float(active.group(1)), f"{active.group(1)}B active (MoE)"
    sized = re.search(r"(?<![\d.a-z])(\d+(?:\.\d+)?)\s*b(?![a-z])", name)
    if sized:
        return float(sized.group(1)), f"{sized.group(1)}B"
    local = local_model_dir(model_ref)
    if local is not None and (local / "config.json").is_file():
        try:
            params = _params_from_config(json.loads((local / "config.json").read_text()))
            return params / 1e9, f"{params / 1e9:.2g}B from config.json"
        except (KeyError, TypeError, ValueError):
            pass
    return ASSUMED_SIZE_B, f"size unknown, assumed {ASSUMED_SIZE_B:g}B"


def _params_from_config(cfg: dict[str, Any]) -> float:
    text = cfg.get("text_config") or cfg
    h, layers = text["hidden_size"], text["num_hidden_layers"]
    inter = text.get("intermediate_size", 4 * h)
    vocab = text.get("vocab_size", cfg.get("vocab_size", 32000))
    return layers * (4 * h * h + 3 * h * inter) + 2 * vocab * h


def default_generation_throughput(model_ref: str, vision: bool) -> tuple[float, str]:
    size, how = model_size_b(model_ref)
    row = next(r for r in GEN_TOKENS_PER_S if size <= r.limit_b)
    tok_s, source = row.tok_s, row.source
    if vision:
        tok_s *= VISION_FACTOR
        source += f"; VLM at the LLM rate: {VISION_SOURCE}"
    return tok_s, f"default: {row.label} {'VLM' if vision else 'LLM'} class ({how}); {source}"


def default_clip_throughput(model_ref: str) -> tuple[float, str]:
    name = model_ref.lower()
    if model_ref.startswith("tiny:") or "base" in name or "b-32" in name or "b-16" in name or "b32" in name:
        size = "base"
    elif any(k in name for k in ("huge", "giant", "bigg", "so400m", "-h-", "-g-")):
        size = "huge"
    else:
        size = "large"
    return CLIP_IMAGES_PER_S[size], f"default: CLIP/SigLIP {size} class; {CLIP_SOURCES[size]}, {CLIP_SOURCE}"


# ------------------------------------------------------------------------------------------- measurements


def parse_throughputs(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        stage, sep, raw = item.partition("=")
        stage = stage.strip()
        if not sep or stage not in STAGES:
            raise ConfigError(f"--throughput {item!r}: expected STAGE=NUMBER with STAGE one of {', '.join(STAGES)}")
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"--throughput {item!r}: {raw!r} is not a number") from None
        if not value > 0 or not math.isfinite(value):
            raise ConfigError(f"--throughput {item!r}: must be a positive number")
        out[stage] = value
    return out


@dataclass
class Measured:
    """From a finished run: per stage, images per second per device and the share of images reaching it."""

    run: str
    images_per_s: dict[str, float]
    reach: dict[str, float]
    notes: list[str]
    output_tokens_per_image: dict[str, float] = field(default_factory=dict)  # retries included


def load_measured(output: str | Path, cfg: PipelineConfig) -> Measured:
    from m3t_gen.run.artefacts import Manifest

    path = Path(output) / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"--from-run {output}: no manifest.json (not a finished run)")
    try:
        manifest = Manifest.loads(path.read_text())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--from-run {output}: unreadable manifest.json ({e})") from None
    stages = {s.stage: s for s in manifest.stages}
    cir_stages = {s.stage: s for s in manifest.cir.stages} if manifest.cir else {}  # pairs, not images
    stages.update(cir_stages)
    read = manifest.totals.read
    rates: dict[str, float] = {}
    reach: dict[str, float] = {}
    tokens: dict[str, float] = {}
    notes: list[str] = []
    planned_cfg = cfg.model_dump(mode="json", by_alias=True)
    for stage in STAGES:
        s = stages.get(stage)
        if not s or not s.rows_in or not s.busy_seconds:
            continue
        if read and stage not in cir_stages:  # a CIR stage's reach is the pool's (pairs per image come from config)
            reach[stage] = s.rows_in / read
        if stage == "read":
            rates[stage] = s.rows_in / s.busy_seconds  # images per second of one read task (one core)
            continue
        gpus = _section_value(manifest.config, stage, "resources.num_gpus")
        devices = float(gpus or 0) or 1.0  # GPUs per replica; a CPU actor counts as one
        rates[stage] = s.rows_in / s.busy_seconds / devices
        ran = _stage_model(manifest.config, stage)
        planned = _stage_model(planned_cfg, stage)
        if ran != planned:
            notes.append(f"{stage}: measured with {ran}, planning for {planned}")
        # Generated tokens per image (the manifest counts them, retries included): used when the run generated
        # under the same model and max_tokens as planned; otherwise the configured bound stays.
        if s.output_tokens:
            same = ran == planned and _max_tokens(manifest.config, stage) == _max_tokens(planned_cfg, stage)
            if same:
                tokens[stage] = s.output_tokens / s.rows_in
            else:
                notes.append(f"{stage}: output tokens per image not taken from the run (other model or max_tokens)")
        if not gpus:
            notes.append(f"{stage}: measured on CPU actors (num_gpus 0)")
    return Measured(str(output), rates, reach, notes, tokens)


def _section_value(cfg: dict[str, Any], stage: str, dotted: str) -> Any:
    """A value under a stage's section of a config as JSON (an older run's may lack it: None)."""
    from m3t_gen.run.artefacts import config_value

    return config_value(stage_section(cfg, stage), dotted)


def _stage_model(cfg: dict[str, Any], stage: str) -> str | None:
    model = _section_value(cfg, stage, "model")
    return model.get("model") if isinstance(model, dict) else model


def _max_tokens(cfg: dict[str, Any], stage: str) -> int | None:
    return _section_value(cfg, stage, "sampling.max_tokens")


# ---------------------------------------------------------------------------------------------- the plan


def stage_section(cfg: Any, stage: str) -> Any:
    """The config section that holds a stage's model and resources (a PipelineConfig or its JSON dump), as the
    stage declares it."""
    return STAGE_CLASSES[stage].settings(cfg)


def planned_stages(cfg: PipelineConfig) -> list[str]:
    """The model stages this config runs, in pipeline order (a single-stage run has no caption stage)."""
    from m3t_gen.run.recipe import enabled

    return [s.name for s in enabled(cfg) if s.model_role]


def gpus_per_replica(cfg: PipelineConfig, stage: str) -> tuple[float, list[str]]:
    section = stage_section(cfg, stage)
    gpus = section.resources.num_gpus
    notes: list[str] = []
    model = getattr(section, "model", None)
    if gpus > 0 and hasattr(model, "backend"):  # a generation model (CLIP stages name theirs by a string)
        backend, options = model.engine()
        parallel = backend.devices_per_replica(options)
        if parallel > gpus:
            notes.append(f"{backend.name} tensor x pipeline parallel = {parallel} GPUs per engine but "
                         f"resources.num_gpus = {gpus:g}: planned with {parallel}")
            gpus = parallel
    return gpus, notes


def _work(cfg: PipelineConfig, side: int, vision_px: int, fill: float,
          measured_tokens: dict[str, float]) -> tuple[dict[str, Work], list[str]]:
    """Each planned stage's own estimate (``Stage.estimate``), in pipeline order: a later prompt holds an earlier
    output."""
    from m3t_gen.run.recipe import enabled

    est = Estimating(cfg, side, vision_px, fill, measured_tokens)
    vis = est.vision(cfg.caption.model.model)
    notes = [f"images at {side} px on the longer side, 4:3 "
             f"({'read.max_side' if cfg.read.max_side else '--image-side'}): {vis} vision tokens per image"
             + (f" ({cfg.caption.model.model})" if cfg.caption.model.model in TINY_IMAGE_TOKENS
                else f" ({vision_px} px per token)")]
    for stage in (s for s in enabled(cfg) if s.model_role):
        work = stage.estimate(est)
        if work is None:
            raise ConfigError(f"{stage.section}: the {stage.name} stage has no plan estimate (Stage.estimate)")
        est.work[stage.name] = work
    notes.append(f"output tokens are {'the upper bound' if fill == 1 else f'{fill:g} x the upper bound'}: "
                 + ", ".join(est.bounds)
                 + (f"; measured per image in the run for {', '.join(sorted(measured_tokens))}"
                    if measured_tokens else ""))
    notes.append("prompt tokens: templates rendered with the validate example row, counted by "
                 + ", ".join(f"{c.source} ({s})" for s, c in est.counters.items()) + f", + {CHAT_OVERHEAD} chat tokens")
    return est.work, notes


def embedding_dim(cfg: PipelineConfig) -> tuple[int, str]:
    """The CLIP embedding width (projection_dim of a local checkpoint; 768, ViT-L/14's, otherwise)."""
    path = local_model_dir(cfg.reward.model)
    if path is not None and (path / "config.json").is_file():
        dim = json.loads((path / "config.json").read_text()).get("projection_dim")
        if dim:
            return int(dim), f"projection_dim of {cfg.reward.model}"
    return 768, "assumed 768 (ViT-L/14)"


def _mining_plan(cfg: PipelineConfig, images: int, throughputs: dict[str, float], pass_gpus: float,
                 assumptions: list[str]) -> "StagePlan | None":
    """Exact pair mining between the passes: 2 N^2 d FLOP of tile products, spread over the GPUs of the CIR
    pass (``cir.pairing.resources.num_gpus`` per task) or, without GPUs, over CPU cores."""
    if not cfg.wants("cir"):
        return None
    spec = cfg.cir.pairing
    dim, dim_src = embedding_dim(cfg)
    n = float(images)
    if spec.index != "exact" or spec.bucket_size is not None:
        assumptions.append(f"CIR: pair mining with index {spec.index}"
                           f"{' in buckets' if spec.bucket_size else ''} on the driver is not planned")
        return None
    flops = 2 * n * n * dim
    gpu = spec.resources.num_gpus > 0
    rate, src = _mining_rate(spec.resources, throughputs, "pair_mining")
    devices = max(pass_gpus, spec.resources.num_gpus) if gpu else float(cfg.ray.num_cpus or 1) / spec.resources.num_cpus
    hours = flops / rate / 3600
    tasks = -(-images // spec.resources.block_rows)
    moved = n * dim * 4 * tasks
    assumptions.append(f"CIR: exact pair mining, 2 N^2 d = {flops:.3g} FLOP (d = {dim}: {dim_src}), "
                       f"{tasks:,} block tasks each streaming the pool's embeddings: {moved / 1e12:.3g} TB read "
                       f"from the object store; on {devices:g} {'GPU' if gpu else 'task'}(s)")
    return StagePlan("pair_mining", "gpu" if gpu else "cpu", n, 0, 0, 0, 0, rate / 1e9,
                     f"GFLOP/s/{'GPU' if gpu else 'task'}", src, rate / (2 * n * dim), spec.resources.num_gpus,
                     int(devices / max(spec.resources.num_gpus, 1)) if gpu else int(devices),
                     hours if gpu else 0.0, hours, hours / devices,
                     [f"2 N^2 d FLOP = {flops:.3g}"])


def _mining_rate(resources: Any, throughputs: dict[str, float], name: str) -> tuple[float, str]:
    """FLOP/s of one mining task: --throughput NAME (GFLOP/s per device), else the GPU estimate or the rate
    measured per CPU core."""
    if name in throughputs:
        return throughputs[name] * 1e9, "--throughput (GFLOP/s per device)"
    if resources.num_gpus > 0:
        return MINING_FLOPS_GPU, "default: estimate, a third of an H100's dense bf16 peak"
    return MINING_FLOPS_CPU_CORE * resources.num_cpus, "default: measured per core (AVX-512 bf16, 1M x 768)"


def _negatives_plan(cfg: PipelineConfig, images: int, throughputs: dict[str, float], pass_gpus: float,
                    assumptions: list[str]) -> "StagePlan | None":
    """The negatives pass after the others: exact kNN of each turn type's targets among themselves and of the
    images among themselves (2 n^2 d FLOP each, on the mining tasks), and CLIP over every image, caption, target
    and text candidate (on the reward's actors)."""
    if cfg.negatives is None:
        return None
    spec, res = cfg.negatives, cfg.negatives.resources
    dim, dim_src = embedding_dim(cfg)
    n = float(images)
    per_image = sum(cfg.dialogue.mix.values())
    flops = 2 * n * n * dim + sum(2 * (n * c) ** 2 * dim for c in cfg.dialogue.mix.values() if c)
    rate, src = _mining_rate(res, throughputs, "negatives")
    gpu = res.num_gpus > 0
    devices = max(pass_gpus, res.num_gpus) if gpu else float(cfg.ray.num_cpus or 1) / res.num_cpus
    mine_hours = flops / rate / 3600
    texts = n * (1 + per_image * (1 + spec.candidates))  # caption, targets, each candidate in its turn's place
    clip_rate, clip_src = default_clip_throughput(cfg.reward.model)
    clip_gpus = cfg.reward.resources.num_gpus > 0
    if not clip_gpus:
        clip_rate, clip_src = clip_rate / CPU_SLOWDOWN, clip_src + f", CPU /{CPU_SLOWDOWN:g}"
    clip_hours = (n + texts / 8) / clip_rate / 3600  # the default rate counts 8 short texts with each image
    replicas = cfg.reward.resources.concurrency
    assumptions.append(f"negatives: exact kNN per turn type and over the images, {flops:.3g} FLOP (d = {dim}: "
                       f"{dim_src}) at {rate / 1e9:.4g} GFLOP/s per {'GPU' if gpu else 'task'} ({src}); CLIP over "
                       f"{n:.3g} images and {texts:.3g} texts ({clip_src}); at most "
                       f"{spec.guard.per_turn} kept per turn from {spec.candidates} candidates")
    gpu_hours = (mine_hours if gpu else 0.0) + (clip_hours if clip_gpus else 0.0)
    return StagePlan("negatives", "gpu" if gpu or clip_gpus else "cpu", n, 0, 0, 0, 0, rate / 1e9,
                     f"GFLOP/s/{'GPU' if gpu else 'task'}", src, n / ((mine_hours + clip_hours) * 3600),
                     res.num_gpus, int(devices / max(res.num_gpus, 1)) if gpu else int(devices), gpu_hours,
                     mine_hours + clip_hours, mine_hours / devices + clip_hours / replicas,
                     [f"kNN FLOP = {flops:.3g}", f"CLIP texts = {texts:.3g}"])


def make_plan(cfg: PipelineConfig, images: int, pipeline: str = "", throughputs: dict[str, float] | None = None,
              measured: Measured | None = None, image_side: int = 1024, vision_px: int = 28,
              fill: float = 1.0) -> Plan:
    throughputs = throughputs or {}
    stages = planned_stages(cfg)
    unknown = sorted(set(throughputs) - set(stages) - {"read"} - ({"pair_mining"} if cfg.wants("cir") else set())
                     - ({"negatives"} if cfg.negatives is not None else set()))
    if unknown:
        raise ConfigError(f"--throughput {unknown[0]}=...: this config has no {unknown[0]} stage "
                          f"(stages: read, {', '.join(stages)})")
    reach = measured.reach if measured else {}
    side = cfg.read.max_side or image_side
    work, assumptions = _work(cfg, side, vision_px, fill, measured.output_tokens_per_image if measured else {})
    plans: list[StagePlan] = []

    # read: CPU tasks, one core each.
    read_images = images * reach.get("read", 1.0)
    if "read" in throughputs:
        sec, src = throughputs["read"], "--throughput (s/image/core)"
    elif measured and "read" in measured.images_per_s:
        sec, src = 1.0 / measured.images_per_s["read"], f"measured: {measured.run}"
    else:
        sec, src = READ_SECONDS_PER_IMAGE, "default: 2 x the 5 ms measured on the smoke photos"
    read_hours = read_images * sec / 3600
    plans.append(StagePlan("read", "cpu", read_images, 0, 0, 0, 0, sec, "s/image/core", src, 1 / sec, 0, 0, 0.0,
                           read_hours, None))

    for stage in stages:
        w = work[stage]
        section = stage_section(cfg, stage)
        gpus, notes = gpus_per_replica(cfg, stage)
        device = "gpu" if gpus > 0 else "cpu"
        per = "GPU" if device == "gpu" else "actor"
        replicas = section.resources.concurrency
        items = images * w.items_per_image * reach.get(stage, reach.get("caption", 1.0))
        if w.generates:
            unit = f"output tok/s/{per}"
            if stage in throughputs:
                value, src = throughputs[stage], "--throughput"
            elif measured and stage in measured.images_per_s:
                value, src = measured.images_per_s[stage] * w.output, f"measured: {measured.run}"
            else:
                value, src = default_generation_throughput(section.model.model,
                                                           vision=STAGE_CLASSES[stage].images_per_request(cfg) > 0)
                if device == "cpu":
                    value, src = value / CPU_SLOWDOWN, src + f", CPU /{CPU_SLOWDOWN:g}"
            items_s = value / w.output
        else:
            unit = f"{w.items}/s/{per}"
            if stage in throughputs:
                value, src = throughputs[stage], "--throughput"
            elif measured and stage in measured.images_per_s:
                value, src = measured.images_per_s[stage], f"measured: {measured.run}"
            else:
                value, src = default_clip_throughput(section.model)
                if w.speedup != 1:
                    value, src = value * w.speedup, src + f", {w.speedup_why} (x{w.speedup:g})"
                if device == "cpu":
                    value, src = value / CPU_SLOWDOWN, src + f", CPU /{CPU_SLOWDOWN:g}"
            items_s = value
        hours = items / items_s / 3600
        units = (gpus if device == "gpu" else 1.0) * replicas
        plans.append(StagePlan(
            stage, device, items, w.prompt, w.output, items * w.prompt, items * w.output, value, unit, src,
            items_s, gpus, replicas, hours if device == "gpu" else 0.0, hours, hours / units, notes))

    mining = _mining_plan(cfg, images, throughputs, max((p.gpus_per_replica * p.replicas for p in plans
                                                          if p.device == "gpu"), default=0.0), assumptions)
    # Stages of one pass stream concurrently: a pass takes as long as its slowest stage. The CIR stages run in
    # a second pass once the sample pass is done, on the GPUs the first pass gave back, after the pair mining.
    wall, total_gpus, total_gpu_hours, bottlenecks, first_pass = 0.0, 0.0, 0.0, [], None
    balanced: dict[str, float] = {}
    for pass_stages in (SAMPLE_PASS, CIR_PASS):
        gen = [p for p in plans if p.stage in pass_stages]
        if not gen:
            continue
        if pass_stages is CIR_PASS and mining is not None:
            plans.insert(plans.index(gen[0]), mining)
            wall += mining.wall_hours or 0.0
            total_gpu_hours += mining.gpu_hours
        slowest = max(gen, key=lambda p: p.wall_hours or 0.0)
        bottlenecks.append(slowest.stage)
        wall += slowest.wall_hours or 0.0
        first_pass = slowest.wall_hours if first_pass is None else first_pass
        gpus = sum(p.gpus_per_replica * p.replicas for p in gen if p.device == "gpu")
        hours = sum(p.gpu_hours for p in gen)
        total_gpus = max(total_gpus, gpus)
        total_gpu_hours += hours
        balanced.update({p.stage: round(gpus * p.gpu_hours / hours, 2)
                         for p in gen if p.device == "gpu" and hours > 0})
    negatives = _negatives_plan(cfg, images, throughputs, total_gpus, assumptions)
    if negatives is not None:  # after the passes, on the GPUs they gave back
        plans.append(negatives)
        wall += negatives.wall_hours or 0.0
        total_gpu_hours += negatives.gpu_hours
    assumptions += [
        "one attempt per request (retries after invalid output cost more; a measured run includes them)",
        "shares of images reaching each stage: " + (f"measured in {measured.run}" if measured else
                                                    "all (read and dedupe rejections not subtracted)"),
    ]
    if measured:
        assumptions.extend(measured.notes)
    return Plan(cfg.name, pipeline, images, plans, total_gpu_hours, total_gpus, wall, " + ".join(bottlenecks),
                read_hours, read_hours / first_pass if first_pass else 0.0, balanced, assumptions)


# ---------------------------------------------------------------------------------------------- printing


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1e9:
        return f"{x / 1e9:.2f}B"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f}M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.3g}"


def _hours(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.1f}" if x >= 1 else f"{x:.3f}"


def format_plan(plan: Plan) -> str:
    lines = [f"plan: {plan.name} ({plan.pipeline}) for {plan.images:,} images; items are images (CIR stages: "
             f"pairs), tokens per item"]
    head = (f"{'stage':<14} {'device':<6} {'items':>8} {'prompt/it':>10} {'output/it':>10} {'prompt tok':>10} "
            f"{'output tok':>10} {'throughput':>28} {'GPU-h':>9} {'GPUs':>5} {'wall h':>8}")
    lines.append(head)
    for p in plan.stages:
        if p.stage == "read":
            tput = f"{p.throughput * 1000:.0f} ms/image/core"
            lines.append(f"{p.stage:<14} {'cpu':<6} {_num(p.images):>8} {'-':>10} {'-':>10} {'-':>10} {'-':>10} "
                         f"{tput:>28} {'-':>9} {'-':>5} {'-':>8}   CPU core-h {_hours(p.device_hours)}")
            continue
        tput = f"{_num(p.throughput)} {p.throughput_unit}"
        gpus = p.gpus_per_replica * p.replicas
        lines.append(
            f"{p.stage:<14} {p.device:<6} {_num(p.images):>8} {_num(p.prompt_tokens_per_image):>10} "
            f"{_num(p.output_tokens_per_image):>10} {_num(p.prompt_tokens):>10} {_num(p.output_tokens):>10} "
            f"{tput:>28} {_hours(p.gpu_hours) if p.device == 'gpu' else '-':>9} "
            f"{f'{gpus:g}' if p.device == 'gpu' else '-':>5} {_hours(p.wall_hours):>8}"
            + ("" if p.device == "gpu" else f"   CPU actor-h {_hours(p.device_hours)}"))
    two = "+" in plan.bottleneck
    lines.append(f"total: {_hours(plan.total_gpu_hours)} GPU-hours on {plan.total_gpus:g} GPUs; wall about "
                 f"{_hours(plan.wall_hours)} h (stages stream concurrently{' within each pass' if two else ''}; "
                 f"slowest: {plan.bottleneck})")
    if plan.wall_hours > 0:
        lines.append(f"read: {_hours(plan.read_cpu_hours)} CPU core-hours; {plan.read_cores_needed:.2g} cores keep "
                     f"up with the slowest stage of its pass")
    if plan.balanced_gpus:
        lines.append("balanced split of these GPUs (by GPU-hours): "
                     + ", ".join(f"{k} {v:g}" for k, v in plan.balanced_gpus.items()))
    for p in plan.stages:
        lines.append(f"  {p.stage}: throughput {p.throughput_source}")
        for note in p.notes:
            lines.append(f"  {p.stage}: {note}")
    for a in plan.assumptions:
        lines.append(f"  assumes: {a}")
    return "\n".join(lines)

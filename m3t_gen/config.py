"""pipeline.yaml: one tree of pydantic models. Unknown keys are errors; every error names its YAML path.

Engine-specific settings live in each backend's own ``Options`` model (m3t_gen/backends/*), checked here
through the registry so that a bad option fails at ``validate`` time, not after a model has loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from m3t_gen.models import check_reference
from m3t_gen.turns import CAPTION_TURN, DEFAULT_MIX, TURN_TYPE_NAMES

TurnType = Literal[TURN_TYPE_NAMES]  # m3t_gen/turns.py: the one table of turn types


def _check_model_ref(v: str) -> str:
    err = check_reference(v)
    if err:
        raise ValueError(err)
    return v


ModelRef = Annotated[str, AfterValidator(_check_model_ref)]

# One spelling per dtype in the config (and in its hash): aliases folded here, read by every engine.
DTYPE_ALIASES = {"auto": "auto", "float32": "float32", "fp32": "float32", "float": "float32",
                 "float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16",
                 "bf16": "bfloat16"}


def _canonical_dtype(v: str) -> str:
    try:
        return DTYPE_ALIASES[str(v).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {v!r} (expected one of {', '.join(sorted(DTYPE_ALIASES))})") from None


Dtype = Annotated[str, AfterValidator(_canonical_dtype)]


class ConfigError(Exception):
    """A bad pipeline config: one line, naming the YAML path and what was expected."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# Fields that say where and with how much the run happens (or only what the card says), not what it writes: left
# out of the config hash and of the config comparison on resume (a crashed run resumes on a bigger or smaller
# cluster, into a moved folder).
PLACEMENT = {"placement": True}


def placement_exclude(model: type[BaseModel]) -> dict[str, Any]:
    """The nested ``exclude`` spec of a model's placement fields (by alias), read from the marks on the models."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        key = info.alias or name
        if (info.json_schema_extra or {}).get("placement"):
            out[key] = True
            continue
        for sub in _model_types(info.annotation):
            nested = placement_exclude(sub)
            if nested:
                out[key] = nested
    return out


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for arg in typing.get_args(annotation) for t in _model_types(arg)]


def drop_excluded(data: Any, exclude: dict[str, Any]) -> Any:
    """``data`` (a config as plain JSON) without the keys ``exclude`` names: old manifests compare the same way."""
    if not isinstance(data, dict):
        return data
    out = {}
    for key, value in data.items():
        rule = exclude.get(key)
        if rule is True:
            continue
        out[key] = drop_excluded(value, rule) if isinstance(rule, dict) else value
    return out


class ReasoningSpec(Strict):
    """A model that reasons before it answers (Qwen3, DeepSeek-R1, gpt-oss). The JSON schema then constrains the
    answer after the reasoning, not the reasoning itself; the reasoning text is kept out of the parsed answer."""

    parser: str = Field(description="vLLM reasoning parser name (qwen3, deepseek_r1, openai_gptoss, ...): where the "
                        "reasoning ends, so that structured output starts there")
    thinking: bool = Field(True, description="think at all: the chat template's enable_thinking (Qwen3 hybrids)")
    budget: int | None = Field(None, ge=1, description="at most this many reasoning tokens, then the end marker is "
                               "forced (vLLM thinking_token_budget); counts against sampling.max_tokens")
    effort: Literal["low", "medium", "high"] | None = Field(
        None, description="reasoning_effort for models whose template reads it (gpt-oss)")
    keep: bool = Field(True, description="store the reasoning text with the sample (KEY.json 'reasoning')")

    def template_kwargs(self) -> dict[str, Any]:
        """What the chat template is given (the same keys a server's chat_template_kwargs take)."""
        kw: dict[str, Any] = {"enable_thinking": self.thinking}
        if self.effort is not None:
            kw["reasoning_effort"] = self.effort
        return kw


class ModelSpec(Strict):
    backend: str = Field(description="registry name of a backend (m3t_gen/backends/: one file each, registered by name)")
    model: ModelRef = Field(description="tiny:<kind>, a local HF checkpoint directory, or a hub id org/name")
    revision: str | None = None
    trust_remote_code: bool = False  # remote model code runs only when the config says so
    dtype: Dtype = "auto"
    options: dict[str, Any] = Field(default_factory=dict, description="the backend's own settings")
    reasoning: ReasoningSpec | None = Field(None, description="for models that reason before they answer")

    def engine(self) -> tuple[Any, BaseModel]:
        """(backend class, its validated options): what validate and plan read capabilities from."""
        from m3t_gen.backends.registry import get_backend

        backend = get_backend(self.backend)
        return backend, backend.Options.model_validate(self.options)

    @model_validator(mode="after")
    def _backend_and_options(self) -> "ModelSpec":
        from m3t_gen.backends.registry import backend_names, get_backend

        try:
            backend = get_backend(self.backend)
        except KeyError as e:
            raise ValueError(str(e.args[0])) from None
        try:
            backend.Options.model_validate(self.options)
        except ValidationError as e:
            first = e.errors()[0]
            msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
            raise ValueError(f"options.{_loc(first['loc'])}: {msg} (backend {self.backend!r})") from None
        if self.reasoning is not None and not backend.supports_reasoning:
            able = [n for n in backend_names() if get_backend(n).supports_reasoning]
            raise ValueError(f"reasoning: not supported by backend {self.backend!r} (use {' or '.join(able)})")
        return self


class Sampling(Strict):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)


class Resources(Strict):
    """Maps onto Ray Data map_batches: actors in the pool, rows per call, GPUs/CPUs per actor."""

    batch_size: int = Field(8, ge=1)
    concurrency: int = Field(1, ge=1)
    batches_in_flight: int = Field(1, ge=1, description="batches one actor works on at once")
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(1, gt=0)


class GenerationResources(Resources):
    batches_in_flight: int | None = Field(  # type: ignore[assignment]
        None, ge=1, description="batches one actor works on at once; default: the backend's own "
        "(Backend.batches_in_flight)")
    decode_cpus: float = Field(
        0, ge=0, description="CPUs of each Ray Data task that decodes a batch's images before it reaches the "
        "model's actor (so the engine's process does not: issue 27); 0 (default: on a 2-vCPU CPU node the A/B "
        "measured 0.85 of the bare engine with it vs 0.91 without, docs/BENCHMARKS.md): the actor decodes them")


class ParquetColumns(Strict):
    image: str | None = Field("image", description="image bytes (binary, or a struct with 'bytes' as HF writes)")
    image_path: str | None = Field(None, description="instead of bytes: a path (relative to the file) or URL")
    text: str | None = "caption"
    url: str | None = "url"
    key: str | None = None

    @model_validator(mode="after")
    def _one_image_source(self) -> "ParquetColumns":
        if (self.image is None) == (self.image_path is None):
            raise ValueError("set exactly one of image / image_path")
        return self


class InputSpec(Strict):
    format: Literal["webdataset", "parquet", "folder"] = "webdataset"
    paths: list[str] = Field(
        min_length=1,
        description="files (webdataset, parquet) or folders (folder); globs and {a,b} / {000..009} braces; "
        "relative to the pipeline file; remote URLs through fsspec",
    )
    columns: ParquetColumns = Field(default_factory=ParquetColumns, description="parquet only")
    allowed_roots: list[str] = Field(
        default_factory=list,
        description="folders (or URL prefixes) besides each input's own folder that parquet image paths and "
        "symbolic links in folder inputs may point into; anything else is rejected (path_outside_root)")


class DedupeSpec(Strict):
    exact: bool = Field(True, description="reject byte-identical images (sha256) seen earlier in the run")
    perceptual: bool = Field(True, description="reject near-duplicates by 64-bit perceptual hash")
    max_distance: int = Field(4, ge=0, le=16, description="Hamming distance at or below which images are near-duplicates")


class ReadSpec(Strict):
    min_side: int = Field(512, ge=1, description="keep images whose longer side is at least this (M3T: 512)")
    max_pixels: int = Field(89_478_485, ge=1, description="larger images are rejected (decompression bombs)")
    max_aspect_ratio: float | None = Field(
        20.0, ge=1, description="longer side / shorter side above this is rejected (banners, strips: vision "
        "encoders tile them into thousands of tokens or refuse them)")
    max_side: int | None = Field(None, ge=16, description="downscale so the longer side is at most this")
    max_text_chars: int = Field(2000, ge=1, description="alt-text longer than this is truncated and flagged")
    max_member_bytes: int = Field(
        64 * 2**20, ge=1, description="a tar member, file or parquet image larger than this is rejected unread "
        "(member_too_large): bombs such as sparse or gzip-of-zeros members")
    max_sample_bytes: int = Field(
        128 * 2**20, ge=1, description="the members of one sample (image, caption, metadata) together; more is "
        "rejected (sample_too_large)")
    jpeg_quality: int = Field(92, ge=1, le=100)
    dedupe: DedupeSpec = Field(default_factory=DedupeSpec)
    num_cpus: float = Field(1, gt=0, description="CPUs per read task (one task per input shard at a time)",
                            json_schema_extra=PLACEMENT)


class GenerationSpec(Strict):
    model: ModelSpec
    template: str
    sampling: Sampling = Field(default_factory=Sampling)
    resources: GenerationResources = Field(default_factory=GenerationResources, json_schema_extra=PLACEMENT)
    max_attempts: int = Field(3, ge=1, description="tries with a new seed before a sample is rejected")

    @model_validator(mode="after")
    def _budget_fits(self) -> "GenerationSpec":
        r = self.model.reasoning
        if r is not None and r.thinking and r.budget is not None and r.budget >= self.sampling.max_tokens:
            raise ValueError(f"model.reasoning.budget ({r.budget}) must be below sampling.max_tokens "
                             f"({self.sampling.max_tokens}): reasoning tokens count against it")
        return self

    def stage_resources(self) -> Resources:
        """``resources`` with ``batches_in_flight`` settled: the configured value, else the backend's own."""
        from m3t_gen.backends.registry import get_backend

        n = self.resources.batches_in_flight or get_backend(self.model.backend).batches_in_flight
        return Resources(**{**self.resources.model_dump(exclude={"decode_cpus"}), "batches_in_flight": n})


class CaptionSpec(GenerationSpec):
    template: str = "caption_dense.j2"
    min_chars: int = Field(1, ge=0, description="shorter captions count as empty and are retried")


class DialogueSpec(GenerationSpec):
    template: str = "m3t_dialogue.j2"
    schema_: str = Field("m3t_dialogue.schema.json", alias="schema")
    mix: dict[TurnType, int] = Field(default_factory=lambda: dict(DEFAULT_MIX))
    max_text_chars: int = Field(300, ge=8, le=4000, description="bound on every generated string")
    source: Literal["caption", "image"] = Field(
        "caption", description="caption: two-stage MuCo recipe (an LLM reads the dense caption); image: single "
        "stage (an MLLM writes the turns straight from the image; its retrieval target is the dense description)")

    @model_validator(mode="after")
    def _single_stage(self) -> "DialogueSpec":
        if self.source == "image":
            if not self.mix.get(CAPTION_TURN):
                raise ValueError(f"source: image needs a {CAPTION_TURN} turn in the mix (its target is the description)")
            if self.template == "m3t_dialogue.j2":
                self.template = "m3t_dialogue_image.j2"
        return self

    @field_validator("mix")
    @classmethod
    def _mix(cls, v: dict[str, int]) -> dict[str, int]:
        if any(n < 0 for n in v.values()):
            raise ValueError("turn counts must be >= 0")
        if sum(v.values()) < 1:
            raise ValueError("the mix must ask for at least one turn")
        return v


class JudgeSpec(GenerationSpec):
    """Optional: an MLLM checks every turn of a sample against its image in one call (m3t_gen/stages/judge.py)."""

    template: str = "m3t_judge.j2"
    schema_: str = Field("judge_verdicts.schema.json", alias="schema")
    max_text_chars: int = Field(160, ge=8, le=2000, description="bound on each verdict's reason (and answer)")
    answerability: bool = Field(False, description="also let the judge answer each VQA query from the image "
                                "without the written target, and record the agreement (one more call per sample)")
    answer_template: str = "m3t_answer.j2"


class TripletJudgeSpec(GenerationSpec):
    """Optional: an MLLM sees reference and target images and judges each modification text."""

    template: str = "cir_judge.j2"
    schema_: str = Field("judge_verdicts.schema.json", alias="schema")
    max_text_chars: int = Field(160, ge=8, le=2000, description="bound on each verdict's reason")


class SelfRetrievalSpec(Strict):
    """Distractors come from a fixed bank of images, the same for every actor and every run (reproducible):
    the first ``bank_size`` readable images of ``bank`` (input-format paths) or, by default, of the run's input."""

    enabled: bool = True
    k: int = Field(15, ge=1, description="distractor images per text")
    bank_size: int = Field(256, ge=1, description="images in the distractor bank")
    bank: list[str] | None = Field(None, description="paths/globs in the input format; default: the run's input")


class RewardSpec(Strict):
    model: ModelRef = Field(description="CLIP or SigLIP checkpoint (HF format): tiny:clip, a directory, or org/name")
    dtype: Dtype = "auto"
    self_retrieval: SelfRetrievalSpec = Field(default_factory=SelfRetrievalSpec)
    resources: Resources = Field(default_factory=lambda: Resources(batch_size=32), json_schema_extra=PLACEMENT)


class PrivacySpec(Strict):
    """Drop texts that mention protected attributes (MTCIR: skin, hair, gender, age, race). Whole-word matches."""

    enabled: bool = False
    words: dict[str, list[str]] | None = Field(None, description="category -> words; default: m3t_gen.text.checks")

    def word_lists(self) -> dict[str, list[str]]:
        from m3t_gen.text.checks import PRIVACY_WORDS

        return self.words if self.words is not None else PRIVACY_WORDS


class FilterSpec(Strict):
    """Thresholds applied after scoring; scores are kept, so thresholds can change without re-scoring."""

    min_turn_score: float | None = Field(None, ge=-1, le=1, description="drop turns whose CLIP cosine is lower")
    max_turn_rank: int | None = Field(None, ge=1, description="drop turns whose own image ranks worse among distractors")
    min_turn_prob: float | None = Field(None, ge=0, le=1, description="drop turns giving their own image less probability")
    min_turns: int = Field(1, ge=1, description="reject a dialogue left with fewer turns")
    min_mean_score: float | None = Field(None, ge=-1, le=1, description="reject when the mean kept-turn cosine is lower")
    min_caption_score: float | None = Field(None, ge=-1, le=1, description="reject when the caption's cosine is lower")
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    # The judge's verdicts (act only where a judge ran).
    drop_contradicted: bool = Field(True, description="drop turns the judge says the image contradicts")
    drop_unanswerable: bool = Field(False, description="drop turns the judge says the image cannot answer")
    min_judge_score: int | None = Field(None, ge=1, le=5, description="drop turns the judge scores lower (1-5)")
    min_answer_agreement: float | None = Field(
        None, ge=0, le=1, description="drop VQA turns whose target disagrees with the judge's own answer "
        "(answerability: exact match for short targets, token F1 otherwise)")


class OutputSpec(Strict):
    dir: str = Field("out", json_schema_extra=PLACEMENT)
    samples_per_tar: int = Field(1000, ge=1)
    license: str = Field("other", json_schema_extra=PLACEMENT,
                         description="the dataset card's license tag (Hugging Face / SPDX id); the generated text's "
                         "terms follow the models', the images keep their own")


class RaySpec(Strict):
    address: str | None = Field(None, description="join this cluster; RAY_ADDRESS also works; none: local Ray",
                                json_schema_extra=PLACEMENT)
    num_cpus: int | None = Field(None, ge=1, description="local Ray only", json_schema_extra=PLACEMENT)
    progress: bool = Field(True, json_schema_extra=PLACEMENT)
    wait_for_actors_s: int = Field(
        900, ge=0, json_schema_extra=PLACEMENT,
        description="the pools of a pass start together; an actor of a pool of K takes work only once all K are up "
        "(models loaded), so the first engine ready does not take every batch; after this many seconds the "
        "actors that are up start without the rest (0: do not wait)")
    preserve_order: bool = Field(True, description="rows reach single-actor stages (dedupe) in input order: "
                                 "which copy of a duplicate survives does not depend on timing")


# Six modification categories (CoLLM/MTCIR-style). Name -> instruction given to the writer LLM.
DEFAULT_CIR_CATEGORIES: dict[str, str] = {
    "add_remove": "add an object to the scene or remove one that is there",
    "attribute": "change an attribute of an object: colour, material, size, pattern or state",
    "replace": "replace one object with a different kind of object",
    "count": "change how many of some object there are",
    "scene": "change the background, setting, time of day or weather",
    "viewpoint_style": "change the viewpoint, framing, or the photographic/artistic style",
}


class PairingResources(Strict):
    """Exact pair mining as Ray tasks: one per block of reference images, each streaming the whole pool's
    embeddings past its block."""

    num_cpus: float = Field(1, gt=0, description="CPUs per mining task (its torch threads)")
    num_gpus: float = Field(0, ge=0, description="GPUs per mining task; on a GPU the tiles multiply there")
    block_rows: int = Field(16384, ge=1, description="reference images per task (K workers take 1/K of the blocks)")
    tile_rows: int = Field(16384, ge=1, description="pool images multiplied at once: [block x tile] scores")


class BandSpec(Strict):
    """A similarity band and a rank window among a query's neighbours (rank 1 = the nearest candidate)."""

    min_similarity: float = Field(-1.0, ge=-1, le=1)
    max_similarity: float = Field(1.0, ge=-1, le=1)
    min_rank: int = Field(1, ge=1, description="1 = the nearest other image")
    max_rank: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "BandSpec":
        if self.min_similarity > self.max_similarity:
            raise ValueError("min_similarity must be <= max_similarity")
        if self.min_rank > self.max_rank:
            raise ValueError("min_rank must be <= max_rank")
        return self


class PairingSpec(BandSpec):
    """Partners by CLIP image similarity: inside a band, inside a rank window (SPN4CIR: not the nearest
    neighbour, whose near-duplicates make useless triplets)."""

    min_similarity: float = Field(0.5, ge=-1, le=1)
    max_similarity: float = Field(0.95, ge=-1, le=1, description="above: near-duplicates, excluded")
    pairs_per_image: int = Field(1, ge=1)
    bucket_size: int | None = Field(None, ge=2, description="pair within buckets of this many images (memory bound)")
    index: Literal["exact", "ivf", "hnsw"] = Field(
        "exact", description="neighbour search: exact (FAISS flat, O(N^2 d)), ivf (inverted lists, probes nprobe of "
        "nlist clusters), hnsw (graph); see docs/BENCHMARKS.md for time, memory and recall at 100K / 1M")
    nlist: int | None = Field(None, ge=1, description="ivf: clusters (default 4 sqrt(N), at least 39 images each)")
    nprobe: int = Field(32, ge=1, description="ivf: clusters searched per query")
    hnsw_m: int = Field(32, ge=4, description="hnsw: links per node")
    ef_search: int = Field(128, ge=1, description="hnsw: candidate list size at search time")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", json_schema_extra=PLACEMENT,
        description="exact search: the tile products' precision (auto: bf16 on GPUs and CPUs with AMX / AVX-512 "
        "bf16); the pairs are the fp32 answer either way (candidates re-scored, uncertain rows redone in full)")
    resources: "PairingResources" = Field(default_factory=lambda: PairingResources(), json_schema_extra=PLACEMENT)


class ModifySpec(GenerationSpec):
    template: str = "cir_modifications.j2"
    schema_: str = Field("cir_modifications.schema.json", alias="schema")
    n: int = Field(5, ge=1, le=20, description="modification texts per pair")
    source: Literal["captions", "images"] = Field(
        "captions", description="captions: a text LLM reads the two dense captions; images: an MLLM sees both images")
    categories: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_CIR_CATEGORIES), min_length=1)
    max_text_chars: int = Field(200, ge=8, le=2000)


    @model_validator(mode="after")
    def _image_template(self) -> "ModifySpec":
        if self.source == "images" and self.template == "cir_modifications.j2":
            self.template = "cir_modifications_images.j2"
        return self


class TripletFilterSpec(Strict):
    """CompoDiff's CLIP minimums by default; privacy filter on (as MTCIR)."""

    min_target_caption_score: float | None = Field(0.2, ge=-1, le=1, description="target image vs target caption")
    min_modification_score: float | None = Field(0.2, ge=-1, le=1, description="modification text vs target image")
    min_directional: float | None = Field(0.2, ge=-1, le=1, description="CompoDiff directional CLIP similarity")
    min_modifications: int = Field(1, ge=1, description="reject a triplet left with fewer modification texts")
    privacy: PrivacySpec = Field(default_factory=lambda: PrivacySpec(enabled=True))
    drop_contradicted: bool = Field(True, description="drop texts the judge says do not turn reference into target")
    min_judge_score: int | None = Field(None, ge=1, le=5, description="drop texts the judge scores lower (1-5)")


class CirSpec(Strict):
    pairing: PairingSpec = Field(default_factory=PairingSpec)
    modify: ModifySpec
    filter: TripletFilterSpec = Field(default_factory=TripletFilterSpec)
    judge: TripletJudgeSpec | None = Field(None, description="optional VLM judge of each modification text")
    triplets_per_file: int = Field(1000, ge=1, description="triplets per JSONL part (the CIR resume unit)")


class NegativeGuardSpec(Strict):
    """The false-negative guard, decided from recorded scores (`m3t-gen refilter --set negatives.guard.x=...`
    re-decides without mining again)."""

    max_positive_ratio: float = Field(
        0.95, gt=0, le=1, description="positive-aware (NV-Retriever's TopK-PercPos): a candidate's score against the "
        "query must stay below the positive's score less (1 - ratio) of its size; else a likely false negative")
    max_text_similarity: float = Field(
        0.98, ge=-1, le=1, description="a text candidate this close to the positive target is a paraphrase of it")
    max_image_similarity: float = Field(
        0.95, ge=-1, le=1, description="an image candidate this close to the image is a near-duplicate of it")
    per_turn: int = Field(3, ge=1, description="negatives kept per turn (the nearest that pass the guard)")
    images_per_sample: int = Field(3, ge=0, description="negative images kept per sample (neg_image_path)")


class NegativesSpec(Strict):
    """Hard negatives for every kept turn, mined from the run's own output (a pass after the sample pass):
    targets of the same turn type from other images near the positive in CLIP text space, and images near the
    sample's image in CLIP image space; each candidate recorded with its scores and the guard's decision."""

    candidates: int = Field(8, ge=1, description="candidates mined per turn (and per image) before the guard")
    text: BandSpec = Field(default_factory=BandSpec, description="among other images' targets of the turn's type")
    image: BandSpec = Field(default_factory=BandSpec, description="among the other scored images")
    guard: NegativeGuardSpec = Field(default_factory=NegativeGuardSpec)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", json_schema_extra=PLACEMENT,
                                                       description="as cir.pairing.precision")
    resources: PairingResources = Field(default_factory=lambda: PairingResources(), json_schema_extra=PLACEMENT)


class PipelineConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    recipe: Literal["m3t", "cir", "m3t+cir"] = "m3t"
    seed: int = 0
    limit: int | None = Field(None, ge=1, description="small-shard test mode: read at most N samples per shard")
    input: InputSpec
    read: ReadSpec = Field(default_factory=ReadSpec)
    caption: CaptionSpec
    dialogue: DialogueSpec | None = Field(None, description="required by the m3t recipe")
    reward: RewardSpec
    judge: JudgeSpec | None = Field(None, description="optional VLM judge of every turn (off unless set)")
    filter: FilterSpec = Field(default_factory=FilterSpec)
    cir: CirSpec | None = Field(None, description="required by the cir recipe")
    negatives: NegativesSpec | None = Field(
        None, description="hard negatives for every kept turn (a pass after the sample pass; off unless set)")
    output: OutputSpec = Field(default_factory=OutputSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    file_roots: list[str] = Field(
        default_factory=list, json_schema_extra=PLACEMENT,
        description="folders besides the pipeline file's own and the bundled prompts/ and schemas/ that "
        "templates and schemas may be read from (a prompt is sent to models and printed in the card)")

    # Where the YAML file was: relative paths in it resolve against this directory.
    base_dir: str = Field(".", exclude=True)

    @model_validator(mode="after")
    def _recipe_sections(self) -> "PipelineConfig":
        if self.wants("m3t") and self.dialogue is None:
            raise ValueError("recipe m3t needs a dialogue: section")
        if self.wants("cir") and self.cir is None:
            raise ValueError("recipe cir needs a cir: section")
        if self.negatives is not None and not self.wants("m3t"):
            raise ValueError("negatives are mined for M3T turns: the recipe must include m3t")
        if self.wants("cir") and self.dialogue is not None and self.wants("m3t") and self.dialogue.source == "image":
            raise ValueError("dialogue.source: image skips the caption stage, which the cir recipe needs")
        return self

    def single_stage(self) -> bool:
        """M3T without a separate caption call: the MLLM writes the turns from the image."""
        return self.wants("m3t") and not self.wants("cir") and self.dialogue.source == "image"

    def wants(self, recipe: str) -> bool:
        return recipe in self.recipe.split("+")

    def resolve_path(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path


# ---------------------------------------------------------------------------------------------- loading


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values parse as YAML (``3`` is an int, ``null`` is None)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = load_yaml(raw, f"--set {dotted.strip()}")
        except yaml.YAMLError:
            value = raw
        set_value(data, dotted, value, f"--set {item!r}")
    return data


def set_value(data: dict[str, Any], dotted: str, value: Any, what: str) -> None:
    """Set ``dotted.key`` in the parsed config to ``value`` as it is: a command-line path goes in as a value, never
    as YAML text (a path holding both quote characters once turned into other YAML, or into a relative folder)."""
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{what}: empty key segment")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {'.'.join(parts[: i + 1])} is not a mapping")
        node = child
    node[parts[-1]] = value


# A pipeline file is a few hundred values; aliases may repeat a block (one model spec for several stages), but a
# tree of aliases of aliases expands exponentially (a "billion laughs": 9 levels of 10 are 10^9 values).
MAX_YAML_VALUES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str, source: str) -> Any:
    """YAML text to plain data, as ``yaml.safe_load`` but refusing what a config must not hold, each as one line
    naming the YAML path: a key given twice (YAML lets the last one win silently), an alias inside its own anchor
    (a cycle that pydantic, JSON and the config hash cannot hold) and aliases expanding past MAX_YAML_VALUES.
    The node graph is checked before anything is built from it, in bounded work. Syntax errors: yaml.YAMLError."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_nodes(root, loader, source)
        return loader.construct_document(root)
    finally:
        loader.dispose()


def _check_nodes(root: yaml.Node, loader: Any, source: str) -> None:
    """Walk the node graph depth-first as the built data would hold it (an alias visits its anchor's node again),
    with an explicit stack: the walk stops at the first duplicate key, cycle, or value past the bound."""
    exit_marker = object()
    work: list[tuple[Any, tuple[Any, ...], tuple[Any, ...] | None]] = [(root, (), None)]
    open_nodes: set[int] = set()  # the nodes on the path from the root to the current one
    seen: set[int] = set()
    count = 0
    while work:
        node, path, alias_at = work.pop()
        if node is exit_marker:
            open_nodes.discard(path)
            continue
        if id(node) in open_nodes:
            raise ConfigError(f"{source}: {_loc(path)}: an alias inside its own anchor (anchored at line "
                              f"{node.start_mark.line + 1}): a recursive structure is not a config value")
        if id(node) in seen and alias_at is None:
            alias_at = path  # the first alias on this branch: where an alias bomb is named
        seen.add(id(node))
        count += 1
        if count > MAX_YAML_VALUES:
            raise ConfigError(f"{source}: {_loc(alias_at or path)}: the document expands to more than "
                              f"{MAX_YAML_VALUES} values (aliases of aliases?): refused")
        if isinstance(node, yaml.ScalarNode):
            continue
        open_nodes.add(id(node))
        work.append((exit_marker, id(node), None))
        if isinstance(node, yaml.SequenceNode):
            children = [(child, path + (i,)) for i, child in enumerate(node.value)]
        else:
            children = _mapping_children(node, path, loader, source)
        work.extend((child, where, alias_at) for child, where in reversed(children))


def _mapping_children(node: yaml.MappingNode, path: tuple[Any, ...], loader: Any,
                      source: str) -> list[tuple[yaml.Node, tuple[Any, ...]]]:
    """A mapping's values with their paths; a key written twice is an error (a merge ``<<`` may be overridden:
    that is what it is for)."""
    first_line: dict[Any, int] = {}
    children = []
    for key_node, value in node.value:
        if key_node.tag == _MERGE_TAG:
            children.append((value, path + ("<<",)))
            continue
        if not isinstance(key_node, yaml.ScalarNode):  # a list or mapping as a key: the constructor refuses it
            children.append((value, path + (key_node.tag,)))
            continue
        key, line = loader.construct_object(key_node), key_node.start_mark.line + 1
        if key in first_line:
            raise ConfigError(f"{source}: {_loc(path + (str(key),))}: duplicate key at line {line} (first at line "
                              f"{first_line[key]}; YAML would keep only the last)")
        first_line[key] = line
        children.append((value, path + (str(key),)))
    return children


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = [p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    got = first.get("input")
    if first["type"] not in ("missing", "extra_forbidden") and not isinstance(got, (dict, list)):
        msg += f" (got {got!r})"
    more = len(err.errors()) - 1
    tail = f" (+{more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {_loc(tuple(loc))}: {msg}{tail}".replace("\n", " ")


def load_config(path: str | Path, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> PipelineConfig:
    """The config in ``path``; ``values`` ({dotted key: value}, the command line's options) are set first, then
    the ``--set`` overrides (so a --set wins)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = load_yaml(path.read_bytes().decode("utf-8"), str(path))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: (top level): expected a mapping, got {type(data).__name__}")
    for dotted, value in (values or {}).items():
        set_value(data, dotted, value, dotted)
    data = apply_overrides(data, overrides or [])
    data["base_dir"] = str(path.resolve().parent)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from None

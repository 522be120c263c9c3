"""`m3t-gen validate`: everything that can be checked without loading a model or starting Ray."""

from __future__ import annotations

import os
from typing import Any

from m3t_gen.config import ConfigError, PipelineConfig
from m3t_gen.resources import data_dir, find_file
from m3t_gen.schemas import dialogue_decoding_schema, load_schema, validation_error
from m3t_gen.stages import caption, dialogue, modify
from m3t_gen.templates import TemplateError, check_template, load_template
from m3t_gen.turns import turn_plan, writes_target

EXAMPLE_ROW = {
    "key": "example_000000", "width": 640, "height": 480, "text": "a photo of a cat on a sofa",
    "caption": "A grey cat lies on a red sofa next to a window; a lamp stands on the left.",
}


EXAMPLE_PAIR = {
    "ref_caption": "A red car parked on a street in front of a brick house.",
    "tgt_caption": "A blue car parked on a snowy street in front of a brick house.",
    "similarity": 0.81,
}


def check_confined(where: str, name: str, kind: str, cfg: PipelineConfig) -> None:
    """A template or schema must come from the pipeline file's folder, the bundled prompts/ or schemas/, or a
    folder in ``file_roots``: a config cannot make m3t-gen read (and send to a model, and print) any file."""
    try:
        path = os.path.realpath(find_file(name, kind, cfg.base_dir))
    except FileNotFoundError:
        return  # reported by the loader with its own message
    roots = [cfg.base_dir, str(data_dir(kind)), *(str(cfg.resolve_path(r)) for r in cfg.file_roots)]
    for root in roots:
        real = os.path.realpath(root)
        if path.startswith(real.rstrip(os.sep) + os.sep):
            return
    raise ConfigError(f"{where}: {name!r} is {path}, outside the pipeline's folder and the bundled {kind}/ "
                      f"(add its folder to file_roots to allow it)")


def _check_schema(where: str, name: str, cfg: PipelineConfig, probe: dict[str, Any], decoding: dict[str, Any],
                  what: str) -> None:
    """A stage's schema file loads from an allowed folder, and a well-formed answer (``probe``) passes it and the
    narrowed decoding schema the stage constrains generation with."""
    check_confined(where, name, "schemas", cfg)
    try:
        schema = load_schema(name, cfg.base_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    except Exception as e:  # jsonschema.SchemaError
        raise ConfigError(f"{where}: not a valid JSON schema: {str(e).splitlines()[0]}") from None
    for label, s in (("schema file", schema), ("decoding schema", decoding)):
        err = validation_error(probe, s)
        if err:
            raise ConfigError(f"{where}: {what} fail the {label}: {err}")


def _check_cir_schema(cfg: PipelineConfig) -> str:
    spec = cfg.cir.modify
    probe = {"modifications": [{"category": next(iter(spec.categories)), "text": f"change {i}"} for i in range(spec.n)]}
    _check_schema("cir.modify.schema", spec.schema_, cfg, probe, modify.decoding_schema(spec),
                  "well-formed modifications")
    return f"cir.modify.schema: {spec.schema_} loads; {spec.n} modifications in {len(spec.categories)} categories"


def _judge_checks(cfg: PipelineConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """The judges' templates with their fields (on a dialogue of this mix, a triplet of cir.modify.n texts), after
    their schema has been checked to accept well-formed verdicts."""
    from m3t_gen.stages import judge

    checks: list[tuple[str, str, dict[str, Any]]] = []
    if judge.JudgeStage.enabled(cfg):
        turns = [{"type": t["type"], "query": "q", "target": "t"} for t in turn_plan(cfg.dialogue.mix)]
        row = dict(EXAMPLE_ROW, turns=turns)
        _check_verdict_schema("judge.schema", cfg.judge, len(turns), cfg)
        checks.append(("judge.template", cfg.judge.template, judge.template_fields(row)))
        if cfg.judge.answerability:
            checks.append(("judge.answer_template", cfg.judge.answer_template, judge.answer_fields(row)))
    if judge.TripletJudgeStage.enabled(cfg):
        mods = [{"category": c, "text": "t"} for c in list(cfg.cir.modify.categories)[:1] * cfg.cir.modify.n]
        _check_verdict_schema("cir.judge.schema", cfg.cir.judge, len(mods), cfg)
        checks.append(("cir.judge.template", cfg.cir.judge.template,
                       judge.triplet_template_fields(dict(EXAMPLE_PAIR, modifications=mods))))
    return checks


def _check_verdict_schema(where: str, spec: Any, n: int, cfg: PipelineConfig) -> None:
    from m3t_gen.stages.judge import verdict_decoding_schema

    probe = {"verdicts": [{"verdict": "supported", "score": 4, "reason": "r"}] * n}
    _check_schema(where, spec.schema_, cfg, probe, verdict_decoding_schema(n, spec.max_text_chars),
                  "well-formed verdicts")


def _check_images_per_prompt(cfg: PipelineConfig) -> None:
    """A vLLM engine refuses a request with more images than ``limit_images_per_prompt``: every batch would fail."""
    from m3t_gen.run.recipe import enabled

    for stage in enabled(cfg):
        n = stage.images_per_request(cfg)
        model = getattr(stage.settings(cfg), "model", None)
        if n and getattr(model, "backend", None) == "vllm":
            limit = model.options.get("limit_images_per_prompt", 1)
            if limit < n:
                raise ConfigError(f"{stage.section}.model.options.limit_images_per_prompt: the {stage.name} stage "
                                  f"sends {n} images per request, vLLM would accept {limit}: set it to {n}")


def validate_config(cfg: PipelineConfig) -> list[str]:
    """Raise ConfigError on the first problem; return notes (things that are fine but worth saying)."""
    notes: list[str] = []
    _check_images_per_prompt(cfg)
    checks = [("caption.template", cfg.caption.template, caption.template_fields(EXAMPLE_ROW))]
    if cfg.wants("m3t"):
        checks.append(("dialogue.template", cfg.dialogue.template,
                       dialogue.template_fields(EXAMPLE_ROW, cfg.dialogue.mix)))
    if cfg.wants("cir"):
        checks.append(("cir.modify.template", cfg.cir.modify.template, modify.template_fields(EXAMPLE_PAIR, cfg.cir.modify)))
    checks += _judge_checks(cfg)
    for where, name, fields in checks:
        check_confined(where, name, "prompts", cfg)
        try:
            template = load_template(name, cfg.base_dir)
            check_template(template, fields)
        except (TemplateError, FileNotFoundError) as e:
            raise ConfigError(f"{where}: {e} (fields available: {', '.join(sorted(fields))})") from None
        notes.append(f"{where}: {name} renders (sha256 {template.short_hash})")
    if cfg.wants("cir"):
        notes.append(_check_cir_schema(cfg))
    if not cfg.wants("m3t"):
        return notes
    single = cfg.dialogue.source == "image"
    decoding = dialogue_decoding_schema(cfg.dialogue.mix, cfg.dialogue.max_text_chars, single_stage=single)
    probe = {"turns": [{"type": t["type"], "query": "q", **({"target": "t"} if writes_target(t["type"], single) else {})}
                       for t in turn_plan(cfg.dialogue.mix)]}
    _check_schema("dialogue.schema", cfg.dialogue.schema_, cfg, probe, decoding, "a well-formed dialogue for this mix")
    notes.append(f"dialogue.schema: {cfg.dialogue.schema_} loads; mix = {sum(cfg.dialogue.mix.values())} turns")
    return notes

"""`m3t-gen validate`: everything that can be checked without loading a model or starting Ray."""

from __future__ import annotations

import os

from m3t_gen.config import ConfigError, PipelineConfig
from m3t_gen.bundled import data_dir, find_file
from m3t_gen.text.schemas import load_schema, validation_error
from m3t_gen.stages.base import SchemaCheck
from m3t_gen.text.templates import TemplateError, check_template, load_template


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


def _check_schema(check: SchemaCheck, cfg: PipelineConfig) -> str:
    """A stage's schema file loads from an allowed folder, and a well-formed answer passes it and the narrowed
    decoding schema the stage constrains generation with."""
    check_confined(check.where, check.name, "schemas", cfg)
    try:
        schema = load_schema(check.name, cfg.base_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{check.where}: {e}") from None
    except Exception as e:  # jsonschema.SchemaError
        raise ConfigError(f"{check.where}: not a valid JSON schema: {str(e).splitlines()[0]}") from None
    for label, s in (("schema file", schema), ("decoding schema", check.decoding)):
        err = validation_error(check.probe, s)
        if err:
            raise ConfigError(f"{check.where}: {check.what} fail the {label}: {err}")
    return f"{check.where}: {check.name} loads; {check.note}"


def _check_images_per_prompt(cfg: PipelineConfig) -> None:
    """An engine refuses a request with more images than its limit (vLLM: ``limit_images_per_prompt``): every
    batch would fail."""
    from m3t_gen.run.recipe import enabled

    for stage in enabled(cfg):
        n = stage.images_per_request(cfg)
        model = getattr(stage.settings(cfg), "model", None)
        if not n or not hasattr(model, "backend"):
            continue
        backend, options = model.engine()
        limit = backend.images_per_request_limit(options)
        if limit is not None and limit < n:
            raise ConfigError(f"{stage.section}.model.options.limit_images_per_prompt: the {stage.name} stage "
                              f"sends {n} images per request, {backend.name} would accept {limit}: set it to {n}")


def _check_local_cpus(cfg: PipelineConfig) -> None:
    """On a local Ray of ``ray.num_cpus`` CPUs, each pass's actors hold their CPUs for the whole pass; if what is
    left cannot fit its largest task (a read, or a stateless stage such as the filter), Ray Data does not fail:
    it waits forever. (A cluster's CPUs are not known here: not checked.)"""
    from m3t_gen.run.recipe import CIR_STAGES, SAMPLE_STAGES, enabled

    cpus = cfg.ray.num_cpus
    if cpus is None or cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return
    for name, stages in (("sample", SAMPLE_STAGES), ("cir", CIR_STAGES)):
        if not (run := enabled(cfg, stages)):
            continue
        res = {s.name: s.resources(cfg) for s in run}
        actors = {s.name: res[s.name].concurrency * res[s.name].num_cpus for s in run if s.uses_actor()}
        tasks = {"read": cfg.read.num_cpus, **{s.name: res[s.name].num_cpus for s in run if not s.uses_actor()},
                 **{f"{s.name} decode": s.settings(cfg).resources.decode_cpus for s in run if s.decodes_ahead(cfg)}}
        task = max(tasks, key=tasks.get)
        held = sum(actors.values())
        if held + tasks[task] > cpus + 1e-9:
            parts = ", ".join(f"{k} {v:g}" for k, v in actors.items())
            raise ConfigError(f"ray.num_cpus: {cpus} CPUs cannot run the {name} pass: its actors hold {held:g} "
                              f"({parts}) and its {task} tasks need {tasks[task]:g} more; Ray Data would wait "
                              f"forever. Lower the stages' resources.num_cpus or raise ray.num_cpus")
    # The Ray tasks between and after the passes: pair mining alone, the negatives' miners beside its CLIP actors.
    mining = []
    if cfg.wants("cir") and cfg.cir.pairing.index == "exact" and cfg.cir.pairing.bucket_size is None:
        mining.append(("cir.pairing.resources.num_cpus", cfg.cir.pairing.resources.num_cpus, 0.0))
    if cfg.negatives is not None:
        reward = cfg.reward.resources
        mining.append(("negatives.resources.num_cpus", cfg.negatives.resources.num_cpus,
                       reward.concurrency * reward.num_cpus))
    for where, need, held in mining:
        if held + need > cpus + 1e-9:
            beside = f" beside {held:g} held by the CLIP actors" if held else ""
            raise ConfigError(f"{where}: {need:g} CPUs per mining task{beside} do not fit ray.num_cpus {cpus}: "
                              "Ray would wait forever. Lower it or raise ray.num_cpus")


def validate_config(cfg: PipelineConfig) -> list[str]:
    """Raise ConfigError on the first problem; return notes (things that are fine but worth saying). What to
    check comes from the stages this config runs: each declares its templates with their fields and its schema."""
    from m3t_gen.run.recipe import enabled

    notes: list[str] = []
    _check_images_per_prompt(cfg)
    _check_local_cpus(cfg)
    stages = enabled(cfg)
    for where, name, fields in [check for stage in stages for check in stage.example_prompts(cfg)]:
        check_confined(where, name, "prompts", cfg)
        try:
            template = load_template(name, cfg.base_dir)
            check_template(template, fields)
        except (TemplateError, FileNotFoundError) as e:
            raise ConfigError(f"{where}: {e} (fields available: {', '.join(sorted(fields))})") from None
        notes.append(f"{where}: {name} renders (sha256 {template.short_hash})")
    for check in filter(None, (stage.schema_check(cfg) for stage in stages)):
        notes.append(_check_schema(check, cfg))
    return notes

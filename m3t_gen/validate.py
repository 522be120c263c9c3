"""`m3t-gen validate`: everything that can be checked without loading a model or starting Ray."""

from __future__ import annotations

import os

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


def _check_cir_schema(cfg: PipelineConfig) -> str:
    spec = cfg.cir.modify
    check_confined("cir.modify.schema", spec.schema_, "schemas", cfg)
    try:
        schema = load_schema(spec.schema_, cfg.base_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"cir.modify.schema: {e}") from None
    except Exception as e:  # jsonschema.SchemaError
        raise ConfigError(f"cir.modify.schema: not a valid JSON schema: {str(e).splitlines()[0]}") from None
    probe = {"modifications": [{"category": next(iter(spec.categories)), "text": f"change {i}"} for i in range(spec.n)]}
    for label, s in (("schema file", schema), ("decoding schema", modify.decoding_schema(spec))):
        err = validation_error(probe, s)
        if err:
            raise ConfigError(f"cir.modify.schema: well-formed modifications fail the {label}: {err}")
    return f"cir.modify.schema: {spec.schema_} loads; {spec.n} modifications in {len(spec.categories)} categories"


def validate_config(cfg: PipelineConfig) -> list[str]:
    """Raise ConfigError on the first problem; return notes (things that are fine but worth saying)."""
    notes: list[str] = []
    checks = [("caption.template", cfg.caption.template, caption.template_fields(EXAMPLE_ROW))]
    if cfg.wants("m3t"):
        checks.append(("dialogue.template", cfg.dialogue.template,
                       dialogue.template_fields(EXAMPLE_ROW, cfg.dialogue.mix)))
    if cfg.wants("cir"):
        checks.append(("cir.modify.template", cfg.cir.modify.template, modify.template_fields(EXAMPLE_PAIR, cfg.cir.modify)))
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
    check_confined("dialogue.schema", cfg.dialogue.schema_, "schemas", cfg)
    try:
        schema = load_schema(cfg.dialogue.schema_, cfg.base_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"dialogue.schema: {e}") from None
    except Exception as e:  # jsonschema.SchemaError
        raise ConfigError(f"dialogue.schema: not a valid JSON schema: {str(e).splitlines()[0]}") from None
    single = cfg.dialogue.source == "image"
    decoding = dialogue_decoding_schema(cfg.dialogue.mix, cfg.dialogue.max_text_chars, single_stage=single)
    probe = {"turns": [{"type": t["type"], "query": "q", **({"target": "t"} if writes_target(t["type"], single) else {})}
                       for t in turn_plan(cfg.dialogue.mix)]}
    for label, s in (("schema file", schema), ("decoding schema", decoding)):
        err = validation_error(probe, s)
        if err:
            raise ConfigError(f"dialogue.schema: a well-formed dialogue for this mix fails the {label}: {err}")
    notes.append(f"dialogue.schema: {cfg.dialogue.schema_} loads; mix = {sum(cfg.dialogue.mix.values())} turns")
    return notes

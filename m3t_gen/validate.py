"""`m3t-gen validate`: everything that can be checked without loading a model or starting Ray."""

from __future__ import annotations

from m3t_gen.config import ConfigError, PipelineConfig
from m3t_gen.schemas import dialogue_decoding_schema, load_schema, validation_error
from m3t_gen.stages import caption, dialogue
from m3t_gen.templates import TemplateError, check_template, load_template

EXAMPLE_ROW = {
    "key": "example_000000", "width": 640, "height": 480, "text": "a photo of a cat on a sofa",
    "caption": "A grey cat lies on a red sofa next to a window; a lamp stands on the left.",
}


def validate_config(cfg: PipelineConfig) -> list[str]:
    """Raise ConfigError on the first problem; return notes (things that are fine but worth saying)."""
    notes: list[str] = []
    checks = [
        ("caption.template", cfg.caption.template, caption.template_fields(EXAMPLE_ROW)),
        ("dialogue.template", cfg.dialogue.template, dialogue.template_fields(EXAMPLE_ROW, cfg.dialogue.mix)),
    ]
    for where, name, fields in checks:
        try:
            template = load_template(name, cfg.base_dir)
            check_template(template, fields)
        except (TemplateError, FileNotFoundError) as e:
            raise ConfigError(f"{where}: {e} (fields available: {', '.join(sorted(fields))})") from None
        notes.append(f"{where}: {name} renders (sha256 {template.short_hash})")
    try:
        schema = load_schema(cfg.dialogue.schema_, cfg.base_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"dialogue.schema: {e}") from None
    except Exception as e:  # jsonschema.SchemaError
        raise ConfigError(f"dialogue.schema: not a valid JSON schema: {str(e).splitlines()[0]}") from None
    decoding = dialogue_decoding_schema(cfg.dialogue.mix, cfg.dialogue.max_text_chars)
    probe = {"turns": [{"type": t["type"], "query": "q", **({} if t["type"] == "retrieval" else {"target": "t"})}
                       for t in dialogue.turn_plan(cfg.dialogue.mix)]}
    for label, s in (("schema file", schema), ("decoding schema", decoding)):
        err = validation_error(probe, s)
        if err:
            raise ConfigError(f"dialogue.schema: a well-formed dialogue for this mix fails the {label}: {err}")
    notes.append(f"dialogue.schema: {cfg.dialogue.schema_} loads; mix = {sum(cfg.dialogue.mix.values())} turns")
    return notes

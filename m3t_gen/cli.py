"""The `m3t-gen` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from m3t_gen.config import ConfigError, load_config


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="m3t-gen")
def main() -> None:
    """Generate multimodal training data (M3T dialogues, CIR triplets) from web image shards."""


def _load(pipeline: str, sets: tuple[str, ...], values: dict | None = None):
    try:
        return load_config(pipeline, list(sets), values)
    except ConfigError as e:
        _fail(str(e))


@main.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--input", "inputs", multiple=True, help="Input shard file or glob (repeatable); replaces input.paths.")
@click.option("--output", help="Output directory (replaces output.dir).")
@click.option("--limit", type=int, help="Small-shard test mode: read at most N samples per input shard.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config value, e.g. caption.sampling.temperature=0.2.")
@click.option("--overwrite", is_flag=True, help="Delete an existing output directory and start over.")
def run(pipeline: str, inputs: tuple[str, ...], output: str | None, limit: int | None, sets: tuple[str, ...], overwrite: bool) -> None:
    """Run PIPELINE (a pipeline.yaml) on Ray; resumes an existing output directory."""
    from m3t_gen.run.pipeline import format_summary, run_pipeline
    from m3t_gen.validate import validate_config

    values: dict = {}  # set into the parsed config as they are: a path is a value, never YAML text
    if inputs:
        values["input.paths"] = [p if "://" in p else os.path.abspath(p) for p in inputs]
    if output:
        values["output.dir"] = output if "://" in output else os.path.abspath(output)
    if limit is not None:
        values["limit"] = limit
    cfg = _load(pipeline, sets, values)
    try:
        validate_config(cfg)
        out = cfg.output.dir if "://" in cfg.output.dir else Path(cfg.output.dir).expanduser()
        manifest = run_pipeline(cfg, out, overwrite=overwrite, log=lambda m: click.echo(m, err=True))
    except ConfigError as e:
        _fail(str(e))
    click.echo(format_summary(manifest))
    click.echo(f"wrote {cfg.output.dir}/manifest.json")


@main.command()
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE")
def validate(pipeline: str, sets: tuple[str, ...]) -> None:
    """Check PIPELINE without loading a model or starting Ray: config, templates vs fields, schemas, model refs."""
    from m3t_gen.validate import validate_config

    cfg = _load(pipeline, sets)
    try:
        notes = validate_config(cfg)
    except ConfigError as e:
        _fail(str(e))
    for note in notes:
        click.echo(f"ok  {note}")
    click.echo(f"ok  {pipeline} is valid")


@main.command()
@click.argument("output")
@click.option("--set", "sets", multiple=True, metavar="filter.KEY=VALUE", required=True,
              help="New threshold, e.g. filter.min_turn_score=0.25 (repeatable).")
def refilter(output: str, sets: tuple[str, ...]) -> None:
    """Re-apply new filter thresholds to a finished run OUTPUT (a folder or a URL) without re-scoring."""
    from m3t_gen.run.pipeline import format_summary
    from m3t_gen.tools.refilter import refilter as do_refilter
    from m3t_gen.tools.refilter import refilter_remote

    try:
        if "://" in output:
            manifest = refilter_remote(output, list(sets))
        elif not Path(output).is_dir():
            raise ConfigError(f"{output}: no such folder")
        else:
            manifest = do_refilter(Path(output), list(sets))
    except (ConfigError, FileNotFoundError) as e:
        _fail(str(e))
    if manifest.wall_seconds is None:
        manifest.wall_seconds = 0
    click.echo(format_summary(manifest))


from m3t_gen.tools.export import EXPORTERS as _EXPORTERS  # noqa: E402  (stdlib-only module: cheap at start-up)


@main.command("export")
@click.argument("output")
@click.option("--format", "fmt", required=True, type=click.Choice(sorted(_EXPORTERS)),
              help="muco: MuCo's trainer (pretrain/ + finetune/ meta folders, images/); cirr / fashioniq: the "
                   "CIRR / FashionIQ layouts CLIP4Cir and SPRC read; mtcir: CIR triplets as JSONL.")
@click.option("--to", "to", required=True, type=click.Path(),
              help="Directory to write into (mtcir: or the .jsonl file).")
@click.option("--image-ext", default="jpg", type=click.Choice(["jpg", "png"]),
              help="fashioniq: image file extension (CLIP4Cir opens .jpg, SPRC .png).")
@click.option("--category", default="dress", type=click.Choice(["dress", "shirt", "toptee"]),
              help="fashioniq: the dress type in the file names (what the trainers' --dress-types selects).")
@click.option("--split", default="train", help="cirr / fashioniq: the split name in the file names.")
def export_cmd(output: str, fmt: str, to: str, image_ext: str, category: str, split: str) -> None:
    """Export the finished run OUTPUT in a trainer's format."""
    from m3t_gen.tools.export import ExportOptions, RunOutputError, export

    from m3t_gen.storage.store import local_copy

    try:
        with local_copy(output) as run_dir:
            result = export(run_dir, fmt, Path(to), ExportOptions(image_ext=image_ext, category=category, split=split))
    except (RunOutputError, OSError) as e:
        _fail(str(e))
    for path, rows in result["written"].items():
        click.echo(f"wrote {rows:>6} rows  {path}")
    click.echo(f"images in {result['images']}")
    for reason, n in sorted(result["left_out"].items(), key=lambda kv: -kv[1]):
        click.echo(f"left out {n:>5}  {reason}")


@main.command("card")
@click.argument("output")
def card_cmd(output: str) -> None:
    """Write OUTPUT/README.md, a Hugging Face dataset card with plots and examples under OUTPUT/card/."""
    from m3t_gen.tools.card import write_card
    from m3t_gen.tools.run_reader import RunOutputError
    from m3t_gen.storage.store import local_copy, upload_tree

    try:
        with local_copy(output) as run_dir:
            path = write_card(run_dir)
            if "://" in output:
                upload_tree(run_dir, output, ["card", "README.md"])
                path = f"{output.rstrip('/')}/README.md"
    except (RunOutputError, OSError) as e:
        _fail(str(e))
    click.echo(f"wrote {path}")


@main.command("inspect")
@click.argument("output")
@click.option("--html", "html_path", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
@click.option("--n", "n", type=click.IntRange(min=1), default=24, show_default=True, help="Samples to show.")
def inspect_cmd(output: str, html_path: str, n: int) -> None:
    """Write one self-contained HTML page showing N samples of the finished run OUTPUT."""
    from m3t_gen.tools.run_reader import RunOutputError
    from m3t_gen.tools.inspect_html import write_html

    from m3t_gen.storage.store import local_copy

    try:
        with local_copy(output) as run_dir:
            path = write_html(run_dir, Path(html_path), n)
    except (RunOutputError, OSError) as e:
        _fail(str(e))
    click.echo(f"wrote {path}")


@main.command("plan")
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.option("--images", type=click.IntRange(min=1), required=True, help="Images the run will read.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a config value.")
@click.option("--throughput", "throughputs", multiple=True, metavar="STAGE=VALUE",
              help="Per GPU: output tok/s (caption, dialogue), images/s (reward); read: CPU s/image. Repeatable.")
@click.option("--from-run", "from_run", type=click.Path(file_okay=False),
              help="A finished run's OUTPUT: measured throughput and stage pass rates from its manifest.")
@click.option("--image-side", type=click.IntRange(min=16), default=1024, show_default=True,
              help="Longer image side for vision tokens when read.max_side is unset.")
@click.option("--vision-px", type=click.IntRange(min=1), default=28, show_default=True,
              help="Pixels per vision token side (Qwen2-VL family: 14-px patches merged 2x2 = 28).")
@click.option("--fill", type=click.FloatRange(min=0, min_open=True, max=1), default=1.0, show_default=True,
              help="Share of the max output tokens actually generated (1 = budget the upper bound).")
@click.option("--json", "as_json", is_flag=True, help="Also print the plan as one JSON line.")
def plan_cmd(pipeline: str, images: int, sets: tuple[str, ...], throughputs: tuple[str, ...],
             from_run: str | None, image_side: int, vision_px: int, fill: float, as_json: bool) -> None:
    """Dry run: estimate tokens, GPU-hours and wall-clock per stage for IMAGES images, without loading a model."""
    import json as _json

    from m3t_gen.tools.plan import format_plan, load_measured, make_plan, parse_throughputs
    from m3t_gen.validate import validate_config

    cfg = _load(pipeline, sets)
    try:
        validate_config(cfg)
        measured = load_measured(from_run, cfg) if from_run else None
        result = make_plan(cfg, images, pipeline, parse_throughputs(list(throughputs)), measured,
                           image_side=image_side, vision_px=vision_px, fill=fill)
    except ConfigError as e:
        _fail(str(e))
    click.echo(format_plan(result))
    if as_json:
        click.echo(_json.dumps(result.to_json(), separators=(",", ":")))


@main.command("tiny-models")
@click.argument("directory", type=click.Path(file_okay=False))
def tiny_models(directory: str) -> None:
    """Build the tiny random-weight models (vlm, lm, clip) used by the small-shard test mode."""
    from m3t_gen.models import TINY_KINDS
    from m3t_gen.testing.tiny_models import ensure_tiny_model

    for kind in TINY_KINDS:
        path = ensure_tiny_model(kind, Path(directory))
        click.echo(f"{kind}: {path}")


if __name__ == "__main__":
    main()

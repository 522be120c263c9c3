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


def _load(pipeline: str, sets: tuple[str, ...], extra: list[str] | None = None):
    try:
        return load_config(pipeline, list(extra or []) + list(sets))
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
    from m3t_gen.pipeline import format_summary, run_pipeline
    from m3t_gen.validate import validate_config

    extra = []
    if inputs:
        extra.append("input.paths=[" + ", ".join(repr(os.path.abspath(p)) for p in inputs) + "]")
    if output:
        extra.append(f"output.dir={os.path.abspath(output)!r}")
    if limit is not None:
        extra.append(f"limit={limit}")
    cfg = _load(pipeline, sets, extra)
    try:
        validate_config(cfg)
        manifest = run_pipeline(cfg, Path(cfg.output.dir).expanduser(), overwrite=overwrite,
                                log=lambda m: click.echo(m, err=True))
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
@click.argument("output", type=click.Path(file_okay=False, exists=True))
@click.option("--set", "sets", multiple=True, metavar="filter.KEY=VALUE", required=True,
              help="New threshold, e.g. filter.min_turn_score=0.25 (repeatable).")
def refilter(output: str, sets: tuple[str, ...]) -> None:
    """Re-apply new filter thresholds to a finished run OUTPUT without re-scoring."""
    from m3t_gen.pipeline import format_summary
    from m3t_gen.refilter import refilter as do_refilter

    try:
        manifest = do_refilter(Path(output), list(sets))
    except ConfigError as e:
        _fail(str(e))
    manifest.setdefault("wall_seconds", 0)
    click.echo(format_summary(manifest))


@main.command("tiny-models")
@click.argument("directory", type=click.Path(file_okay=False))
def tiny_models(directory: str) -> None:
    """Build the tiny random-weight models (vlm, lm, clip) used by the small-shard test mode."""
    from m3t_gen.models import TINY_KINDS
    from m3t_gen.tiny_models import ensure_tiny_model

    for kind in TINY_KINDS:
        path = ensure_tiny_model(kind, Path(directory))
        click.echo(f"{kind}: {path}")


if __name__ == "__main__":
    main()

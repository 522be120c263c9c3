"""A run of a config: output ownership and lock, resume, the sample pass, the CIR pass, manifest and summary.

input shards --read (tasks)--> the sample stages of run/recipe.py (dedupe, caption, embed, dialogue, reward,
judge: actor pools; filter: tasks) --> driver: OutputWriter (tars, index, rejects, pool, stats)
--> the CIR pass (run/cir.py) when the recipe asks for it --> manifest.json + summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from m3t_gen import __version__
from m3t_gen.config import ConfigError, PipelineConfig, drop_excluded, placement_exclude
from m3t_gen.run.artefacts import Manifest, ShardStats, StageRow, Totals
from m3t_gen.storage.sources import InputShard, expand_inputs
from m3t_gen.run.recipe import SAMPLE_ORDER, SAMPLE_STAGES, apply_stages, init_ray, lineage, stage_table
from m3t_gen.stages.base import RunContext
from m3t_gen.stages.read import read_shards
from m3t_gen.text.templates import load_template
from m3t_gen.storage.store import LOCK_FILE, OutputBusy, Store, is_remote, lock_output
from m3t_gen.run.writer import OutputWriter



def result_hash(cfg: PipelineConfig) -> str:
    """Hash of everything that changes what a run writes: every config field but those marked as placement on the
    config models (where Ray runs, where output goes, how many actors/GPUs/CPUs a stage gets)."""
    data = cfg.model_dump(mode="json", by_alias=True, exclude=placement_exclude(PipelineConfig))
    if data.get("negatives") is None:  # a section added later: unset, it leaves every earlier hash as it was
        data.pop("negatives", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def make_context(cfg: PipelineConfig) -> RunContext:
    names, models = lineage(cfg)
    templates = {stage: load_template(name, cfg.base_dir).short_hash for stage, name in names.items()}
    return RunContext(config=cfg, config_hash=result_hash(cfg), template_hashes=templates, model_names=models)


def share_reward_bank(cfg: PipelineConfig, ctx: RunContext) -> RunContext:
    """Read the self-retrieval bank once and hand it to every reward actor through the object store."""
    import dataclasses

    import ray

    from m3t_gen.stages.reward import RewardStage, bank_images

    if not (RewardStage.enabled(cfg) and cfg.reward.self_retrieval.enabled):
        return ctx
    return dataclasses.replace(ctx, shared={**ctx.shared, "reward_bank": ray.put(bank_images(cfg))})


def build_dataset(cfg: PipelineConfig, ctx: RunContext, shards: list[InputShard]) -> Any:
    import ray.data

    items = [{"shard": s.shard, "path": s.path} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    # Its own num_cpus also keeps Ray Data from fusing the read tasks into the single dedupe actor.
    ds = ds.map_batches(read_shards, batch_size=1, batch_format="pyarrow", num_cpus=cfg.read.num_cpus,
                        fn_kwargs={"input_spec": cfg.input, "spec": cfg.read, "limit": cfg.limit})
    return apply_stages(ds, SAMPLE_STAGES, cfg, ctx)


OWNER_FILE = ".m3t-gen"  # written first into every output: the proof that m3t-gen made this folder
# What a run (and refilter, card) writes at the top of an output; --overwrite removes these and nothing else.
OWNED = ("shards", "filtered", "index", "rejects", "stats", "pool", "pairs", "triplets", "triplet_shards",
         "negatives", "negatives_stats",
         "triplet_rejects", "triplet_stats", "card", "manifest.json", "README.md", OWNER_FILE)


def _owner_records(store: Store) -> list[tuple[str, dict[str, Any]]]:
    """(where, {config_hash, config?}) from the files that say which config made this output: the owner file and
    the manifest. Only an output older than owner files, killed before its manifest, has neither: then one
    finished shard's stats speak for it (each carries the hash). Not every stats file: at 10K shards on object
    storage that would be 10K GETs before the run starts, to learn what the owner file already says."""
    def read(rel: str) -> dict[str, Any] | None:
        try:
            data = json.loads(store.read_bytes(rel))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and data.get("config_hash") else None

    found = [(rel, data) for rel in (OWNER_FILE, "manifest.json") if (data := read(rel)) is not None]
    if not found:
        found = [(rel, data) for rel in store.files("stats", ".json")[:1] if (data := read(rel)) is not None]
    return found


def write_owner_file(out: Store | Path, cfg: PipelineConfig) -> None:
    store = out if isinstance(out, Store) else Store(out)
    store.write_bytes(OWNER_FILE, json.dumps({
        "tool": "m3t-gen", "version": __version__, "config_hash": result_hash(cfg),
        "config": cfg.model_dump(mode="json", by_alias=True),
        "written": datetime.now(timezone.utc).isoformat()}, indent=1).encode())


def prepare_output(out: Store | Path, cfg: PipelineConfig, overwrite: bool) -> Any:
    """Make the output ready and hold it: refuse what m3t-gen did not write, an output another run is writing,
    or a run made with another config; clear it with --overwrite (only what m3t-gen writes); write the owner file;
    drop a crashed run's temporary files. Returns the held lock (``release()`` it when the run ends)."""
    store = out if isinstance(out, Store) else Store(out)
    if not store.remote and os.path.exists(store.root) and not os.path.isdir(store.root):
        raise ConfigError(f"output.dir: {store.root} is a file, not a folder")
    try:
        present = [n for n in store.names() if n != LOCK_FILE]
        records = _owner_records(store) if present else []
        if present and not records:
            raise ConfigError(
                f"output.dir: {store.root} is a non-empty folder that m3t-gen did not write (no {OWNER_FILE}); "
                f"refusing to {'delete' if overwrite else 'write into'} it: give a new or empty folder")
        store.makedirs()
        lock = lock_output(store)
    except OutputBusy as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"output.dir: {store.root}: cannot write there ({e.strerror or e})") from None
    try:
        _make_ready(store, cfg, overwrite, records)
    except BaseException:
        lock.release()
        raise
    return lock


def _make_ready(store: Store, cfg: PipelineConfig, overwrite: bool, records: list[tuple[str, dict[str, Any]]]) -> None:
    current = result_hash(cfg)
    if overwrite:
        for name in OWNED:
            store.remove(name)
    else:
        for where, data in records:
            if data["config_hash"] != current:
                earlier = data.get("config") or next((d.get("config") for _, d in records if d.get("config")), None)
                changed = config_changes(earlier, cfg.model_dump(mode="json", by_alias=True)) if earlier else []
                shown = ", ".join(changed[:5]) + (f" (+{len(changed) - 5} more)" if len(changed) > 5 else "")
                raise ConfigError(
                    f"{store.root}: holds a run made with a different config "
                    f"({shown or 'config hash ' + str(data['config_hash']) + ' vs ' + current}) according to {where};"
                    " use --overwrite to start over, or another --output")
    try:
        if not store.exists(OWNER_FILE):
            write_owner_file(store, cfg)
        if not store.remote:
            # Leftovers of a crashed run (their shards are redone); only where m3t-gen writes.
            out = store.local()
            for tmp in [*out.glob("*.tmp"), *(t for name in OWNED if (out / name).is_dir()
                                              for t in (out / name).rglob("*.tmp"))]:
                if tmp.is_file():
                    tmp.unlink()
    except OSError as e:
        raise ConfigError(f"output.dir: {store.root}: cannot write there ({e.strerror or e})") from None


def config_changes(old: Any, new: Any) -> list[str]:
    """Dotted keys whose values differ, as 'key: old -> new', placement fields left out (as in the hash)."""
    exclude = placement_exclude(PipelineConfig)
    return _differences(drop_excluded(old, exclude), drop_excluded(new, exclude), "")


def _differences(old: Any, new: Any, prefix: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def run_pipeline(cfg: PipelineConfig, out: str | Path, overwrite: bool = False, log=print) -> Manifest:
    """Run the config into ``out`` (a local folder or an fsspec URL such as s3://bucket/prefix)."""
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    # Actors may run elsewhere (another cwd, another node): give them the absolute output path.
    store = Store(out if is_remote(out) else Path(out).expanduser().resolve())
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": store.root})})
    shards = expand_inputs(cfg)
    lock = prepare_output(store, cfg, overwrite)
    try:
        return _run_held(cfg, store, shards, started, t0, log)
    finally:
        lock.release()


def _run_held(cfg: PipelineConfig, store: Store, shards: list[InputShard], started: datetime, t0: float,
              log) -> Manifest:
    out = store.root
    finished = set(store.files("stats", ".json"))
    done = {s.shard for s in shards if f"stats/{s.shard}.json" in finished}
    todo = [s for s in shards if s.shard not in done]
    log(f"m3t-gen: {len(shards)} input shard(s), {len(done)} already done, {len(todo)} to run -> {out}")
    ctx = make_context(cfg)
    writer = OutputWriter(store, ctx, {s.shard: s.path for s in shards})
    if todo:
        init_ray(cfg)
        ds = build_dataset(cfg, share_reward_bank(cfg, ctx), todo)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.consume(batch.to_pylist())
    if writer.incomplete():
        raise RuntimeError(f"shards never completed: {writer.incomplete()}")
    all_stats = [ShardStats.loads(store.read_bytes(f"stats/{s.shard}.json")) for s in shards]
    totals, stages = summarize(all_stats)
    cir_summary = None
    if cfg.wants("cir"):
        from m3t_gen.run.cir import run_cir

        cir_summary = run_cir(cfg, ctx, store, [s.shard for s in shards], log)
    negatives = None
    if cfg.negatives is not None:
        from m3t_gen.run.negatives import run_negatives

        negatives = run_negatives(cfg, store, [s.shard for s in shards], log)
    manifest = Manifest(
        name=cfg.name, recipe=cfg.recipe, config_hash=result_hash(cfg),
        config=cfg.model_dump(mode="json", by_alias=True),
        versions=_versions(cfg), templates=ctx.template_hashes, template_texts=_template_texts(cfg),
        models=ctx.model_names,
        started=started.isoformat(), finished=datetime.now(timezone.utc).isoformat(),
        wall_seconds=round(time.perf_counter() - t0, 2), shards=len(shards),
        shards_this_run=len(todo), totals=totals, stages=stages, cir=cir_summary, negatives=negatives)
    manifest.quality = timed_quality_report(store, manifest.config, log)
    store.write_bytes("manifest.json", manifest.dumps())
    return manifest


def timed_quality_report(store: Store, config: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The quality report of the finished output (m3t_gen/run/quality.py), read back from where it was
    written, with the seconds it took."""
    from m3t_gen.run.quality import quality_report

    t = time.perf_counter()
    report = quality_report(store, config)
    report["seconds"] = round(time.perf_counter() - t, 3)
    log(f"m3t-gen: quality report in {report['seconds']} s")
    return report


def summarize(stats: list[ShardStats]) -> tuple[Totals, list[StageRow]]:
    """The sample pass over every shard's stats: the totals and the per-stage table (recipe.stage_table)."""
    read = sum(s.read for s in stats)
    kept = sum(s.kept for s in stats)
    rejected = sum(s.rejected for s in stats)
    stages = stage_table(stats, SAMPLE_ORDER, read, always=frozenset({"read"}))
    reasons: Counter = Counter()
    repairs: Counter = Counter()
    skipped: Counter = Counter()
    for s in stats:
        reasons.update(s.reasons)
        repairs.update(s.repairs)
        skipped.update(s.skipped_entries)
    shard_errors = {s.shard: s.shard_errors for s in stats if s.shard_errors}
    return Totals(read=read, kept=kept, rejected=rejected, reasons=dict(reasons),
                  repairs=dict(sorted(repairs.items())), skipped_entries=dict(sorted(skipped.items())),
                  shard_errors=shard_errors), stages


def _stage_line(s: StageRow, width: int) -> str:
    toks = "" if s.output_tokens is None else s.output_tokens
    return f"{s.stage:<{width}} {s.rows_in:>8} {s.kept:>8} {s.rejected:>9} {s.busy_seconds:>9.2f} {toks:>11}"


def format_summary(manifest: Manifest) -> str:
    lines = [f"{'stage':<10} {'in':>8} {'kept':>8} {'rejected':>9} {'busy s':>9} {'out tokens':>11}"]
    lines += [_stage_line(s, 10) for s in manifest.stages]
    lines += _request_lines(manifest.stages)
    t = manifest.totals
    lines.append(f"total: read {t.read} = kept {t.kept} + rejected {t.rejected}; "
                 f"wall {manifest.wall_seconds} s")
    for reason, n in sorted(t.reasons.items(), key=lambda kv: -kv[1]):
        lines.append(f"  rejected {n:>6}  {reason}")
    for flag, n in sorted(t.repairs.items(), key=lambda kv: -kv[1]):
        lines.append(f"  repaired {n:>6}  {flag}")
    for kind, n in t.skipped_entries.items():
        lines.append(f"  skipped  {n:>6}  {kind} (no data of its own)")
    if t.shard_errors:
        lines.append(f"shard errors in {len(t.shard_errors)} input shard(s) (what was read before each still counts):")
        for shard, messages in sorted(t.shard_errors.items()):
            lines += [f"  {shard}: {m}" for m in messages]
    cir = manifest.cir
    if cir:
        lines.append(f"cir: pool {cir.pool} images -> {cir.pairs} pairs = triplets kept {cir.kept} + "
                     f"rejected {cir.rejected}")
        lines += [_stage_line(s, 14) for s in cir.stages]
        lines += _request_lines(cir.stages)
        for reason, n in sorted(cir.reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  rejected {n:>6}  {reason}")
    neg = manifest.negatives
    if neg:
        lines.append(f"negatives: {neg.turns_with_negatives} of {neg.turns} kept turns carry hard negatives; "
                     f"candidates {neg.candidates} = kept {neg.kept} + dropped {neg.dropped}")
        for reason, n in sorted(neg.reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  dropped  {n:>6}  {reason}")
    return "\n".join(lines)


def _request_lines(stages: list[StageRow]) -> list[str]:
    """Per generation stage: requests sent and, per request, what the model read (image tokens among the prompt
    tokens: proof that images reached it) and how much of its output was reasoning."""
    lines = []
    for s in stages:
        n = s.requests
        if not n:
            continue
        line = f"  {s.stage}: {n} requests, {(s.prompt_tokens or 0) / n:.1f} prompt tokens per request"
        if s.image_tokens:
            line += f" ({s.image_tokens / n:.1f} of them image tokens)"
        if s.reasoning_tokens:
            line += f", {s.reasoning_tokens / n:.1f} reasoning tokens"
        lines.append(line)
    return lines


def _template_texts(cfg: PipelineConfig) -> dict[str, str]:
    """The prompt templates the run used, verbatim (the card shows them; the files may move or change later)."""
    names, _ = lineage(cfg)
    return {stage: load_template(name, cfg.base_dir).source for stage, name in names.items()}


def _versions(cfg: PipelineConfig) -> dict[str, str]:
    """Versions of what made the output: the pipeline's own packages and those of every backend a stage ran."""
    from importlib import metadata

    from m3t_gen.backends.registry import get_backend
    from m3t_gen.run.recipe import enabled

    models = (getattr(s.settings(cfg), "model", None) for s in enabled(cfg))
    backends = {m.backend for m in models if hasattr(m, "backend")}  # generation models (CLIP's is a string)
    dists = ["ray", "webdataset", "pyarrow", "transformers", "torch"]
    dists += [d for b in sorted(backends) for d in get_backend(b).packages if d not in dists]
    out = {"m3t-gen": __version__, "python": sys.version.split()[0]}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out

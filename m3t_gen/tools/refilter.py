"""`m3t-gen refilter OUT --set filter.x=...`: apply new thresholds to a finished run without re-scoring.

Every scored sample of the run is in OUT/shards (kept) or OUT/filtered (rejected by the filter), with its scores
and all its turns. Refilter replays them through the same `apply_filter` and the same `OutputWriter` into a new
directory, carries the earlier stages' rejections over from OUT/rejects, and swaps the directories when done:
the result is what a fresh run with the new thresholds would have written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from pydantic import ValidationError

from m3t_gen.config import ConfigError, PipelineConfig, apply_overrides, format_validation_error
from m3t_gen.run.pipeline import OWNER_FILE, result_hash, summarize, timed_quality_report, write_owner_file
from m3t_gen.storage.store import LOCK_FILE, OutputBusy, Store, atomic_write_bytes, local_copy, lock_output
from m3t_gen.rows import MARKER, REJECTED, new_row
from m3t_gen.stages.base import RunContext
from m3t_gen.stages.filter import apply_filter
from m3t_gen.run.writer import OutputWriter, row_from_sample
from m3t_gen.tools.run_reader import iter_tar


def refilter(out: Path, overrides: list[str]) -> dict[str, Any]:
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        raise ConfigError(f"{out}: no manifest.json (not a finished m3t-gen run)")
    try:
        lock = lock_output(Store(out), "refilter")  # not while a run (or another refilter) writes it
    except OutputBusy as e:
        raise ConfigError(str(e)) from None
    try:
        return _refilter_held(out, overrides, manifest_path)
    finally:
        lock.release()


def _refilter_held(out: Path, overrides: list[str], manifest_path: Path) -> dict[str, Any]:
    manifest = json.loads(manifest_path.read_text())
    bad = [o for o in overrides if not o.startswith("filter.")]
    if bad:
        raise ConfigError(f"refilter changes only filter.* thresholds, not {bad[0].split('=')[0]}")
    data = apply_overrides(json.loads(json.dumps(manifest["config"])), overrides)
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "--set")) from None
    ctx = RunContext(config=cfg, config_hash=result_hash(cfg), template_hashes=manifest["templates"],
                     model_names=manifest["models"])
    stats_files = sorted((out / "stats").glob("*.json"))
    sources = {json.loads(p.read_text())["shard"]: json.loads(p.read_text())["source"] for p in stats_files}
    new = out.with_name(out.name + ".refilter.tmp")
    if new.exists():
        shutil.rmtree(new)
    writer = OutputWriter(new, ctx, sources)
    for path in stats_files:
        stats = json.loads(path.read_text())
        shard = stats["shard"]
        for sub, names in (("shards", stats["tars"]), ("filtered", stats.get("filtered_tars", []))):
            for name in names:
                for _key, image, meta in iter_tar(out / sub / name):
                    row = row_from_sample(meta, shard, image)
                    apply_filter(row, cfg.filter)
                    writer.consume([row])
        earlier = pq.read_table(out / "rejects" / f"{shard}.parquet").to_pylist()
        for rec in earlier:
            if rec["stage"] == "filter":
                continue  # decided again above
            writer.consume([new_row(key=rec["key"], shard=shard, source_key=rec["source_key"], url=rec["url"],
                                    status=REJECTED, reject_stage=rec["stage"], reject_reason=rec["reason"],
                                    reject_detail=rec["detail"], source_sha256=rec.get("source_sha256"),
                                    phash=rec.get("phash"))])
        shard_detail = {k: v for k, v in (("errors", stats["shard_errors"]),
                                          ("skipped", stats.get("skipped_entries"))) if v}
        writer.consume([new_row(key=f"{shard}__end", shard=shard, status=MARKER, shard_rows=stats["read"],
                                reject_detail=json.dumps(shard_detail) if shard_detail else None)])
        # Time spent generating and scoring belongs to the original run: carry it over.
        new_stats_path = new / "stats" / path.name
        new_stats = json.loads(new_stats_path.read_text())
        new_stats["stage_seconds"] = stats["stage_seconds"]
        new_stats["stage_tokens"] = stats.get("stage_tokens", {})
        new_stats["repairs"] = stats.get("repairs", {})  # made on reading, rejected rows included
        atomic_write_bytes(new_stats_path, json.dumps(new_stats, indent=1).encode())
    if writer.incomplete():
        raise RuntimeError(f"refilter: shards incomplete: {writer.incomplete()}")
    all_stats = [json.loads(p.read_text()) for p in sorted((new / "stats").glob("*.json"))]
    summary = summarize(all_stats)
    history = manifest.get("refilters", []) + [{"set": overrides, "previous_config_hash": manifest["config_hash"]}]
    manifest.update(config=cfg.model_dump(mode="json", by_alias=True), config_hash=ctx.config_hash,
                    totals=summary["totals"], stages=summary["stages"], refilters=history)
    write_owner_file(new, cfg)
    # Everything else in the output comes along: the CIR results (not refiltered) and anything m3t-gen did not
    # write. The card (README.md, card/) described the old results and is not carried.
    rewritten = {"shards", "filtered", "index", "rejects", "stats", "manifest.json", OWNER_FILE, LOCK_FILE,
                 "README.md", "card"}
    for entry in out.iterdir():
        if entry.name in rewritten or entry.name.endswith(".tmp"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)
    # The quality report of what the refilter kept (the CIR part, carried over above, included).
    manifest["quality"] = timed_quality_report(Store(new), manifest["config"], lambda _msg: None)
    atomic_write_bytes(new / "manifest.json", json.dumps(manifest, indent=1).encode())
    old = out.with_name(out.name + ".old.tmp")
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old)
    return manifest


def refilter_remote(location: str, overrides: list[str]) -> dict[str, Any]:
    """Refilter an output on object storage: on a local copy, then the remote made equal to it: new files first,
    then the shard stats (the completion markers) and the manifest, then files the refilter no longer has."""
    store = Store(location)
    if not store.exists("manifest.json"):
        raise ConfigError(f"{location}: no manifest.json (not a finished m3t-gen run)")
    try:
        lease = lock_output(store, "refilter")
    except OutputBusy as e:
        raise ConfigError(str(e)) from None
    try:
        with local_copy(location) as local:
            (local / LOCK_FILE).unlink(missing_ok=True)
            manifest = refilter(local, overrides)
            new = sorted(p.relative_to(local).as_posix() for p in local.rglob("*")
                         if p.is_file() and p.name != LOCK_FILE)
            last = [r for r in new if r.startswith("stats/")] + ["manifest.json"]
            for rel in [r for r in new if r not in last] + last:
                store.fs.put_file(str(local / rel), store._path(rel))
            keep = set(new) | {LOCK_FILE}
            old = sorted(store.fs.find(store._path("")))
            for path in old:
                rel = path[len(store._path("")):].lstrip("/")
                if rel not in keep:
                    store.fs.rm(path)
    finally:
        lease.release()
    return manifest

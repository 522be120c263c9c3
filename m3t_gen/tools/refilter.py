"""`m3t-gen refilter OUT --set filter.x=...`: apply new thresholds to a finished run without re-scoring.

Every scored sample of the run is in OUT/shards (kept) or OUT/filtered (rejected by the filter), with its scores
and all its turns. Refilter replays them through the same `apply_filter` and the same `OutputWriter`, carries the
earlier stages' rejections over from OUT/rejects, and swaps the new results in: the output is then what a fresh
run with the new thresholds would have written.

It writes nowhere but inside OUT, and there only into its own working folder (OUT/.m3t-gen-refilter, made by it
and marked so) and the names it rewrites. The new results are built in ``work/new``; the swap moves each
rewritten name's old version to ``work/old`` and the new one into place, then writes the manifest, then marks the
work done. A refilter killed on the way leaves the working folder: the next refilter rolls an unfinished swap
back (or drops an unfinished build) and starts over. A folder of that name that m3t-gen did not make is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from pydantic import ValidationError

from m3t_gen.config import ConfigError, PipelineConfig, apply_overrides, format_validation_error
from m3t_gen.run.artefacts import Manifest, ShardStats
from m3t_gen.run.pipeline import OWNER_FILE, result_hash, summarize, timed_quality_report, write_owner_file
from m3t_gen.storage.store import LOCK_FILE, OutputBusy, Store, atomic_write_bytes, local_copy, lock_output
from m3t_gen.rows import MARKER, REJECTED, new_row
from m3t_gen.stages.base import RunContext
from m3t_gen.stages.filter import apply_filter
from m3t_gen.run.writer import OutputWriter, row_from_sample
from m3t_gen.tools.run_reader import iter_tar


WORK_DIR = ".m3t-gen-refilter"  # inside the output: refilter's working folder, and only refilter's
WORK_MARKER = ".m3t-gen"        # in the working folder, written first: the proof that refilter made it
WORK_STATE = "state.json"       # {"step": "swap" | "done", "new": [names the new results have]}
# What a refilter rewrites at the top of the output (the manifest last, on its own); the card described the old
# results and goes. Everything else (the CIR results, the pool, anything m3t-gen did not write) stays in place.
SWAPPED = ("shards", "filtered", "index", "rejects", "stats", "negatives", "negatives_stats", OWNER_FILE, "README.md",
           "card")
REDECIDED = ("filter.", "negatives.guard.")  # what a refilter may change: decisions over recorded scores


def refilter(out: Path, overrides: list[str]) -> Manifest:
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        raise ConfigError(f"{out}: no manifest.json (not a finished m3t-gen run)")
    _refuse_foreign_work_dir(out)  # before the lock file is made: nothing is written next to a stranger's folder
    try:
        lock = lock_output(Store(out), "refilter")  # not while a run (or another refilter) writes it
    except OutputBusy as e:
        raise ConfigError(str(e)) from None
    try:
        _recover(out)
        return _refilter_held(out, overrides, manifest_path)
    finally:
        lock.release()


def _refuse_foreign_work_dir(out: Path) -> None:
    """The working folder is refilter's when it holds the marker, or is empty (killed between making it and
    marking it: removing an empty folder loses nothing); anything else of that name is someone else's."""
    work = out / WORK_DIR
    if not os.path.lexists(work):
        return
    if work.is_symlink() or not work.is_dir() or not ((work / WORK_MARKER).is_file() or not any(work.iterdir())):
        raise ConfigError(f"{work}: exists and m3t-gen did not make it (no {WORK_MARKER} in it); refilter works "
                          f"there and will not touch it: move it away")


def _recover(out: Path) -> None:
    """Clean up after a refilter that was killed: an unfinished build goes; an unfinished swap is rolled back (each
    name gets its old version back, the manifest too), so the output is the run as it was before that refilter."""
    work = out / WORK_DIR
    if not work.exists():
        return
    state_path = work / WORK_STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"step": "build"}
    if state["step"] == "swap":
        for name in ("manifest.json",) + SWAPPED:
            moved_in = name in state["new"] and not os.path.lexists(work / "new" / name)
            if moved_in:
                Store(out).remove(name)  # the new version, half-way through the swap
            if os.path.lexists(work / "old" / name):
                os.replace(work / "old" / name, out / name)
    shutil.rmtree(work)


def _start_work(out: Path) -> Path:
    work = out / WORK_DIR
    work.mkdir()
    atomic_write_bytes(work / WORK_MARKER, json.dumps({"tool": "m3t-gen", "command": "refilter",
                                                       "pid": os.getpid()}).encode())
    return work


def _refilter_held(out: Path, overrides: list[str], manifest_path: Path) -> Manifest:
    manifest = Manifest.loads(manifest_path.read_text())
    bad = [o for o in overrides if not o.startswith(REDECIDED)]
    if bad:
        raise ConfigError(f"refilter changes only filter.* and negatives.guard.* thresholds, not "
                          f"{bad[0].split('=')[0]}")
    data = apply_overrides(json.loads(json.dumps(manifest.config)), overrides)
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "--set")) from None
    ctx = RunContext(config=cfg, config_hash=result_hash(cfg), template_hashes=manifest.templates,
                     model_names=manifest.models)
    stats_files = sorted((out / "stats").glob("*.json"))
    old_stats = [ShardStats.loads(p.read_text()) for p in stats_files]
    work = _start_work(out)
    new = work / "new"
    writer = OutputWriter(new, ctx, {stats.shard: stats.source for stats in old_stats})
    for path, stats in zip(stats_files, old_stats):
        shard = stats.shard
        for sub, names in (("shards", stats.tars), ("filtered", stats.filtered_tars)):
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
        shard_detail = {k: v for k, v in (("errors", stats.shard_errors), ("skipped", stats.skipped_entries)) if v}
        writer.consume([new_row(key=f"{shard}__end", shard=shard, status=MARKER, shard_rows=stats.read,
                                reject_detail=json.dumps(shard_detail) if shard_detail else None)])
        # Time spent generating and scoring belongs to the original run: carry it over, with the repairs made on
        # reading (rejected rows included).
        new_stats_path = new / "stats" / path.name
        new_stats = dataclasses.replace(ShardStats.loads(new_stats_path.read_text()), stage_seconds=stats.stage_seconds,
                                        stage_tokens=stats.stage_tokens, repairs=stats.repairs)
        atomic_write_bytes(new_stats_path, new_stats.dumps())
    if writer.incomplete():
        raise RuntimeError(f"refilter: shards incomplete: {writer.incomplete()}")
    totals, stages = summarize([ShardStats.loads(p.read_text()) for p in sorted((new / "stats").glob("*.json"))])
    manifest.refilters = (manifest.refilters or []) + [{"set": overrides, "previous_config_hash": manifest.config_hash}]
    manifest.config, manifest.config_hash = cfg.model_dump(mode="json", by_alias=True), ctx.config_hash
    manifest.totals, manifest.stages = totals, stages
    if cfg.negatives is not None:  # the mined candidates, re-decided onto the new shards (no mining again)
        from m3t_gen.run.negatives import attach

        negatives = attach(Store(out), Store(new), cfg.negatives.guard)
        if negatives is not None:
            manifest.negatives = negatives
    write_owner_file(new, cfg)
    _swap(out, work)
    # The quality report of what the refilter kept (the CIR part, left in place, included).
    manifest.quality = timed_quality_report(Store(out), manifest.config, lambda _msg: None)
    atomic_write_bytes(manifest_path, manifest.dumps())
    atomic_write_bytes(work / WORK_STATE, json.dumps({"step": "done"}).encode())
    shutil.rmtree(work)
    return manifest


def _swap(out: Path, work: Path) -> None:
    """Each rewritten name: its old version to work/old, its new one into place; the manifest is kept as it was
    (a copy in work/old) until the caller writes the new one. The state file first, so a crash can be undone."""
    old, new = work / "old", work / "new"
    old.mkdir()
    shutil.copy2(out / "manifest.json", old / "manifest.json")
    atomic_write_bytes(work / WORK_STATE, json.dumps({"step": "swap", "new": [
        name for name in SWAPPED if os.path.lexists(new / name)]}).encode())
    for name in SWAPPED:
        if os.path.lexists(out / name):
            os.replace(out / name, old / name)
        if os.path.lexists(new / name):
            os.replace(new / name, out / name)


def refilter_remote(location: str, overrides: list[str]) -> Manifest:
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

"""Reading a finished run's output: its manifest and shard stats (typed: m3t_gen/run/artefacts.py), its sample tars,
its triplets. Every tool over an output (export, card, inspect, refilter) reads it through these."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from m3t_gen.run.artefacts import Manifest, ShardStats
from m3t_gen.storage.store import iter_tar  # noqa: F401  (the one output tar reader; tools import it from here)


class RunOutputError(Exception):
    """A finished run's output cannot be read or exported; the message is one line for the user."""


def read_manifest(out_dir: Path) -> Manifest:
    """The run's manifest, typed (m3t_gen/run/artefacts.py): an older run's missing fields take their defaults."""
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        raise RunOutputError(f"{out_dir}: no manifest.json (not a finished m3t-gen run)")
    try:
        return Manifest.loads(path.read_text())
    except (OSError, ValueError, TypeError) as e:
        raise RunOutputError(f"{path}: unreadable manifest ({e})") from None


def read_shard_stats(out_dir: Path) -> list[ShardStats]:
    """Every input shard's stats (``stats/*.json``), in shard order."""
    return [ShardStats.loads(p.read_text()) for p in sorted((Path(out_dir) / "stats").glob("*.json"))]


def run_output_around(path: Path) -> Path | None:
    """The m3t-gen run output that holds ``path`` (the folder itself or one above it, links resolved), if any:
    a folder with m3t-gen's owner file (a run under way) or its manifest (a JSON object with a config hash)."""
    from m3t_gen.run.pipeline import OWNER_FILE

    here = Path(os.path.realpath(path))
    for folder in (here, *here.parents):
        if (folder / OWNER_FILE).is_file() or _is_manifest(folder / "manifest.json"):
            return folder
    return None


def _is_manifest(path: Path) -> bool:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "config_hash" in data


def refuse_inside_run(path: Path, option: str) -> None:
    """A tool writes its page or export outside every run output (the one it reads included): inside, it would
    overwrite the run's own files (its manifest, its triplet parts) or mix its files into the run's."""
    root = run_output_around(path)
    if root is not None:
        raise RunOutputError(f"{option} {path}: inside the m3t-gen run output {root}; refusing to write there "
                             f"(it would overwrite or mix with the run's files): choose a path outside it")


def tar_paths(out_dir: Path, sub: str = "shards") -> list[Path]:
    """The committed tars of ``OUT/<sub>`` (shards or filtered) in a stable order; ``*.tar.tmp`` are not."""
    return sorted((Path(out_dir) / sub).glob("*.tar"))


def iter_samples(out_dir: Path, sub: str = "shards") -> Iterator[tuple[str, bytes | None, dict[str, Any]]]:
    for path in tar_paths(out_dir, sub):
        yield from iter_tar(path)


def sorted_turns(sample: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(sample.get("turns", []), key=lambda t: t.get("i", 0))


def triplet_files(out_dir: Path) -> list[Path]:
    return sorted((Path(out_dir) / "triplets").glob("*.jsonl"))


def iter_triplets(out_dir: Path) -> Iterator[dict[str, Any]]:
    """The kept triplets of the run, as the CIR recipe wrote them (all fields), file by file."""
    for path in triplet_files(out_dir):
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    t = json.loads(line)
                    for f in ("id", "image", "target_image"):
                        if not isinstance(t[f], str) or not t[f]:
                            raise ValueError(f"{f} must be a non-empty string")
                    if not all(isinstance(m, dict) and isinstance(m["text"], str) for m in t["modifications"]):
                        raise ValueError("modifications must be a list of {category, text}")
                except (ValueError, KeyError, TypeError) as e:
                    raise RunOutputError(f"{path}:{n}: not a CIR triplet ({type(e).__name__}: {e})") from None
                yield t


def find_images(out_dir: Path, keys: set[str], subs: tuple[str, ...] = ("pool", "shards", "filtered"),
                ) -> Iterator[tuple[str, bytes]]:
    """(key, JPEG) for each of ``keys`` found in the run's tars (the CIR image pool first), each key once."""
    left = set(keys)
    for sub in subs:
        for path in tar_paths(out_dir, sub):
            if not left:
                return
            for key, image, _ in iter_tar(path):
                if key in left and image is not None:
                    left.discard(key)
                    yield key, image

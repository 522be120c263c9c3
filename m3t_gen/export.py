"""`m3t-gen export OUT --format FMT --to PATH`: convert a finished run into the layout a trainer reads.

Formats live in ``EXPORTERS`` (name -> ``Format``: the file it writes and a function); adding one = one
function + its ``@exporter(name, file_name)``. ``PATH`` is a directory (the format's file is written inside it
under its default name) or, when it ends with the format's suffix, the file itself; JPEGs always go to
``images/`` beside that file, and image paths in the file are relative to the file's folder.

- ``muco``: the M3T parquet layout the MuCo trainer reads, self-contained::

      PATH/train.parquet        one row per kept sample (row groups of at most 1000 rows)
      PATH/images/<key>.jpg     the sample's JPEG, extracted from OUT/shards

  columns: ``key``, ``image`` (``images/<key>.jpg``, relative to the parquet's folder), ``url``, ``caption``,
  ``queries`` (query strings in turn order), ``positives`` (target strings aligned with ``queries``),
  ``turn_types`` (aligned with ``queries``).

- ``mtcir``: CIR triplets as JSONL (``PATH/train.jsonl`` or ``PATH`` itself when it ends with ``.jsonl``), one
  ``{"id", "image", "target_image", "modifications"}`` object a line: ``image`` / ``target_image`` are the
  reference / target JPEGs (``images/<key>.jpg``, extracted from the run's pool/shards tars) and
  ``modifications`` the kept ``[{"category", "text"}, ...]``. Read from ``OUT/triplets/*.jsonl`` (written by
  the CIR recipe: id, image = reference key, target_image = target key, modifications); a run without them is
  an error ("this run has no CIR triplets; run a CIR recipe").

Every file is written under a temporary name and renamed when complete.

This module also holds the small readers of a finished run (manifest, samples in the tars) that
``card.py`` and ``inspect_html.py`` share; heavy imports are deferred so that the CLI stays fast to start.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterator

TMP = ".tmp"
ROW_GROUP = 1000  # small row groups: the HF dataset viewer and streaming readers cope badly with big ones
NO_TRIPLETS = "this run has no CIR triplets; run a CIR recipe"


class RunOutputError(Exception):
    """A finished run's output cannot be read or exported; the message is one line for the user."""


# ----------------------------------------------------------------------------------------- reading a run
def read_manifest(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        raise RunOutputError(f"{out_dir}: no manifest.json (not a finished m3t-gen run)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunOutputError(f"{path}: unreadable manifest ({e})") from None


def tar_paths(out_dir: Path, sub: str = "shards") -> list[Path]:
    """The committed tars of ``OUT/<sub>`` (shards or filtered) in a stable order; ``*.tar.tmp`` are not."""
    return sorted((Path(out_dir) / sub).glob("*.tar"))


def iter_tar(path: Path) -> Iterator[tuple[str, bytes | None, dict[str, Any]]]:
    """(key, JPEG bytes, KEY.json) for each sample of one tar, in tar order (members of a key are adjacent)."""
    key: str | None = None
    parts: dict[str, bytes] = {}

    def emit() -> Iterator[tuple[str, bytes | None, dict[str, Any]]]:
        if key is not None and "json" in parts:
            yield key, parts.get("jpg"), json.loads(parts["json"])

    with tarfile.open(path) as tf:
        for member in tf:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            if k != key:
                yield from emit()
                key, parts = k, {}
            fh = tf.extractfile(member)
            parts[ext.lower()] = fh.read() if fh else b""
        yield from emit()


def iter_samples(out_dir: Path, sub: str = "shards") -> Iterator[tuple[str, bytes | None, dict[str, Any]]]:
    for path in tar_paths(out_dir, sub):
        yield from iter_tar(path)


def sorted_turns(sample: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(sample.get("turns", []), key=lambda t: t.get("i", 0))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + TMP)
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Format:
    name: str
    file_name: str  # written inside a --to directory; a --to path with this suffix is taken as the file
    write: Callable[[Path, Path], dict[str, Any]]  # (run dir, output file) -> summary


EXPORTERS: dict[str, Format] = {}


def exporter(name: str, file_name: str) -> Callable[[Callable], Callable]:
    def register(fn: Callable[[Path, Path], dict[str, Any]]) -> Callable:
        EXPORTERS[name] = Format(name, file_name, fn)
        return fn
    return register


def export(out_dir: Path, fmt: str, to: Path) -> dict[str, Any]:
    """Export the finished run in ``out_dir`` as ``fmt`` to ``to`` (a directory, or the output file itself when
    it ends with the format's suffix); returns a summary dict (format, rows, path, images)."""
    try:
        spec = EXPORTERS[fmt]
    except KeyError:
        raise RunOutputError(f"unknown export format {fmt!r} (one of: {', '.join(sorted(EXPORTERS))})") from None
    out_dir, to = Path(out_dir), Path(to)
    read_manifest(out_dir)
    target = to if to.suffix == Path(spec.file_name).suffix else to / spec.file_name
    if target.is_dir():
        raise RunOutputError(f"{target}: is a directory")
    if target.parent.exists() and not target.parent.is_dir():
        raise RunOutputError(f"{target.parent}: exists and is not a directory")
    return spec.write(out_dir, target)


def _make_dirs(target: Path) -> Path:
    images = target.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    return images


# ----------------------------------------------------------------------------------------- muco
def _muco_schema():
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()), ("image", pa.string()), ("url", pa.string()), ("caption", pa.string()),
        ("queries", pa.list_(pa.string())), ("positives", pa.list_(pa.string())),
        ("turn_types", pa.list_(pa.string())),
    ])


@exporter("muco", "train.parquet")
def export_muco(out_dir: Path, target: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = _make_dirs(target)
    schema = _muco_schema()
    tmp = target.with_name(target.name + TMP)
    rows: list[dict[str, Any]] = []
    count = 0
    writer = pq.ParquetWriter(str(tmp), schema)
    try:
        for key, image, sample in iter_samples(out_dir, "shards"):
            if image is None:
                raise RunOutputError(f"{out_dir}: sample {key} has no JPEG in its tar")
            _atomic_write(images / f"{key}.jpg", image)
            turns = sorted_turns(sample)
            rows.append({
                "key": key, "image": f"images/{key}.jpg", "url": (sample.get("source") or {}).get("url"),
                "caption": sample.get("caption"),
                "queries": [t["query"] for t in turns], "positives": [t["target"] for t in turns],
                "turn_types": [t["type"] for t in turns],
            })
            if len(rows) >= ROW_GROUP:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=ROW_GROUP)
                count += len(rows)
                rows = []
        if rows or count == 0:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=ROW_GROUP)
            count += len(rows)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, target)
    return {"format": "muco", "rows": count, "path": str(target), "images": str(images)}


# ----------------------------------------------------------------------------------------- mtcir
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


@exporter("mtcir", "train.jsonl")
def export_mtcir(out_dir: Path, target: Path) -> dict[str, Any]:
    if not triplet_files(out_dir):
        raise RunOutputError(NO_TRIPLETS)
    wanted = {t[f] for t in iter_triplets(out_dir) for f in ("image", "target_image")}  # also validates
    images = _make_dirs(target)
    found = set()
    for key, image in find_images(out_dir, wanted):
        _atomic_write(images / f"{key}.jpg", image)
        found.add(key)
    missing = sorted(wanted - found)
    if missing:
        raise RunOutputError(f"{out_dir}: triplets reference {len(missing)} image(s) found in none of the run's "
                             f"tars, e.g. {missing[0]!r}")
    tmp = target.with_name(target.name + TMP)
    count = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for t in iter_triplets(out_dir):
            fh.write(json.dumps({"id": t["id"], "image": f"images/{t['image']}.jpg",
                                 "target_image": f"images/{t['target_image']}.jpg",
                                 "modifications": [{"category": m.get("category"), "text": m["text"]}
                                                   for m in t["modifications"]]}, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, target)
    return {"format": "mtcir", "rows": count, "path": str(target), "images": str(images)}

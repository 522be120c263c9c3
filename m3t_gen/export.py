"""`m3t-gen export OUT --format FMT --to PATH`: convert a finished run into the layout a trainer reads.

Formats live in ``EXPORTERS`` (name -> function ``(out_dir, to) -> dict``); adding one = one function + its
``@exporter("name")``.

- ``muco``: the M3T parquet layout the MuCo trainer reads, self-contained in ``TO/``::

      TO/train.parquet          one row per kept sample (row groups of at most 1000 rows)
      TO/images/<key>.jpg       the sample's JPEG, extracted from OUT/shards

  columns: ``key``, ``image`` (path of the JPEG relative to ``TO/``, i.e. ``images/<key>.jpg``), ``url``,
  ``caption``, ``queries`` (query strings in turn order), ``positives`` (target strings aligned with
  ``queries``), ``turn_types`` (aligned with ``queries``).

- ``mtcir``: CIR triplets as JSONL, ``TO/train.jsonl``, one ``{"id", "image", "target_image", "modifications"}``
  object a line; ``image`` / ``target_image`` are paths relative to ``TO/`` of the reference / target JPEG
  (extracted to ``TO/images/<key>.jpg``), ``modifications`` is the list of ``{"category", "text"}`` as the CIR
  stage wrote them. Read from ``OUT/triplets/*.jsonl`` (fields id, image = reference key, target_image = target
  key, modifications).

Every file is written under a temporary name and renamed when complete.

This module also holds the small readers of a finished run (manifest, samples in the tars) that
``card.py`` and ``inspect_html.py`` share; heavy imports are deferred so that the CLI stays fast to start.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
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
Exporter = Callable[[Path, Path], dict[str, Any]]
EXPORTERS: dict[str, Exporter] = {}


def exporter(name: str) -> Callable[[Exporter], Exporter]:
    def register(fn: Exporter) -> Exporter:
        EXPORTERS[name] = fn
        return fn
    return register


def export(out_dir: Path, fmt: str, to: Path) -> dict[str, Any]:
    """Export the finished run in ``out_dir`` as ``fmt`` into the directory ``to``; returns a summary dict."""
    try:
        fn = EXPORTERS[fmt]
    except KeyError:
        raise RunOutputError(f"unknown export format {fmt!r} (one of: {', '.join(sorted(EXPORTERS))})") from None
    out_dir, to = Path(out_dir), Path(to)
    read_manifest(out_dir)
    if to.exists() and not to.is_dir():
        raise RunOutputError(f"{to}: exists and is not a directory")
    return fn(out_dir, to)


def _make_dirs(to: Path) -> None:
    (to / "images").mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------------------- muco
def _muco_schema():
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()), ("image", pa.string()), ("url", pa.string()), ("caption", pa.string()),
        ("queries", pa.list_(pa.string())), ("positives", pa.list_(pa.string())),
        ("turn_types", pa.list_(pa.string())),
    ])


@exporter("muco")
def export_muco(out_dir: Path, to: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _make_dirs(to)
    schema = _muco_schema()
    final = to / "train.parquet"
    tmp = final.with_name(final.name + TMP)
    rows: list[dict[str, Any]] = []
    count = 0
    writer = pq.ParquetWriter(str(tmp), schema)
    try:
        for key, image, sample in iter_samples(out_dir, "shards"):
            if image is None:
                raise RunOutputError(f"{out_dir}: sample {key} has no JPEG in its tar")
            rel = f"images/{key}.jpg"
            _atomic_write(to / rel, image)
            turns = sorted_turns(sample)
            rows.append({
                "key": key, "image": rel, "url": (sample.get("source") or {}).get("url"),
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
    os.replace(tmp, final)
    return {"format": "muco", "rows": count, "path": str(final), "images": str(to / "images")}


# ----------------------------------------------------------------------------------------- mtcir
def _read_triplets(out_dir: Path) -> list[dict[str, Any]]:
    files = sorted((out_dir / "triplets").glob("*.jsonl"))
    if not files:
        raise RunOutputError(NO_TRIPLETS)
    triplets = []
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                t = json.loads(line)
                triplet = {"id": str(t["id"]), "image": str(t["image"]), "target_image": str(t["target_image"]),
                           "modifications": [{"category": m.get("category"), "text": m["text"]}
                                             for m in t["modifications"]]}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise RunOutputError(f"{path}:{n}: not a CIR triplet ({type(e).__name__}: {e})") from None
            triplets.append(triplet)
    return triplets


@exporter("mtcir")
def export_mtcir(out_dir: Path, to: Path) -> dict[str, Any]:
    triplets = _read_triplets(out_dir)
    _make_dirs(to)
    wanted = {t[f] for t in triplets for f in ("image", "target_image")}
    found: set[str] = set()
    for sub in ("shards", "filtered"):
        for path in tar_paths(out_dir, sub):
            for key, image, _ in iter_tar(path):
                if key in wanted and key not in found and image is not None:
                    _atomic_write(to / "images" / f"{key}.jpg", image)
                    found.add(key)
    missing = sorted(wanted - found)
    if missing:
        raise RunOutputError(f"{out_dir}: triplets reference {len(missing)} image(s) not in the run's tars, "
                             f"e.g. {missing[0]!r}")
    lines = [json.dumps({"id": t["id"], "image": f"images/{t['image']}.jpg",
                         "target_image": f"images/{t['target_image']}.jpg",
                         "modifications": t["modifications"]}, ensure_ascii=False) for t in triplets]
    final = to / "train.jsonl"
    _atomic_write(final, ("\n".join(lines) + "\n" if lines else "").encode())
    return {"format": "mtcir", "rows": len(lines), "path": str(final), "images": str(to / "images")}

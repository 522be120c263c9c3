"""Input formats: each turns one input shard into raw samples (bytes, not yet decoded).

A raw sample is a plain dict: ``source_key``, ``image`` (bytes or None), ``image_name``, ``text`` (bytes/str or
None), ``meta`` (bytes/dict or None), ``problem`` (a reason code when the sample is unusable before decoding,
e.g. ``duplicate_key``) and ``problem_detail``. Damage to the shard itself (a tar cut off in the middle, an
unreadable parquet) is appended to ``errors``; what was read before it still counts.

Formats register by name in ``FORMATS``; remote paths (``s3://``, ``gs://``, ``https://``...) open through
fsspec when its filesystem package is installed.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from typing import Any, Callable, Iterator

from m3t_gen.config import InputSpec

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
RawSample = dict[str, Any]
Reader = Callable[[str, InputSpec, list[str]], Iterator[RawSample]]


def open_binary(path: str):
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def _split_name(name: str) -> tuple[str | None, str | None]:
    """webdataset's convention: the key is everything before the first dot of the file name."""
    directory, base = posixpath.split(name)
    if "." not in base or base.startswith("."):
        return None, None
    stem, ext = base.split(".", 1)
    return posixpath.join(directory, stem) if directory else stem, ext.lower()


def _unsafe(name: str) -> bool:
    parts = name.split("/")
    return name.startswith("/") or ".." in parts or "\\" in name


def _finish(sample: RawSample) -> RawSample:
    members = sample.pop("members")
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    sample["image"] = members.get(image_ext) if image_ext else None
    sample["image_name"] = f"{sample['source_key']}.{image_ext}" if image_ext else None
    sample["text"] = members.get("txt")
    sample["meta"] = members.get("json")
    if sample["problem"] is None and image_ext is None:
        sample["problem"] = "no_image"
        sample["problem_detail"] = {"members": sorted(members)}
    return sample


def read_webdataset(path: str, spec: InputSpec, errors: list[str]) -> Iterator[RawSample]:
    """img2dataset / WebDataset tars. Members group into samples by key (consecutive, as webdataset does); a key
    seen again later, a repeated member, or an unsafe member name makes that sample a recorded problem."""
    seen: dict[str, int] = {}
    current: RawSample | None = None
    index = 0
    try:
        with open_binary(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                name = info.name
                if name.startswith("__") or posixpath.basename(name).startswith("_"):
                    continue  # webdataset metadata members
                key, ext = _split_name(name)
                if key is None:
                    errors.append(f"member without extension skipped: {name[:200]!r}")
                    continue
                data = tar.extractfile(info).read()
                if current is None or key != current["source_key"]:
                    if current is not None:
                        yield _finish(current)
                    current = {"source_key": key, "members": {}, "problem": None, "problem_detail": None}
                    if _unsafe(name):
                        current["problem"], current["problem_detail"] = "unsafe_name", {"name": name[:300]}
                    elif key in seen:
                        current["problem"], current["problem_detail"] = "duplicate_key", {"first_index": seen[key]}
                    else:
                        seen[key] = index
                    index += 1
                if ext in current["members"] and current["problem"] is None:
                    current["problem"], current["problem_detail"] = "duplicate_member", {"member": name[:300]}
                current["members"][ext] = data
                tar.members = []  # tarfile keeps every header otherwise: memory would grow with the shard
    except (tarfile.TarError, EOFError, OSError) as e:
        # A tar cut off mid-stream: keep what was read; the sample in progress may be incomplete, so it goes on
        # through validation like any other (its image will fail to decode if it was cut).
        errors.append(f"damaged tar: {type(e).__name__}: {str(e)[:200]}")
    if current is not None:
        yield _finish(current)


def read_parquet(path: str, spec: InputSpec, errors: list[str]) -> Iterator[RawSample]:
    """Parquet with image bytes (a binary column, or a struct with ``bytes`` as HF datasets writes) or paths."""
    import pyarrow.parquet as pq

    cols = spec.columns
    wanted = [c for c in (cols.image, cols.image_path, cols.text, cols.url, cols.key) if c]
    base = posixpath.dirname(path) if "://" in path else os.path.dirname(os.path.abspath(path))
    try:
        with open_binary(path) as fh:
            pf = pq.ParquetFile(fh)
            missing = [c for c in wanted if c not in pf.schema_arrow.names]
            if missing:
                errors.append(f"parquet lacks column(s) {missing}; has {pf.schema_arrow.names}")
                return
            index = 0
            for batch in pf.iter_batches(batch_size=256, columns=wanted):
                for rec in batch.to_pylist():
                    key = str(rec[cols.key]) if cols.key and rec.get(cols.key) is not None else f"{index:09d}"
                    sample: RawSample = {"source_key": key, "problem": None, "problem_detail": None,
                                         "text": rec.get(cols.text) if cols.text else None,
                                         "meta": {"url": rec.get(cols.url)} if cols.url else None}
                    index += 1
                    if cols.image:
                        value = rec.get(cols.image)
                        sample["image"] = value.get("bytes") if isinstance(value, dict) else value
                        sample["image_name"] = key
                    else:
                        ref = rec.get(cols.image_path)
                        sample["image_name"] = ref
                        sample["image"] = _read_ref(ref, base, sample)
                    if sample["image"] is None and sample["problem"] is None:
                        sample["problem"], sample["problem_detail"] = "no_image", {"column": cols.image or cols.image_path}
                    yield sample
    except Exception as e:  # unreadable or truncated parquet: the shard ends here, recorded
        errors.append(f"damaged parquet: {type(e).__name__}: {str(e)[:200]}")


def _read_ref(ref: str | None, base: str, sample: RawSample) -> bytes | None:
    if not ref:
        return None
    target = ref if ("://" in ref or os.path.isabs(ref)) else posixpath.join(base, ref)
    try:
        with open_binary(target) as fh:
            return fh.read()
    except OSError as e:
        sample["problem"], sample["problem_detail"] = "image_unreadable", {"path": ref, "error": str(e)[:200]}
        return None


def read_folder(path: str, spec: InputSpec, errors: list[str]) -> Iterator[RawSample]:
    """A folder of images, with optional sidecar ``NAME.txt`` captions and ``NAME.json`` metadata."""
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        errors.append(f"unreadable folder: {e}")
        return
    present = set(names)
    for name in names:
        stem, dot, ext = name.rpartition(".")
        ext = ext.lower()
        if not dot or ext in ("txt", "json") or os.path.isdir(os.path.join(path, name)):
            continue
        sample: RawSample = {"source_key": name, "problem": None, "problem_detail": None, "image_name": name}
        if ext not in IMAGE_EXTS:
            sample.update(image=None, text=None, meta=None, problem="unsupported_file", problem_detail={"name": name})
            yield sample
            continue
        with open(os.path.join(path, name), "rb") as fh:
            sample["image"] = fh.read()
        sample["text"] = _sidecar(path, f"{stem}.txt", present)
        sample["meta"] = _sidecar(path, f"{stem}.json", present)
        yield sample


def _sidecar(folder: str, name: str, present: set[str]) -> bytes | None:
    if name not in present:
        return None
    with open(os.path.join(folder, name), "rb") as fh:
        return fh.read()


FORMATS: dict[str, Reader] = {"webdataset": read_webdataset, "parquet": read_parquet, "folder": read_folder}


def parse_meta(meta: Any, flags: list[str]) -> dict[str, Any]:
    if meta is None:
        return {}
    if isinstance(meta, dict):
        return meta
    try:
        value = json.loads(meta)
    except (json.JSONDecodeError, UnicodeDecodeError):
        flags.append("json_invalid")
        return {}
    if not isinstance(value, dict):
        flags.append("json_invalid")
        return {}
    return value

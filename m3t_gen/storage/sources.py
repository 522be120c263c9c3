"""Input formats: each turns one input shard into raw samples (bytes, not yet decoded).

A raw sample is a plain dict: ``source_key``, ``image`` (bytes or None), ``text`` (bytes/str or None), ``meta`` (bytes/dict or None), ``problem`` (a reason code when the sample is unusable before decoding,
e.g. ``duplicate_key``) and ``problem_detail``. Every entry a reader meets becomes a sample (kept or rejected
later with its reason) or, when it carries no data of its own (a tar's directory members, webdataset's
``__*`` metadata), a count in ``ShardReport.skipped``. Damage to the shard itself (a tar cut off in the middle,
an unreadable parquet) is appended to ``ShardReport.errors``; what was read before it still counts.

Formats register by name in ``FORMATS``; remote paths (``s3://``, ``gs://``, ``https://``...) open through
fsspec when its filesystem package is installed. Local files are opened non-blocking and checked to be regular
files before a byte is read, so a named pipe or a device cannot hang a reader.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import posixpath
import re
import stat
import tarfile
from collections import Counter
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from m3t_gen.config import ConfigError, InputSpec, PipelineConfig

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SIDECAR_EXTS = ("txt", "json")
RawSample = dict[str, Any]


@dataclass
class ShardReport:
    """What a reader noticed about the shard as a whole (not about one sample)."""

    errors: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # entries without data of their own, by kind

    def as_detail(self) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        if self.errors:
            out["errors"] = self.errors
        if self.skipped:
            out["skipped"] = dict(sorted(self.skipped.items()))
        return out or None


Reader = Callable[[str, InputSpec, ShardReport], Iterator[RawSample]]


class EntryProblem(Exception):
    """An entry that cannot become an image: carries the reason code and its detail."""

    def __init__(self, reason: str, **detail: Any) -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def open_binary(path: str):
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def read_local_file(path: str) -> bytes:
    """The bytes of a regular local file, or EntryProblem. O_NONBLOCK + fstat: whatever the name points to when
    it is opened (a pipe swapped in after a check included), only a regular file is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP) and os.path.islink(path):
            raise EntryProblem("broken_link", target=os.readlink(path)[:300], error=e.strerror) from None
        raise EntryProblem("image_unreadable", error=f"{e.strerror} (errno {e.errno})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise EntryProblem("not_a_regular_file", kind=_kind(mode))
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read()
    except OSError as e:
        raise EntryProblem("image_unreadable", error=f"{e.strerror} (errno {e.errno})") from None
    finally:
        os.close(fd)


class Roots:
    """Where a reader may follow a reference (a parquet image path, a symbolic link in a folder): below the
    shard's own folder, or below one of ``input.allowed_roots``. Local paths are compared after resolving links;
    URLs by normalised prefix."""

    def __init__(self, own: str, extra: list[str]) -> None:
        self.local: list[str] = []
        self.remote: list[str] = []
        for root in [own, *extra]:
            if "://" in root:
                scheme, rest = root.split("://", 1)
                self.remote.append(f"{scheme}://{posixpath.normpath(rest).rstrip('/')}/")
            else:
                self.local.append(os.path.realpath(os.path.expanduser(root)))

    def allows(self, target: str) -> bool:
        if "://" in target:
            scheme, rest = target.split("://", 1)
            norm = f"{scheme}://{posixpath.normpath(rest)}"
            return any(norm.startswith(r) for r in self.remote)
        real = os.path.realpath(target)
        return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.local)

    def shown(self) -> list[str]:
        return self.local + self.remote


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


def _problem(sample: RawSample, reason: str, **detail: Any) -> None:
    if sample["problem"] is None:  # the first problem found is the one reported
        sample["problem"], sample["problem_detail"] = reason, detail


def _finish(sample: RawSample) -> RawSample:
    members = sample.pop("members")
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    sample["image"] = members.get(image_ext) if image_ext else None
    sample["text"] = members.get("txt")
    sample["meta"] = members.get("json")
    if image_ext is None:
        _problem(sample, "no_image", members=sorted(members))
    return sample


def _member_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "symbolic link"
    if info.islnk():
        return "hard link"
    return {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
            tarfile.FIFOTYPE: "named pipe"}.get(info.type, f"tar type {info.type!r}")


def read_webdataset(path: str, spec: InputSpec, report: ShardReport) -> Iterator[RawSample]:
    """img2dataset / WebDataset tars. Members group into samples by key (consecutive, as webdataset does); a key
    seen again later, a repeated member, an unsafe member name, a member that is a link or a device (never
    followed: it could point anywhere), a member without extension, or a member cut off by a damaged tar makes
    that sample a recorded problem."""
    seen: dict[str, int] = {}
    current: RawSample | None = None
    index = 0

    def start(key: str, name: str) -> RawSample:
        nonlocal index
        sample: RawSample = {"source_key": key, "members": {}, "problem": None, "problem_detail": None}
        if _unsafe(name):
            _problem(sample, "unsafe_name", name=name[:300])
        elif key in seen:
            _problem(sample, "duplicate_key", first_index=seen[key])
        else:
            seen[key] = index
        index += 1
        return sample

    try:
        with open_binary(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                tar.members = []  # tarfile keeps every header otherwise: memory would grow with the shard
                name = info.name
                if info.isdir():
                    report.skipped["tar folder member"] += 1
                    continue
                if name.startswith("__") or posixpath.basename(name).startswith("_"):
                    report.skipped["webdataset metadata member"] += 1
                    continue
                key, ext = _split_name(name)
                if key is None:
                    key, ext = name, ""
                if current is None or key != current["source_key"]:
                    if current is not None:
                        yield _finish(current)
                    current = start(key, name)
                if not info.isreg():
                    _problem(current, "not_a_regular_file", member=name[:300], kind=_member_kind(info),
                             target=(info.linkname or "")[:300] or None)
                    continue
                if not ext:
                    _problem(current, "unsupported_file", member=name[:300], why="no extension")
                    continue
                try:
                    data = tar.extractfile(info).read()
                except (tarfile.TarError, EOFError, OSError) as e:
                    _problem(current, "damaged_member", member=name[:300], error=f"{type(e).__name__}: {e}"[:200])
                    raise
                if ext in current["members"]:
                    _problem(current, "duplicate_member", member=name[:300])
                current["members"][ext] = data
            tail = tar.fileobj.tell() - tar.offset  # bytes of the header read that ended the archive
        if tail == 0:
            report.errors.append("damaged tar: ends without an end-of-archive block (cut at a member boundary?)")
        elif tail < tarfile.BLOCKSIZE:
            report.errors.append(f"damaged tar: cut inside a member header ({tail} of 512 bytes)")
    except (tarfile.TarError, EOFError, OSError) as e:
        # A tar cut off mid-stream: keep what was read. The member being read when it broke makes its sample a
        # `damaged_member` rejection (above); a header that cannot be read has no key, so it is a shard error.
        report.errors.append(f"damaged tar: {type(e).__name__}: {str(e)[:200]}")
    if current is not None:
        yield _finish(current)


def _cell_bytes(value: Any, column: str) -> tuple[bytes | None, str | None]:
    """An image cell: bytes, or HF datasets' {bytes, path} struct (a path when bytes are absent)."""
    if isinstance(value, dict):
        if isinstance(value.get("bytes"), (bytes, bytearray)) and value["bytes"]:
            return bytes(value["bytes"]), None
        if isinstance(value.get("path"), str) and value["path"]:
            return None, value["path"]
        return None, None
    if value is None or isinstance(value, (bytes, bytearray)):
        return value, None
    raise EntryProblem("bad_value", column=column, type=type(value).__name__)


def read_parquet(path: str, spec: InputSpec, report: ShardReport) -> Iterator[RawSample]:
    """Parquet with image bytes (a binary column, or a struct with ``bytes`` as HF datasets writes) or paths.
    Paths are read only below the parquet's folder or ``input.allowed_roots``; a cell of the wrong type is that
    row's rejection, not the file's."""
    import pyarrow.parquet as pq

    cols = spec.columns
    wanted = [c for c in (cols.image, cols.image_path, cols.text, cols.url, cols.key) if c]
    base = posixpath.dirname(path) if "://" in path else os.path.dirname(os.path.abspath(path))
    roots = Roots(base, spec.allowed_roots)
    seen: dict[str, int] = {}
    try:
        with open_binary(path) as fh:
            pf = pq.ParquetFile(fh)
            missing = [c for c in wanted if c not in pf.schema_arrow.names]
            if missing:
                report.errors.append(f"parquet lacks column(s) {missing}; has {pf.schema_arrow.names}")
                return
            index = 0
            for batch in pf.iter_batches(batch_size=256, columns=wanted):
                for rec in batch.to_pylist():
                    raw_key = rec.get(cols.key) if cols.key else None
                    key = str(raw_key)[:500] if raw_key is not None else f"{index:09d}"
                    sample: RawSample = {"source_key": key, "problem": None, "problem_detail": None,
                                         "text": rec.get(cols.text) if cols.text else None, "image": None,
                                         "meta": {"url": rec.get(cols.url)} if cols.url else None}
                    if key in seen:
                        _problem(sample, "duplicate_key", first_index=seen[key])
                    else:
                        seen[key] = index
                    index += 1
                    column = cols.image or cols.image_path
                    try:
                        if cols.image:
                            sample["image"], ref = _cell_bytes(rec.get(column), column)
                        else:
                            ref = rec.get(column)
                            if ref is not None and not isinstance(ref, str):
                                raise EntryProblem("bad_value", column=column, type=type(ref).__name__)
                        if ref and sample["problem"] is None:
                            sample["image"] = _read_ref(ref, base, roots)
                    except EntryProblem as p:
                        _problem(sample, p.reason, **p.detail)
                    if sample["image"] is None:
                        _problem(sample, "no_image", column=column)
                    yield sample
    except Exception as e:  # unreadable or truncated parquet: the shard ends here, recorded
        report.errors.append(f"damaged parquet: {type(e).__name__}: {str(e)[:200]}")


def _read_ref(ref: str, base: str, roots: Roots) -> bytes:
    remote = "://" in ref or "://" in base
    if "://" in ref or os.path.isabs(ref):
        target = ref
    else:
        target = posixpath.join(base, ref) if remote else os.path.join(base, ref)
    if not roots.allows(target):
        raise EntryProblem("path_outside_root", path=ref[:300], roots=roots.shown())
    if "://" in target:
        try:
            with open_binary(target) as fh:
                return fh.read()
        except (OSError, ValueError) as e:
            raise EntryProblem("image_unreadable", path=ref[:300], error=str(e)[:200]) from None
    try:
        return read_local_file(target)
    except EntryProblem as p:
        p.detail["path"] = ref[:300]
        raise


def read_folder(path: str, spec: InputSpec, report: ShardReport) -> Iterator[RawSample]:
    """A folder of images (sub-folders included; the key is the path below the folder), with optional sidecar
    ``NAME.txt`` captions and ``NAME.json`` metadata. Every entry is a sample or a sidecar of one: files that are
    not images, sidecars without an image, links that are broken or lead outside the allowed roots, pipes and
    devices, and sub-folders that cannot be listed are rejections with their reason."""
    roots = Roots(path, spec.allowed_roots)
    yield from _walk_folder(path, "", roots, report)


def _walk_folder(root: str, rel: str, roots: Roots, report: ShardReport) -> Iterator[RawSample]:
    folder = os.path.join(root, rel) if rel else root
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        if not rel:
            report.errors.append(f"unreadable folder: {e}")
        else:
            yield _entry_sample(rel, problem=("unreadable_folder", {"error": e.strerror}))
        return
    names = {e.name for e in entries}
    image_stems = {n.rpartition(".")[0] for n in names if n.rpartition(".")[2].lower() in IMAGE_EXTS}
    for entry in entries:
        name = posixpath.join(rel, entry.name) if rel else entry.name
        try:
            is_link = entry.is_symlink()
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError as e:
            yield _entry_sample(name, problem=("image_unreadable", {"error": e.strerror}))
            continue
        if is_dir:
            yield from _walk_folder(root, name, roots, report)
            continue
        stem, dot, ext = entry.name.rpartition(".")
        ext = ext.lower() if dot and stem else ""
        if ext in SIDECAR_EXTS:
            if stem not in image_stems:
                yield _entry_sample(name, problem=("no_image", {"sidecar": entry.name}))
            continue
        if is_link and not roots.allows(entry.path):
            yield _entry_sample(name, problem=("path_outside_root", {"target": os.readlink(entry.path)[:300],
                                                                     "roots": roots.shown()}))
            continue
        if ext not in IMAGE_EXTS:
            why = "no extension" if not ext else f".{ext} is not an image extension"
            if is_link and os.path.isdir(entry.path):
                yield _entry_sample(name, problem=("not_a_regular_file", {"kind": "link to a folder"}))
            else:
                yield _entry_sample(name, problem=("unsupported_file", {"name": entry.name, "why": why}))
            continue
        sample = _entry_sample(name)
        try:
            sample["image"] = read_local_file(entry.path)
        except EntryProblem as p:
            _problem(sample, p.reason, **p.detail)
            yield sample
            continue
        flags: list[str] = []
        sample["text"] = _sidecar(folder, f"{stem}.txt", names, roots, flags)
        sample["meta"] = _sidecar(folder, f"{stem}.json", names, roots, flags)
        sample["flags"] = flags
        yield sample


def _entry_sample(name: str, problem: tuple[str, dict[str, Any]] | None = None) -> RawSample:
    sample: RawSample = {"source_key": name, "problem": None, "problem_detail": None, "image": None, "text": None,
                         "meta": None}
    if problem:
        _problem(sample, problem[0], **problem[1])
    return sample


def _sidecar(folder: str, name: str, names: set[str], roots: Roots, flags: list[str]) -> bytes | None:
    if name not in names:
        return None
    full = os.path.join(folder, name)
    if os.path.islink(full) and not roots.allows(full):
        flags.append("sidecar_unreadable")
        return None
    try:
        return read_local_file(full)
    except EntryProblem:
        flags.append("sidecar_unreadable")  # the image is still good; the caption or metadata is not
        return None


FORMATS: dict[str, Reader] = {"webdataset": read_webdataset, "parquet": read_parquet, "folder": read_folder}


@dataclass
class InputShard:
    shard: str  # stable id, used in keys and output names
    path: str


def expand_inputs(cfg: PipelineConfig) -> list[InputShard]:
    """Input patterns -> shards (files, or folders for the folder format), in a stable order."""
    from braceexpand import braceexpand

    want_dirs = cfg.input.format == "folder"
    paths: list[str] = []
    for pattern in cfg.input.paths:
        matches: list[str] = []
        for expanded in braceexpand(pattern):
            matches.extend(_glob(expanded if "://" in expanded else str(cfg.resolve_path(expanded)), want_dirs))
        if not matches:
            raise ConfigError(f"input.paths: {pattern!r} matches no {'folder' if want_dirs else 'file'}")
        paths.extend(matches)
    paths = list(dict.fromkeys(paths))
    stems = Counter(_stem(p) for p in paths)
    shards = []
    for p in paths:
        sid = _stem(p)
        if stems[sid] > 1:  # same file name in two folders: disambiguate by path
            sid = f"{sid}-{hashlib.sha1(p.encode()).hexdigest()[:6]}"
        shards.append(InputShard(sid, p))
    return shards


def _glob(pattern: str, want_dirs: bool) -> list[str]:
    if "://" in pattern:
        import fsspec

        fs, _, found = fsspec.get_fs_token_paths(pattern)
        return sorted(fs.unstrip_protocol(p) for p in found if fs.isdir(p) == want_dirs)
    found = glob.glob(pattern) if glob.has_magic(pattern) else [pattern]
    return sorted(os.path.abspath(p) for p in found if os.path.exists(p) and os.path.isdir(p) == want_dirs)


def _stem(path: str) -> str:
    name = Path(path).name.split(".")[0] or "shard"
    return re.sub(r"[^A-Za-z0-9-]", "-", name)


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

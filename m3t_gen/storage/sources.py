"""Input formats: each turns one input shard into raw samples (bytes, not yet decoded).

A raw sample is a plain dict: ``source_key``, ``image`` (bytes or None), ``text`` (bytes/str or None), ``meta`` (bytes/dict or None), ``problem`` (a reason code when the sample is unusable before decoding,
e.g. ``duplicate_key``) and ``problem_detail``. Every entry a reader meets becomes a sample (kept or rejected
later with its reason) or, when it carries no data of its own (a tar's directory members, webdataset's
``__*`` metadata), a count in ``ShardReport.skipped``. Damage to the shard itself (a tar cut off in the middle,
an unreadable parquet) is appended to ``ShardReport.errors``; what was read before it still counts.

Formats register by name in ``FORMATS``; remote paths (``s3://``, ``gs://``, ``https://``...) open through
fsspec when its filesystem package is installed. Local files are opened non-blocking and checked to be regular
files before a byte is read, so a named pipe or a device cannot hang a reader.

Nothing is read whole on the word of a header: every member, file or cell has a byte budget
(``read.max_member_bytes``), checked against its declared size before it is read and enforced while reading,
and the members of one sample together another (``read.max_sample_bytes``). Names that are not UTF-8 (a
latin-1 tar member, a file name with byte 0xFF) are kept as a reversible escape (``escape_name``).
"""

from __future__ import annotations

import bz2
import errno
import glob
import gzip
import hashlib
import json
import lzma
import os
import posixpath
import re
import stat
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from m3t_gen.config import ConfigError, InputSpec, PipelineConfig, ReadSpec

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SIDECAR_EXTS = ("txt", "json")
USED_EXTS = IMAGE_EXTS + SIDECAR_EXTS
RawSample = dict[str, Any]


@dataclass
class ShardReport:
    """What a reader noticed about the shard as a whole (not about one sample)."""

    errors: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # entries without data of their own, by kind

    def as_detail(self) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        if self.errors:
            out["errors"] = [escape_name(e) for e in self.errors]  # messages may quote a non-UTF-8 file name
        if self.skipped:
            out["skipped"] = dict(sorted(self.skipped.items()))
        return out or None


Reader = Callable[[str, InputSpec, ShardReport, ReadSpec | None], Iterator[RawSample]]


class EntryProblem(Exception):
    """An entry that cannot become an image: carries the reason code and its detail."""

    def __init__(self, reason: str, **detail: Any) -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def escape_name(name: str) -> str:
    """A name as valid UTF-8 text, reversibly. Python hands a name that is not UTF-8 over with each undecodable
    byte as a lone surrogate (``surrogateescape``), which no UTF-8 writer (Arrow, JSON files) accepts. Such a name
    is written with each of those bytes as ``\\xHH`` (any other lone surrogate as ``\\uXXXX``) and each backslash
    doubled; ``name_bytes`` gives the original bytes back. A name that is UTF-8 already is returned as it is."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    out = []
    for ch in name:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append("\\\\" if ch == "\\" else ch)
    return "".join(out)


_ESCAPE = re.compile(r"\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|(\\))")


def name_bytes(escaped: str) -> bytes:
    """The original bytes of a name that ``escape_name`` escaped (its inverse on names that needed escaping)."""
    out, at = bytearray(), 0
    for m in _ESCAPE.finditer(escaped):
        out += escaped[at:m.start()].encode("utf-8")
        if m.group(1):
            out.append(int(m.group(1), 16))
        elif m.group(2):
            out += chr(int(m.group(2), 16)).encode("utf-8", "surrogatepass")
        else:
            out += b"\\"
        at = m.end()
    return bytes(out + escaped[at:].encode("utf-8"))


def bounded_read(fh: Any, limit: int) -> bytes:
    """At most ``limit`` bytes of ``fh``, or ``member_too_large``: enforced on what comes, whatever a header said
    (a file that grows, a stream that inflates)."""
    data = fh.read(limit + 1)
    if len(data) > limit:
        raise EntryProblem("member_too_large", bytes=f">{limit}", max_member_bytes=limit)
    return data


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


def read_local_file(path: str, limit: int) -> bytes:
    """The bytes of a regular local file of at most ``limit`` bytes, or EntryProblem. O_NONBLOCK + fstat:
    whatever the name points to when it is opened (a pipe swapped in after a check included), only a regular
    file is read; its size is checked before reading and again while reading (it may grow)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP) and os.path.islink(path):
            raise EntryProblem("broken_link", target=escape_name(os.readlink(path))[:300], error=e.strerror) from None
        raise EntryProblem("image_unreadable", error=f"{e.strerror} (errno {e.errno})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise EntryProblem("not_a_regular_file", kind=_kind(st.st_mode))
        if st.st_size > limit:
            raise EntryProblem("member_too_large", bytes=st.st_size, max_member_bytes=limit)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return bounded_read(fh, limit)
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
        return [escape_name(r) for r in self.local + self.remote]


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


def _finish(sample: RawSample, report: ShardReport) -> RawSample:
    """The members of one key -> the raw sample. Every member is accounted for: the image, the caption and the
    metadata are the sample's; a second image makes it a rejection (which of them the caption describes is
    unknown); other members (``KEY.cls``, ``KEY.seg.png``...) are counted as skipped."""
    members, names = sample.pop("members"), sample.pop("names")
    del sample["bytes"]
    images = [e for e in IMAGE_EXTS if e in members]
    sample["image"] = members[images[0]] if images else None
    sample["text"] = members.get("txt")
    sample["meta"] = members.get("json")
    if not images:
        _problem(sample, "no_image", members=sorted(members))
    elif len(images) > 1:
        _problem(sample, "extra_image", member=names[images[1]][:300], image=names[images[0]][:300])
    unused = sum(1 for e in members if e not in USED_EXTS)
    if unused and sample["problem"] is None:  # a rejected sample accounts for all its members itself
        report.skipped["unused member (not an image, .txt or .json)"] += unused
    return sample


def _member_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "symbolic link"
    if info.islnk():
        return "hard link"
    return {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
            tarfile.FIFOTYPE: "named pipe"}.get(info.type, f"tar type {info.type!r}")


# What breaks while a (compressed) tar is read: the tar's own errors and each decompressor's.
STREAM_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
# tarfile skips an unread member by reading it in pieces of this size (its default, 10 KB, made skipping a
# gigabyte cost 100,000 calls).
TAR_BUFFER = 1 << 20
_COMPRESSED = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")), (b"BZh", bz2.BZ2File),
               (b"\xfd7zXZ\x00", lzma.LZMAFile), (b"\x5d\x00\x00\x80", lzma.LZMAFile))
# Headers whose data tarfile reads into memory whole, before the member they describe is handed over.
_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
               tarfile.SOLARIS_XHDTYPE)


class _Prefixed:
    """A stream with the bytes already read from its start put back in front (the compression is told by the
    first bytes, and not every remote file can seek back)."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self.head, self.rest = head, rest

    def read(self, size: int | None = -1) -> bytes:
        if not self.head:
            return self.rest.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.rest.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data


class _UpToError:
    """A decompressed stream whose reads hand over what came before a decompression error (a cut or corrupt
    .tar.gz) and raise it on the next read: tarfile reads ahead TAR_BUFFER bytes, and the members before the
    damage must not be lost with that read."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.error = inner, None

    def read(self, size: int | None = -1) -> bytes:
        if self.error is not None:
            raise self.error
        chunks, got = [], 0
        while size is None or size < 0 or got < size:
            try:
                chunk = self.inner.read1(TAR_BUFFER if size is None or size < 0 else size - got)
            except STREAM_ERRORS as e:
                self.error = e
                break
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if not chunks and self.error is not None:
            raise self.error
        return b"".join(chunks)


def _tar_bytes(stream: Any) -> Any:
    """The tar inside a plain, gzip, bzip2 or xz stream. Decompressed here, not by tarfile's stream mode: that
    inflates whatever one read of the compressed file holds at once (1 MB of a gzip of zeros is 1 GB), while
    the standard library's file readers inflate no more than is asked for."""
    head = stream.read(6)
    whole = _Prefixed(head, stream)
    for magic, reader in _COMPRESSED:
        if head.startswith(magic):
            return _UpToError(reader(whole))
    return whole


def _guarded_tarinfo(limit: int, invalid: list[str]) -> type[tarfile.TarInfo]:
    """TarInfo that refuses a long-name or pax header longer than ``limit`` bytes (tarfile would read its data
    into memory whole; a gzip of zeros holds gigabytes in a few MB: the tar cannot be followed past it, a shard
    error), and notes in ``invalid`` a header that is garbage (bad checksum): tarfile ends the archive there
    without a word, as if it were the end-of-archive block."""

    class GuardedTarInfo(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
            try:
                info = super().frombuf(buf, encoding, errors)
            except tarfile.InvalidHeaderError as e:
                invalid.append(str(e))
                raise
            if info.type in _META_TYPES and info.size > limit:
                raise tarfile.SubsequentHeaderError(
                    f"extended header ({info.type!r}) of {info.size} bytes, more than read.max_member_bytes")
            return info

    return GuardedTarInfo


def open_tar(stream: Any, limits: ReadSpec, invalid: list[str]) -> tarfile.TarFile:
    """A tar read front to back (``r|``) from a plain or compressed stream, its headers guarded."""
    return tarfile.open(fileobj=_tar_bytes(stream), mode="r|", bufsize=TAR_BUFFER,
                        tarinfo=_guarded_tarinfo(limits.max_member_bytes, invalid))


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, sample: RawSample, name: str,
                 limits: ReadSpec) -> bytes | None:
    """A member's bytes within the member and sample budgets (checked on the header's size before reading, and
    while reading), or None with the sample's problem recorded (the member is then skipped unread)."""
    if info.size > limits.max_member_bytes:
        _problem(sample, "member_too_large", member=name[:300], bytes=info.size,
                 max_member_bytes=limits.max_member_bytes)
        return None
    if sample["bytes"] + info.size > limits.max_sample_bytes:
        _problem(sample, "sample_too_large", member=name[:300], bytes=sample["bytes"] + info.size,
                 max_sample_bytes=limits.max_sample_bytes)
        return None
    try:
        data = bounded_read(tar.extractfile(info), limits.max_member_bytes)
    except EntryProblem as p:
        _problem(sample, p.reason, member=name[:300], **p.detail)
        return None
    except STREAM_ERRORS as e:
        _problem(sample, "damaged_member", member=name[:300], error=f"{type(e).__name__}: {e}"[:200])
        raise
    sample["bytes"] += len(data)
    return data


def read_webdataset(path: str, spec: InputSpec, report: ShardReport,
                    limits: ReadSpec | None = None) -> Iterator[RawSample]:
    """img2dataset / WebDataset tars (plain, .gz, .bz2, .xz). Members group into samples by key (consecutive, as
    webdataset does); a key seen again later, a repeated member, a second image, an unsafe member name, a member
    that is a link or a device (never followed: it could point anywhere), a member without extension, a member
    or sample over its byte budget (not read), or a member cut off by a damaged tar makes that sample a recorded
    problem. Members that are not an image, caption or metadata are counted and not read."""
    limits = limits or ReadSpec()
    seen: dict[str, int] = {}
    current: RawSample | None = None
    index = 0

    def start(key: str, raw_name: str) -> RawSample:
        nonlocal index
        raw_key = _split_name(raw_name)[0] or raw_name
        sample: RawSample = {"source_key": key, "members": {}, "names": {}, "bytes": 0, "problem": None,
                             "problem_detail": None, "flags": ["name_not_utf8"] if key != raw_key else []}
        if _unsafe(raw_name):
            _problem(sample, "unsafe_name", name=escape_name(raw_name)[:300])
        elif key in seen:
            _problem(sample, "duplicate_key", first_index=seen[key])
        else:
            seen[key] = index
        index += 1
        return sample

    invalid: list[str] = []  # a garbage header that ended the archive early (tarfile says nothing)
    try:
        with open_binary(path) as stream, open_tar(stream, limits, invalid) as tar:
            for info in tar:
                tar.members = []  # tarfile keeps every header otherwise: memory would grow with the shard
                name = escape_name(info.name)  # '/' and '.' are never escaped: keys split as they would
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
                        yield _finish(current, report)
                    current = start(key, info.name)
                if not info.isreg():
                    _problem(current, "not_a_regular_file", member=name[:300], kind=_member_kind(info),
                             target=escape_name(info.linkname or "")[:300] or None)
                    continue
                if not ext:
                    _problem(current, "unsupported_file", member=name[:300], why="no extension")
                    continue
                if ext in current["members"]:
                    _problem(current, "duplicate_member", member=name[:300])
                    continue
                current["names"][ext] = name
                # Members the sample does not use are counted (in _finish), not read.
                current["members"][ext] = _read_member(tar, info, current, name, limits) if ext in USED_EXTS else None
            tail = tar.fileobj.tell() - tar.offset  # bytes of the header read that ended the archive
        if invalid:
            report.errors.append(f"damaged tar: {invalid[-1]} at byte {tar.offset}: the rest cannot be followed")
        elif tail == 0:
            report.errors.append("damaged tar: ends without an end-of-archive block (cut at a member boundary?)")
        elif tail < tarfile.BLOCKSIZE:
            report.errors.append(f"damaged tar: cut inside a member header ({tail} of 512 bytes)")
    except STREAM_ERRORS as e:
        # A tar cut off mid-stream: keep what was read. The member being read when it broke makes its sample a
        # `damaged_member` rejection (above); a header that cannot be read has no key, so it is a shard error.
        report.errors.append(f"damaged tar: {type(e).__name__}: {str(e)[:200]}")
    if current is not None:
        yield _finish(current, report)


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


def read_parquet(path: str, spec: InputSpec, report: ShardReport,
                 limits: ReadSpec | None = None) -> Iterator[RawSample]:
    """Parquet with image bytes (a binary column, or a struct with ``bytes`` as HF datasets writes) or paths.
    Paths are read only below the parquet's folder or ``input.allowed_roots``; a cell of the wrong type is that
    row's rejection, not the file's; an image (cell or file) over ``read.max_member_bytes`` is rejected."""
    import pyarrow.parquet as pq

    limits = limits or ReadSpec()
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
                            sample["image"] = _read_ref(ref, base, roots, limits.max_member_bytes)
                        if sample["image"] is not None and len(sample["image"]) > limits.max_member_bytes:
                            raise EntryProblem("member_too_large", column=column, bytes=len(sample["image"]),
                                               max_member_bytes=limits.max_member_bytes)
                    except EntryProblem as p:
                        _problem(sample, p.reason, **p.detail)
                    if sample["image"] is None:
                        _problem(sample, "no_image", column=column)
                    yield sample
    except Exception as e:  # unreadable or truncated parquet: the shard ends here, recorded
        report.errors.append(f"damaged parquet: {type(e).__name__}: {str(e)[:200]}")


def _read_ref(ref: str, base: str, roots: Roots, limit: int) -> bytes:
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
                return bounded_read(fh, limit)
        except EntryProblem as p:
            p.detail["path"] = ref[:300]
            raise
        except (OSError, ValueError) as e:
            raise EntryProblem("image_unreadable", path=ref[:300], error=str(e)[:200]) from None
    try:
        return read_local_file(target, limit)
    except EntryProblem as p:
        p.detail["path"] = ref[:300]
        raise


def read_folder(path: str, spec: InputSpec, report: ShardReport,
                limits: ReadSpec | None = None) -> Iterator[RawSample]:
    """A folder of images (sub-folders included; the key is the path below the folder), with optional sidecar
    ``NAME.txt`` captions and ``NAME.json`` metadata. Every entry is a sample or a sidecar of one: files that are
    not images, sidecars without an image, links that are broken or lead outside the allowed roots, pipes and
    devices, sub-folders that cannot be listed, and files over the byte budgets are rejections with their
    reason. ``a.jpg`` and ``a.png`` are two samples (the key keeps the extension), sharing ``a.txt``."""
    roots = Roots(path, spec.allowed_roots)
    yield from _walk_folder(path, "", roots, report, limits or ReadSpec())


def _walk_folder(root: str, rel: str, roots: Roots, report: ShardReport, limits: ReadSpec) -> Iterator[RawSample]:
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
            yield from _walk_folder(root, name, roots, report, limits)
            continue
        stem, dot, ext = entry.name.rpartition(".")
        ext = ext.lower() if dot and stem else ""
        if ext in SIDECAR_EXTS:
            if stem not in image_stems:
                yield _entry_sample(name, problem=("no_image", {"sidecar": escape_name(entry.name)}))
            continue
        if is_link and not roots.allows(entry.path):
            yield _entry_sample(name, problem=("path_outside_root", {
                "target": escape_name(os.readlink(entry.path))[:300], "roots": roots.shown()}))
            continue
        if ext not in IMAGE_EXTS:
            why = "no extension" if not ext else f".{ext} is not an image extension"
            if is_link and os.path.isdir(entry.path):
                yield _entry_sample(name, problem=("not_a_regular_file", {"kind": "link to a folder"}))
            else:
                yield _entry_sample(name, problem=("unsupported_file", {"name": escape_name(entry.name),
                                                                        "why": escape_name(why)}))
            continue
        sample = _entry_sample(name)
        try:
            sample["image"] = read_local_file(entry.path, limits.max_member_bytes)
        except EntryProblem as p:
            _problem(sample, p.reason, **p.detail)
            yield sample
            continue
        sample["text"] = _sidecar(folder, f"{stem}.txt", names, roots, sample, limits)
        sample["meta"] = _sidecar(folder, f"{stem}.json", names, roots, sample, limits)
        yield sample


def _entry_sample(name: str, problem: tuple[str, dict[str, Any]] | None = None) -> RawSample:
    key = escape_name(name)
    sample: RawSample = {"source_key": key, "problem": None, "problem_detail": None, "image": None, "text": None,
                         "meta": None, "flags": ["name_not_utf8"] if key != name else []}
    if problem:
        _problem(sample, problem[0], **problem[1])
    return sample


def _sidecar(folder: str, name: str, names: set[str], roots: Roots, sample: RawSample,
             limits: ReadSpec) -> bytes | None:
    """An image's ``.txt`` / ``.json``: None when absent; flagged when it cannot be read (the image is still
    good); over the byte budgets it makes the sample a rejection, as a tar member would."""
    if name not in names:
        return None
    full = os.path.join(folder, name)
    if os.path.islink(full) and not roots.allows(full):
        sample["flags"].append("sidecar_unreadable")
        return None
    try:
        data = read_local_file(full, limits.max_member_bytes)
    except EntryProblem as p:
        if p.reason == "member_too_large":
            _problem(sample, p.reason, member=escape_name(name)[:300], **p.detail)
        else:
            sample["flags"].append("sidecar_unreadable")
        return None
    total = len(sample["image"] or b"") + len(sample["text"] or b"") + len(data)
    if total > limits.max_sample_bytes:
        _problem(sample, "sample_too_large", member=escape_name(name)[:300], bytes=total,
                 max_sample_bytes=limits.max_sample_bytes)
        return None
    return data


FORMATS: dict[str, Reader] = {"webdataset": read_webdataset, "parquet": read_parquet, "folder": read_folder}


@dataclass
class InputShard:
    shard: str  # stable id, used in keys and output names
    path: str


def expand_inputs(cfg: PipelineConfig, label: str = "input.paths") -> list[InputShard]:
    """Input patterns -> shards (files, or folders for the folder format), in a stable order. ``label`` names
    the config key the patterns came from in an error."""
    from braceexpand import braceexpand

    want_dirs = cfg.input.format == "folder"
    paths: list[str] = []
    for pattern in cfg.input.paths:
        matches: list[str] = []
        for expanded in braceexpand(pattern):
            matches.extend(_glob(expanded if "://" in expanded else str(cfg.resolve_path(expanded)), want_dirs))
        if not matches:
            raise ConfigError(f"{label}: {pattern!r} matches no {'folder' if want_dirs else 'file'}")
        paths.extend(matches)
    paths = list(dict.fromkeys(paths))
    stems = Counter(_stem(p) for p in paths)
    shards = []
    for p in paths:
        sid = _stem(p)
        if stems[sid] > 1:  # same file name in two folders: disambiguate by path
            sid = f"{sid}-{hashlib.sha1(os.fsencode(p)).hexdigest()[:6]}"  # os.fsencode: names need not be UTF-8
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
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone "\udcff" escape: valid JSON, not text any UTF-8 writer accepts
        flags.append("json_invalid")
        return {}
    return value

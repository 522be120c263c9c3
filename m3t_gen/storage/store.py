"""Where a run's output lives: a local folder or any fsspec URL (``s3://bucket/prefix``, ``gs://...``).

Every file is written whole and becomes visible only complete: locally through a temporary name and a rename,
on object storage by one PUT (an object is never visible half-uploaded). Big files (tars) are built in a staging
file first (next to their final name locally, in a temporary folder for a remote output) and committed with
``commit``. Completion markers (``stats/*.json``, ``triplet_stats/*.json``) are written after the files they
vouch for, so a marker that exists means its files exist, whatever the storage.

Tools that work on a finished output (card, export, inspect, refilter) read a remote one through ``local_copy``.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, BinaryIO, Iterator

TMP = ".tmp"


def is_remote(location: str | os.PathLike) -> bool:
    return "://" in str(location)


class Store:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = str(root).rstrip("/") if is_remote(root) else str(Path(root))
        self.remote = is_remote(root)
        self._staging: str | None = None
        if self.remote:
            import fsspec

            self.fs, self._base = fsspec.core.url_to_fs(self.root)
        else:
            self.fs, self._base = None, self.root

    def __reduce__(self):  # ships to Ray workers as its root alone
        return (Store, (self.root,))

    # ---------------------------------------------------------------- names
    def url(self, rel: str = "") -> str:
        """The full location of ``rel``: a local path or a URL (what readers elsewhere open)."""
        if not rel:
            return self.root
        return f"{self.root}/{rel}" if self.remote else os.path.join(self.root, rel)

    def _path(self, rel: str) -> str:
        return posixpath.join(self._base, rel) if self.remote else os.path.join(self.root, rel)

    def local(self, rel: str = "") -> Path:
        assert not self.remote, "local() on a remote store"
        return Path(self._path(rel)) if rel else Path(self.root)

    # ---------------------------------------------------------------- reading
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel)) if self.remote else os.path.exists(self._path(rel))

    def read_bytes(self, rel: str) -> bytes:
        if self.remote:
            return self.fs.cat_file(self._path(rel))
        with open(self._path(rel), "rb") as fh:
            return fh.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def open(self, rel: str, mode: str = "rb") -> Any:
        return self.fs.open(self._path(rel), mode) if self.remote else open(self._path(rel), mode)

    def names(self, folder: str = "") -> list[str]:
        """Entry names directly in ``folder`` (sorted); [] when it does not exist."""
        if self.remote:
            try:
                found = self.fs.ls(self._path(folder) if folder else self._base, detail=False, refresh=True)
            except FileNotFoundError:
                return []
            return sorted(posixpath.basename(p.rstrip("/")) for p in found)
        path = self._path(folder) if folder else self.root
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def files(self, folder: str, suffix: str) -> list[str]:
        """``folder/NAME`` for each file in ``folder`` whose name ends with ``suffix`` (never temporaries)."""
        return [f"{folder}/{n}" for n in self.names(folder) if n.endswith(suffix) and not n.endswith(TMP)]

    def is_dir(self) -> bool:
        if self.remote:
            return bool(self.names())  # a prefix exists when something is under it
        return os.path.isdir(self.root)

    # ---------------------------------------------------------------- writing
    def makedirs(self, *folders: str) -> None:
        if self.remote:
            return  # object storage has no folders to make
        for folder in folders or ("",):
            os.makedirs(self._path(folder) if folder else self.root, exist_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.remote:
            self.fs.pipe_file(self._path(rel), data)
            return
        path = self._path(rel)
        tmp = path + TMP
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)

    def staging(self, rel: str) -> Path:
        """Where to build ``rel`` before ``commit``: its temporary name locally, a scratch file otherwise."""
        if not self.remote:
            return Path(self._path(rel) + TMP)
        if self._staging is None:
            self._staging = tempfile.mkdtemp(prefix="m3t-gen-staging-")
            # Gone with the store (or at exit): what is left there was never committed.
            weakref.finalize(self, shutil.rmtree, self._staging, True)
        path = Path(self._staging) / (rel.replace("/", "__") + TMP)
        return path

    def commit(self, rel: str) -> None:
        """Make the staged ``rel`` visible under its name (a rename, or one upload then the scratch file goes)."""
        staged = self.staging(rel)
        if self.remote:
            self.fs.put_file(str(staged), self._path(rel))
            staged.unlink()
        else:
            os.replace(staged, self._path(rel))

    def remove(self, rel: str) -> None:
        """Remove ``rel`` (a file, or a folder with all below it) if present."""
        if self.remote:
            path = self._path(rel)
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
            return
        path = self._path(rel)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)


def read_member(location: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of a local file or a URL (one ranged read on object storage)."""
    if "://" in location:
        import fsspec

        with fsspec.open(location, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)
    with open(location, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a local file whole: a temporary name, then a rename (readers never see it half-written)."""
    Store(path.parent).write_bytes(path.name, data)


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[Path]:
    """A temporary path to write a big local file into (streamed, not held in memory); renamed to ``path`` when
    the block ends without an error, removed otherwise."""
    tmp = Path(str(path) + TMP)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def local_copy(location: str | os.PathLike) -> Iterator[Path]:
    """A local folder holding the output at ``location``: the folder itself, or a download of a remote one
    (removed afterwards)."""
    if not is_remote(location):
        yield Path(location)
        return
    store = Store(location)
    if not store.exists("manifest.json") and not store.names():
        raise FileNotFoundError(f"{location}: nothing there")
    scratch = Path(tempfile.mkdtemp(prefix="m3t-gen-copy-"))
    try:
        store.fs.get(store._path(""), str(scratch) + "/", recursive=True)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def upload_tree(local: Path, location: str, names: list[str]) -> None:
    """Put ``names`` (files or folders under ``local``) to the remote output ``location``."""
    store = Store(location)
    for name in names:
        path = local / name
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file():
                    store.fs.put_file(str(f), store._path(f.relative_to(local).as_posix()))
        elif path.is_file():
            store.fs.put_file(str(path), store._path(name))


# ------------------------------------------------------------------------------------------------ one writer

LOCK_FILE = ".m3t-gen.lock"


class OutputBusy(Exception):
    """Another live process writes this output."""


def _holder(command: str) -> dict[str, Any]:
    import socket
    import time
    from datetime import datetime, timezone

    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "heartbeat": time.time()}


def _busy(where: str, holder: dict[str, Any]) -> OutputBusy:
    return OutputBusy(f"{where}: another m3t-gen {holder.get('command', 'run')} is writing this output (pid "
                      f"{holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}); "
                      "wait for it to finish, or use another --output")


class LocalLock:
    """An exclusive ``flock`` on ``OUT/.m3t-gen.lock``. The kernel drops it when its process ends however it ends
    (kill -9 included), so a crashed run never holds an output."""

    def __init__(self, store: Store, command: str = "run") -> None:
        self.path, self.command, self.fd = store.local(LOCK_FILE), command, None

    def acquire(self) -> "LocalLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise _busy(str(self.path.parent), holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder(self.command)).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


class ObjectLease:
    """Object storage has no locks: a lease object ``.m3t-gen.lock`` whose holder refreshes a heartbeat every
    ttl/4 seconds. Another run refuses while the heartbeat is younger than the ttl (``M3T_GEN_LEASE_SECONDS``,
    default 120), or while the holder, on this same host, is a live process; a holder killed on this host frees
    the output at once, one killed elsewhere after the ttl. (Two runs starting within one PUT of each other can
    both win: object stores without conditional writes cannot rule that out.)"""

    def __init__(self, store: Store, command: str = "run") -> None:
        import threading

        self.store, self.command = store, command
        self.ttl = float(os.environ.get("M3T_GEN_LEASE_SECONDS", "120"))
        self.stop = threading.Event()
        self.thread: Any = None
        self.mine: dict[str, Any] | None = None

    def _live(self, holder: dict[str, Any]) -> bool:
        import socket
        import time

        if holder.get("host") == socket.gethostname():
            import psutil

            return holder.get("pid") != os.getpid() and psutil.pid_exists(int(holder.get("pid", -1)))
        return time.time() - float(holder.get("heartbeat", 0)) < self.ttl

    def acquire(self) -> "ObjectLease":
        import threading

        if self.store.exists(LOCK_FILE):
            try:
                holder = json.loads(self.store.read_bytes(LOCK_FILE))
            except ValueError:
                holder = {}
            if self._live(holder):
                raise _busy(self.store.root, holder)
        self.mine = _holder(self.command)
        self.store.write_bytes(LOCK_FILE, json.dumps(self.mine).encode())
        self.thread = threading.Thread(target=self._beat, daemon=True, name="m3t-gen-lease")
        self.thread.start()
        return self

    def _beat(self) -> None:
        import time

        while not self.stop.wait(self.ttl / 4):
            self.mine["heartbeat"] = time.time()
            try:
                self.store.write_bytes(LOCK_FILE, json.dumps(self.mine).encode())
            except Exception:  # a missed beat only shortens the lease; the next one retries
                pass

    def release(self) -> None:
        if self.mine is None:
            return
        self.stop.set()
        self.thread.join()
        self.store.remove(LOCK_FILE)
        self.mine = None


def lock_output(store: Store, command: str = "run") -> LocalLock | ObjectLease:
    return (ObjectLease if store.remote else LocalLock)(store, command).acquire()


def iter_tar(path: Path | BinaryIO) -> Iterator[tuple[str, bytes | None, dict[str, Any]]]:
    """(key, JPEG bytes, KEY.json) for each sample of one tar (a path, or an open file read as a stream, e.g.
    from object storage), in tar order (members of a key are adjacent)."""
    key: str | None = None
    parts: dict[str, bytes] = {}

    def emit() -> Iterator[tuple[str, bytes | None, dict[str, Any]]]:
        if key is not None and "json" in parts:
            yield key, parts.get("jpg"), json.loads(parts["json"])

    import tarfile

    with (tarfile.open(fileobj=path, mode="r|") if hasattr(path, "read") else tarfile.open(path)) as tf:
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


def stale_fingerprints(store: Store, folder: str, field: str, expected: str) -> set[str]:
    """The fingerprints other than ``expected`` that a pass's completion markers (``folder/*.json``) record
    ("None" for an unreadable marker): work made from other inputs, never to be resumed or mixed in."""
    stale = set()
    for rel in store.files(folder, ".json"):
        try:
            recorded = json.loads(store.read_text(rel)).get(field)
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded != expected:
            stale.add(str(recorded))
    return stale

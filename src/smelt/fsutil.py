"""Atomic file writes: write to a temporary name in the same directory, then rename.

A reader never sees a half-written file: either the old content (or nothing) or the new one,
whatever happens to the writing process (exceptions, ``kill -9``). The rename is atomic on POSIX
file systems. Durability against power loss also needs an fsync before the rename; it costs
~3 ms per file here (a third of a small curation task), so it is on where losing the file is
expensive (checkpoints: ``fsync=True``) and otherwise follows ``SMELT_FSYNC=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

FSYNC = os.environ.get("SMELT_FSYNC", "0") == "1"


def maybe_fsync(fd: int, fsync: bool | None = None) -> None:
    if FSYNC if fsync is None else fsync:
        os.fsync(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", encoding: str | None = None,
                fsync: bool | None = None) -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit (fsync and) rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            maybe_fsync(f.fileno(), fsync)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    committed(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(staged(path).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# never destroy work: moving old outputs aside


def move_aside(path: str | Path, why: str = "") -> Path | None:
    """Rename ``path`` to the first free ``<name>.prev-<N>`` beside it; None when it does not exist.

    What a fresh start does with the previous output (checkpoints, curated data, token shards)
    instead of deleting it: a rename costs nothing, and only the user decides to delete."""
    import logging

    path = Path(path)
    m = _MIRROR if _MIRROR is not None and _MIRROR.covers(path) else None
    remote = m is not None and m.fs.exists(m.key(path))
    if not path.exists() and not remote:
        return None
    n = 1
    while (dest := path.with_name(f"{path.name}.prev-{n}")).exists() or (remote and m.fs.exists(m.key(dest))):
        n += 1
    if remote:  # the store first: a kill between the two leaves the local copy, a cache, to redo
        m.move(path, dest)
    if path.exists():
        os.replace(path, dest)
    logging.getLogger(__name__).warning("%s%smoved the previous %s aside to %s (delete it yourself when it is "
                                        "no longer needed)", why, ": " if why else "", path.name, dest)
    return dest


def set_aside(directory: str | Path) -> list[str]:
    """The ``*.prev-N`` copies `move_aside` left in ``directory`` (names, sorted)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if ".prev-" in p.name)


# --------------------------------------------------------------------------------------------
# one writer per run directory


LOCK_FILE = ".smelt.lock"


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory's lock."""


_held: dict[str, tuple[int, int]] = {}  # resolved lock path -> (fd, depth): re-entrant in one process


@contextlib.contextmanager
def run_lock(run_dir: str | Path, command: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``run_dir`` for the duration (``fcntl.flock`` on ``.smelt.lock``).

    The OS releases a flock when its process dies, so ``kill -9`` never leaves a stale lock (the
    file itself stays, holding the last holder's PID and command for the message). A second
    process fails at once with `RunDirLocked` naming the holder; the same process may nest
    (``smelt run`` takes it, then the stages it calls). Under ``torchrun`` only global rank 0
    locks: the other ranks are the same job."""
    import fcntl
    import sys

    run_dir = Path(run_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        yield run_dir
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_FILE
    key = str(lock_path.resolve())
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield run_dir
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        finally:
            os.close(fd)
        pid, _, cmd = holder.partition(" ")
        raise RunDirLocked(f"{run_dir} is in use by another smelt process (PID {pid or '?'}: {cmd or 'unknown'}); "
                           "wait for it to finish or stop it, then run again") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command or ' '.join(sys.argv)}\n".encode(), 0)
        remote = _remote_lock(run_dir, command)  # before registering: a refusal leaves nothing held
        _held[key] = (fd, 1)
        try:
            yield run_dir
        finally:
            if remote is not None:
                remote()
            del _held[key]
            if created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
                # nothing was written (e.g. a refused import): leave no empty directory behind
                lock_path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
    finally:
        os.close(fd)  # closing the only descriptor releases the flock


def _remote_lock(run_dir: Path, command: str) -> Callable[[], None] | None:
    """With a mirrored run directory, a lock object on the store (``.smelt.lock``: host, PID,
    command) that a driver on another machine refuses to run beside; returns its release.

    Object stores have no lock primitive that fsspec exposes on every backend, so this is a lease
    by convention, not a mutual exclusion: it stops the common mistake (the same job started on two
    machines), and a driver that died leaves it behind, to be deleted by hand (the message says
    where). On this machine the local ``flock`` already ruled out a live holder."""
    import socket
    import sys

    m = _MIRROR
    if m is None or not m.covers(run_dir):
        return None
    key = m.key(run_dir / LOCK_FILE)
    host = socket.gethostname()
    if m.fs.exists(key):
        holder = m.fs.cat_file(key).decode("utf-8", "replace").strip()
        h, _, rest = holder.partition(" ")
        if h != host:
            pid, _, cmd = rest.partition(" ")
            raise RunDirLocked(f"{m.url} is in use by smelt on {h} (PID {pid or '?'}: {cmd or 'unknown'}); wait "
                               f"for it to finish or stop it; if that process is gone, delete {m.url}/{LOCK_FILE} "
                               "and run again")
    if url_protocol(m.url) not in OBJECT_STORES:
        m.fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
    m.fs.pipe_file(key, f"{host} {os.getpid()} {command or ' '.join(sys.argv)}\n".encode())

    def release() -> None:
        with contextlib.suppress(Exception):
            m.fs.rm(key)

    return release


# --------------------------------------------------------------------------------------------
# disk full, permissions: one sentence instead of a traceback

_OS_ADVICE = {
    "ENOSPC": "the disk is full: free space (or point runs_dir at a larger disk) and run the same command again; "
              "it resumes where it stopped",
    "EDQUOT": "the disk quota is exceeded: free space and run the same command again; it resumes where it stopped",
    "EACCES": "permission denied: make it writable by this user (or choose another runs_dir) and run again",
    "EPERM": "operation not permitted: check the owner and permissions of that path and run again",
    "EROFS": "the file system is read-only: choose a writable runs_dir and run again",
}


def describe_os_error(e: BaseException) -> str | None:
    """One sentence naming the path and what to do for disk-full and permission errors; None for
    any other error (those keep their own message)."""
    import errno

    if not isinstance(e, OSError) or e.errno is None:
        return None
    advice = _OS_ADVICE.get(errno.errorcode.get(e.errno, ""))
    if advice is None:
        return None
    where = e.filename if e.filename is not None else "a file in the run directory"
    return f"cannot write {where}: {advice}"


def locked(command: str, where: Any) -> Any:
    """Decorator: run the function under `run_lock` on ``where(arguments)``, a function of its
    bound arguments (by name) returning the run directory."""
    import functools
    import inspect

    def deco(fn: Any) -> Any:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            with run_lock(where(bound.arguments), command):
                return fn(*args, **kwargs)

        return wrapper

    return deco


# --------------------------------------------------------------------------------------------
# run directories on object stores: a local stage, mirrored file by file


# Filesystems where one upload is all-or-nothing (a PUT, or a multipart upload that appears only
# when completed): an object is written in place. Elsewhere (file://, sftp, ...) an upload goes
# to a temp name first and is renamed, as `atomic_open` does locally.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "hf", "oss", "r2"})


def url_protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def stage_base() -> Path:
    """Where this machine keeps local copies of remote things: ``$SMELT_STAGE_DIR``, default
    ``~/.cache/smelt/stage``."""
    return Path(os.environ.get("SMELT_STAGE_DIR") or Path.home() / ".cache" / "smelt" / "stage")


def stage_root(runs_url: str) -> Path:
    """The local directory that stands for the remote ``runs_url`` on this machine:
    ``$SMELT_STAGE_DIR`` (default ``~/.cache/smelt/stage``) / a hash of the URL. The same path on
    every machine of a cluster that shares the user and the variable, so task plans that name files
    by path hold on every node."""
    import hashlib

    return stage_base() / hashlib.sha256(runs_url.rstrip("/").encode()).hexdigest()[:16]


class RunMirror:
    """A run directory at an fsspec URL (``s3://bucket/runs/demo``), worked on through a local
    copy, the *stage* (`stage_root`): the stages read and write local files as always, and

    * every file committed locally (`atomic_open`, a shard writer's rename) is uploaded at once
      (`committed`), in the process that wrote it: a task's outputs are on the store before the
      driver writes that task's completion marker, which is itself uploaded last;
    * a file a task reads is checked against the store first (`staged`): downloaded when this
      machine lacks it or holds another version (size or modification time differ: a leftover
      of an earlier run on this node), removed when the store no longer has it. So a task runs on
      any node, and a driver on a new machine resumes from the store's markers.

    Each object is written once, whole: one PUT, or temp name + rename off object stores. Nothing
    on the store is ever half-written, and a task is done only when its marker is there. A local
    copy carries the object's modification time (`_store_us`), which is how versions are told
    apart; files this process uploaded or verified are remembered and not asked about again.
    Picklable (the filesystem object is rebuilt in each process; ``memory://`` stores live in one
    process, so a task sent elsewhere refuses them)."""

    def __init__(self, url: str, local: str | Path, owner_pid: int | None = None) -> None:
        self.url = url.rstrip("/")
        self.local = Path(local).absolute()
        self.owner_pid = os.getpid() if owner_pid is None else owner_pid
        self._fs: Any = None
        self._root = ""
        self._fresh: set[str] = set()  # local paths known to match the store

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "local": self.local, "owner_pid": self.owner_pid}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["local"], state["owner_pid"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"RunMirror({self.url!r}, local={str(self.local)!r})"

    @property
    def fs(self) -> Any:
        if self._fs is None:
            if url_protocol(self.url) == "memory" and os.getpid() != self.owner_pid:
                raise RemoteStoreError(f"{self.url}: a memory:// store lives in one process, and this task runs in "
                                       "another; run with workers: 1 and the local executor, or use a shared store")
            self._fs, self._root = open_filesystem(self.url)
            self._root = self._root.rstrip("/")
        return self._fs

    def covers(self, path: str | Path) -> bool:
        return Path(path).absolute().is_relative_to(self.local)

    def key(self, path: str | Path) -> str:
        """The store path of a local path under the stage."""
        _ = self.fs  # sets self._root
        rel = Path(path).absolute().relative_to(self.local).as_posix()
        return self._root if rel == "." else f"{self._root}/{rel}"

    def exists(self, path: str | Path) -> bool:
        return bool(self.fs.exists(self.key(path)))

    def _info(self, key: str) -> dict[str, Any] | None:
        """The store's metadata of a file; None when there is none. Any other error (network,
        credentials, throttling) propagates: a store that cannot answer must not read as empty."""
        try:
            info = self.fs.info(key)
        except FileNotFoundError:
            return None
        return info if info.get("type", "file") == "file" else None

    @staticmethod
    def _matches(path: Path, info: dict[str, Any]) -> bool:
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        stamp = _store_us(info)
        return st.st_size == int(info.get("size") or 0) and (stamp is None or st.st_mtime_ns // 1000 == stamp)

    def fetch(self, path: str | Path) -> bool:
        """Make the local copy of `path` (a file) the store's: kept when it matches (size and
        modification time), downloaded when missing or different, removed when the store has no
        such file. True when the file exists afterwards."""
        path = Path(path).absolute()
        if str(path) in self._fresh and path.is_file():
            return True
        info = self._info(self.key(path))
        if info is None:
            path.unlink(missing_ok=True)  # a leftover: the store is what is true
            self._fresh.discard(str(path))
            return False
        if not self._matches(path, info):
            self._download(path, info)
        self._fresh.add(str(path))
        return True

    def _download(self, path: Path, info: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            self.fs.get_file(self.key(path), tmp)
            os.chmod(tmp, 0o644)
            _set_mtime(tmp, _store_us(info))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def upload(self, path: str | Path) -> None:
        key = self.key(path)
        fs = self.fs
        parent = key.rsplit("/", 1)[0]
        if url_protocol(self.url) in OBJECT_STORES:
            fs.put_file(str(path), key)
        else:
            fs.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/.{key.rsplit('/', 1)[-1]}.{os.getpid()}.upload.tmp"
            try:
                fs.put_file(str(path), tmp)
                fs.mv(tmp, key)
            except BaseException:
                with contextlib.suppress(Exception):
                    fs.rm(tmp)
                raise
        # the local copy takes the object's modification time: stage keys fingerprint files by
        # (size, mtime), and every machine then sees the same pair for the same object
        info = self._info(key)
        if info is not None:
            _set_mtime(path, _store_us(info))
            self._fresh.add(str(Path(path).absolute()))

    def files(self, directory: str | Path) -> dict[str, dict[str, Any]]:
        """The store's files under `directory` (a local path): relative POSIX path -> metadata."""
        key = self.key(directory)
        try:
            found = self.fs.find(key, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for p, info in found.items():
            p = p.rstrip("/")
            if info.get("type", "file") == "file" and p.startswith(key + "/"):
                out[p[len(key) + 1:]] = info
        return out

    def pull(self, directory: str | Path) -> int:
        """Make the local `directory` the store's: download the files this machine lacks or holds
        in another version, remove local files the store does not have (leftovers of an earlier
        run; temp files are left to their writers). Returns how many were downloaded."""
        directory = Path(directory).absolute()
        remote = {rel: info for rel, info in self.files(directory).items()
                  if not any(part.startswith(".") for part in rel.split("/"))}
        n = 0
        for rel, info in remote.items():
            local = directory / rel
            if not self._matches(local, info):
                self._download(local, info)
                n += 1
            self._fresh.add(str(local))
        if directory.is_dir():
            for f in directory.rglob("*"):
                rel = f.relative_to(directory).as_posix()
                if f.is_file() and rel not in remote and not any(x.startswith(".") for x in rel.split("/")):
                    f.unlink()
                    self._fresh.discard(str(f))
        return n

    def move(self, src: str | Path, dst: str | Path) -> None:
        """Move a file or directory on the store (an object store copies, then deletes: the copy
        is complete before anything goes)."""
        s, d = self.key(src), self.key(dst)
        if self.fs.exists(s):
            self.fs.mv(s, d, recursive=True)
        self._fresh.clear()

    def remove(self, path: str | Path) -> None:
        """Delete `path` (a file or directory) on the store: only intermediate files of a finished stage."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.key(path), recursive=True)
        self._fresh.clear()


def _store_us(info: dict[str, Any]) -> int | None:
    """An object's modification time in microseconds from its fsspec metadata (the field differs
    per backend: ``mtime`` local, ``LastModified`` s3, ``updated`` gcs, ``last_modified`` azure,
    ``created`` memory); None when the backend gives none (then sizes alone tell versions apart)."""
    import datetime as dt

    for k in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(k)
        if v is None:
            continue
        if isinstance(v, str):
            try:
                v = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(v, dt.datetime):
            if v.tzinfo is None:
                v = v.replace(tzinfo=dt.UTC)
            return int(round(v.timestamp() * 1e6))
        if isinstance(v, (int, float)):
            return int(round(float(v) * 1e6))
    return None


def _set_mtime(path: str | Path, us: int | None) -> None:
    if us is not None:
        os.utime(path, ns=(us * 1000, us * 1000))


def open_filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of `url`; `RemoteStoreError` naming the package to
    install when the protocol's filesystem is not installed (s3fs, gcsfs, adlfs, ...)."""
    try:
        from fsspec.core import url_to_fs

        return url_to_fs(url)
    except ImportError as e:
        raise RemoteStoreError(f"{url}: {e}") from None
    except ValueError as e:  # unknown protocol
        raise RemoteStoreError(f"{url}: {e}") from None


class RemoteStoreError(RuntimeError):
    """A remote run directory cannot be used (missing filesystem package, unknown protocol)."""


_MIRROR: RunMirror | None = None  # this process's: one run directory per smelt process


def active_mirror() -> RunMirror | None:
    return _MIRROR


@contextlib.contextmanager
def mirroring(mirror: RunMirror | None) -> Iterator[RunMirror | None]:
    """Mirror the run directory's writes to, and reads from, `mirror` for the duration (None: no-op)."""
    global _MIRROR
    before = _MIRROR
    _MIRROR = mirror if mirror is not None else before
    try:
        yield mirror
    finally:
        _MIRROR = before


def committed(path: str | Path) -> None:
    """Called by every writer after its local rename: upload the file when a run directory on a
    store covers it."""
    m = _MIRROR
    if m is not None and m.covers(path):
        m.upload(path)


def staged(path: str | Path) -> Path:
    """`path`, first made the store's version when a mirrored run directory covers it
    (`RunMirror.fetch`: a task on another node, a driver resuming on a new machine, a leftover of
    an earlier run on this one)."""
    path = Path(path)
    m = _MIRROR
    if m is not None and m.covers(path):
        m.fetch(path)
    return path


def pull(directory: str | Path) -> None:
    """`RunMirror.pull` when a mirrored run directory covers `directory`; else nothing."""
    m = _MIRROR
    if m is not None and m.covers(directory):
        m.pull(directory)


class Mirrored:
    """A task function that runs under a mirror in whatever process (or node) it is sent to."""

    def __init__(self, fn: Any, mirror: RunMirror) -> None:
        self.fn, self.mirror = fn, mirror

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with mirroring(self.mirror):
            return self.fn(*args, **kwargs)


def mirrored(fn: Any) -> Any:
    """`fn` wrapped in `Mirrored` when this process mirrors a run directory; else `fn` itself."""
    return Mirrored(fn, _MIRROR) if _MIRROR is not None else fn


def remove_path(path: str | Path) -> None:
    """Delete a file or directory a stage itself wrote and no longer needs (its intermediate
    ``_work``, a stale marker), here and, when mirrored, on the store."""
    import shutil

    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    m = _MIRROR
    if m is not None and m.covers(path):
        m.remove(path)


def activate_mirror(mirror: RunMirror | None) -> None:
    """Mirror this whole process's run directory (the CLI, for a `runs_dir` URL)."""
    global _MIRROR
    _MIRROR = mirror

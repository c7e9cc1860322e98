"""A run directory is data: checked before use, written without following links, locked.

Run directories are handed around (copied, unpacked from an archive, received from a
colleague), so nothing in one is trusted to be what its name says:

* :func:`check_run_dir` refuses a symbolic link anywhere inside a run directory (config,
  metrics, samples, events, checkpoints, each step folder and file): a write, an append or
  orbax's clean-up of old checkpoints would otherwise land on the link's target, outside the
  run. The run directory itself may be reached through links (e.g. ``runs/`` on a scratch disk).
* :func:`atomic_write` is the one way a run-directory file is written: a new temporary file
  beside it (created exclusively, so never a link's target), then ``os.replace``, which swaps
  names and never writes through a link; a path that is a link is refused.
  :func:`open_append` opens a log for appending with ``O_NOFOLLOW``.
* :func:`claim_output_dir` lets a command write a new run only into a missing or empty folder,
  or one that already is a tfm-jax run (it has ``config.yaml`` or the lock file) -- never into
  someone's other folder.
* :class:`RunLock` holds an exclusive ``fcntl.flock`` on ``<run>/.tfm-jax.lock`` for as long as
  a process trains into the run: a second process stops with one line naming the first one's
  pid. The kernel drops the lock when its process exits, however it exits (crash, kill -9,
  power loss of a local disk), so a lock file left behind never blocks a later run: only a
  live process holds the lock. (On a network file system without ``flock`` support the lock
  may not be exclusive across machines.)

Errors are :class:`RunDirError` (a :class:`~tfm_jax.core.errors.DataError`): one line, exit 2.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from typing import IO, Optional, Union

from tfm_jax.core.errors import DataError

LOCK_NAME = ".tfm-jax.lock"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class RunDirError(DataError):
    """A run directory that cannot be used as it is (a link inside it, a folder that is not a
    run, another process using it); the message says what to do."""


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _link_error(link: pathlib.Path, run_dir: pathlib.Path) -> RunDirError:
    return RunDirError(
        f"{link} is a symbolic link inside the run directory {run_dir}: a run directory holds "
        f"only its own files and folders (a write or a checkpoint clean-up would follow the "
        f"link outside it). Replace it with a real file or folder, e.g. copy the run with "
        f"'cp -rL', or use another run directory")


def check_run_dir(run_dir: Union[str, os.PathLike]) -> None:
    """RunDirError if any entry inside ``run_dir`` (at any depth) is a symbolic link; nothing
    to check if the folder does not exist yet."""
    root = pathlib.Path(run_dir)
    if not root.is_dir():
        return
    for parent, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:          # os.walk lists a link to a folder under dirs
            p = pathlib.Path(parent) / name
            if p.is_symlink():
                raise _link_error(p, root)


def atomic_write(path: Union[str, os.PathLike], data: Union[bytes, str],
                 mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` whole or not at all, without following links: a temporary
    file created exclusively beside it, flushed, then ``os.replace``. RunDirError if ``path``
    is a symbolic link."""
    path = pathlib.Path(path)
    if path.is_symlink():
        raise _link_error(path, path.parent)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def open_append(path: Union[str, os.PathLike]) -> IO[str]:
    """``path`` opened for appending text (created if missing), refusing a symbolic link."""
    path = pathlib.Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
    except OSError as err:
        if path.is_symlink():
            raise _link_error(path, path.parent) from None
        raise RunDirError(f"{path}: cannot open for appending: {err.strerror}") from None
    return os.fdopen(fd, "a")


def is_run_dir(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a folder a tfm-jax command wrote (its ``config.yaml`` or lock file)."""
    p = pathlib.Path(path)
    return p.is_dir() and any((p / n).is_file() and not (p / n).is_symlink()
                              for n in ("config.yaml", LOCK_NAME))


def claim_output_dir(path: Union[str, os.PathLike], what: str) -> None:
    """RunDirError unless ``path`` is missing, an empty folder, or a tfm-jax run directory
    (then also :func:`check_run_dir`): ``what`` (e.g. ``--out``) names the setting."""
    p = pathlib.Path(path)
    if p.is_symlink() and not p.exists():
        raise RunDirError(f"{what} {p}: a dangling symbolic link; choose another directory")
    if not p.exists():
        return
    if not p.is_dir():
        raise RunDirError(f"{what} {p}: exists and is not a folder; choose another directory")
    if any(p.iterdir()) and not is_run_dir(p):
        raise RunDirError(f"{what} {p}: an existing folder that is not a tfm-jax run (no "
                          f"config.yaml); a run is never written into another folder's files. "
                          f"Choose a new or empty directory")
    check_run_dir(p)


class RunLock:
    """Exclusive lock on a run directory (module doc): ``with RunLock(run_dir): ...``."""

    def __init__(self, run_dir: Union[str, os.PathLike]):
        self.run_dir = pathlib.Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:                   # not POSIX: no lock (documented)
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
        except OSError:
            if self.path.is_symlink():
                raise _link_error(self.path, self.run_dir) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise RunDirError(
                f"run directory {self.run_dir} is in use by another tfm-jax process (pid "
                f"{holder}, lock {self.path}); wait for it to finish, or use another run "
                f"directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

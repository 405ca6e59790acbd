"""Atomic file writes (a temporary file renamed over the target), and storage failures (full disk, quota, I/O
error, read-only directory) as one :class:`StorageError` naming the file and the cause.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "I/O error",
    errno.EACCES: "permission denied",
    errno.EROFS: "read-only file system",
    errno.EPERM: "operation not permitted",
}
_FIXES = {
    errno.ENOSPC: "free space", errno.EDQUOT: "free space or raise the quota",
    errno.EIO: "check the disk", errno.EACCES: "make the run directory writable",
    errno.EROFS: "make the run directory writable", errno.EPERM: "make the run directory writable",
}
LOW_SPACE_BYTES = 4 << 20  # torch.save hides the OSError of a full disk; less free space than this means ENOSPC


class StorageError(RuntimeError):
    """Writing ``path`` failed for a reason of the storage (``errno`` one of :data:`STORAGE_ERRNOS`).

    Attributes:
        path: The file being written.
        errno: The cause (``errno.ENOSPC``...), or None when only torch's message is known.
        detail: The underlying message.
        kept: What survived (e.g. the newest loadable checkpoint), filled in by whoever knows it.
    """

    def __init__(self, path: str | os.PathLike, errno_: int | None, detail: str = "", kept: str | None = None) -> None:
        super().__init__(path, errno_, detail)
        self.path, self.errno, self.detail, self.kept = Path(path), errno_, detail, kept

    @property
    def reason(self) -> str:
        if self.errno in STORAGE_ERRNOS:
            return STORAGE_ERRNOS[self.errno]
        return f"write failed ({self.detail})" if self.detail else "write failed"

    def __str__(self) -> str:
        fix = _FIXES.get(self.errno, "fix the storage")
        kept = f"; {self.kept}" if self.kept else ""
        then = " to resume" if self.kept and self.kept.startswith("kept") else ""
        return f"{self.reason} writing {self.path}{kept}; {fix} and rerun the same command{then}"


def storage_errno(error: BaseException) -> int | None:
    """The storage errno of ``error`` or of an exception it was raised from, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return error.errno
        error = error.__cause__ or error.__context__
    return None


def as_storage_error(error: BaseException, path: str | os.PathLike) -> StorageError | None:
    """``error`` raised while writing ``path`` as a :class:`StorageError`, or None. torch.save reports a failed
    write without the OSError; then the directory's free space decides whether the disk was full.
    """
    if isinstance(error, StorageError):
        return error
    code = storage_errno(error)
    if code is not None:
        return StorageError(path, code, str(error))
    text = str(error)
    if isinstance(error, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return StorageError(path, errno.ENOSPC if free_bytes(Path(path).parent) < LOW_SPACE_BYTES else None, first)
    return None


def free_bytes(directory: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use in ``directory`` (of its nearest existing ancestor)."""
    directory = Path(directory)
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        stats = os.statvfs(directory)
    except OSError:
        return shutil.disk_usage(directory).free
    return stats.f_bavail * stats.f_frsize


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> Path:
    """Calls ``write(file)`` on a temporary file beside ``path``, then renames it over ``path`` (with a plain
    ``open()``'s permissions, so lab-mates can read it).

    Raises:
        StorageError: the storage failed; nothing is left behind and an existing ``path`` is untouched.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        storage = as_storage_error(error, path) if isinstance(error, Exception) else None
        if storage is not None and storage is not error:
            raise storage from error
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))

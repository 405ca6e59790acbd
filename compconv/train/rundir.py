"""One writer per run directory: an exclusive ``fcntl.flock`` on ``<run_dir>/.run.lock`` for the run's life.
The kernel drops it when the process dies, so a dead run's lock is taken over (its record is reported); where
the filesystem refuses flock, the run goes on unlocked with a warning (docs/training.md).
"""

from __future__ import annotations

import atexit
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

_logger = logging.getLogger("compconv.train")
LOCK_NAME = ".run.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirInUseError(RuntimeError):
    """Another live process holds the run directory."""


class RunDirLock:
    """The exclusive lock of one run directory, held by this process until :meth:`release` or exit."""

    def __init__(self, run_dir: Path, handle, record: dict) -> None:
        self.run_dir, self._handle, self.record = run_dir, handle, record

    @property
    def held(self) -> bool:
        return self._handle is not None

    def release(self) -> None:
        """Empties the record (a clean end leaves nothing to take over) and drops the lock."""
        if self._handle is None:
            return
        try:
            self._handle.truncate(0)
            self._handle.flush()
        except OSError:
            pass  # a full disk must not stop the release; the kernel drops the flock on close
        self._handle.close()
        self._handle = None
        _held.pop(_key(self.run_dir), None)


_held: dict[str, RunDirLock] = {}  # this process's locks, by resolved run directory


def _key(run_dir: Path) -> str:
    return os.path.realpath(run_dir)


def describe_holder(record: dict) -> str:
    """``pid N on host H since T (command)`` from a lock record."""
    command = record.get("command") or "unknown command"
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')} since {record.get('started', '?')} "
            f"({command})")


def _read_record(handle) -> dict:
    handle.seek(0)
    text = handle.read()
    if not text.strip():
        return {}
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "started": "?", "command": f"unreadable lock record {text[:60]!r}"}
    return record if isinstance(record, dict) else {}


def lock_run_dir(run_dir: str | os.PathLike, command: str | None = None) -> RunDirLock:
    """Takes the exclusive lock of ``run_dir`` (created if missing) for this process.

    Args:
        run_dir: The run directory.
        command: What to record as the holder's command (default: this process's ``sys.argv``).

    Returns:
        The lock; it is released at :meth:`RunDirLock.release`, at interpreter exit, or by the kernel
        when the process dies.

    Raises:
        RunDirInUseError: another live process holds it; the message names that process and the fix.
    """
    run_dir = Path(run_dir)
    held = _held.get(_key(run_dir))
    if held is not None and held.held:
        return held
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    handle = open(path, "a+")  # never truncates: the holder's record stays readable until we hold the lock
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        record = _read_record(handle)
        handle.close()
        raise RunDirInUseError(
            f"run directory {run_dir} is in use by {describe_holder(record)}; wait for it, or pass another "
            "hydra.run.dir") from None
    except OSError as error:
        if error.errno not in _UNSUPPORTED:
            handle.close()
            raise
        _logger.warning("run directory %s is not locked: its filesystem does not support flock (%s); make sure "
                        "no other run uses it", run_dir, error.strerror)
        handle.close()
        lock = RunDirLock(run_dir, None, {})
        return lock
    previous = _read_record(handle)
    if previous:
        _logger.warning("run directory %s: taking over the lock left by %s, which is no longer running",
                        run_dir, describe_holder(previous))
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": command if command is not None else " ".join(["python", *sys.argv])}
    handle.seek(0)
    handle.truncate(0)
    handle.write(json.dumps(record) + "\n")
    handle.flush()
    lock = RunDirLock(run_dir, handle, record)
    _held[_key(run_dir)] = lock
    atexit.register(lock.release)
    return lock

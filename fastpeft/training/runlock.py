"""One training run per output folder: an advisory `fcntl.flock` on `OUT/.fastpeft.lock`.

The lock file holds the holder's pid, host and start time (JSON).  A second run on the folder fails at
once with `RunLockedError` naming the holder.  The kernel drops a flock when its holder dies, so a lock
file whose content names a process but is not locked is stale (the holder was killed): it is taken over
with a warning.  A lock still held by a pid that no longer exists on this host (a forked child kept the
file open) is taken over too, by replacing the file.  On release the file is emptied, not removed
(removing a lock file races with a process that has opened but not yet locked it).  Where `fcntl` is
missing (Windows) no lock is taken.  The lock is re-entrant within a process (the CLI takes it before
loading the model, `Trainer.train` takes it again).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Callable

LOCK_NAME = ".fastpeft.lock"
_HELD: dict[str, "RunLock"] = {}


class RunLockedError(RuntimeError):
    """Another live run holds the output folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read().strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    started = holder.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) \
        else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{when}"


class RunLock:
    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.fd: int | None = None
        self.count = 0

    def _try(self) -> bool:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def acquire(self, warn: Callable[[str], None]) -> None:
        host = socket.gethostname()
        if not self._try():
            holder = _read_holder(self.path)
            pid = holder.get("pid")
            if holder.get("host") == host and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
                # held by an orphan that inherited the file: start a fresh lock file
                tmp = f"{self.path}.{os.getpid()}"
                open(tmp, "w").close()
                os.replace(tmp, self.path)
                warn(f"taking over the lock of {self.folder} from {_describe(holder)}, which is no longer running")
                if not self._try():
                    raise RunLockedError(f"{self.folder} is in use by {_describe(_read_holder(self.path))} "
                                         f"(lock file {self.path}); wait for it to finish or choose another --out")
            else:
                raise RunLockedError(f"{self.folder} is in use by {_describe(holder)} (lock file {self.path}); "
                                     f"wait for that run to finish or choose another --out")
        else:
            holder = _read_holder(self.path)
            if holder.get("pid") not in (None, os.getpid()):
                warn(f"taking over the stale lock of {self.folder} left by {_describe(holder)}, which is no "
                     f"longer running")
        data = json.dumps({"pid": os.getpid(), "host": host, "started": time.time()}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def acquire_run_lock(folder: str, warn: Callable[[str], None]) -> RunLock | None:
    """Lock `folder` for this process (re-entrant); `RunLockedError` when another live run holds it.
    Release with `release_run_lock`."""
    try:
        import fcntl  # noqa: F401
    except ImportError:
        return None
    key = os.path.realpath(folder)
    lock = _HELD.get(key)
    if lock is None:
        lock = RunLock(folder)
        lock.acquire(warn)
        _HELD[key] = lock
    lock.count += 1
    return lock


def release_run_lock(lock: RunLock | None) -> None:
    if lock is None:
        return
    lock.count -= 1
    if lock.count <= 0:
        lock.release()
        _HELD.pop(os.path.realpath(lock.folder), None)

"""The store's writer lock: ``StoreLock`` (an exclusive ``flock`` on ``STORE.lock``, plus who holds it) and
``describe_holder``, which words the holder for the refusal message.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import sys
from pathlib import Path

from engine.store_format import StoreError, StoreLocked, _now, lock_path


# --------------------------------------------------------------------------------------------- lock
class StoreLock:
    """Exclusive writer lock: ``flock`` on ``STORE.lock`` plus who holds it (JSON), for the refusal message.

    ``flock`` is released by the kernel when the holding process dies, however it dies, so a lock file left by
    a killed run never blocks the next one (its stale content is reported and replaced).
    """

    def __init__(self, store: str | Path):
        self.store = Path(store)
        self.path = lock_path(store)
        self.fd: int | None = None
        self.stale: dict | None = None     # what a dead previous holder had written, if anything

    def acquire(self, command: str = "") -> "StoreLock":
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_fd(fd)
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise StoreError(f"{self.store}: cannot lock {self.path}: {exc}") from None
                raise StoreLocked(f"{self.store}: another run is writing this store ({describe_holder(holder)}); "
                                  f"wait for it to finish or stop it") from None
            # The holder may have unlinked the file between our open and flock: lock the file that is there.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.stale = _read_fd(fd) or None
            info = {"pid": os.getpid(), "host": platform.node(), "started": _now(),
                    "command": command or " ".join(sys.argv)}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
            except OSError:
                os.close(fd)
                raise
            self.fd = fd
            return self
        raise StoreError(f"{self.store}: could not take the lock {self.path} (it keeps being replaced)")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)   # unlink while still holding it: nobody can lock a stale inode
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _read_fd(fd: int) -> dict:
    try:
        text = os.pread(fd, 65536, 0).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}, "
            f"command: {holder.get('command', '?')}")

"""An exclusive, crash-safe lock on a feature store, held by the run that writes it.

``fcntl.flock`` on ``<store>/.medfeat.lock``: the kernel drops the lock when the holding
process dies, SIGKILL included, so a killed run never leaves a stale lock. A second writer
gets a one-line :class:`~medfeat.errors.StoreError` naming the holder instead of
interleaving its writes. Readers (``store info``, probes) take no lock: chunk files are
replaced atomically, so they see whole chunks.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import TracebackType

from medfeat.errors import StoreError, os_error_reason

LOCK_NAME = ".medfeat.lock"


class StoreLock:
    """Context manager: ``with StoreLock(path): ...`` holds the store's write lock."""

    def __init__(self, store_path: str | Path) -> None:
        self.path = Path(store_path) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> StoreLock:
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only file system, no permission, a full disk
            raise StoreError(f"{self.path.parent}: cannot take the store's write lock "
                             f"({os_error_reason(exc)})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise StoreError(f"{self.path.parent}: store is in use by another run ({holder}); "
                             "wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "since": time.time()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, et: type | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} since {since}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"

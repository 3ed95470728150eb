"""One exclusive lock between processes: ``flock`` on a lock file (issue 20, rule 3: concurrent writers never lose
each other's work).

Used by the embedding checkpoints (one run per checkpoint directory) and by in-place rewrites of a store's table
(two ``hopt-st embed`` runs on one store take turns, and each re-reads what the other wrote before writing). The
lock is released when :meth:`FileLock.release` is called or when the process dies (the kernel drops it), so a
killed run never leaves a store locked. The lock file names its holder; with ``cleanup`` it is deleted on
release, and a process that locked a file deleted meanwhile (its path now names another file, or none) notices
and locks again, so two holders never coexist.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


class FileLock:
    """An exclusive ``flock`` on ``path``, waited for up to ``timeout`` seconds (then ``TimeoutError``).

    Parameters
    ----------
    path
        The lock file (created if missing).
    timeout
        Seconds to wait for another holder.
    busy
        ``busy(holder) -> str``: the ``TimeoutError`` message, given what the lock file says about its holder.
    cleanup
        Delete the lock file on release (nothing is left beside what was locked).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        timeout: float,
        busy: Callable[[str], str] | None = None,
        *,
        cleanup: bool = False,
    ):
        self.path, self.timeout, self._fd, self.cleanup = Path(path), float(timeout), None, cleanup
        self.busy = busy or (lambda holder: f"{str(self.path)!r} is locked by {holder}.")

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock, say so once
            logger.debug("no fcntl on this platform: %s is not locked", self.path)
            return
        deadline = time.monotonic() + self.timeout
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise TimeoutError(self.busy(holder)) from None
                time.sleep(0.05)
                continue
            if self._still_the_file(fd):
                break
            os.close(fd)  # the holder before us deleted it: lock the file now at that path
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self._fd = fd

    def _still_the_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        if self._fd is not None:
            if self.cleanup:
                try:
                    self.path.unlink()  # while still locked: a waiter then sees a deleted file and retries
                except FileNotFoundError:
                    pass
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

"""One run per `--out` folder at a time.

Two drivers in the same folder (two `lesa train`, or `--resume latest` while the run still goes)
would open two MLflow runs, write run.json and metrics.json for different runs and discard each
other's ledger lines. The driver therefore holds an exclusive `flock` on `OUT/.lock` for the whole
run. The kernel drops it when the process ends, however it ends, so a SIGKILLed or crashed run
never leaves the folder locked; the pid in the file only tells the next caller whom to look for.
On a network filesystem flock is as reliable as that filesystem's locking (NFSv4 and Lustre honour it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from trainer.config import ConfigError
from trainer.run_folder import LOCK_FILE


@contextlib.contextmanager
def hold(out: Path) -> Iterator[None]:
    """Hold the lock of `out` (an existing folder) while the block runs; ConfigError (exit 2) if
    another process holds it."""
    path = Path(out) / LOCK_FILE
    # Opened without truncating: a refused caller must still be able to read the holder's pid.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise ConfigError(
                f"--out {out} is in use by another run (pid {holder}, lock {path}); wait for it to end or "
                f"stop it (a stopped `lesa train` continues with --resume latest), or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock (the file stays: deleting it would race a new holder)

"""How a DataLoader process starts: from a fork server, with its maker's environment, and bound
to its maker's life.

A loader process stuck in a read (a stalled storage request, a shard that never ends) is inside
the dataset's iterator, where PyTorch's own parent check (between batches) never runs; an audit
found one spinning after its run had gone. So each loader process dies with its maker: on Linux
the kernel kills it when its parent (the fork server, which exits when the maker does) dies
(PR_SET_PDEATHSIG), and everywhere a watcher thread ends it within WATCH_EVERY seconds of the
maker's exit (docs/reliability.md, Data path).
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import signal
import sys
import threading
import time

WATCH_EVERY = 1.0  # seconds between two looks at the maker
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@functools.cache
def fork_server():
    """Loader processes start from a fork server, never by forking the process that iterates.

    A Ray Train worker runs threads (Ray's core worker, gRPC, gloo, Ray Train's own); a process
    forked from it while one of them holds a lock inherits that lock, held for good. Runs hung in
    CI with a loader process forked for the final evaluation alive and not one batch scored
    (Python 3.14 makes forkserver the default on Linux for this reason). The server imports the
    caller's main module and the reader (torch, PIL) once, so a loader process still starts fast.
    As with any start method but fork, a script that makes a loader needs `if __name__ == "__main__":`.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "datasets.stream"])
    return context


def start_loader_process(environment: dict[str, str], maker: int, loader_id: int) -> None:
    """The DataLoader's worker_init_fn. The process sees the environment of the process that made
    the loader, as a forked one would (storage credentials set after the fork server started,
    say), and ends when that process (pid `maker`) does."""
    os.environ.clear()
    os.environ.update(environment)
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    threading.Thread(target=_end_with, args=(maker,), name="lesa-maker-watch", daemon=True).start()


def _end_with(maker: int) -> None:
    while alive(maker):
        time.sleep(WATCH_EVERY)
    print(f"loader process {os.getpid()}: the process that made it ({maker}) is gone; exiting", file=sys.stderr)
    os._exit(1)  # the main thread may be blocked in a read: only a hard exit is sure to end it


def alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (dead, not yet reaped by its parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:  # no /proc (macOS): a zombie is taken for alive until reaped
        return True

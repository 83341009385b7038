"""Starting Ray, one way for every command that needs it (converters, extraction, training)."""

from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager


def connect_or_start_ray(num_cpus: int | None = None, dashboard: bool = False, runtime_env: dict | None = None) -> bool:
    """Connect to the cluster in RAY_ADDRESS (passing it `runtime_env`), else start a local Ray
    with `num_cpus` CPU slots; whether this call started it (its caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, logging_level="WARNING")
    else:
        # Ray 2.60 cannot bind its GCS and raylet to loopback (cluster/README.md, "Loopback
        # binds"); the dashboard, when wanted, listens on 127.0.0.1 only.
        port = free_port() if dashboard else None
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            configure_logging=True,
            logging_level="WARNING",
            # Ray Train's placement-group cleaner asks the state API (the dashboard) whether the
            # run's controller lives. Left to find a cluster by itself, it dies with a 30-line
            # "Found multiple active Ray instances" traceback whenever another Ray runs on this
            # machine; RAY_API_SERVER_ADDRESS names this one to every process of the job.
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}} if port else None,
        )
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for the dashboard of the cluster about to start."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def worker_lines_flushed():
    """On leaving, print the worker lines that Ray's log deduplication still holds. It keeps a
    line that repeats for RAY_DEDUP_LOGS_AGG_WINDOW_S (5 s) and prints its "[repeated Nx across
    cluster]" summary then or at disconnect, which for a run that just ended came after the
    driver's report. Ray has no public call for this: if its internals change, the summaries
    come at exit, as before."""
    try:
        yield
    finally:
        try:
            from ray._private import worker

            ignore_prefix = worker._should_ignore_worker_log_prefix(worker.global_worker)
            for deduplicator, sink in (
                (worker.stdout_deduplicator, sys.stdout),
                (worker.stderr_deduplicator, sys.stderr),
            ):
                for batch in deduplicator.flush():
                    worker.print_worker_logs(batch, sink, ignore_prefix)
        except Exception:  # never fail a finished run over its console
            pass

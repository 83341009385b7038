"""Starting Ray, one way for every command that needs it (converters, extraction, training)."""

from __future__ import annotations

import os
import socket


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

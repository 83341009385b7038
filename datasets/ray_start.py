"""Starting Ray, one way for every command that needs it (converters, extraction, training)."""

from __future__ import annotations

import os


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
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            configure_logging=True,
            logging_level="WARNING",
        )
    return True

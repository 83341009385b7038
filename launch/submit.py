"""`lesa submit CONFIG`: run `lesa train CONFIG` as a Ray job on a cluster, from the YAML alone.

The YAML's `submit:` section says where (address), what to ship (working_dir) and the job's
runtime environment; the config is validated here first, so a typo fails before anything is
uploaded. Logs stream back and the exit status is the job's. Ctrl-C detaches and leaves the job
running, unless --stop-on-interrupt asks to stop it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import re
import shlex
import sys
from pathlib import Path

from trainer.config import ConfigError, load_config

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never ship these: virtualenvs, local runs and stores, caches.
DEFAULT_EXCLUDES = [
    ".venv/",
    ".git/",
    "demo_out/",
    "mlruns/",
    "mlartifacts/",
    "mlflow.db",
    "**/__pycache__/",
    ".pytest_cache/",
    ".whl/",
]
# Nor credentials: the package is stored on the cluster and unpacked on every node, readable by any
# job there. Patterns in the gitwildmatch syntax of runtime_env excludes (a name without a slash
# matches at any depth); SSH keys by their ssh-keygen names, since a bare `id_*` would drop code.
SECRET_FILES = [
    ".env*",
    "*.pem",
    "*.key",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*credentials*",
    "*service-account*.json",
    ".netrc",
    ".npmrc",
    ".pypirc",
]
SECRET_DIRS = [".aws/", ".ssh/", ".gcloud/", ".config/gcloud/"]  # the last one only at the top
# A Google service-account key under any other name is known by its content.
SERVICE_ACCOUNT = re.compile(rb'"type"\s*:\s*"service_account"')


def job_spec(config: str, overrides: list[str], out: str | None) -> tuple[str, dict, str]:
    """(entrypoint, runtime_env, address) for a validated config."""
    cfg = load_config(config, overrides)
    sub = cfg.submit
    working_dir = Path(sub.working_dir).resolve()
    try:
        config_in_job = Path(config).resolve().relative_to(working_dir)
    except ValueError:
        raise ConfigError(
            f"submit.working_dir: {config} must lie inside {working_dir}, which is what the cluster receives"
        ) from None
    out = out or sub.out
    if not out:
        raise ConfigError(
            "submit.out: where should the job write its results on the head node? "
            "Set submit.out in the YAML or pass --out"
        )
    check_cluster_paths(cfg, out)
    found, key_files = secrets_in(working_dir)
    if found:
        print(f"warning: not shipping what looks like credentials: {', '.join(found)}", file=sys.stderr)
    # The user's excludes add to these, never replace them.
    excludes = DEFAULT_EXCLUDES + SECRET_FILES + SECRET_DIRS + key_files + sub.runtime_env.get("excludes", [])
    runtime_env = {**sub.runtime_env, "excludes": excludes, "working_dir": str(working_dir)}
    env_vars = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", **runtime_env.get("env_vars", {})}
    runtime_env["env_vars"] = env_vars
    args = ["lesa", "train", str(config_in_job), "--out", out]
    for item in overrides:
        args += ["--set", item]
    if not (cfg.mlflow.tracking_uri or env_vars.get("MLFLOW_TRACKING_URI")):
        # The job's working directory is a temporary copy: keep the default store with the results.
        args += ["--set", f"mlflow.tracking_uri=sqlite:///{Path(out).as_posix().rstrip('/')}/mlflow.db"]
        print(f"note: no mlflow.tracking_uri configured; the run is recorded in {out}/mlflow.db on the head node")
    address = sub.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    return shlex.join(args), runtime_env, address


def check_cluster_paths(cfg, out: str) -> None:
    """The job runs `lesa train` in a temporary copy of submit.working_dir on the head node, and its
    workers on other nodes: a relative path there names a folder in Ray's temp directory, found
    (if at all) only after the upload. Refused here, before anything is packaged."""
    paths = [
        ("data.url", cfg.data.url),
        ("checkpoint.storage", cfg.checkpoint.storage),
        ("model.backbone_weights", cfg.model.backbone_weights),
        ("mlflow.artifact_location", cfg.mlflow.artifact_location),
        ("submit.out (--out)", out),
    ]
    for key, path in paths:
        if path and "://" not in path and not Path(path).is_absolute():
            raise ConfigError(
                f"{key}: {path} is a relative path, which the job would resolve in its temporary copy of "
                f"submit.working_dir on the cluster: use an absolute path or a URL every node can read"
            )


def secrets_in(working_dir: Path) -> tuple[list[str], list[str]]:
    """(the paths in `working_dir` the secret excludes drop, as the warning lists them; an exclude
    for each service-account key that no name pattern catches). Skips what is never shipped anyway."""
    never = {entry.strip("/") for entry in DEFAULT_EXCLUDES if entry.endswith("/") and "*" not in entry}
    secret_dirs = {entry.strip("/") for entry in SECRET_DIRS}
    found, key_files = [], []
    for root, dirs, files in os.walk(working_dir):
        rel = Path(root).relative_to(working_dir)
        for name in sorted(dirs):
            path = (rel / name).as_posix()
            if name in never or name == "__pycache__" or name in secret_dirs or path in secret_dirs:
                dirs.remove(name)
                if name in secret_dirs or path in secret_dirs:
                    found.append(path + "/")
        for name in sorted(files):
            path = (rel / name).as_posix()
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in SECRET_FILES):
                found.append(path)
            elif name.endswith(".json") and is_service_account(Path(root, name)):
                found.append(path)
                key_files.append("/" + re.sub(r"([\\\[\]*?!#])", r"\\\1", path))  # anchored, literal
    return sorted(found), key_files


def is_service_account(path: Path) -> bool:
    try:
        return path.stat().st_size < 1 << 20 and SERVICE_ACCOUNT.search(path.read_bytes()) is not None
    except OSError:  # unreadable: Ray's packaging reports it
        return False


async def _follow(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def submit(
    config: str,
    overrides: list[str],
    out: str | None = None,
    address: str | None = None,
    wait: bool = True,
    stop_on_interrupt: bool = False,
) -> int:
    entrypoint, runtime_env, default_address = job_spec(config, overrides, out)
    address = address or default_address
    # Ray 2.60 clusters require token auth by default; the token comes from ~/.ray/auth_token
    # or RAY_AUTH_TOKEN, as for the Ray CLI. Ray reads the mode when it is imported.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:  # the client asks the dashboard for its version first: nothing is uploaded yet
        client = JobSubmissionClient(address)
    except ConnectionError as exc:
        raise ConfigError(
            f"--address {address}: no Ray dashboard answers there ({str(exc).splitlines()[0][:160]}); start the "
            f"cluster (ray start --head, or cluster/README.md), or pass its dashboard URL, e.g. http://HEAD:8265"
        ) from None
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"submitted job {job_id} to {address}: {entrypoint}", flush=True)
    if not wait:
        print(f"follow it with: ray job logs --address {address} -f {job_id}")
        return 0
    try:
        asyncio.run(_follow(client, job_id))
    except KeyboardInterrupt:
        if stop_on_interrupt:
            client.stop_job(job_id)
            print(f"\nstopped job {job_id}")
        else:
            print(f"\ndetached; job {job_id} keeps running (ray job stop --address {address} {job_id})")
        return 130
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1

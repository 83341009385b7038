"""Run a command the way the integration tests do, and leave evidence when it hangs; `lesa` runs
the CLI itself, in the environment every integration test gives it (lesa_env).

A distributed run that stops making progress is killed at the test's timeout; before that, every
Python process under it (the driver, the local Ray it started, the Ray Train workers and their
loader processes) gets its stack dumped with py-spy, which ray[default] installs. The failure
message then says where each process was waiting, instead of only that time ran out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
LESA = [sys.executable, "-m", "launch.cli"]
# A test's run gets a local Ray and the tracking store its config names, whatever the shell has;
# MLflow must find an S3 endpoint through AWS_ENDPOINT_URL alone (tests/integration/test_remote_storage.py).
SHELL_ONLY = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")
PY_SPY = Path(sys.executable).parent / "py-spy"
# Ray's own Python services: their stacks say nothing about a hung run.
RAY_SERVICES = ("ray/dashboard", "ray/autoscaler", "log_monitor.py", "runtime_env/agent", "dashboard/agent")


def run_cli(cmd: list[str], timeout: float, **popen_kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = process_tree(proc.pid)
        stacks = dump_stacks(tree)
        for p in tree:
            try:
                p.kill()
            except psutil.Error:
                pass
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"{' '.join(map(str, cmd[:4]))} ... still running after {timeout} s; stacks of "
            f"its Python processes:\n{stacks}\n--- stdout tail:\n{stdout[-3000:]}\n"
            f"--- stderr tail:\n{stderr[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def lesa_env(**extra: str) -> dict[str, str]:
    """This environment, less SHELL_ONLY, with the checkout importable by Ray's worker processes
    and unbuffered output (a killed driver's log still reaches the test); `extra` goes last."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    for name in SHELL_ONLY:
        env.pop(name, None)
    return {**env, **extra}


def lesa(*args, cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`lesa ARGS` as a subprocess, in lesa_env() unless `env` is given."""
    return run_cli(LESA + [str(a) for a in args], timeout=timeout, cwd=cwd, env=lesa_env() if env is None else env)


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def dump_stacks(processes: list[psutil.Process]) -> str:
    """Stacks of the run's own processes, Ray Train workers and their loader processes first (a
    CI log keeps the head and tail of a long failure); Ray's services are only named."""
    if not PY_SPY.exists():
        return f"(no stacks: {PY_SPY} is not installed)"
    ours, services = [], []
    for p in processes:
        try:
            cmd = " ".join(p.cmdline())
            in_worker = any(" ".join(a.cmdline()).startswith("ray::") for a in [p, *p.parents()])
        except psutil.Error:
            continue
        # by command line, not name: loader processes rename themselves (pt_data_worker)
        if any(s in cmd for s in RAY_SERVICES) or not ("python" in cmd or cmd.startswith("ray::")):
            services.append(f"{p.pid} {cmd[:80]}")
        else:
            ours.append((not in_worker, "IDLE" in cmd, p.pid, cmd))
    dumps = []
    for _, _, pid, cmd in sorted(ours):
        dump = subprocess.run(
            [str(PY_SPY), "dump", "--native", "--pid", str(pid)], capture_output=True, text=True, timeout=60
        )
        if dump.returncode != 0:  # native unwinding is not available everywhere
            dump = subprocess.run([str(PY_SPY), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
        dumps.append(f"=== pid {pid}: {cmd[:160]}\n{dump.stdout or dump.stderr}")
    return "\n".join(dumps + ["=== not dumped: " + "; ".join(services)])

"""The launch side of the audit through real runs (real Ray, DeepSpeed, shards, MLflow sqlite):
two drivers on one --out, a SIGKILLed driver's folder, `--resume latest` once the checkpoints are
gone, and worker errors that a retry would only repeat."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_cli import run_cli

from datasets.makers.synthetic import write_synthetic
from launch.run_lock import hold

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "launch" / "synthetic.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit-runs") / "data"
    write_synthetic(
        str(root), seed=5, sizes={"train": 64, "test": 32}, image_size=32, shard_size=16, log=lambda *_: None
    )
    return root


def command(work: Path, data: Path, *extra: str) -> tuple[list[str], dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "launch.cli", "train", CONFIG, "--out", str(work / "run")]
    for item in (
        "data.image_size=32",
        "data.batch_size=8",
        "checkpoint.every=0",
        "train.log_every=1",
        "mlflow.experiment=audit",
        "mlflow.log_model=false",
    ):
        cmd += ["--set", item]
    cmd += ["--set", f"data.url={data}", "--set", f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}"]
    return cmd + list(extra), env


def mlflow_runs(work: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("audit").experiment_id])


def test_one_run_per_out_a_killed_driver_frees_it_and_lost_checkpoints_stop_a_resume(tmp_path, data, shared_ray):
    cmd, env = command(tmp_path, data, "--set", "train.max_steps=100000")
    first = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        deadline = time.time() + 300
        for line in first.stdout:  # the lock is held from before the MLflow run opens
            if line.startswith("MLflow run "):
                break
            assert time.time() < deadline and first.poll() is None
        cmd2, _ = command(tmp_path, data, "--resume", "latest")
        started = time.time()
        second = run_cli(cmd2, timeout=120, cwd=tmp_path, env=env)
        assert second.returncode == 2, second.stdout + second.stderr
        assert time.time() - started < 60, "refused at once, not after Ray started"
        error = second.stderr.strip().splitlines()[-1]
        assert str(tmp_path / "run") in error and f"pid {first.pid}" in error, error
        assert len(mlflow_runs(tmp_path)) == 1, "the refused run opened no MLflow run"
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
        first.wait()
    with hold(tmp_path / "run"):  # the kernel dropped the dead driver's lock
        pass

    # It died before its first checkpoint with no step in MLflow: --resume latest restarts it (on
    # the session's cluster; the killed driver's own Ray died with it).
    cmd3, _ = command(tmp_path, data, "--resume", "latest", "--set", "train.max_steps=4")
    third = run_cli(cmd3, timeout=600, cwd=tmp_path, env={**env, **shared_ray})
    assert third.returncode == 0, (third.stdout + third.stderr)[-6000:]
    runs = mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", "the same MLflow run, resumed"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 4

    # Now its steps are in MLflow; without its checkpoints a resume would log them again.
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    fourth = run_cli(
        command(tmp_path, data, "--resume", "latest", "--set", "train.max_steps=8")[0], 120, cwd=tmp_path, env=env
    )
    assert fourth.returncode == 2 and "holds no checkpoint" in fourth.stderr, fourth.stderr[-3000:]
    assert str(tmp_path / "run" / "checkpoints") in fourth.stderr


def test_a_deterministic_worker_error_fails_at_once_while_others_are_retried(tmp_path, data):
    # tests/test_audit_launch.py checks FailFast against every deterministic error; here one of
    # them and one flaky error go through Ray Train's real failure handling.
    import ray

    from launch.workers import run_workers
    from trainer.config import ConfigError, load_config
    from trainer.tracking import RunLogger, open_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def attempts_of(error: Exception, name: str) -> int:
        tally = tmp_path / f"{name}.attempts"

        def worker(_config):  # a closure: Ray ships it by value to its workers
            with open(tally, "a") as f:
                f.write("x")
            raise error

        cfg = load_config(
            CONFIG,
            [
                f"data.url={data}",  # the driver side reads its dataset.json (the MLflow input)
                "scaling.num_workers=1",
                "checkpoint.max_failures=2",
                f"checkpoint.storage={tmp_path}/checkpoints",
            ],
        )
        logger = RunLogger(uri, open_run(uri, None, "audit", name, {}))
        with pytest.raises(Exception) as failed:
            run_workers(cfg, tmp_path, worker, {}, name, logger, log_metrics=False)
        assert str(error) in str(failed.value)
        return len(tally.read_text())

    try:
        assert attempts_of(ConfigError("data.url: a deliberately bad key"), "config") == 1
        assert attempts_of(RuntimeError("a flaky failure"), "flaky") == 3, "1 + checkpoint.max_failures"
    finally:
        ray.shutdown()

"""Submitting to a real two-node Ray cluster on loopback (cluster/local-multinode.sh): `lesa submit`
and the plain `ray job submit` both run `lesa train` as a job whose workers land on both nodes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from run_cli import run_cli

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "local-multinode.sh"
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    folder = tempfile.mkdtemp(prefix="lesa-ray-", dir="/tmp")
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(name, None)
    start = subprocess.run(["bash", str(SCRIPT), "start", folder], env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    client = dict(env)
    for line in Path(folder, "cluster.env").read_text().splitlines():
        if line.startswith("export "):
            name, value = line[len("export ") :].split("=", 1)
            client[name] = value
    try:
        yield client
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", folder], env=env, capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def data(synthetic):
    return synthetic(4, 32, 16, train=64, test=32)


def train_args(data: Path, out: Path) -> list[str]:
    return [
        "--set",
        f"data.url={data}",
        "--set",
        "data.image_size=32",
        "--set",
        "data.batch_size=8",
        "--set",
        "train.max_steps=6",
        "--set",
        "train.log_every=2",
        "--set",
        "scaling.num_workers=2",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{out.parent}/mlflow.db",
        "--set",
        "mlflow.experiment=submit",
        "--set",
        "mlflow.log_model=false",
    ]


def assert_ran_on_both_nodes(log: str) -> None:
    # Both nodes share this machine's IP, so Ray Train's node_rank cannot tell them apart: the
    # workers print their Ray node id.
    nodes = dict(re.findall(r"\[rank (\d+)/2\] on node ([0-9a-f]+)", log))
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"], (
        f"training workers were not placed on both nodes: {nodes}\n{log[-3000:]}"
    )


def finished_runs(out: Path) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out.parent}/mlflow.db")
    exp = client.get_experiment_by_name("submit")
    return sum(r.info.status == "FINISHED" for r in client.search_runs([exp.experiment_id]))


def test_lesa_submit_runs_on_both_nodes(cluster, data, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        [
            sys.executable,
            "-m",
            "launch.cli",
            "submit",
            str(REPO / "launch" / "synthetic.yaml"),
            "--out",
            str(out),
            *train_args(data, out),
        ],
        timeout=600,
        cwd=REPO,
        env=cluster,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "SUCCEEDED" in log
    assert_ran_on_both_nodes(log)
    assert (out / "metrics.json").exists()
    assert finished_runs(out) == 1


def test_plain_ray_job_submit_runs_the_same_entrypoint(cluster, data, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        [
            str(VENV_BIN / "ray"),
            "job",
            "submit",
            "--address",
            cluster["RAY_ADDRESS"],
            "--working-dir",
            str(REPO),
            "--",
            "lesa",
            "train",
            "launch/synthetic.yaml",
            "--out",
            str(out),
            *train_args(data, out),
        ],
        timeout=600,
        cwd=REPO,
        env=cluster,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert_ran_on_both_nodes(log)
    assert (out / "metrics.json").exists()
    assert finished_runs(out) == 1


def test_submit_rejects_a_bad_config_before_uploading(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.cli",
            "submit",
            str(REPO / "launch" / "synthetic.yaml"),
            "--out",
            str(tmp_path),
            "--set",
            "scaling.num_wokers=2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "scaling.num_wokers" in proc.stderr

"""What the resume tests (test_resume.py, test_resume_faults.py) share: their dataset, a `lesa train`
with the sample ledger on, and the checks on what a run leaves (the ledger proves every training
sample is used exactly once per completed epoch; MLflow's steps; the model digests in the log)."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path

from run_cli import LESA, REPO, lesa_env, run_cli

from datasets.contract import read_dataset
from trainer.ledger import read_ledger

CONFIG = str(REPO / "launch" / "synthetic.yaml")
TRAIN_IMAGES = 192  # 8 shards of 24; 2 workers x 8 images = 16 per step, so 12 steps per epoch


def resume_data(synthetic) -> Path:
    return synthetic(2, 32, 24, train=TRAIN_IMAGES, test=48)


def train(work: Path, data: Path, *extra: str, ray: dict | None = None, background=False):
    """`lesa train` on the cluster whose environment `ray` is (the session's shared_ray), else on
    a local Ray of its own, as a user's first run is."""
    env = lesa_env(**(ray or {}))
    cmd = LESA + [
        "train",
        CONFIG,
        "--out",
        str(work / "run"),
        "--set",
        f"data.url={data}",
        "--set",
        "data.image_size=32",
        "--set",
        "data.batch_size=8",
        "--set",
        "data.ledger=true",
        "--set",
        "train.log_every=2",
        "--set",
        "mlflow.experiment=resume",
        "--set",
        "mlflow.log_model=false",  # test_e2e.py checks the logged model
        *extra,
    ]
    if background:
        return subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = run_cli(cmd, timeout=600, cwd=work, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


def train_keys(data: Path) -> list[str]:
    import tarfile

    keys = []
    for shard in read_dataset(str(data)).shards("train"):
        with tarfile.open(shard.url) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    return sorted(keys)


def assert_exactly_once(work: Path, data: Path, steps_samples: int) -> dict[int, int]:
    """No sample twice in any epoch; every epoch the run counts as completed holds every sample.
    (Workers may be in different epochs at once: one that finished its share goes on.)"""
    entries = read_ledger(work / "run" / "ledger")
    assert len(entries) == steps_samples, "one ledger line per sample whose gradient is in the model"
    by_epoch: dict[int, list[str]] = {}
    for epoch, key in entries:
        by_epoch.setdefault(epoch, []).append(key)
    keys = train_keys(data)
    completed = json.loads((work / "run" / "metrics.json").read_text())["epochs_completed"]
    for epoch, seen in sorted(by_epoch.items()):
        duplicates = [k for k, n in Counter(seen).items() if n > 1]
        assert not duplicates, f"epoch {epoch}: used twice: {duplicates[:5]}"
        assert set(seen) <= set(keys)
    for epoch in range(completed):
        assert sorted(by_epoch[epoch]) == keys, f"epoch {epoch} counts as completed but is not"
    return {epoch: len(seen) for epoch, seen in by_epoch.items()}


def mlflow_steps(work: Path, key: str = "loss") -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("resume")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "one MLflow run per job, across restarts"
    assert runs[0].info.status == "FINISHED"
    return [m.step for m in sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.timestamp)]


def digest_at(log: str, pattern: str) -> str:
    match = re.search(pattern + r".*?model digest ([0-9a-f]{16})", log)
    assert match, f"no '{pattern}' in the log"
    return match.group(1)

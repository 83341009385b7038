"""Resume, with real Ray, real DeepSpeed and real shards on the CPU: a worker SIGKILLed mid-epoch,
a run stopped and resumed on 1 and then 3 workers, a crash while a checkpoint is being written.
The sample ledger proves every training sample is used exactly once per completed epoch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from run_cli import LESA, REPO, lesa, lesa_env, run_cli

from datasets.contract import read_dataset
from trainer.ledger import read_ledger

CONFIG = str(REPO / "launch" / "synthetic.yaml")
TRAIN_IMAGES = 192  # 8 shards of 24; 2 workers x 8 images = 16 per step, so 12 steps per epoch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data(synthetic):
    return synthetic(2, 32, 24, train=TRAIN_IMAGES, test=48)


def train(work: Path, data: Path, *extra: str, env_extra=None, background=False):
    """`lesa train` on its own local Ray: a SIGKILLed driver connected to a shared cluster would
    leave its Ray Train controller running there."""
    env = lesa_env(**(env_extra or {}))
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


def test_stop_and_resume_on_one_then_three_workers(tmp_path, data):
    first = train(tmp_path, data, "--set", "train.max_steps=10", "--set", "checkpoint.every=4")
    assert_exactly_once(tmp_path, data, 10 * 16)

    second = train(
        tmp_path,
        data,
        "--resume",
        "latest",
        "--set",
        "scaling.num_workers=1",
        "--set",
        "train.max_steps=20",
        "--set",
        "checkpoint.every=4",
    )
    assert "resumed from step 10 on 1 workers" in second
    assert digest_at(second, "resumed from step 10") == digest_at(first, "checkpoint at step 10")
    counts = assert_exactly_once(tmp_path, data, 10 * 16 + 10 * 8)
    assert counts[0] == TRAIN_IMAGES  # epoch 0 was finished by the single worker

    third = train(
        tmp_path,
        data,
        "--resume",
        "latest",
        "--set",
        "scaling.num_workers=3",
        "--set",
        "train.max_steps=26",
        "--set",
        "checkpoint.every=4",
    )
    assert "resumed from step 20 on 3 workers" in third
    assert digest_at(third, "resumed from step 20") == digest_at(second, "checkpoint at step 20")
    counts = assert_exactly_once(tmp_path, data, 10 * 16 + 10 * 8 + 6 * 24)
    assert counts[0] == TRAIN_IMAGES and sum(counts.values()) == 2 * TRAIN_IMAGES

    steps = mlflow_steps(tmp_path)
    assert steps == list(range(2, 27, 2)), "strictly increasing, no step logged twice"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == 26 and metrics["epochs_completed"] >= 1


def test_without_resume_an_existing_run_is_not_overwritten(tmp_path, data):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    proc = lesa("train", CONFIG, "--out", tmp_path / "run", "--set", f"data.url={data}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "--resume latest" in proc.stderr


def test_crash_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, data):
    log = train(
        tmp_path,
        data,
        "--set",
        "train.max_steps=16",
        "--set",
        "checkpoint.every=5",
        "--set",
        "train.debug_fault=checkpoint@10",
    )
    assert "dying while writing the checkpoint of step 10" in log
    # the half-written checkpoint of step 10 never became the latest: the retry starts at step 5
    assert "resumed from step 5 on 2 workers" in log
    assert digest_at(log, "resumed from step 5") == digest_at(log, "checkpoint at step 5")
    assert_exactly_once(tmp_path, data, 16 * 16)
    assert mlflow_steps(tmp_path) == list(range(2, 17, 2))


def test_sigkilled_worker_mid_epoch_run_completes_like_an_uninterrupted_one(tmp_path, data):
    steps = 30
    args = ("--set", f"train.max_steps={steps}", "--set", "checkpoint.every=5", "--set", "train.log_every=1")
    proc = train(tmp_path, data, *args, background=True)
    log, killed = [], False
    deadline = time.time() + 600
    for line in proc.stdout:
        log.append(line)
        match = re.search(r"RayTrainWorker pid=(\d+)\).*step 8/", line)
        if match and not killed:  # step 8 of 12 in epoch 0: mid-epoch, after the step-5 checkpoint
            os.kill(int(match.group(1)), signal.SIGKILL)
            killed = True
        assert time.time() < deadline
    assert proc.wait(timeout=60) == 0, "".join(log)[-6000:]
    log = "".join(log)
    assert killed and re.search(r"resumed from step (5|10) on 2 workers", log)
    counts = assert_exactly_once(tmp_path, data, steps * 16)
    assert counts[0] == TRAIN_IMAGES
    assert mlflow_steps(tmp_path) == list(range(1, steps + 1))

    reference = tmp_path / "reference"
    reference.mkdir()
    train(reference, data, *args)
    ours = json.loads((tmp_path / "run" / "metrics.json").read_text())
    theirs = json.loads((reference / "run" / "metrics.json").read_text())
    # After a resume the shuffle buffers refill in another order, so the runs differ as two
    # data orders do, not more: on this 30-step toy run both stay within 10 points of mAP.
    for setting in ("zsl", "gzsl"):
        assert abs(ours[setting]["mAP"] - theirs[setting]["mAP"]) <= 10.0, (ours[setting], theirs[setting])


def test_resume_from_a_checkpoint_folder_into_a_new_output(tmp_path, data):
    first = train(tmp_path, data, "--set", "train.max_steps=4", "--set", "checkpoint.every=0")
    folder = next((tmp_path / "run" / "checkpoints").glob("*/checkpoint_*/"))
    other = tmp_path / "other"
    other.mkdir()
    log = train(
        other,
        data,
        "--resume",
        str(folder),
        "--set",
        "train.max_steps=6",
        "--set",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert "resumed from step 4 on 2 workers" in log
    assert digest_at(log, "resumed from step 4") == digest_at(first, "checkpoint at step 4")
    assert json.loads((other / "run" / "metrics.json").read_text())["step"] == 6
    assert mlflow_steps(tmp_path) == [2, 4, 6], "the checkpoint's MLflow run continues"

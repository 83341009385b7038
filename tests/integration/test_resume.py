"""Resume, with real Ray, real DeepSpeed and real shards on the CPU: a run stopped and resumed on 1
and then 3 workers and then from its checkpoint folder into a new output; an existing run never
overwritten. The first run starts a local Ray of its own, as a user's first run does; the resumes
run on the session's cluster, so each resume also meets a cluster other than the one that wrote its
checkpoint. Faults: test_resume_faults.py."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from resume_run import CONFIG, TRAIN_IMAGES, assert_exactly_once, digest_at, mlflow_steps, resume_data, train
from run_cli import lesa


@pytest.fixture(scope="module")
def data(synthetic):
    return resume_data(synthetic)


def test_stop_and_resume_on_one_then_three_workers_then_from_a_folder(tmp_path, data, shared_ray):
    every = ("--set", "checkpoint.every=4")
    first = train(tmp_path, data, "--set", "train.max_steps=10", *every)
    assert_exactly_once(tmp_path, data, 10 * 16)

    one = ("--set", "scaling.num_workers=1")
    second = train(tmp_path, data, "--resume", "latest", *one, "--set", "train.max_steps=20", *every, ray=shared_ray)
    assert "resumed from step 10 on 1 workers" in second
    assert digest_at(second, "resumed from step 10") == digest_at(first, "checkpoint at step 10")
    counts = assert_exactly_once(tmp_path, data, 10 * 16 + 10 * 8)
    assert counts[0] == TRAIN_IMAGES  # epoch 0 was finished by the single worker

    three = ("--set", "scaling.num_workers=3")
    third = train(tmp_path, data, "--resume", "latest", *three, "--set", "train.max_steps=26", *every, ray=shared_ray)
    assert "resumed from step 20 on 3 workers" in third
    assert digest_at(third, "resumed from step 20") == digest_at(second, "checkpoint at step 20")
    counts = assert_exactly_once(tmp_path, data, 10 * 16 + 10 * 8 + 6 * 24)
    assert counts[0] == TRAIN_IMAGES and sum(counts.values()) == 2 * TRAIN_IMAGES

    assert mlflow_steps(tmp_path) == list(range(2, 27, 2)), "strictly increasing, no step logged twice"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == 26 and metrics["epochs_completed"] >= 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "model.pt" in {a.path for a in client.list_artifacts(metrics["mlflow_run_id"])}
    assert not client.get_run(metrics["mlflow_run_id"]).outputs.model_outputs, "mlflow.log_model=false"

    # --resume PATH: the last checkpoint folder into a new output, whose MLflow run continues
    other = tmp_path / "other"
    other.mkdir()
    uri = ("--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    fourth = train(other, data, "--resume", metrics["checkpoint"], "--set", "train.max_steps=28", *uri, ray=shared_ray)
    assert "resumed from step 26 on 2 workers" in fourth
    assert digest_at(fourth, "resumed from step 26") == digest_at(third, "checkpoint at step 26")
    assert json.loads((other / "run" / "metrics.json").read_text())["step"] == 28
    assert mlflow_steps(tmp_path) == list(range(2, 29, 2)), "the checkpoint's MLflow run continues"


def test_without_resume_an_existing_run_is_not_overwritten(tmp_path, data):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    proc = lesa("train", CONFIG, "--out", tmp_path / "run", "--set", f"data.url={data}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "--resume latest" in proc.stderr

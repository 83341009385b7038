"""Resume, with real Ray, real DeepSpeed and real shards on the CPU: a run stopped and resumed on 1
and then 3 workers, each run on a local Ray of its own as a user's runs are; a checkpoint folder
resumed into a new output; an existing run never overwritten. Faults: test_resume_faults.py."""

from __future__ import annotations

import json

import pytest
from resume_run import CONFIG, TRAIN_IMAGES, assert_exactly_once, digest_at, mlflow_steps, resume_data, train
from run_cli import lesa


@pytest.fixture(scope="module")
def data(synthetic):
    return resume_data(synthetic)


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


def test_resume_from_a_checkpoint_folder_into_a_new_output(tmp_path, data, shared_ray):
    first = train(tmp_path, data, "--set", "train.max_steps=4", "--set", "checkpoint.every=0", ray=shared_ray)
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
        ray=shared_ray,
    )
    assert "resumed from step 4 on 2 workers" in log
    assert digest_at(log, "resumed from step 4") == digest_at(first, "checkpoint at step 4")
    assert json.loads((other / "run" / "metrics.json").read_text())["step"] == 6
    assert mlflow_steps(tmp_path) == [2, 4, 6], "the checkpoint's MLflow run continues"

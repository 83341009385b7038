"""What a run's MLflow records say besides metrics, on a real sqlite store: the experiment's kind,
where the run came from, and its dataset (trainer/tracking.py)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from trainer.tracking import EXPERIMENT_KIND, log_dataset, open_run, run_page

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, artifact location) of one sqlite store: creating one takes seconds."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}", root.as_uri()


def test_a_run_is_a_training_run_traced_to_its_code_and_command(store):
    uri, artifacts = store
    client = MlflowClient(uri)
    older = client.create_experiment("older")  # made before lesa tagged experiments
    run_id = open_run(uri, artifacts, "older", "r1", {"a": 1})
    assert client.get_experiment(older).tags | EXPERIMENT_KIND == client.get_experiment(older).tags
    fresh = client.get_run(open_run(uri, artifacts, "fresh", "r2", {})).info.experiment_id
    assert client.get_experiment(fresh).tags["mlflow.experimentKind"] == "custom_model_development"
    tags = client.get_run(run_id).data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head
    assert tags["lesa.git_dirty"] in ("true", "false")
    assert tags["lesa.command"].split()[0] == "lesa"  # then the arguments the process was given
    assert client.get_run(run_id).data.params == {"a": "1"}


def test_the_dataset_is_the_run_input_with_a_digest_of_its_metadata(store):
    uri, artifacts = store
    run_id = open_run(uri, artifacts, "e", "r", {})
    profile = {"seen_labels": 3, "unseen_labels": 1, "train_images": 10}
    log_dataset(uri, run_id, "s3://bucket/data", "toy", '{"name": "toy"}', profile, "training")
    log_dataset(uri, run_id, "s3://bucket/data", "toy", '{"name": "toy"}', profile, "training")  # a resume
    (entry,) = MlflowClient(uri).get_run(run_id).inputs.dataset_inputs
    assert entry.dataset.name == "toy" and entry.dataset.source_type == "s3"
    assert json.loads(entry.dataset.source) == {"uri": "s3://bucket/data"}
    assert json.loads(entry.dataset.profile) == profile
    assert len(entry.dataset.digest) == 16
    assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", "training")]


def test_the_run_page_opens_the_classic_ml_view(tmp_path, monkeypatch):
    view = "/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert run_page("http://mlflow:5000/", "3", "abc") == "http://mlflow:5000" + view
    monkeypatch.chdir(tmp_path)
    assert run_page(f"sqlite:///{tmp_path / 'mlflow.db'}", "3", "abc") == "http://127.0.0.1:5000" + view  # make ui
    assert run_page("sqlite:////elsewhere/mlflow.db", "3", "abc") is None


def test_a_worker_shorter_than_one_sampling_interval_still_logs_its_system_metrics(store):
    from trainer.tracking import SYSTEM_METRICS_INTERVAL_S, system_metrics

    uri, artifacts = store
    run_id = open_run(uri, artifacts, "system", "short", {})
    monitor = system_metrics(uri, run_id, node_rank=1)
    time.sleep(0.5)  # well under SYSTEM_METRICS_INTERVAL_S: MLflow's own monitor logs nothing yet
    assert SYSTEM_METRICS_INTERVAL_S > 5
    monitor.finish()
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    assert metrics["system/node_1/cpu_utilization_percentage"] >= 0
    assert metrics["system/node_1/system_memory_usage_megabytes"] > 0

"""`lesa compare` end to end: three models train a few steps on a real Ray cluster with DeepSpeed,
tar shards and an MLflow sqlite store, and nest their runs under the comparison's (the table and
its failures on their own: tests/test_compare.py). The three are LESA, ConSE (scores from the
seen labels' classifier) and one attention per label (chunked scoring); every model, those two
baselines beside, trains from images with its own loss and reloads its saved model in
tests/test_baselines.py, and each one here is a whole Ray Train run (about 22 s)."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from run_cli import REPO, lesa, lesa_env

CONFIG = str(REPO / "launch" / "synthetic.yaml")
MODELS = ["lesa", "conse", "one_attention_per_label"]


def test_compare_trains_each_model_and_nests_their_runs(tmp_path, synthetic, shared_ray):
    data = synthetic(1, 48, 32, train=128, test=64)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The ablations are LESA with other config values (test_rows_are_the_models_then_the_ablations,
    # test_baselines.py::test_lesa_ablations_are_config_only).
    proc = lesa(
        "compare",
        CONFIG,
        "--models",
        *MODELS,
        "--out",
        tmp_path / "cmp",
        "--set",
        f"data.url={data}",
        "--set",
        "data.image_size=48",
        "--set",
        "train.max_steps=4",
        "--set",
        "checkpoint.every=0",
        "--set",
        "checkpoint.max_failures=0",
        "--set",
        f"mlflow.tracking_uri={uri}",
        "--set",
        "mlflow.experiment=compare",
        "--set",
        "mlflow.log_model=false",  # test_e2e.py checks the logged model
        timeout=900,
        cwd=tmp_path,
        env=lesa_env(**shared_ray),
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    table = json.loads((tmp_path / "cmp" / "table.json").read_text())
    names = MODELS
    assert [r["name"] for r in table["rows"]] == names
    assert all(r["status"] == "ok" for r in table["rows"]), [r.get("reason") for r in table["rows"]]
    for row in table["rows"]:
        assert row["step"] == 4 and row["num_test_images"] == 64
        assert 0 <= row["zsl"]["mAP"] <= 100 and 0 <= row["gzsl"]["F1@3"] <= 100
        assert (tmp_path / "cmp" / row["name"] / "metrics.json").exists()
    text = (tmp_path / "cmp" / "table.md").read_text()
    for title in ("LESA (M=10)", "CONSE", "One Attention per Label"):
        assert f"| {title} | " in text

    client = MlflowClient(uri)
    parent_id = table["mlflow_parent_run_id"]
    exp = client.get_experiment_by_name("compare")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert sorted(run.info.run_name for run in children) == sorted(names)
    by_name = {run.info.run_name: run for run in children}
    for row in table["rows"]:
        child = by_name[row["name"]]
        assert child.info.run_id == row["mlflow_run_id"] and child.info.status == "FINISHED"
        assert child.data.params["model.name"] == row["name"]
        assert child.data.metrics["zsl/mAP"] == pytest.approx(row["zsl"]["mAP"])
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and "mlflow.parentRunId" not in parent.data.tags
    assert parent.data.metrics["conse/gzsl/mAP"] == pytest.approx(table["rows"][1]["gzsl"]["mAP"])

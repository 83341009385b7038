"""End to end as a user runs it: `lesa synth`, then `lesa train` on a real local Ray cluster with 2
workers, a real DeepSpeed engine, real tar shards (one of them holding bad samples) and a real
MLflow sqlite store; then the recorded run is checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from run_cli import REPO, lesa, lesa_env

from datasets.contract import read_dataset, write_metadata
from datasets.makers.shards import SplitWriter, encode_jpeg, encode_labels
from datasets.makers.synthetic import SyntheticBenchmark, write_synthetic

CONFIG = REPO / "launch" / "synthetic.yaml"
STEPS, LOG_EVERY = 24, 8


def add_bad_shard(root: Path) -> None:
    """Append a training shard with 2 good and 3 bad samples, and list it in dataset.json."""
    bench = SyntheticBenchmark(seed=3, image_size=48)
    with SplitWriter(str(root), "badtrain", maxcount=100) as writer:
        for i in range(2):
            image, pos, neg = bench.sample("train", i)
            writer.write(f"good{i}", {"jpg": encode_jpeg(image), "labels.json": encode_labels(pos, neg)})
        writer.write("corrupt", {"jpg": b"\xff\xd8 not a jpeg", "labels.json": encode_labels([0], [1])})
        writer.write("nolabels", {"jpg": encode_jpeg(image)})
        writer.write("outofrange", {"jpg": encode_jpeg(image), "labels.json": b'{"pos": [999], "neg": []}'})
    info = read_dataset(str(root))
    meta = json.loads((root / "dataset.json").read_text())
    splits = {name: [(s["path"], s["samples"]) for s in entry["shards"]] for name, entry in meta["splits"].items()}
    splits["train"] += writer.shards
    write_metadata(str(root), meta["name"], meta["kind"], info.labels, info.embeddings, splits)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    data = work / "data"
    # eval.every validates on the val split (trainer/schedule.py): the best model comes back too
    write_synthetic(str(data), seed=1, sizes={"train": 256, "val": 32, "test": 96}, image_size=48, shard_size=64)
    add_bad_shard(data)
    # its own local Ray, started by `lesa train` as a user's first run starts it
    proc = lesa(
        "train",
        CONFIG,
        "--out",
        work / "run",
        "--set",
        f"data.url={data}",
        "--set",
        "data.image_size=48",
        "--set",
        f"train.max_steps={STEPS}",
        "--set",
        f"train.log_every={LOG_EVERY}",
        "--set",
        "eval.every=16",
        "--set",
        "mlflow.experiment=e2e",
        timeout=600,
        cwd=work,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return work, log


def test_train_writes_metrics_for_zsl_and_gzsl(trained):
    work, log = trained
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    for setting in ("zsl", "gzsl"):
        assert set(metrics[setting]) == {f"{m}@{k}" for m in "P R F1".split() for k in (3, 5)} | {"mAP"}
        assert all(0.0 <= v <= 100.0 for v in metrics[setting].values())
    assert metrics["num_test_images"] == 96
    assert metrics["step"] == STEPS
    assert "Started training worker group of size 2" in log
    assert "ZSL" in log and "GZSL" in log and "mAP" in log
    assert (work / "run" / "model.pt").stat().st_size > 0
    assert metrics["best"]["step"] == 16 and (work / "run" / "model_best.pt").stat().st_size > 0


def test_bad_samples_are_skipped_counted_and_reported(trained):
    work, log = trained
    bad = json.loads((work / "run" / "metrics.json").read_text())["bad_samples"]["train"]
    # The bad shard may be read in several epochs; each pass skips the same three samples.
    assert bad["count"] >= 3 and bad["count"] % 3 == 0
    assert set(bad["by_kind"]) == {"corrupt image", "missing labels.json", "label index out of range"}
    keys = {e["key"] for e in bad["examples"]}
    assert keys == {"corrupt", "nolabels", "outofrange"}
    assert all(e["shard"].endswith("badtrain/badtrain-000000.tar") for e in bad["examples"])
    assert "skipped bad sample: shard" in log and "key corrupt" in log


def test_mlflow_run_holds_params_losses_and_eval_metrics(trained):
    from mlflow.tracking import MlflowClient

    work, _ = trained
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "one MLflow run per training job"
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "lesa" and run.data.params["scaling.num_workers"] == "2"
    for key in ("loss", "loss/rank", "loss/dist", "loss/rel", "loss/div", "lr", "samples_per_s", "data_wait_fraction"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), key
    zsl_map = client.get_metric_history(run.info.run_id, "zsl/mAP")
    assert [m.step for m in zsl_map] == [16, STEPS]
    assert zsl_map[-1].value == pytest.approx(metrics["zsl"]["mAP"])
    assert run.data.metrics["bad_samples/train"] == metrics["bad_samples"]["train"]["count"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "metrics.json"} <= artifacts
    assert exp.artifact_location.startswith((work / "mlartifacts").as_uri())
    assert (work / "mlartifacts").is_dir()


def test_config_error_names_the_key_before_any_cluster_work(tmp_path):
    proc = lesa("train", CONFIG, "--out", tmp_path, "--set", "train.max_stepz=3", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "train.max_stepz" in proc.stderr
    assert "ray" not in proc.stderr.lower()


def test_missing_dataset_is_a_clear_error(tmp_path):
    proc = lesa(
        "train", CONFIG, "--out", tmp_path / "o", "--set", f"data.url={tmp_path / 'nowhere'}", cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 2
    assert "nowhere/dataset.json: missing" in proc.stderr


def test_evaluate_checkpoint_on_another_number_of_workers_gives_the_same_metrics(trained, shared_ray):
    """`lesa evaluate` with 3 workers reproduces the 2-worker training's final metrics exactly (on
    the session's Ray: its subject is the checkpoint, not a fresh cluster)."""
    work, _ = trained
    trained_metrics = json.loads((work / "run" / "metrics.json").read_text())
    proc = lesa(
        "evaluate",
        CONFIG,
        "--checkpoint",
        work / "run",
        "--out",
        work / "eval3",
        "--set",
        f"data.url={work / 'data'}",
        "--set",
        "data.image_size=48",
        "--set",
        "scaling.num_workers=3",
        "--set",
        "mlflow.experiment=e2e-eval",
        timeout=600,
        cwd=work,
        env=lesa_env(**shared_ray),
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    metrics = json.loads((work / "eval3" / "metrics.json").read_text())
    for setting in ("zsl", "gzsl"):
        for key, value in trained_metrics[setting].items():
            assert metrics[setting][key] == pytest.approx(value, abs=1e-6), (setting, key)
    assert metrics["num_test_images"] == 96
    for setting in ("zsl", "gzsl"):
        rows = (work / "eval3" / f"per_label_{setting}.tsv").read_text().splitlines()
        assert rows[0].split("\t") == ["index", "id", "name", "role", "AP", "positives", "annotated"]
        assert len(rows) - 1 == (15 if setting == "zsl" else 64)
        assert (work / "eval3" / f"per_label_{setting}.tsv").read_text() == (
            work / "run" / f"per_label_{setting}.tsv"
        ).read_text()
    assert "ZSL per label: best:" in proc.stdout

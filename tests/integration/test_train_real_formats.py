"""The experiment files users submit, `launch/openimages.yaml` and `launch/nuswide.yaml`, train and
evaluate through the same `lesa train` as the synthetic data (tests/integration/test_e2e.py), on small Open
Images and NUS-WIDE releases in their exact file formats (tests/fixtures_release.py) converted
with `lesa convert`.

Only what a CPU test must change is overridden: the frozen VGG-19 becomes the trainable small CNN
at 64 px, one CPU worker, a few steps with a validation every 3 (the val split drives the adaptive
lr and the best model, as the files say), MLflow in a temporary sqlite store. Everything else, the
K of P/R/F1@K, the validation metric and split, the optimizer and the lr schedule, comes from the
files. Both runs share one local Ray cluster, started by the first `lesa train` in this process.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from fixtures_release import make_nuswide, make_openimages, write_glove

from datasets.contract import read_dataset
from launch.cli import main
from trainer.tracking import metric_key

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 6, 3
NUS_TAGS = ["sky", "water", "beach", "animal", "blue", "sunset", "dog", "airport", "car", "tree"]
NUS_CONCEPTS = ["airport", "animal", "beach", "fire", "whales"]  # 3 are tags too, 2 are not


def convert_openimages(work: Path) -> Path:
    src, out = work / "oi", work / "openimages"
    make_openimages(src, n_train=16, n_val=6, n_test=10)
    assert (
        main(
            [
                "convert",
                "openimages",
                "--class-descriptions",
                str(src / "class-descriptions.csv"),
                "--seen",
                str(src / "seen.txt"),
                "--unseen",
                str(src / "unseen.tsv"),
                "--annotations",
                str(src),
                "--images",
                str(src / "images"),
                "--vectors",
                str(src / "glove.4d.txt"),
                "--no-ray",
                "--image-size",
                "64",
                "--shard-size",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def convert_nuswide(work: Path) -> Path:
    src, out = work / "nus", work / "nuswide"
    make_nuswide(src, NUS_TAGS, NUS_CONCEPTS, n_images=32)
    write_glove(src / "glove.txt", sorted(set(NUS_TAGS) | set(NUS_CONCEPTS)))
    assert (
        main(
            [
                "convert",
                "nuswide",
                "--root",
                str(src),
                "--vectors",
                str(src / "glove.txt"),
                "--placeholder",
                str(src / "placeholder.jpg"),
                "--val-size",
                "5",
                "--no-ray",
                "--image-size",
                "64",
                "--shard-size",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def cpu_overrides(data: Path, work: Path) -> list[str]:
    values = {
        "data.url": data,
        "model.backbone": "small_cnn",
        "model.backbone_weights": "null",
        "data.image_size": 64,
        "data.batch_size": 4,
        "data.loader_workers": 0,
        "scaling.use_gpu": "false",
        "scaling.num_workers": 1,
        "scaling.cpus_per_worker": 1,
        "train.max_steps": STEPS,
        "eval.every": EVERY,
        "checkpoint.every": 0,
        "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "mlflow.log_model": "false",  # test_e2e.py checks the logged model
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


EXPERIMENTS = {"openimages": convert_openimages, "nuswide": convert_nuswide}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Convert both releases, then `lesa train` each experiment file on its dataset, in this process."""
    import ray

    work = tmp_path_factory.mktemp("real_formats")
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)  # a local cluster, whatever the shell has
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("PYTHONPATH", str(REPO))  # Ray's worker processes import the checkout
        mp.chdir(work)
        try:
            for name, convert in EXPERIMENTS.items():
                data = convert(work)
                config = REPO / "launch" / f"{name}.yaml"
                assert main(["train", str(config), "--out", str(work / f"run_{name}"), *cpu_overrides(data, work)]) == 0
                results[name] = {
                    "data": data,
                    "run": work / f"run_{name}",
                    "work": work,
                    "file": yaml.safe_load(config.read_text()),
                    "metrics": json.loads((work / f"run_{name}" / "metrics.json").read_text()),
                }
        finally:
            ray.shutdown()
    return results


@pytest.mark.integration
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_file_trains_and_evaluates_zsl_and_gzsl(runs, name):
    run = runs[name]
    metrics, ks = run["metrics"], run["file"]["eval"]["k"]
    assert ks == {"openimages": [10, 20], "nuswide": [3, 5]}[name]  # the paper's K, from the file
    for setting in ("zsl", "gzsl"):
        assert set(metrics[setting]) == {f"{m}@{k}" for m in ("P", "R", "F1") for k in ks} | {"mAP"}, setting
        assert all(0.0 <= v <= 100.0 for v in metrics[setting].values()), metrics[setting]
    assert metrics["step"] == STEPS

    # Every test image the converter wrote is evaluated, none twice, none skipped as bad.
    report = json.loads((run["data"] / "convert_report.json").read_text())
    written = report["splits"]["test"]["written"]
    assert written == sum(s.samples for s in read_dataset(str(run["data"])).shards("test")) > 0
    assert metrics["num_test_images"] == written
    assert metrics["bad_samples"]["eval"]["count"] == 0 and metrics["bad_samples"]["train"]["count"] == 0

    # Per-label reports: ZSL over the unseen labels the converter wrote, each with test positives.
    info = read_dataset(str(run["data"]))
    with open(run["run"] / "per_label_zsl.tsv", newline="") as f:
        zsl = list(csv.DictReader(f, delimiter="\t"))
    assert [row["name"] for row in zsl] == [info.labels[i].name for i in info.unseen]
    assert all(row["role"] == "unseen" and int(row["positives"]) > 0 for row in zsl), zsl
    gzsl_rows = (run["run"] / "per_label_gzsl.tsv").read_text().splitlines()
    assert len(gzsl_rows) - 1 == info.num_labels
    assert (run["run"] / "model.pt").stat().st_size > 0


@pytest.mark.integration
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_validation_drives_the_schedule_and_the_best_model(runs, name):
    """The val split the converter wrote is validated every eval.every steps with the file's metric
    (mAP on Open Images, F1@5 on NUS-WIDE, seen labels only); the test split only at the end."""
    run = runs[name]
    metrics, ev, optim = run["metrics"], run["file"]["eval"], run["file"]["optim"]
    assert ev["val_split"] == "val" and optim["adaptive_lr"] is True and ev["test_during_training"] is False
    assert metrics["schedule"]["val_split"] == "val"
    assert metrics["schedule"]["val_metric"] == ev["val_metric"] == {"openimages": "mAP", "nuswide": "F1@5"}[name]
    assert metrics["schedule"]["validations"] == STEPS // EVERY and metrics["schedule"]["adaptive_lr"]
    assert 0 < metrics["schedule"]["final_lr"] <= optim["lr"]
    history = metrics["history"]
    assert [h["step"] for h in history] == list(range(EVERY, STEPS + 1, EVERY))
    val_key = f"val/{ev['val_metric']}"
    for h in history:
        assert 0.0 <= h[val_key] <= 100.0 and "val/ema" in h and h["lr"] > 0, h
        assert not any(k.startswith(("zsl/", "gzsl/")) for k in h), h  # test_during_training: false
    best = metrics["best"]
    assert best["step"] in [h["step"] for h in history]
    assert best["val_metric"] == max(h[val_key] for h in history)
    assert set(best["zsl"]) == set(metrics["zsl"]) and set(best["gzsl"]) == set(metrics["gzsl"])
    assert (run["run"] / "model_best.pt").stat().st_size > 0


@pytest.mark.integration
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_mlflow_run_in_the_files_experiment(runs, name):
    from mlflow.tracking import MlflowClient

    run = runs[name]
    metrics, ev = run["metrics"], run["file"]["eval"]
    client = MlflowClient(f"sqlite:///{run['work'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name(run["file"]["mlflow"]["experiment"])  # lesa-openimages, lesa-nuswide
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [metrics["mlflow_run_id"]]
    mlrun = client.get_run(metrics["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["eval.k"] == str(ev["k"]) and mlrun.data.params["model.backbone"] == "small_cnn"
    assert mlrun.data.params["optim.name"] == "rmsprop_tf"
    val = client.get_metric_history(mlrun.info.run_id, metric_key(f"val/{ev['val_metric']}"))
    assert sorted(m.step for m in val) == list(range(EVERY, STEPS + 1, EVERY))
    assert mlrun.data.metrics[metric_key(f"zsl/F1@{ev['k'][-1]}")] == pytest.approx(metrics["zsl"][f"F1@{ev['k'][-1]}"])

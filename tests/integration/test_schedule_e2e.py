"""The validation schedule end to end: real Ray, DeepSpeed, tar shards and MLflow; the lr decays,
early stopping ends the run, the best model is kept and a resume continues the schedule (the
rules on their own: tests/test_schedule.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from run_cli import REPO, lesa, lesa_env

from trainer.schedule import BEST_MODEL_FILE, AdaptiveLR, EarlyStopping

CONFIG = str(REPO / "launch" / "synthetic.yaml")
MAX_STEPS, EVERY = 40, 2


def write_data(root: Path) -> None:
    """A tiny synthetic dataset whose validation labels are inverted (present <-> verified absent):
    the better the model learns the training task, the lower its validation metric, so the lr
    decays and early stopping ends the run without waiting for noise."""
    from datasets.contract import read_dataset, write_metadata
    from datasets.makers.shards import SplitWriter, encode_jpeg, encode_labels
    from datasets.makers.synthetic import SyntheticBenchmark, write_synthetic

    write_synthetic(
        str(root), seed=4, sizes={"train": 64, "test": 16}, image_size=32, shard_size=16, log=lambda *_: None
    )
    bench = SyntheticBenchmark(seed=4, image_size=32)
    with SplitWriter(str(root), "val", maxcount=100) as writer:
        for i in range(16):
            image, pos, neg = bench.sample("val", i)
            writer.write(f"val{i}", {"jpg": encode_jpeg(image), "labels.json": encode_labels(neg, pos)})
    info = read_dataset(str(root))
    meta = json.loads((root / "dataset.json").read_text())
    splits = {name: [(s["path"], s["samples"]) for s in entry["shards"]] for name, entry in meta["splits"].items()}
    write_metadata(
        str(root), meta["name"], meta["kind"], info.labels, info.embeddings, {**splits, "val": writer.shards}
    )


def lesa_train(work: Path, data: Path, ray: dict, *extra: str) -> str:
    """`lesa train` on the session's Ray cluster: the subject here is the schedule, not a fresh Ray."""
    proc = lesa(
        "train",
        CONFIG,
        "--out",
        work / "run",
        "--set",
        f"data.url={data}",
        "--set",
        "data.image_size=32",
        "--set",
        "data.batch_size=4",
        "--set",
        "data.shuffle_buffer=16",
        "--set",
        "eval.batch_size=16",
        "--set",
        "eval.overlays=0",
        "--set",
        f"eval.every={EVERY}",
        "--set",
        "eval.test_during_training=false",
        "--set",
        "optim.lr=0.003",
        "--set",
        "optim.lr_patience=0",
        "--set",
        "optim.lr_ema=0",
        "--set",
        "train.early_stopping=true",
        "--set",
        "train.early_stopping_patience=2",
        "--set",
        "train.log_every=1",
        "--set",
        "checkpoint.every=4",
        "--set",
        "checkpoint.keep=1",
        "--set",
        "mlflow.experiment=schedule",
        "--set",
        "mlflow.log_model=false",  # test_e2e.py checks the logged model
        *extra,
        timeout=600,
        cwd=work,
        env=lesa_env(**ray),
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


def replay(history: list[dict], lr_patience: int, stop_patience: int) -> list[tuple]:
    """(lr, EMA, bad evaluations, best step) after each validation, recomputed from the metrics alone."""
    rule, stop, best, out = (
        AdaptiveLR(lr=0.003, patience=lr_patience, smoothing=0.0),
        EarlyStopping(stop_patience),
        None,
        [],
    )
    for entry in history:
        metric = entry["val/mAP"]
        rule.adapt(metric)
        stop.update(metric)
        if best is None or metric > best[1]:
            best = (entry["step"], metric)
        out.append((pytest.approx(rule.lr, rel=1e-12), pytest.approx(rule.ema), stop.bad_evaluations, best[0]))
    return out


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, shared_ray):
    work = tmp_path_factory.mktemp("schedule")
    write_data(work / "data")
    log = lesa_train(work, work / "data", shared_ray, "--set", f"train.max_steps={MAX_STEPS}")
    return work, log


def test_lr_decays_early_stopping_ends_the_run_and_the_best_model_is_kept(stopped_run):
    work, log = stopped_run
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    history = [h for h in metrics["history"] if "val/mAP" in h]
    assert [h["step"] for h in history] == list(range(EVERY, metrics["step"] + 1, EVERY))
    # every decision follows from the recorded metrics by the spec's rule, on both workers alike
    assert [(h["lr"], h["val/ema"], h["val/bad_evaluations"]) for h in history] == [
        r[:3] for r in replay(history, 0, 2)
    ]
    assert history[-1]["lr"] < 0.003, "the lr decayed"
    assert metrics["schedule"]["stopped_early"] and metrics["step"] < MAX_STEPS
    assert history[-1]["val/bad_evaluations"] == 2
    assert f"stopped early at step {metrics['step']}" in log and "decayed from 0.003" in log

    best = metrics["best"]
    assert best["step"] == replay(history, 0, 2)[-1][3] and best["step"] < metrics["step"]
    assert best["val_metric"] == max(h["val/mAP"] for h in history)
    assert set(best["zsl"]) == set(metrics["zsl"]) and set(best["gzsl"]) == set(metrics["gzsl"])
    assert best["zsl"] != metrics["zsl"], "the best and the last model are different models"
    assert metrics["schedule"]["final_lr"] == pytest.approx(history[-1]["lr"])

    # model_best.pt holds the weights of the best step: its validation metric, recomputed here in
    # one process, is the one the two workers measured at that step
    from datasets.contract import read_dataset
    from trainer.config import config_from_dict
    from trainer.evaluation.evaluate import validation_metric
    from trainer.models.registry import build_model
    from trainer.weights import load_model_state

    cfg = config_from_dict(json.loads((work / "run" / "config.json").read_text()))
    info = read_dataset(cfg.data.url)
    model = build_model(cfg, info.embeddings, info.seen)
    load_model_state(model, str(work / "run" / BEST_MODEL_FILE))
    assert validation_metric(model, info, cfg, 0, 1, torch.device("cpu")) == pytest.approx(best["val_metric"], abs=1e-9)
    last = torch.load(work / "run" / "model.pt", weights_only=True)
    assert any(
        not torch.equal(v, last[k]) for k, v in torch.load(work / "run" / BEST_MODEL_FILE, weights_only=True).items()
    )


def test_mlflow_has_the_lr_and_the_validation_metric(stopped_run):
    from mlflow.tracking import MlflowClient

    work, _ = stopped_run
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    run_id = metrics["mlflow_run_id"]
    history = [h for h in metrics["history"] if "val/mAP" in h]
    val = client.get_metric_history(run_id, "val/mAP")
    assert [(m.step, m.value) for m in val] == [(h["step"], pytest.approx(h["val/mAP"])) for h in history]
    # the lr logged at each step is the one that step trained with: the last validation's before it
    lr_at = {m.step: m.value for m in client.get_metric_history(run_id, "lr")}
    assert sorted(lr_at) == list(range(1, metrics["step"] + 1))
    for step, lr in lr_at.items():
        before = [h["lr"] for h in history if h["step"] < step]
        assert lr == pytest.approx(before[-1] if before else 0.003), step
    assert len(set(lr_at.values())) > 1
    best = client.get_metric_history(run_id, "best/zsl/mAP")
    assert [m.value for m in best] == [pytest.approx(metrics["best"]["zsl"]["mAP"])]


def test_resume_on_one_worker_continues_the_schedule(stopped_run, shared_ray):
    work, _ = stopped_run
    first = json.loads((work / "run" / "metrics.json").read_text())
    stopped_at = first["step"]
    ckpt = Path(first["checkpoint"])
    saved = json.loads((ckpt / "lesa_state.json").read_text())["schedule"]
    assert (ckpt / BEST_MODEL_FILE).exists(), "the final checkpoint carries the best model"
    assert len([p for p in ckpt.parent.glob("checkpoint_*") if p.is_dir()]) == 1, (
        "checkpoint.keep=1 deleted the older ones"
    )

    # patience for early stopping raised so the run goes on; everything else as it was
    log = lesa_train(
        work,
        work / "data",
        shared_ray,
        "--resume",
        "latest",
        "--set",
        "scaling.num_workers=1",
        "--set",
        f"train.max_steps={stopped_at + 2 * EVERY}",
        "--set",
        "train.early_stopping_patience=50",
    )
    assert f"resumed from step {stopped_at} on 1 workers" in log
    saved["early_stopping"]["patience"] = 50  # hyperparameters come from the config, the state from the checkpoint
    assert f"resumed schedule: {json.dumps(saved)}" in log
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    assert metrics["step"] == stopped_at + 2 * EVERY and not metrics["schedule"]["stopped_early"]
    history = [h for h in metrics["history"] if "val/mAP" in h]
    assert [h["step"] for h in history] == list(range(EVERY, metrics["step"] + 1, EVERY))
    # the lr, EMA and counter carry on from the checkpoint: the whole history replays as one run
    # (the early-stopping counter with the raised patience counts the same way)
    assert [(h["lr"], h["val/ema"], h["val/bad_evaluations"]) for h in history] == [
        r[:3] for r in replay(history, 0, 50)
    ]
    assert metrics["best"]["step"] == replay(history, 0, 50)[-1][3]
    assert metrics["history"][: len(first["history"])] == first["history"]

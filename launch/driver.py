"""The driver of `lesa train` and `lesa evaluate`: validate, take the run folder, open the MLflow
run, run the workers on Ray Train (launch/workers.py), print the summary.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from datasets.contract import join
from launch.preflight import (
    absolute,
    check_resume_engine,
    evaluation_checkpoint,
    preflight,
    resumed,
    training_splits,
)
from launch.run_lock import hold
from launch.storage import has_checkpoint, read_text
from launch.workers import run_workers
from trainer.checkpointing import CheckpointError, check_loadable
from trainer.config import Config, ConfigError
from trainer.evaluation.report import summarise_per_label
from trainer.progress import format_table
from trainer.run_folder import ATTENTION_DIR, MODEL_FILE, PER_LABEL_FILES, SETTINGS, RunFolder, RunRecord
from trainer.state import STATE_FILE, StateError, TrainState
from trainer.tracking import RunLogger, find_run, open_run, resolve_tracking, run_page


def open_tracking(
    cfg: Config, out: Path, default_name: str, resume: RunRecord | None = None, parent_run_id: str | None = None
) -> tuple[str, str, RunLogger]:
    """A new MLflow run (nested under `parent_run_id` if given), or on resume the run of the job
    being continued (params not re-logged: MLflow refuses changed values, and a resume may change
    the number of workers)."""
    tracking_uri, artifact_location = resolve_tracking(cfg.mlflow)
    if resume and resume.tracking_uri is None:  # a checkpoint from elsewhere: never its tracking URI
        if find_run(tracking_uri, resume.mlflow_run_id) is not None:
            resume = dataclasses.replace(resume, tracking_uri=tracking_uri)
        else:
            print(
                f"the checkpoint's MLflow run {resume.mlflow_run_id} is not in {tracking_uri}: continuing in a new run there"
            )
            resume = None
    if resume:
        tracking_uri, run_name = resume.tracking_uri, resume.run_name
        logger = RunLogger(tracking_uri, resume.mlflow_run_id)
        logger.reopen()
        print(f"resuming MLflow run {logger.run_id} ({run_name}) in {tracking_uri}")
        print_run_page(logger)
        return tracking_uri, run_name, logger
    run_name = cfg.mlflow.run_name or f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = open_run(tracking_uri, artifact_location, cfg.mlflow.experiment, run_name, cfg.flat(), parent_run_id)
    logger = RunLogger(tracking_uri, run_id)
    folder = RunFolder(out)
    folder.config.write_text(json.dumps(cfg.to_dict(), indent=1))
    logger.artifact(folder.config)
    print(f"MLflow run {run_id} ({run_name}) in {tracking_uri}")
    print_run_page(logger)
    return tracking_uri, run_name, logger


def print_run_page(logger: RunLogger) -> None:
    experiment = logger.client.get_run(logger.run_id).info.experiment_id
    page = run_page(logger.tracking_uri, experiment, logger.run_id)
    if page:
        print(f"  in the MLflow UI: {page}")


def checked_checkpoint(folder: str) -> TrainState:
    """`--resume PATH`: the checkpoint's TrainState, after the checks a restore makes (every file's
    digest, plain tensors only) where the folder is local, so a damaged or planted checkpoint is
    refused here, before any cluster work; a remote one is checked by the workers as they load it."""
    state_text = read_text(join(folder, STATE_FILE))
    if state_text is None:
        raise ConfigError(f"--resume {folder}: not a checkpoint of this system ({STATE_FILE} is missing)")
    try:
        if "://" not in folder:
            check_loadable(Path(folder))
        return TrainState.from_json(state_text, join(folder, STATE_FILE))
    except (CheckpointError, StateError) as exc:
        raise ConfigError(f"--resume: {exc}") from None


def resume_target(out: Path, resume: str | None) -> tuple[RunRecord | None, str | None]:
    """(the run being continued, a checkpoint folder to start from) for `--resume`."""
    folder = RunFolder(out)
    run_file = folder.run_record
    if resume is None:
        if run_file.exists():
            raise ConfigError(
                f"--out {out} already holds a training run; pass --resume latest to continue "
                f"it, or choose another --out"
            )
        return None, None
    if resume == "latest":
        if not run_file.exists():
            raise ConfigError(f"--resume latest: {out} holds no run to resume ({run_file.name} is missing)")
        run = RunRecord.read(folder)
        # No checkpoint and no step in MLflow (the run died before its first logged window): a
        # restart from step 0 is its resume. Once steps are logged, starting over would log them again.
        logged = (
            None
            if has_checkpoint(run.storage, run.run_name, STATE_FILE)
            else find_run(run.tracking_uri, run.mlflow_run_id)
        )
        if logged is not None and logged.data.metrics:
            raise ConfigError(
                f"--resume latest: {run.storage.rstrip('/')}/{run.run_name} holds no checkpoint of the run in {out}; "
                f"start afresh in a new --out, or --resume PATH with a checkpoint folder of it"
            )
        return run, None
    resume = absolute(resume).rstrip("/")  # a checkpoint folder, local or at a URL
    state = checked_checkpoint(resume)
    if run_file.exists():
        run = RunRecord.read(folder)
    else:  # a checkpoint from elsewhere: continue its MLflow run under a new Ray Train run name
        # tracking_uri None: the user's store (open_tracking); a checkpoint must not redirect tracking
        run = RunRecord(f"resumed-{time.strftime('%Y%m%d-%H%M%S')}", state.mlflow_run_id, None, None)
    return run, resume


def run_training(cfg: Config, out: str | Path, resume: str | None = None, parent_run_id: str | None = None) -> dict:
    """`lesa train`; `parent_run_id` nests its MLflow run under another (`lesa compare`)."""
    from launch.preflight import check_trains
    from trainer.worker import train_worker

    cfg, out, info, _ = preflight(cfg, out, training_splits(cfg))
    check_trains(cfg)
    with hold(out):  # launch/run_lock.py: one run per --out, before run.json is read or any MLflow/Ray work
        run, resume_from = resume_target(out, resume)
        check_resume_engine(cfg, run, resume_from)  # a ZeRO stage or optimizer switch, refused before Ray
        print(
            f"dataset {info.name}: {len(info.seen)} seen + {len(info.unseen)} unseen labels, "
            f"{sum(s.samples for s in info.shards(cfg.data.train_split))} training images"
        )
        cfg = resumed(cfg, run)
        tracking_uri, run_name, logger = open_tracking(
            cfg, out, cfg.model.name, resume=run, parent_run_id=parent_run_id
        )
        RunRecord(run_name, logger.run_id, tracking_uri, cfg.checkpoint.storage).write(RunFolder(out))
        metrics = run_workers(
            cfg,
            out,
            train_worker,
            {"tracking_uri": tracking_uri},
            run_name,
            logger,
            log_metrics=False,
            resume_from=resume_from,
        )
        print_summary(metrics, cfg, out, f"{cfg.model.name} after {metrics['step']} steps")
        return metrics


def run_evaluation(cfg: Config, checkpoint: str | None, out: str | Path, parent_run_id: str | None = None) -> dict:
    """`lesa evaluate`: a trained model.pt (or a folder holding one), or a model that trains nothing
    (clip_zeroshot, `checkpoint` None), on any number of workers; `parent_run_id` as in run_training."""
    from trainer.worker import evaluate_worker

    cfg, out, info, _ = preflight(cfg, out, [cfg.eval.split])
    checkpoint = evaluation_checkpoint(checkpoint, cfg, info)  # before the MLflow run and Ray
    with hold(out):  # launch/run_lock.py: one run per --out
        tracking_uri, run_name, logger = open_tracking(
            cfg, out, f"evaluate-{cfg.model.name}", parent_run_id=parent_run_id
        )
        metrics = run_workers(cfg, out, evaluate_worker, {"checkpoint": checkpoint}, run_name, logger, log_metrics=True)
        print_summary(metrics, cfg, out, f"{cfg.model.name} from {checkpoint or 'no checkpoint (it trains nothing)'}")
        return metrics


def print_summary(metrics: dict, cfg: Config, out: Path, title: str) -> None:
    print(
        f"\n=== {title}, {metrics['num_test_images']} {cfg.eval.split} images "
        f"on {cfg.scaling.num_workers} workers (percent) ==="
    )
    print(format_table(metrics, cfg.eval.k))
    if metrics.get("best"):  # the best validated model (model_best.pt), on the same split
        best, schedule = metrics["best"], metrics["schedule"]
        print(
            f"best model (step {best['step']}, {schedule['val_split']} seen {schedule['val_metric']} "
            f"{best['val_metric']:.2f}) on {cfg.eval.split}:\n{format_table(best, cfg.eval.k)}"
        )
    if metrics.get("schedule", {}).get("stopped_early"):
        print(
            f"stopped early at step {metrics['step']}: no improvement on {metrics['schedule']['val_split']} "
            f"for train.early_stopping_patience={cfg.train.early_stopping_patience} validations"
        )
    print(
        "chance level (mean label frequency): "
        + ", ".join(f"{name.upper()} mAP {value:.2f}" for name, value in metrics["chance_mAP"].items())
    )
    for setting, name in zip(SETTINGS, PER_LABEL_FILES):
        print(f"{setting.upper()} per label: {summarise_per_label(out / name)}")
    for phase, bad in metrics["bad_samples"].items():
        print(
            f"bad samples skipped ({phase}): {bad['count']} of {bad['read']} read"
            + (f" {bad['by_kind']}" if bad["count"] else "")
        )
    if metrics.get("throughput"):
        print(
            f"throughput: {metrics['throughput']['samples_per_s']:.0f} samples/s over "
            f"{metrics['throughput']['seconds']:.0f} s"
        )
    print(
        f"results in {out} (metrics.json, per_label_*.tsv"
        + (f", {MODEL_FILE}" if (out / MODEL_FILE).exists() else "")
        + (", model_best.pt" if metrics.get("best") else "")
        + (f", {ATTENTION_DIR}/*.png" if (out / ATTENTION_DIR).is_dir() else "")
        + f"); MLflow run {metrics['mlflow_run_id']}"
    )

"""The driver of `lesa train` and `lesa evaluate`: validate, open the MLflow run, start Ray Train,
collect the results.

Ray: the cluster in RAY_ADDRESS if set (as under `ray job submit`), otherwise a local one started
here with enough CPU slots for the requested workers.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from datasets.contract import join
from launch.errors import RunFailed
from launch.preflight import absolute, evaluation_checkpoint, preflight, resumed, training_splits
from launch.run_lock import hold
from launch.storage import checkpoint_url, has_checkpoint, ray_storage, read_text, storage_env
from trainer.checkpointing import CheckpointError, check_loadable
from trainer.config import Config, ConfigError
from trainer.progress import format_table
from trainer.report import summarise_per_label
from trainer.state import STATE_FILE, StateError, TrainState
from trainer.tracking import RunLogger, find_run, open_run, resolve_tracking


def start_ray(cfg: Config) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # On an existing cluster Ray's processes do not inherit this environment, and Train's
        # controller writes to the checkpoint storage too: the storage variables go to the whole
        # job. Under `ray job submit` the job's runtime env is set already and this process runs
        # inside it (Ray refuses to merge the same variable twice), so it is left alone there.
        env = storage_env()
        under_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray for job entrypoints
        ray.init(runtime_env={"env_vars": env} if env and not under_job else None)
    else:
        needed = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
        # The dashboard (on 127.0.0.1) also serves the state API that Ray Train's placement-group
        # cleaner polls; without it that actor logs a warning every few seconds.
        ray.init(
            num_cpus=max(os.cpu_count() or 1, needed),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            configure_logging=True,
            logging_level="WARNING",
        )


RUN_FILE = "run.json"  # what `--resume latest` needs: the Ray Train run name and the MLflow run


def open_tracking(
    cfg: Config, out: Path, default_name: str, resume: dict | None = None, parent_run_id: str | None = None
) -> tuple[str, str, RunLogger]:
    """A new MLflow run (nested under `parent_run_id` if given), or on resume the run of the job
    being continued (params not re-logged: MLflow refuses changed values, and a resume may change
    the number of workers)."""
    tracking_uri, artifact_location = resolve_tracking(cfg.mlflow)
    if resume and resume["tracking_uri"] is None:  # a checkpoint from elsewhere: never its tracking URI
        if find_run(tracking_uri, resume["mlflow_run_id"]) is not None:
            resume = {**resume, "tracking_uri": tracking_uri}
        else:
            print(
                f"the checkpoint's MLflow run {resume['mlflow_run_id']} is not in {tracking_uri}: continuing in a new run there"
            )
            resume = None
    if resume:
        tracking_uri, run_name = resume["tracking_uri"], resume["run_name"]
        logger = RunLogger(tracking_uri, resume["mlflow_run_id"])
        logger.reopen()
        print(f"resuming MLflow run {logger.run_id} ({run_name}) in {tracking_uri}")
        return tracking_uri, run_name, logger
    run_name = cfg.mlflow.run_name or f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = open_run(tracking_uri, artifact_location, cfg.mlflow.experiment, run_name, cfg.flat(), parent_run_id)
    logger = RunLogger(tracking_uri, run_id)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    logger.artifact(out / "config.json")
    print(f"MLflow run {run_id} ({run_name}) in {tracking_uri}")
    return tracking_uri, run_name, logger


RESULT_FILES = ("metrics.json", "per_label_zsl.tsv", "per_label_gzsl.tsv", "model.pt", "model_best.pt")
OVERLAYS_DIR = "attention"


def run_workers(
    cfg: Config,
    out: Path,
    worker_fn,
    payload: dict,
    run_name: str,
    logger: RunLogger,
    log_metrics: bool,
    resume_from: str | None = None,
) -> dict:
    """Run `worker_fn` on `scaling.num_workers` Ray Train workers; bring its results into `out`
    and the MLflow run; return metrics.json as a dict. A run whose name already has checkpoints
    in the storage resumes from the latest; `resume_from` names a checkpoint otherwise."""
    from ray.train import Checkpoint, CheckpointConfig, ControllerError, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainer.engine import WorkerArgs
    from trainer.failures import FailFast, NotRetryable

    # Ray's print patch tees prints when a library has wrapped stdout: every line came out twice.
    worker_env = {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if not cfg.scaling.use_gpu:
        worker_env["DS_ACCELERATOR"] = "cpu"
    worker_env.update(storage_env())  # credentials and endpoints, by name from this environment
    storage_path, storage_filesystem = ray_storage(cfg.checkpoint.storage)
    start_ray(cfg)
    trainer = TorchTrainer(
        worker_fn,
        # Ray Train V2 refuses resume_from_checkpoint: the workers fall back to this one themselves
        # while the run has no checkpoint of its own.
        train_loop_config={
            "args": WorkerArgs(
                config=cfg.to_dict(),
                out=str(out),
                run_id=logger.run_id,
                resume_from=Checkpoint(*ray_storage(resume_from)) if resume_from else None,
                **payload,
            )
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            callbacks=[FailFast()],  # trainer/failures.py: no retries of an error that would recur
            worker_runtime_env={"env_vars": worker_env},
        ),
    )
    try:
        result = trainer.fit()
        with result.checkpoint.as_directory() as ckpt:
            for name in RESULT_FILES:
                if Path(ckpt, name).exists():
                    shutil.copy(Path(ckpt, name), out / name)
            if Path(ckpt, OVERLAYS_DIR).is_dir():  # eval.overlays: attention PNGs (trainer/attention_maps.py)
                shutil.rmtree(out / OVERLAYS_DIR, ignore_errors=True)
                shutil.copytree(Path(ckpt, OVERLAYS_DIR), out / OVERLAYS_DIR)
    except ControllerError as exc:  # FailFast stopped the run: the error is said in one line
        logger.finish(ok=False)
        if isinstance(exc.controller_failure, NotRetryable):
            raise RunFailed(str(exc.controller_failure)) from None
        raise
    except BaseException:
        logger.finish(ok=False)
        raise
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["mlflow_run_id"] = logger.run_id
    metrics["checkpoint"] = checkpoint_url(cfg.checkpoint.storage, result.checkpoint.path)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if log_metrics:  # training's rank 0 logged them already, with their step
        logger.log(
            {f"{setting}/{k}": v for setting in ("zsl", "gzsl") for k, v in metrics[setting].items()}, metrics["step"]
        )
    for name in ("metrics.json", *SETTINGS_FILES):
        logger.artifact(out / name)
    for picture in sorted((out / OVERLAYS_DIR).glob("*.png")):
        logger.artifact(picture, OVERLAYS_DIR)
    logger.finish(ok=True)
    return metrics


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


def resume_target(out: Path, resume: str | None) -> tuple[dict | None, str | None]:
    """(the run being continued, a checkpoint folder to start from) for `--resume`."""
    run_file = out / RUN_FILE
    if resume is None:
        if run_file.exists():
            raise ConfigError(
                f"--out {out} already holds a training run; pass --resume latest to continue "
                f"it, or choose another --out"
            )
        return None, None
    if resume == "latest":
        if not run_file.exists():
            raise ConfigError(f"--resume latest: {out} holds no run to resume ({RUN_FILE} is missing)")
        run = json.loads(run_file.read_text())
        # No checkpoint and no step in MLflow (the run died before its first logged window): a
        # restart from step 0 is its resume. Once steps are logged, starting over would log them again.
        logged = (
            None
            if has_checkpoint(run["storage"], run["run_name"], STATE_FILE)
            else find_run(run["tracking_uri"], run["mlflow_run_id"])
        )
        if logged is not None and logged.data.metrics:
            raise ConfigError(
                f"--resume latest: {run['storage'].rstrip('/')}/{run['run_name']} holds no checkpoint of the run in {out}; "
                f"start afresh in a new --out, or --resume PATH with a checkpoint folder of it"
            )
        return run, None
    resume = absolute(resume).rstrip("/")  # a checkpoint folder, local or at a URL
    state = checked_checkpoint(resume)
    if run_file.exists():
        run = json.loads(run_file.read_text())
    else:  # a checkpoint from elsewhere: continue its MLflow run under a new Ray Train run name
        run = {
            "run_name": f"resumed-{time.strftime('%Y%m%d-%H%M%S')}",
            "mlflow_run_id": state.mlflow_run_id,
            "tracking_uri": None,  # the user's store (open_tracking): a checkpoint must not redirect tracking
            "storage": None,
        }
    return run, resume


def run_training(cfg: Config, out: str | Path, resume: str | None = None, parent_run_id: str | None = None) -> dict:
    """`lesa train`; `parent_run_id` nests its MLflow run under another (`lesa compare`)."""
    from trainer.worker import train_worker

    cfg, out, info, _ = preflight(cfg, out, training_splits(cfg))
    with hold(out):  # launch/run_lock.py: one run per --out, before run.json is read or any MLflow/Ray work
        run, resume_from = resume_target(out, resume)
        print(
            f"dataset {info.name}: {len(info.seen)} seen + {len(info.unseen)} unseen labels, "
            f"{sum(s.samples for s in info.shards(cfg.data.train_split))} training images"
        )
        cfg = resumed(cfg, run)
        tracking_uri, run_name, logger = open_tracking(
            cfg, out, cfg.model.name, resume=run, parent_run_id=parent_run_id
        )
        (out / RUN_FILE).write_text(
            json.dumps(
                {
                    "run_name": run_name,
                    "mlflow_run_id": logger.run_id,
                    "tracking_uri": tracking_uri,
                    "storage": cfg.checkpoint.storage,
                }
            )
        )
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


def run_evaluation(cfg: Config, checkpoint: str, out: str | Path) -> dict:
    """`lesa evaluate`: a trained model.pt (or a folder holding one) on any number of workers."""
    from trainer.worker import evaluate_worker

    cfg, out, _, _ = preflight(cfg, out, [cfg.eval.split])
    with hold(out):  # launch/run_lock.py: one run per --out
        checkpoint = evaluation_checkpoint(checkpoint)
        tracking_uri, run_name, logger = open_tracking(cfg, out, f"evaluate-{cfg.model.name}")
        metrics = run_workers(cfg, out, evaluate_worker, {"checkpoint": checkpoint}, run_name, logger, log_metrics=True)
        print_summary(metrics, cfg, out, f"{cfg.model.name} from {checkpoint}")
        return metrics


SETTINGS_FILES = ("per_label_zsl.tsv", "per_label_gzsl.tsv")


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
    for name in SETTINGS_FILES:
        print(f"{name[len('per_label_') : -4].upper()} per label: {summarise_per_label(out / name)}")
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
        + (", model.pt" if (out / "model.pt").exists() else "")
        + (", model_best.pt" if metrics.get("best") else "")
        + (f", {OVERLAYS_DIR}/*.png" if (out / OVERLAYS_DIR).is_dir() else "")
        + f"); MLflow run {metrics['mlflow_run_id']}"
    )

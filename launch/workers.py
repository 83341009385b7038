"""Running a worker function on Ray Train: the cluster, the trainer, and bringing results home.

Ray: the cluster in RAY_ADDRESS if set (as under `ray job submit`), otherwise a local one started
here with enough CPU slots for the requested workers.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from datasets.contract import join, read_dataset
from datasets.ray_start import connect_or_start_ray, worker_lines_flushed
from launch.errors import RunFailed
from launch.storage import checkpoint_url, ray_storage, read_text, storage_env
from trainer.config import Config
from trainer.results import flat_eval_metrics
from trainer.run_folder import ATTENTION_DIR, MODEL_FILE, PER_LABEL_FILES, RESULT_FILES, RunFolder
from trainer.tracking import RunLogger, log_dataset


def start_ray(cfg: Config) -> None:
    """Ray for `scaling.num_workers` workers: RAY_ADDRESS's cluster, or a local one with a slot for each."""
    # On an existing cluster Ray's processes do not inherit this environment, and Train's
    # controller writes to the checkpoint storage too: the storage variables go to the whole
    # job. Under `ray job submit` the job's runtime env is set already and this process runs
    # inside it (Ray refuses to merge the same variable twice), so it is left alone there.
    env = storage_env()
    under_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray for job entrypoints
    needed = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    # The dashboard also serves the state API that Ray Train's placement-group cleaner polls;
    # without it that actor logs a warning every few seconds.
    connect_or_start_ray(
        max(os.cpu_count() or 1, needed),
        dashboard=True,
        runtime_env={"env_vars": env} if env and not under_job else None,
    )


def worker_env(cfg: Config) -> dict[str, str]:
    """The environment every Ray Train worker gets."""
    # Ray's print patch tees prints when a library has wrapped stdout: every line came out twice.
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    env.update(storage_env())  # credentials and endpoints, by name from this environment
    return env


def quiet_train_controller() -> None:
    """Ray Train's preemption watcher off, unless the environment says otherwise: it only feeds
    ray.train.get_preemption_info(), which our loop never reads (a preempted node is still told
    apart from a failure by how its workers died), and creating its actor logs an error-level
    line on every run. Ray Train hands this variable on from the driver to its controller."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def build_trainer(cfg: Config, out: Path, worker_fn, payload: dict, run_name: str, run_id: str, resume_from):
    """A TorchTrainer running `worker_fn` on `scaling.num_workers` workers, with WorkerArgs."""
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainer.engine import WorkerArgs
    from trainer.failures import FailFast

    storage_path, storage_filesystem = ray_storage(cfg.checkpoint.storage)
    args = WorkerArgs(
        config=cfg.to_dict(),
        out=str(out),
        run_id=run_id,
        # Ray Train V2 refuses resume_from_checkpoint: the workers fall back to this one themselves
        # while the run has no checkpoint of its own.
        resume_from=Checkpoint(*ray_storage(resume_from)) if resume_from else None,
        driver_pid=os.getpid(),
        **payload,
    )
    return TorchTrainer(
        worker_fn,
        train_loop_config={"args": args},
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
            worker_runtime_env={"env_vars": worker_env(cfg)},
            # Ray Train's INFO lines (resources requested, worker group started, every report as a
            # 1 KB TrainingReport(...)) go to its log files in Ray's session folder only; its
            # warnings and errors still reach the console beside our progress lines.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def log_dataset_input(cfg: Config, logger: RunLogger, context: str) -> None:
    """data.url as the MLflow run's input: name, digest of dataset.json, label and image counts."""
    info = read_dataset(cfg.data.url)
    profile = {
        "kind": info.kind,
        "seen_labels": len(info.seen),
        "unseen_labels": len(info.unseen),
        **{f"{split}_images": sum(s.samples for s in info.shards(split)) for split in info.splits},
    }
    metadata = read_text(join(cfg.data.url, "dataset.json")) or ""
    log_dataset(logger.tracking_uri, logger.run_id, cfg.data.url, info.name, metadata, profile, context)


def copy_results(checkpoint_dir: Path, folder: RunFolder) -> None:
    """The final checkpoint's result files into the run folder (attention/: eval.overlays)."""
    for name in RESULT_FILES:
        if Path(checkpoint_dir, name).exists():
            shutil.copy(Path(checkpoint_dir, name), folder.root / name)
    if Path(checkpoint_dir, ATTENTION_DIR).is_dir():
        shutil.rmtree(folder.attention, ignore_errors=True)
        shutil.copytree(Path(checkpoint_dir, ATTENTION_DIR), folder.attention)


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
    """Run `worker_fn` on Ray Train; bring its results into `out` and the MLflow run; return
    metrics.json as a dict. A run whose name already has checkpoints in the storage resumes from
    the latest; `resume_from` names a checkpoint otherwise."""
    from ray.train import ControllerError

    from trainer.failures import NotRetryable

    folder = RunFolder(out)
    log_dataset_input(cfg, logger, "evaluation" if log_metrics else "training")  # log_metrics: lesa evaluate
    quiet_train_controller()
    start_ray(cfg)
    trainer = build_trainer(cfg, out, worker_fn, payload, run_name, logger.run_id, resume_from)
    try:
        with worker_lines_flushed():  # the workers' last lines before the driver's report
            result = trainer.fit()
        with result.checkpoint.as_directory() as checkpoint_dir:
            copy_results(Path(checkpoint_dir), folder)
    except ControllerError as exc:  # FailFast stopped the run: the error is said in one line
        logger.finish(ok=False)
        if isinstance(exc.controller_failure, NotRetryable):
            raise RunFailed(str(exc.controller_failure)) from None
        raise
    except BaseException:
        logger.finish(ok=False)
        raise
    metrics = json.loads(folder.metrics.read_text())
    metrics["mlflow_run_id"] = logger.run_id
    metrics["checkpoint"] = checkpoint_url(cfg.checkpoint.storage, result.checkpoint.path)
    folder.metrics.write_text(json.dumps(metrics, indent=1))
    if log_metrics:  # training's rank 0 logged them already, with their step
        logger.log(flat_eval_metrics(metrics), metrics["step"])
    for path in (folder.metrics, *(folder.root / name for name in PER_LABEL_FILES)):
        logger.artifact(path)
    for picture in sorted(folder.attention.glob("*.png")):
        logger.artifact(picture, ATTENTION_DIR)
    if (folder.root / MODEL_FILE).exists():  # a training run: its model as a file and as an MLflow model
        logger.artifact(folder.root / MODEL_FILE)
        if cfg.mlflow.log_model:
            log_mlflow_model(cfg, logger, folder.root / MODEL_FILE)
    logger.finish(ok=True)
    return metrics


def log_mlflow_model(cfg: Config, logger: RunLogger, model_file: Path) -> None:
    """model.pt as an MLflow model in the run; a model torch.export cannot trace must not fail a
    finished run, so that is one warning line."""
    from launch.mlflow_model import log_trained_model

    try:
        log_trained_model(logger.tracking_uri, logger.run_id, cfg, model_file)
    except Exception as exc:
        reason = (str(exc).splitlines() or [""])[0][:200]
        print(f"warning: the model is not logged as an MLflow model ({type(exc).__name__}: {reason}); "
              f"{MODEL_FILE} is in the run", file=sys.stderr)  # fmt: skip

"""The driver of `lesa train`: validate, open the MLflow run, start Ray Train, collect the result.

Ray: the cluster in RAY_ADDRESS if set (as under `ray job submit`), otherwise a local one started
here with enough CPU slots for the requested workers.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from datasets.contract import read_dataset
from trainer.config import Config, ConfigError
from trainer.progress import format_table
from trainer.tracking import RunLogger, open_run, resolve_tracking


def absolute(url: str) -> str:
    """Workers run in other directories: make local paths absolute, leave URLs alone."""
    return url if "://" in url else str(Path(url).resolve())


def check_data(cfg: Config):
    info = read_dataset(cfg.data.url)
    train = info.shards(cfg.data.train_split)
    info.shards(cfg.eval.split)
    if len(train) < cfg.scaling.num_workers:
        raise ConfigError(f"scaling.num_workers: {cfg.scaling.num_workers} workers but the "
                          f"{cfg.data.train_split} split of {cfg.data.url} has only {len(train)} shards; "
                          f"write smaller shards or use fewer workers")
    if len(info.unseen) == 0:
        raise ConfigError(f"data.url: {cfg.data.url} has no unseen labels to evaluate ZSL on")
    return info


def start_ray(cfg: Config) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        needed = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
        # The dashboard (on 127.0.0.1) also serves the state API that Ray Train's placement-group
        # cleaner polls; without it that actor logs a warning every few seconds.
        ray.init(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=True,
                 dashboard_host="127.0.0.1", configure_logging=True, logging_level="WARNING")


def run_training(cfg: Config, out: str | Path) -> dict:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainer.worker import train_worker

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg.data.url = absolute(cfg.data.url)
    cfg.checkpoint.storage = absolute(cfg.checkpoint.storage or str(out / "checkpoints"))
    info = check_data(cfg)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    tracking_uri, artifact_location = resolve_tracking(cfg.mlflow)
    run_name = cfg.mlflow.run_name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = open_run(tracking_uri, artifact_location, cfg.mlflow.experiment, run_name, cfg.flat())
    logger = RunLogger(tracking_uri, run_id)
    logger.artifact(out / "config.json")
    print(f"dataset {info.name}: {len(info.seen)} seen + {len(info.unseen)} unseen labels, "
          f"{sum(s.samples for s in info.shards(cfg.data.train_split))} training images")
    print(f"MLflow run {run_id} ({run_name}) in {tracking_uri}")

    # Ray's print patch tees prints when a library has wrapped stdout: every line came out twice.
    worker_env = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
                  "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not cfg.scaling.use_gpu:
        worker_env["DS_ACCELERATOR"] = "cpu"
    start_ray(cfg)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "tracking_uri": tracking_uri, "run_id": run_id},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=cfg.checkpoint.storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             worker_runtime_env={"env_vars": worker_env}),
    )
    try:
        result = trainer.fit()
        with result.checkpoint.as_directory() as ckpt:
            metrics = json.loads((Path(ckpt) / "metrics.json").read_text())
            shutil.copy(Path(ckpt) / "model.pt", out / "model.pt")
    except BaseException:
        logger.finish(ok=False)
        raise
    metrics["mlflow_run_id"] = run_id
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    logger.artifact(out / "metrics.json")
    logger.finish(ok=True)
    print_summary(metrics, cfg, out)
    return metrics


def print_summary(metrics: dict, cfg: Config, out: Path) -> None:
    bad = metrics["bad_samples"]
    print(f"\n=== {cfg.model.name} after {metrics['step']} steps, "
          f"{metrics['num_test_images']} {cfg.eval.split} images (percent) ===")
    print(format_table(metrics, cfg.eval.k))
    print("chance level (mean label frequency): " + ", ".join(
        f"{name.upper()} mAP {value:.2f}" for name, value in metrics["chance_mAP"].items()))
    print(f"bad samples skipped: train {bad['train']['count']} of {bad['train']['read']} read, "
          f"eval {bad['eval']['count']} of {bad['eval']['read']}")
    if metrics.get("throughput"):
        print(f"throughput: {metrics['throughput']['samples_per_s']:.0f} samples/s over "
              f"{metrics['throughput']['seconds']:.0f} s")
    print(f"metrics: {out / 'metrics.json'}   model: {out / 'model.pt'}   MLflow run: {metrics['mlflow_run_id']}")

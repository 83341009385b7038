"""The functions Ray Train runs on every worker: `train_worker` (lesa train) and `evaluate_worker`
(lesa evaluate). Rank 0 logs to MLflow; evaluation runs on all workers, each on its own shards.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from datasets.contract import read_dataset
from trainer.engine import WorkerArgs, setup_worker
from trainer.evaluation.attention_maps import eval_overlay_files
from trainer.evaluation.evaluate import evaluate
from trainer.loop import train_step
from trainer.models.registry import build_model
from trainer.results import final_metrics, publish
from trainer.tracking import system_metrics
from trainer.training import TrainingRun
from trainer.weights import load_model_state


def every(interval: int, step: int) -> bool:
    return bool(interval) and step % interval == 0


def quiet_ray_reports() -> None:
    """Ray Train's report logger is named by its file's path, outside ray.train.* where its
    LoggingConfig (launch/workers.py) applies: each ray.train.report logged a 1 KB
    TrainingReport(...) line to the console at INFO. Its warnings still show."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


@contextmanager
def node_system_metrics(args: WorkerArgs):
    """The system metrics of this worker's node in the MLflow run, from the node's first worker."""
    import ray.train

    ctx = ray.train.get_context()
    monitor = system_metrics(args.tracking_uri, args.run_id, ctx.get_node_rank()) if ctx.get_local_rank() == 0 else None
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()


def train_worker(config: dict) -> None:
    quiet_ray_reports()
    with node_system_metrics(config["args"]):
        train(config["args"])


def train(args: WorkerArgs) -> None:
    run = TrainingRun.start(args)
    cfg, state = run.cfg, run.state
    seen_ids, weights = run.seen_ids, run.loss_weights
    while state.step < cfg.train.max_steps and not run.schedule.should_stop:
        state.step += 1
        run.meter.add(state.step, train_step(run.engine, run.stream, seen_ids, weights, run.device))
        if run.meter.due(state.step):
            run.log_window()
        if run.schedule.due(state.step):
            run.validate()
        last = state.step == cfg.train.max_steps or run.schedule.should_stop  # the final evaluation follows
        if not last and cfg.eval.test_during_training and every(cfg.eval.every, state.step):
            run.test()
        if not last and every(cfg.checkpoint.every, state.step):
            run.checkpoint({"step": state.step})
    run.finish()


def evaluate_worker(config: dict) -> None:
    """Score a trained model.pt on any number of workers: no optimizer, no engine. A model that
    trains nothing (clip_zeroshot) has no checkpoint and is scored as built."""
    args: WorkerArgs = config["args"]
    cfg, rank, world, device = setup_worker(args)
    info = read_dataset(cfg.data.url)
    model = build_model(cfg, info.embeddings, info.seen, info.features)
    if args.checkpoint is not None:
        load_model_state(model, args.checkpoint)
    model.to(device)
    results = evaluate(model, info, cfg, rank, world, device, average_bn=False)
    metrics = final_metrics(results, step=0, bad_samples={"eval": results.bad_samples}, checkpoint=args.checkpoint)
    publish(rank, metrics, results, info, eval_overlay_files(model, info, cfg, device) if rank == 0 else None)

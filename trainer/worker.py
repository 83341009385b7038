"""The per-worker training loop that Ray Train runs on every worker.

Each worker builds the model, wraps it in a DeepSpeed engine on the process group Ray already
created (gloo on CPU, nccl on GPU), streams its share of the training shards, and steps. Rank 0
logs to MLflow. Evaluation runs on all workers every `eval.every` steps and at the end.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import torch
import torch.distributed as dist

from datasets.contract import read_dataset
from datasets.position import DataPosition
from datasets.stream import StreamSpec, make_loader
from trainer.attention_maps import eval_overlay_files
from trainer.bad_samples import BadSampleLog
from trainer.checkpointing import restore, rng_state, save, set_rng_state, state_digest
from trainer.config import Config, config_from_dict
from trainer.evaluation import evaluate, settings_of, validation_metric
from trainer.ledger import Ledger
from trainer.losses import total_loss
from trainer.model import build_model, loss_weights
from trainer.optim import build_optimizer
from trainer.progress import Progress, format_table
from trainer.report import write_per_label
from trainer.schedule import ValidationSchedule, current_lr
from trainer.tracking import RunLogger


def deepspeed_config(cfg: Config, world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.data.batch_size * world,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.deepspeed.bf16},
        # DeepSpeed clips the gradient norm at 1.0 unless told otherwise; LESA's optimizer
        # (docs/protocol.md, Optimisation) and the baselines take the raw gradient.
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,  # our own progress line replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }


def init_engine(cfg: Config, model: torch.nn.Module, world: int):
    import deepspeed

    if not cfg.scaling.use_gpu:
        # DeepSpeed's CPU shared-memory collective is a C++ op JIT-built on first use (about 50 s and
        # a compiler, see docs/development.md); plain gloo collectives are enough for data parallelism.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, world)
    )
    return engine, optimizer


def mean_over_workers(values: dict[str, float], device) -> dict[str, float]:
    names = sorted(values)
    t = torch.tensor([values[n] for n in names], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(names, t.tolist()))


def setup_worker(payload: dict):
    """(config, rank, world, device) for this Ray Train worker."""
    import ray
    import ray.train

    cfg = config_from_dict(payload["config"])
    ctx = ray.train.get_context()
    if cfg.scaling.use_gpu:
        device = torch.device("cuda", ctx.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cfg.scaling.cpus_per_worker)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed + ctx.get_world_rank())
    node = ray.get_runtime_context().get_node_id()
    print(f"[rank {ctx.get_world_rank()}/{ctx.get_world_size()}] on node {node[:12]}, {device}", flush=True)
    return cfg, ctx.get_world_rank(), ctx.get_world_size(), device


def result_files(metrics: dict, results: dict, info, model=None) -> dict:
    """Files rank 0 hands to the driver in the final checkpoint: metrics.json, one per-label TSV
    per setting and, after training, model.pt (a plain state dict)."""
    files = {"metrics.json": lambda path: path.write_text(json.dumps(metrics, indent=1))}
    for name, cols in settings_of(info).items():
        files[f"per_label_{name}.tsv"] = lambda path, cols=cols: write_per_label(path, info, results["per_label"], cols)
    if model is not None:
        files["model.pt"] = lambda path: torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return files


def publish(rank: int, metrics: dict, results: dict, info, extra_files: dict | None = None) -> None:
    """Report evaluation results to the driver (rank 0 through a checkpoint of result files)."""
    import ray.train

    flat = flat_eval_metrics(results)
    if rank != 0:
        ray.train.report(flat)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name, write in {**result_files(metrics, results, info), **(extra_files or {})}.items():
            write(Path(tmp, name))
        ray.train.report(flat, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def final_metrics(results: dict, step: int, **extra) -> dict:
    """The metrics.json of docs/training.md: zsl and gzsl first, then what else the run knows."""
    return {
        "zsl": results["zsl"],
        "gzsl": results["gzsl"],
        "chance_mAP": results["chance_mAP"],
        "step": step,
        "num_test_images": results["num_images"],
        **extra,
    }


def flat_eval_metrics(results: dict) -> dict[str, float]:
    return {f"{setting}/{name}": value for setting in ("zsl", "gzsl") for name, value in results[setting].items()}


def add_to_history(history: list[dict], step: int, values: dict) -> None:
    """One entry per evaluated step: validation and test results of a step share it."""
    if history and history[-1]["step"] == step:
        history[-1].update(values)
    else:
        history.append({"step": step, **values})


def gather_used(used: list, position: DataPosition) -> None:
    """Merge every worker's used positions since the last checkpoint into `position` (the same on
    every rank afterwards)."""
    parts = [used]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, used)
    for part in parts:
        position.mark(part)
    used.clear()


def train_worker(payload: dict) -> None:
    cfg, rank, world, device = setup_worker(payload)
    out = payload["out"]
    info = read_dataset(cfg.data.url)
    engine, optimizer = init_engine(cfg, build_model(cfg, info.embeddings, info.seen, info.features), world)
    model = engine.module
    shards = info.shards(cfg.data.train_split)

    schedule = ValidationSchedule(cfg)  # adaptive lr, early stopping, best model (trainer/schedule.py)
    restored = restore(
        engine,
        fallback=payload.get("resume_from"),
        read_files=lambda state, folder: schedule.load(state.get("schedule"), folder),
    )
    schedule.apply_lr(optimizer)  # the checkpoint's lr, not optim.lr
    step = restored["step"] if restored else 0
    sizes = [s.samples for s in shards]
    position = DataPosition.from_json(restored["position"]) if restored else DataPosition(sizes)
    if position.sizes != sizes:
        raise RuntimeError(
            f"the checkpoint was written for other {cfg.data.train_split} shards than "
            f"{cfg.data.url} lists now; resume on the same dataset"
        )
    eval_history = restored["eval_history"] if restored else []
    if restored:
        set_rng_state(restored["rng"])
        if rank == 0:
            print(
                f"resumed from step {step} on {world} workers: model digest {state_digest(model)}, "
                f"data at epoch {position.completed_epochs} (+{len(position.used)} in flight)",
                flush=True,
            )
            print(f"resumed schedule: {json.dumps(schedule.to_json())}", flush=True)
    ledger_dir = Path(out, "ledger")
    if cfg.data.ledger and rank == 0:
        Ledger.discard_after(ledger_dir, step)  # entries past the restored checkpoint never happened
    if dist.is_initialized():
        dist.barrier()
    ledger = Ledger(ledger_dir, rank) if cfg.data.ledger else None
    logger = RunLogger(payload["tracking_uri"], payload["run_id"], after_step=step) if rank == 0 else None

    spec = StreamSpec(
        shards=shards,
        num_labels=info.num_labels,
        image_size=cfg.data.image_size,
        batch_size=cfg.data.batch_size,
        rank=rank,
        world=world,
        seed=cfg.train.seed,
        train=True,
        shuffle_buffer=cfg.data.shuffle_buffer,
        position=position if restored else None,
        features=info.features,
    )
    loader_workers = min(cfg.data.loader_workers, len(shards) // world)
    batches = iter(make_loader(spec, loader_workers, pin_memory=device.type == "cuda"))
    bad = BadSampleLog(rank, cfg.data.max_bad_fraction)
    used: list = []
    seen_ids = torch.as_tensor(info.seen, device=device)
    weights = loss_weights(cfg)  # each model.name brings its own loss terms (trainer/model.py)
    progress = Progress(cfg.train.max_steps, cfg.data.batch_size * world, first_step=step) if rank == 0 else None

    def next_batch():
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(
                    f"rank {rank}: the training stream ended; no readable samples in "
                    f"its shards (skipped: {dict(bad.by_kind)})"
                ) from None
            bad.add(batch)
            used.extend(batch["positions"])
            if batch["images"] is not None:
                return batch

    def checkpoint(metrics: dict, extra_files=None) -> None:
        gather_used(used, position)
        state = {
            "position": position.to_json(),
            "eval_history": eval_history,
            "rng": rng_state(),
            "mlflow_run_id": payload["run_id"],
            "tracking_uri": payload["tracking_uri"],
            "schedule": schedule.to_json(),
        }
        if ledger:
            ledger.commit(step)
        save(engine, rank, step, state, metrics, out, {**schedule.files(), **(extra_files or {})})
        if rank == 0:
            logger.flush()  # MLflow gets a step's metrics only once a checkpoint holds that step
            print(f"checkpoint at step {step}: model digest {state_digest(model)}", flush=True)

    window: dict[str, float] = {}
    loss_sum = None  # the window's summed losses, left on the device until logged
    while step < cfg.train.max_steps and not schedule.should_stop:
        step += 1
        t0 = time.perf_counter()
        batch = next_batch()
        t_data = time.perf_counter() - t0
        images = batch["images"].to(device, non_blocking=True)
        y = batch["labels"].to(device, non_blocking=True)[:, seen_ids]
        out_ = engine(images, seen_ids)
        loss, parts = total_loss(out_, y, weights)
        engine.backward(loss)
        engine.step()
        if ledger:
            ledger.record(batch["epochs"], batch["keys"])
        step_time = time.perf_counter() - t0
        losses = torch.stack([loss.detach(), *parts.values()])
        loss_sum = losses if loss_sum is None else loss_sum + losses
        for name, value in {"time/step": step_time, "time/data": t_data}.items():
            window[name] = window.get(name, 0.0) + value
        window["n"] = window.get("n", 0) + 1

        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            loss_names = ["loss", *(f"loss/{k}" for k in parts)]
            wait = time.perf_counter()
            window.update(zip(loss_names, loss_sum.tolist()))  # the window's one wait for the GPU,
            window["time/step"] += time.perf_counter() - wait  # whose queued steps it times too
            n = window.pop("n")
            avg = mean_over_workers({k: v / n for k, v in window.items()}, device)
            window.clear()
            loss_sum = None
            if rank == 0:
                row = {k: v for k, v in avg.items() if k.startswith("loss")}
                row["lr"] = optimizer.param_groups[0]["lr"]
                row["samples_per_s"] = cfg.data.batch_size * world / avg["time/step"]
                row["data_wait_fraction"] = avg["time/data"] / avg["time/step"]
                progress.update(step, row)
                logger.log(row, step, flush=False)

        if schedule.due(step):  # validation: seen labels of eval.val_split, never the test split
            logged = schedule.observe(step, validation_metric(model, info, cfg, rank, world, device), model, optimizer)
            eval_history.append({"step": step, **logged, "lr": current_lr(optimizer)})
            if rank == 0:
                print(schedule.report, flush=True)
                logger.log(logged, step, flush=False)
        last = step == cfg.train.max_steps or schedule.should_stop  # the final evaluation follows

        if cfg.eval.every and cfg.eval.test_during_training and step % cfg.eval.every == 0 and not last:
            results = evaluate(model, info, cfg, rank, world, device)
            add_to_history(eval_history, step, flat_eval_metrics(results))
            if rank == 0:
                print(f"[eval @ step {step}]\n{format_table(results, cfg.eval.k)}", flush=True)
                logger.log(flat_eval_metrics(results), step, flush=False)

        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and not last:
            checkpoint({"step": step})

    throughput = progress.summary() if rank == 0 else None  # training only, before the final evaluation
    gather_used(used, position)
    results = evaluate(model, info, cfg, rank, world, device)
    best = schedule.best_on_test(model, step, results, lambda: evaluate(model, info, cfg, rank, world, device))
    bad_train = bad.summary()
    metrics = final_metrics(
        results,
        step,
        bad_samples={"train": bad_train, "eval": results["eval_bad_samples"]},
        epochs_completed=position.completed_epochs,
        history=eval_history,
        throughput=throughput,
        best=best,
        schedule=schedule.summary(optimizer),
    )
    if rank == 0:
        logger.log(
            {
                **flat_eval_metrics(results),
                "bad_samples/train": bad_train["count"],
                "bad_samples/eval": results["eval_bad_samples"]["count"],
                **({f"best/{k}": v for k, v in flat_eval_metrics(best).items()} if best else {}),
            },
            step,
            flush=False,
        )
    files = result_files(metrics, results, info, model)
    if rank == 0:  # attention overlays next to the numbers; a model without attention gives none
        files.update(eval_overlay_files(model, info, cfg, device))
    checkpoint(flat_eval_metrics(results), extra_files=files)
    if ledger:
        ledger.close()


def load_model_state(model: torch.nn.Module, url: str) -> None:
    """Weights from a model.pt this system wrote (tensors only: weights_only=True never runs code).
    The label vectors come from the dataset being evaluated, not from the checkpoint."""
    with fsspec.open(url, "rb") as f:
        state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    state.pop("label_vectors", None)
    # A frozen backbone's weights come from model.backbone_weights (or were cached as the
    # features): a model trained on images evaluates on features and the other way round.
    frozen = not getattr(model.backbone, "trainable", True)
    if frozen:
        state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "label_vectors" and not (frozen and k.startswith("backbone."))]
    if missing or unexpected:
        raise ValueError(
            f"{url}: does not match model.name/model.backbone of the config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def evaluate_worker(payload: dict) -> None:
    """`lesa evaluate`: score a trained model on any number of workers, no optimizer or engine."""
    cfg, rank, world, device = setup_worker(payload)
    info = read_dataset(cfg.data.url)
    model = build_model(cfg, info.embeddings, info.seen, info.features)
    load_model_state(model, payload["checkpoint"])
    model.to(device)
    results = evaluate(model, info, cfg, rank, world, device, average_bn=False)
    metrics = final_metrics(
        results,
        step=payload.get("step", 0),
        bad_samples={"eval": results["eval_bad_samples"]},
        checkpoint=payload["checkpoint"],
    )
    publish(rank, metrics, results, info, eval_overlay_files(model, info, cfg, device) if rank == 0 else None)

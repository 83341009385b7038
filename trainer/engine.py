"""A Ray Train worker's place in the run and its DeepSpeed engine.

`WorkerArgs` is what the driver hands every worker; `setup_worker` finds the worker's rank and
device; `init_engine` wraps the model in DeepSpeed on the process group Ray already created (gloo
on the CPU, nccl on GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer.config import Config, config_from_dict
from trainer.optim import build_optimizer, param_groups


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands every Ray Train worker (`train_loop_config={"args": WorkerArgs}`)."""

    config: dict  # Config.to_dict(), validated and resolved on the driver
    out: str  # the run folder (--out), absolute
    run_id: str  # the MLflow run the workers log into
    tracking_uri: str = ""  # lesa train: where that run lives
    resume_from: object | None = None  # a ray.train.Checkpoint named by --resume PATH
    checkpoint: str | None = None  # lesa evaluate: the model.pt to score
    driver_pid: int = 0  # the driver's process, for train.debug_fault=driver@STEP only


def setup_worker(args: WorkerArgs) -> tuple[Config, int, int, torch.device]:
    """(config, rank, world size, device) for this Ray Train worker, its seeds and threads set."""
    import ray
    import ray.train

    cfg = config_from_dict(args.config)
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


def deepspeed_config(cfg: Config, world: int, universal: bool = False) -> dict:
    """DeepSpeed's config; `universal`: the checkpoint to load is a universal conversion
    (a resume on another world size at ZeRO stages 1-3, trainer/zero.py)."""
    zero = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.deepspeed.stage3_param_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.data.batch_size * world,
        "zero_optimization": zero,
        # DeepSpeed vouches only for its own optimizers at stages 1-3; ours are plain torch
        # optimizers, and their state is named as the universal conversion needs (trainer/optim.py)
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": universal},
        "bf16": {"enabled": cfg.deepspeed.bf16},
        # DeepSpeed 0.19 casts only the parameters to bf16 and leaves buffers fp32, which BatchNorm
        # (small_cnn, the adapter) refuses on bf16 inputs ("expected scalar type BFloat16 but found
        # Float"); cast the buffers with them, as its module.bfloat16() did before.
        "data_types": {"buffer_dtype": "bf16" if cfg.deepspeed.bf16 else None},
        # DeepSpeed clips the gradient norm at 1.0 unless told otherwise; LESA's optimizer and the
        # baselines take the raw gradient (docs/protocol.md).
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,  # our own progress line replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }


def init_engine(cfg: Config, model: torch.nn.Module, world: int, universal: bool = False):
    """(engine, optimizer): the model wrapped by DeepSpeed with the optimizer of `optim.name`."""
    import deepspeed

    if not cfg.scaling.use_gpu:
        # DeepSpeed's CPU shared-memory collective is a C++ op JIT-built on first use (about 50 s and
        # a compiler); plain gloo collectives are enough for data parallelism.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
    optimizer = build_optimizer(param_groups(model, cfg.optim), cfg.optim)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, world, universal)
    )
    return engine, optimizer

"""ZeRO stages 1-3: which load a resume needs, the universal conversion, the optimizer digest, the
gathered weights.

At stage 0 one file holds the whole optimizer state and any number of workers loads it. At
stages 1 to 3 each rank saves only its partition of the optimizer state
(`zero_pp_rank_<R>_mp_rank_00_optim_states.pt`; at stage 3 also of the weights, in its own
`zero_pp_rank_<R>_mp_rank_00_model_states.pt`), and DeepSpeed loads such a checkpoint natively
only on the world size that wrote it. On another world size the run converts the checkpoint to
DeepSpeed's universal format (`deepspeed.checkpoint.ds_to_universal`: one file per parameter and
state, unpartitioned) and loads that with `checkpoint.load_universal`, which repartitions it. No
user step: `resume_load` decides from the TrainState, `universal_copy` converts.

Where the conversion goes, and why: node-local scratch (the temp folder), once per node by its
local rank 0 while the others wait, removed after the load. Not next to the checkpoint: a
committed Ray Train checkpoint is immutable (its files are in the manifests, its storage may be
s3, and writing there would race with Ray's own pruning), and a second copy in the storage would
double its size for every checkpoint kept.

`optimizer_digest` hashes the full (gathered) fp32 weights and the optimizer's `exp_avg` and
`exp_avg_sq` of every trainable parameter, so a restore, native or universal, on any world size,
is checked to give back exactly the state that was saved.

At stage 3 `module.state_dict()` holds empty placeholders for the partitioned parameters:
`full_state_dict` gathers them, for the model digest, `model.pt` and the best model.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import Config
from trainer.distributed import distributed

# The optimizer states ds_to_universal converts; every optimizer of trainer/optim.py keeps its
# state under these names (RMSpropTF included), so every one converts.
STATE_NAMES = ("exp_avg", "exp_avg_sq")
UNIVERSAL_PREFIX = "lesa-universal-"


def model_states_file(stage: int) -> str:
    """Rank 0's model states: the module with its buffers, DeepSpeed's counters. At stage 3 every
    rank writes its own, holding its partition of the weights."""
    return "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"


def engine_switch_error(stage: int, optimizer: str, cfg: Config) -> str | None:
    """Why optimizer state saved at ZeRO `stage` by `optimizer` cannot continue under `cfg`, or
    None. Another stage partitions (or not) differently, and DeepSpeed's universal format fails
    between some stages; another optimizer's state means something else."""
    if stage != cfg.deepspeed.zero_stage:
        return (
            f"deepspeed.zero_stage: the checkpoint was written at ZeRO stage {stage}, this run is at stage "
            f"{cfg.deepspeed.zero_stage}; a checkpoint resumes only at the stage that wrote it: resume with "
            f"--set deepspeed.zero_stage={stage}, or start a new run"
        )
    if optimizer != cfg.optim.name:
        return (
            f"optim.name: the checkpoint's optimizer state is {optimizer}'s, this run uses {cfg.optim.name}: "
            f"resume with --set optim.name={optimizer}, or start a new run"
        )
    return None


@dataclass(frozen=True)
class ResumeLoad:
    """How the engine loads a checkpoint: natively, or converted to the universal format."""

    universal: bool
    saved_world: int
    world: int

    def describe(self) -> str:
        if not self.universal:
            return f"native load ({self.world} workers, as saved)"
        return f"universal load: saved on {self.saved_world} workers, repartitioned for {self.world}"


def resume_load(stage: int, saved_world: int, world: int) -> ResumeLoad:
    """Stage 0 keeps the optimizer whole, so it loads natively anywhere; stages 1-3 partition it by
    rank, so another world size needs the universal format."""
    return ResumeLoad(stage > 0 and saved_world != world, saved_world, world)


def local_rank() -> int:
    import ray.train

    return ray.train.get_context().get_local_rank()


def universal_copy(folder: Path, tag: str, step: int) -> Path:
    """The checkpoint in `folder` (DeepSpeed's `tag` inside) converted to the universal format in
    node-local scratch, by each node's local rank 0; returns the folder to load `tag` from. A
    collective: every rank waits until its node's copy is complete."""
    from trainer.checkpointing import tensors_only_loads

    key = hashlib.sha256(f"{folder.resolve()}:{step}".encode()).hexdigest()[:16]
    scratch = Path(tempfile.gettempdir(), f"{UNIVERSAL_PREFIX}{key}")
    if local_rank() == 0:
        from deepspeed.checkpoint import ds_to_universal

        shutil.rmtree(scratch, ignore_errors=True)  # a copy a killed run left half-written
        start = time.perf_counter()
        args = argparse.Namespace(
            input_folder=str(folder / tag),
            output_folder=str(scratch / tag),
            # in this process: its torch.load is the tensors-only one, and Ray owns the workers' cores
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # stages 1-2 do not save the info the conversion needs (3 does)
        )
        with tensors_only_loads():
            ds_to_universal.main(args)
        print(f"converted the checkpoint of step {step} to the universal format in {time.perf_counter() - start:.1f} s")
    if distributed():
        dist.barrier()
    return scratch


def remove_universal_copy(scratch: Path) -> None:
    """After every rank of the node loaded it (a collective)."""
    if distributed():
        dist.barrier()
    if local_rank() == 0:
        shutil.rmtree(scratch, ignore_errors=True)


def restore_buffers(module: torch.nn.Module, folder: Path, tag: str, stage: int) -> None:
    """A universal load restores the parameters only; the buffers (BatchNorm's running statistics)
    come from the model states rank 0 saved, as a native load takes them (buffers are never
    partitioned). Call it inside `tensors_only_loads`."""
    saved = torch.load(folder / tag / model_states_file(stage), map_location="cpu")["module"]
    module.load_state_dict({name: saved[name] for name, _ in module.named_buffers() if name in saved}, strict=False)


def keep_lr_scales(optimizer, scales: list[float]) -> None:
    """DeepSpeed's stage-3 universal load gives every param group the hyperparameters of group 0;
    a trained backbone's group gets its own lr multiplier back (`scales`, as built from the config:
    trainer/optim.py), relative to the head's restored lr."""
    head_lr = optimizer.param_groups[0]["lr"]
    for group, scale in zip(optimizer.param_groups, scales):
        group["lr_scale"], group["lr"] = scale, head_lr * scale


def full_state_dict(module: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of `module`, whole, as a CPU copy; {} where not `keep`. At stage 3 a parameter
    is 1/N on each rank: each is gathered in turn (a collective every rank joins, keeping or not),
    so besides the partitions at most one whole parameter is on the device. Stages 0-2: local."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters, ZeroParamStatus

    state = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        partitioned = getattr(tensor, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE
        if not partitioned and not keep:
            continue
        with GatheredParameters([tensor], modifier_rank=None) if partitioned else nullcontext():
            if keep:
                state[name] = tensor.detach().to("cpu", copy=True)
    return state


def full_optimizer_tensors(engine, param: torch.nn.Parameter):
    """(fp32 weights, exp_avg, exp_avg_sq) of one parameter, gathered from every rank's partition
    (a collective at stages 1-3 and with bf16); stage 0 in fp32 holds them whole."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    weights = safe_get_full_fp32_param(param)
    if weights is None:  # no partition, no master copy: the torch optimizer steps the module's tensor
        state = engine.optimizer.state.get(param, {})
        return [param.detach(), *(state.get(name) for name in STATE_NAMES)]
    return [weights, *(safe_get_full_optimizer_state(param, name) for name in STATE_NAMES)]


def optimizer_digest(engine) -> str:
    """A short hash of the full optimizer state of every trainable parameter (a collective)."""
    # DeepSpeed links each parameter to its piece of the optimizer state lazily: at the first step
    # after a load (the digest right after a restore needs it now), and at the first step of a run
    # right after stepping the first param group, before a second one (a trained backbone's) has
    # any state. Link again, now that every group has its state.
    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state") and any(optimizer.optimizer.state.values()):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    h = hashlib.sha256()
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        h.update(name.encode())
        for tensor in full_optimizer_tensors(engine, param):
            if tensor is None:  # a parameter that never had a gradient has no state yet
                h.update(b"none")
            else:
                h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

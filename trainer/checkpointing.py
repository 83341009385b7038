"""Checkpoints that resume exactly, on any number of workers.

A checkpoint is one Ray Train checkpoint directory: DeepSpeed's checkpoint of the engine (model,
optimizer; ZeRO stage 0 keeps the optimizer state whole, so any world size can load it) plus
`lesa_state.json` written by rank 0: the step, the data position (trainer-independent, see
datasets/position.py), the evaluation history, the MLflow run id and rank 0's RNG state.
Ray Train registers a checkpoint only once every worker has reported it, so one that was being
written when a worker died never becomes the latest; it keeps the last `checkpoint.keep`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

STATE_FILE = "lesa_state.json"
DS_TAG = "ds"


def state_digest(model: torch.nn.Module) -> str:
    """A short hash of every tensor of the model, to show a restore is bit-exact."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fault_point(name: str, step: int, rank: int, out: str) -> None:
    """Testing aid: LESA_FAULT=<name>@<step> makes rank 0 die here once (a marker in `out`
    keeps the retried attempt alive), as a machine would that is lost at that moment."""
    if os.environ.get("LESA_FAULT") != f"{name}@{step}" or rank != 0:
        return
    marker = Path(out) / f".fault-{name}-{step}"
    if marker.exists():
        return
    marker.touch()
    print(f"[rank {rank}] LESA_FAULT: dying at {name} of step {step}", flush=True)
    os._exit(137)


def save(engine, rank: int, step: int, state: dict, metrics: dict, out: str, extra_files=None) -> None:
    """Write and report a checkpoint; every rank must call it (DeepSpeed and Ray collect all)."""
    import ray.train

    tmp = tempfile.mkdtemp(prefix="lesa-ckpt-")
    try:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"step": step})
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(json.dumps({**state, "step": step}))
            for name, write in (extra_files or {}).items():
                write(Path(tmp, name))
        fault_point("checkpoint", step, rank, out)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        # Reports are registered asynchronously by Ray Train's controller; a worker lost before
        # that would take this checkpoint with it. Wait until it is committed as the latest.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(engine, fallback=None, read_files=None) -> dict | None:
    """Load the run's latest checkpoint (else `fallback`, the one `--resume PATH` named) into the
    engine; its state, or None on a fresh start. `read_files(state, folder)` may read more files
    of the checkpoint while its folder is open (the best model, trainer/schedule.py)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint() or fallback
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path, _ = engine.load_checkpoint(folder, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"{folder}: no DeepSpeed checkpoint '{DS_TAG}' to resume from")
        state = json.loads(Path(folder, STATE_FILE).read_text())
        if read_files is not None:
            read_files(state, Path(folder))
        return state


def rng_state() -> list[int]:
    return torch.get_rng_state().tolist()


def set_rng_state(state: list[int]) -> None:
    torch.set_rng_state(torch.tensor(state, dtype=torch.uint8))

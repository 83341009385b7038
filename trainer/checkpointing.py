"""Checkpoints that resume exactly, on any number of workers, and never run code when loaded.

A checkpoint is one Ray Train checkpoint directory:

    ds/mp_rank_00_model_states.pt   DeepSpeed's checkpoint of the engine, written by rank 0: the
                                    model, and at ZeRO stage 0 the whole optimizer state
    ds/zero_pp_rank_<R>_mp_rank_00_optim_states.pt
                                    stages 1-3 (bf16_ prefixed in bf16): rank R's partition of the
                                    optimizer state, written by rank R (docs/zero.md); at stage 3
                                    zero_pp_rank_<R>_mp_rank_00_model_states.pt replaces the
                                    model states: rank R's partition of the weights
    lesa_state.json                 the TrainState (trainer/state.py), written by rank 0
    model_best.pt, model.pt, ...    files rank 0 adds (the best weights; results at the end)
    lesa_files_rank<R>.json         sha256 of every file rank R wrote, checked before a load

Every rank writes its files into a folder of its own and reports it; Ray Train 2.60 merges the
reported folders into the one checkpoint folder in the storage and registers it only once every
worker has reported, so one that was being written when a worker died never becomes the latest;
it keeps the last `checkpoint.keep`. A restore also refuses a checkpoint without the manifest of
every rank of its `world_size`. On another world size at stages 1-3 it loads the checkpoint's
universal conversion (trainer/zero.py).

What a restore refuses, each with one line naming the file (docs/reliability.md):
- a file whose bytes differ from the digest recorded when it was written (bit rot, truncation,
  a file replaced afterwards);
- a `.pt` file holding anything but tensors and plain containers: DeepSpeed reads its files with
  `torch.load(weights_only=False)`, which runs whatever a pickle names, so while a checkpoint is
  restored every `torch.load` is made `weights_only=True`;
- a model whose weights, or an optimizer whose gathered state, after loading do not hash to the
  digest recorded at save.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.state import STATE_FILE, TrainState
from trainer.zero import (
    ResumeLoad,
    full_state_dict,
    keep_lr_scales,
    optimizer_digest,
    remove_universal_copy,
    restore_buffers,
    universal_copy,
)

DS_TAG = "ds"
MANIFEST_PREFIX = "lesa_files_rank"
MANIFEST = MANIFEST_PREFIX + "{rank}.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored safely: damaged, or holding more than plain tensors."""


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A short hash of every tensor of a state dict (a model's, whole: trainer/zero.py,
    full_state_dict), to show (and check) that a restore is bit-exact."""
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        # as raw bytes, so that bf16 weights hash too (numpy has no bfloat16)
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, rank: int) -> None:
    """Record the digest of every file this rank put into the checkpoint folder."""
    files = {
        str(p.relative_to(folder)): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(MANIFEST_PREFIX)
    }
    Path(folder, MANIFEST.format(rank=rank)).write_text(json.dumps(files, indent=0))


def verify_files(folder: Path) -> None:
    """Every file every rank recorded is there with the bytes it had when it was written."""
    manifests = sorted(Path(folder).glob(MANIFEST.format(rank="*")))
    if not manifests:
        raise CheckpointError(f"{folder}: no {MANIFEST.format(rank='*')} (written by an older lesa, or damaged)")
    check_every_rank(folder, manifests)
    for manifest in manifests:
        try:
            files = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{manifest}: unreadable ({exc}); the checkpoint is damaged") from None
        for name, digest in files.items():
            path = Path(folder, name)
            actual = file_sha256(path) if path.is_file() else "missing"
            if actual != digest:
                raise CheckpointError(
                    f"{path}: sha256 {actual[:16]} but {digest[:16]} when written; the checkpoint is damaged: "
                    f"resume from an earlier one (--resume PATH) or start a new run"
                )


def deepspeed_records() -> list[type]:
    """The DeepSpeed types its ZeRO checkpoint files hold besides tensors: plain records (a loss
    scaler's numbers, an enum, a dataclass of offsets), rebuilt from their fields, never called."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def check_every_rank(folder: Path, manifests: list[Path]) -> None:
    """A checkpoint counts only with every rank's manifest (and so every rank's shard): Ray Train
    commits one only after every worker reported, so one without is damaged, never resumed."""
    state = Path(folder, STATE_FILE)
    try:
        world = json.loads(state.read_text()).get("world_size", 0) if state.is_file() else 0
    except (OSError, json.JSONDecodeError, AttributeError):
        return  # the state's own digest check (rank 0's manifest) names the damage
    ranks = {m.name[len(MANIFEST_PREFIX) : -len(".json")] for m in manifests}
    ranks = {int(rank) for rank in ranks if rank.isdigit()}
    missing = sorted(set(range(world)) - ranks)
    if missing:
        raise CheckpointError(
            f"{folder}: written by {world} workers but {MANIFEST.format(rank=missing[0])} is missing, so rank "
            f"{missing[0]}'s shard cannot be checked; the checkpoint is incomplete: resume from an earlier one "
            f"(--resume PATH) or start a new run"
        )


@contextlib.contextmanager
def tensors_only_loads():
    """Make every `torch.load` inside the block `weights_only=True` (tensors, containers and
    `deepspeed_records` only), and name the file it refuses."""
    original = torch.load
    records = deepspeed_records()

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with warnings.catch_warnings(), torch.serialization.safe_globals(records):
                # torch's note on a pickle protocol is noise here
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            reason = str(exc).strip().splitlines()[0][:200]
            raise CheckpointError(f"{f}: holds more than plain tensors, refused unread ({reason})") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def check_loadable(folder: Path) -> None:
    """What a restore checks before it loads anything, for the driver to run before any cluster
    work: the digests, and that every .pt file holds plain tensors only."""
    verify_files(folder)
    with tensors_only_loads():
        for path in sorted(Path(folder).rglob("*.pt")):
            torch.load(path, map_location="cpu")


@dataclass(frozen=True)
class FaultPoint:
    """Testing aid, `train.debug_fault: WHERE@STEP`, once per run (a marker in the run folder keeps
    the retried attempt alive), for the resume tests:
    - `checkpoint@S`: rank 0 dies while writing the checkpoint of step S, as a machine lost at that
      moment would;
    - `driver@S`: once the checkpoint of step S is committed, rank 0 SIGKILLs the driver (its pid
      comes with the worker's arguments), as a lost head node would, before anything else runs."""

    where: str
    step: int
    marker: Path
    driver_pid: int = 0

    @classmethod
    def parse(cls, spec: str | None, out: str, driver_pid: int = 0) -> "FaultPoint | None":
        if not spec:
            return None
        where, _, step = spec.partition("@")
        if where not in ("checkpoint", "driver") or not step.isdigit():
            raise ValueError(f"train.debug_fault: expected checkpoint@STEP or driver@STEP, got {spec!r}")
        return cls(where, int(step), Path(out, f".fault-{where}-{step}"), driver_pid)

    def due(self, where: str, step: int, rank: int) -> bool:
        if where != self.where or step != self.step or rank != 0 or self.marker.exists():
            return False
        self.marker.touch()
        return True

    def while_writing(self, step: int, rank: int) -> None:
        if self.due("checkpoint", step, rank):
            print(f"[rank {rank}] train.debug_fault: dying while writing the checkpoint of step {step}", flush=True)
            os._exit(137)

    def after_commit(self, step: int, rank: int) -> None:
        if self.due("driver", step, rank):
            print(
                f"[rank {rank}] train.debug_fault: killing the driver after the checkpoint of step {step}", flush=True
            )
            os.kill(self.driver_pid, signal.SIGKILL)
            time.sleep(600)  # the cluster goes down with its driver; nothing more of this run happens


TEMP_PREFIX = "lesa-ckpt-"


def remove_orphaned_folders() -> None:
    """Checkpoint folders that a killed worker left in the temp folder (each is checkpoint-sized):
    their name holds the writer's pid, and a folder whose writer is gone is removed."""
    for folder in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*"):
        pid = folder.name[len(TEMP_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def save(engine, rank: int, state: TrainState, metrics: dict, extra_files=None, fault: FaultPoint | None = None):
    """Write and report a checkpoint; every rank must call it (DeepSpeed and Ray collect all)."""
    import ray.train

    remove_orphaned_folders()
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-"))
    try:
        engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={"step": state.step})
        if rank == 0:
            Path(tmp, STATE_FILE).write_text(state.to_json())
            for name, write in (extra_files or {}).items():
                write(Path(tmp, name))
        write_manifest(tmp, rank)
        if fault is not None:
            fault.while_writing(state.step, rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
        # Reports are registered asynchronously by Ray Train's controller; a worker lost before
        # that would take this checkpoint with it. Wait until it is committed as the latest.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        if fault is not None:
            fault.after_commit(state.step, rank)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class FoundCheckpoint:
    """A checkpoint to resume from: its folder (open while the context of `latest` lasts), its
    files verified, and its TrainState."""

    folder: Path
    state: TrainState


@contextlib.contextmanager
def latest(fallback=None):
    """The run's latest checkpoint (else `fallback`, the one `--resume PATH` named), verified and
    open for the body, or None on a fresh start. The engine is built inside: how it loads depends
    on the state (trainer/zero.py, resume_load)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint() or fallback
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        verify_files(folder)
        state = TrainState.from_json(Path(folder, STATE_FILE).read_text(), str(Path(folder, STATE_FILE)))
        yield FoundCheckpoint(folder, state)


def restore(engine, found: FoundCheckpoint, load: ResumeLoad, read_files=None) -> TrainState:
    """Load `found` into the engine, natively or through its universal conversion (`load`); its
    TrainState. `read_files(state, folder)` may read more files of the checkpoint (the best model,
    trainer/schedule.py). Every rank must call it (the conversion and the digests are collectives)."""
    folder, state = found.folder, found.state
    source = universal_copy(folder, DS_TAG, state.step) if load.universal else folder
    lr_scales = [group.get("lr_scale", 1.0) for group in engine.optimizer.param_groups]
    with tensors_only_loads():
        path, _ = engine.load_checkpoint(
            str(source), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise CheckpointError(f"{folder}: no DeepSpeed checkpoint '{DS_TAG}' to resume from")
        if load.universal:
            restore_buffers(engine.module, folder, DS_TAG, state.zero_stage)
            keep_lr_scales(engine.optimizer, lr_scales)
        if read_files is not None:
            read_files(state, folder)
    if load.universal:
        remove_universal_copy(source)
    for what, digest, saved in (
        ("model", state_digest(full_state_dict(engine.module)), state.model_digest),
        ("optimizer state", optimizer_digest(engine), state.optimizer_digest),
    ):
        if digest != saved:
            raise CheckpointError(
                f"{folder}: the {what} loaded from it ({load.describe()}) hashes to {digest}, but to {saved} "
                f"when it was saved; the checkpoint is damaged: resume from an earlier one or start a new run"
            )
    return state

"""Checkpoints that resume exactly, on any number of workers, and never run code when loaded.

A checkpoint is one Ray Train checkpoint directory:

    ds/mp_rank_00_model_states.pt   DeepSpeed's checkpoint of the engine: model and optimizer
                                    (ZeRO stage 0 keeps the optimizer state whole, so any world
                                    size can load it)
    lesa_state.json                 the TrainState (trainer/state.py), written by rank 0
    model_best.pt, model.pt, ...    files rank 0 adds (the best weights; results at the end)
    lesa_files_rank<R>.json         sha256 of every file rank R wrote, checked before a load

Ray Train registers a checkpoint only once every worker has reported it, so one that was being
written when a worker died never becomes the latest; it keeps the last `checkpoint.keep`.

What a restore refuses, each with one line naming the file (docs/reliability.md):
- a file whose bytes differ from the digest recorded when it was written (bit rot, truncation,
  a file replaced afterwards);
- a `.pt` file holding anything but tensors and plain containers: DeepSpeed reads its files with
  `torch.load(weights_only=False)`, which runs whatever a pickle names, so while a checkpoint is
  restored every `torch.load` is made `weights_only=True`;
- a model whose weights after loading do not hash to the digest recorded at save.
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

DS_TAG = "ds"
MANIFEST_PREFIX = "lesa_files_rank"
MANIFEST = MANIFEST_PREFIX + "{rank}.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be restored safely: damaged, or holding more than plain tensors."""


def state_digest(model: torch.nn.Module) -> str:
    """A short hash of every tensor of the model, to show (and check) that a restore is bit-exact."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
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


@contextlib.contextmanager
def tensors_only_loads():
    """Make every `torch.load` inside the block `weights_only=True`, and name the file it refuses."""
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with warnings.catch_warnings():  # torch's note on a pickle protocol is noise here
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


def restore(engine, fallback=None, read_files=None) -> TrainState | None:
    """Load the run's latest checkpoint (else `fallback`, the one `--resume PATH` named) into the
    engine; its TrainState, or None on a fresh start. `read_files(state, folder)` may read more
    files of the checkpoint while its folder is open (the best model, trainer/schedule.py)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint() or fallback
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        verify_files(folder)
        state = TrainState.from_json(Path(folder, STATE_FILE).read_text(), str(Path(folder, STATE_FILE)))
        with tensors_only_loads():
            path, _ = engine.load_checkpoint(
                str(folder), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if path is None:
                raise CheckpointError(f"{folder}: no DeepSpeed checkpoint '{DS_TAG}' to resume from")
            if read_files is not None:
                read_files(state, folder)
        digest = state_digest(engine.module)
        if digest != state.model_digest:
            raise CheckpointError(
                f"{folder}: the model loaded from it hashes to {digest}, but to {state.model_digest} when it "
                f"was saved; the checkpoint is damaged: resume from an earlier one or start a new run"
            )
        return state

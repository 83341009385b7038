"""The parts of the training loop, one concern each; trainer/worker.py's `train_worker` strings them.

- `RankZeroLog`: the console and the MLflow run, written by rank 0 only (no-ops elsewhere).
- `TrainStream`: this worker's training batches, with the bookkeeping of what each one used
  (bad samples, data positions for the checkpoint, the sample ledger).
- `train_step`: one optimizer step of the engine.
- `LossMeter`: a logging window's losses, summed on the device and read once per window; a
  non-finite loss stops the run there, naming its step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from datasets.batch import Batch
from datasets.position import DataPosition
from datasets.stream import StreamSpec, make_loader
from trainer.bad_samples import BadSampleLog
from trainer.config import Config
from trainer.distributed import distributed
from trainer.ledger import Ledger
from trainer.models.backbones import input_resample
from trainer.models.losses import total_loss
from trainer.tracking import RunLogger


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite: training cannot continue from these weights."""


class RankZeroLog:
    """Console lines and MLflow metrics of the run, from rank 0. Metrics are buffered and reach
    MLflow only once a checkpoint holds their step (`flush`), so a restart never logs a step twice."""

    def __init__(self, rank: int, tracking_uri: str, run_id: str, after_step: int):
        self.enabled = rank == 0
        self.mlflow = RunLogger(tracking_uri, run_id, after_step=after_step, skip_logged=True) if self.enabled else None

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.enabled:
            self.mlflow.log(values, step, flush=False)

    def flush(self) -> None:
        if self.enabled:
            self.mlflow.flush()


class TrainStream:
    """This worker's share of the training shards, endlessly, as batches with samples. Skipped bad
    samples are counted (`bad`); every position a batch used is kept until `commit_positions`
    merges all workers' into the checkpoint's DataPosition; the ledger records each sample."""

    def __init__(self, cfg: Config, info, rank: int, world: int, device, position: DataPosition, resumed: bool):
        shards = info.shards(cfg.data.train_split)
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
            position=position if resumed else None,
            features=info.features,
            resample=input_resample(cfg.model),
        )
        loader_workers = min(cfg.data.loader_workers, len(shards) // world)
        self.batches = iter(make_loader(spec, loader_workers, pin_memory=device.type == "cuda"))
        self.rank = rank
        self.bad = BadSampleLog(rank, cfg.data.max_bad_fraction)
        self.used: list = []
        self.ledger: Ledger | None = None

    def open_ledger(self, root: Path, step: int) -> None:
        """`data.ledger`: entries past the restored checkpoint never happened (rank 0 drops them
        before any rank writes again)."""
        if self.rank == 0:
            Ledger.discard_after(root, step)
        if dist.is_initialized():
            dist.barrier()
        self.ledger = Ledger(root, self.rank)

    def next(self) -> Batch:
        while True:
            try:
                batch = next(self.batches)
            except StopIteration:
                raise RuntimeError(
                    f"rank {self.rank}: the training stream ended; no readable samples in "
                    f"its shards (skipped: {dict(self.bad.by_kind)})"
                ) from None
            self.bad.add(batch)
            self.used.extend(batch.positions)
            if batch.has_samples:
                if self.ledger:
                    self.ledger.record(batch.epochs, batch.keys)
                return batch

    def commit_positions(self, position: DataPosition, step: int) -> None:
        """Merge every worker's used positions since the last commit into `position` (the same on
        every rank afterwards), and commit the ledger under `step`. A collective."""
        parts = [self.used]
        if distributed():
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.used)
        for part in parts:
            position.mark(part)
        self.used = []
        if self.ledger:
            self.ledger.commit(step)

    def close(self) -> None:
        if self.ledger:
            self.ledger.close()


@dataclass
class StepOutput:
    losses: torch.Tensor  # [total, *terms], still on the device
    terms: list[str]
    seconds: float
    data_seconds: float


def train_step(engine, stream: TrainStream, seen_ids: torch.Tensor, weights: dict[str, float], device) -> StepOutput:
    """Read a batch, score the seen labels, step the optimizer. No sync with the device."""
    start = time.perf_counter()
    batch = stream.next()
    data_seconds = time.perf_counter() - start
    images = batch.images.to(device, non_blocking=True)
    y = batch.labels.to(device, non_blocking=True)[:, seen_ids]
    loss, parts = total_loss(engine(images, seen_ids), y, weights)
    engine.backward(loss)
    engine.step()
    losses = torch.stack([loss.detach(), *parts.values()])
    return StepOutput(losses, list(parts), time.perf_counter() - start, data_seconds)


@dataclass
class LossMeter:
    """A logging window's steps: their losses stay on the device until `read`, the window's one
    wait for it, which also checks that every step's loss was finite."""

    log_every: int
    max_steps: int
    samples_per_step: int
    steps: list[int] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)
    terms: list[str] = field(default_factory=list)
    seconds: float = 0.0
    data_seconds: float = 0.0

    def add(self, step: int, out: StepOutput) -> None:
        self.steps.append(step)
        self.losses.append(out.losses)
        self.terms = out.terms
        self.seconds += out.seconds
        self.data_seconds += out.data_seconds

    def due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.max_steps

    def check_finite(self) -> torch.Tensor | None:
        """The window's losses per step [steps, 1 + terms] on the CPU; raises at a non-finite one."""
        if not self.losses:
            return None
        per_step = torch.stack(self.losses).double().cpu()
        finite = torch.isfinite(per_step).all(dim=1)
        if not bool(finite.all()):
            step = self.steps[int((~finite).nonzero()[0])]
            raise NonFiniteLoss(
                f"the loss is {per_step[~finite][0].tolist()} (total, {', '.join(self.terms)}) at step {step}: "
                f"training stopped there, nothing of it was checkpointed. Check the label vectors and "
                f"inputs for NaN/Inf, or lower optim.lr"
            )
        return per_step

    def read(self, optimizer, device) -> dict[str, float]:
        """The window's mean losses, step time and data wait over all workers; resets the window."""
        wait = time.perf_counter()
        per_step = self.check_finite()
        self.seconds += time.perf_counter() - wait  # the wait times the steps the device still had queued
        n = len(self.steps)
        names = ["loss", *(f"loss/{k}" for k in self.terms), "time/step", "time/data"]
        local = torch.cat(
            [per_step.mean(dim=0), torch.tensor([self.seconds / n, self.data_seconds / n], dtype=torch.float64)]
        )
        mean = local.to(device)
        if distributed():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        avg = dict(zip(names, mean.tolist()))
        self.steps, self.losses, self.seconds, self.data_seconds = [], [], 0.0, 0.0
        row = {k: v for k, v in avg.items() if k.startswith("loss")}
        row["lr"] = optimizer.param_groups[0]["lr"]
        row["samples_per_s"] = self.samples_per_step / avg["time/step"]
        row["data_wait_fraction"] = avg["time/data"] / avg["time/step"]
        return row


def check_weights_finite(model: torch.nn.Module, step: int) -> None:
    """Before a checkpoint: a non-finite weight (a gradient that overflowed) is never saved. At ZeRO
    stage 3 each rank checks its partitions (`ds_tensor`) and all learn the verdict."""
    params = dict(model.named_parameters())
    partitioned = any(hasattr(p, "ds_tensor") for p in params.values())
    tensors = [getattr(p, "ds_tensor", p) for p in params.values()]
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).int()
    if partitioned and distributed():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    finite = finite.cpu().bool()  # one wait, not one a tensor
    if not bool(finite.all()):
        name = list(params)[int((~finite).nonzero()[0])]
        raise NonFiniteLoss(f"weight {name} is not finite at step {step}: training stopped before checkpointing it")

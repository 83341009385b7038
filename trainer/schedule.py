"""What follows the validation metric: LESA's adaptive learning rate, early stopping, the best model.

Every `eval.every` steps the workers compute `eval.val_metric` on the seen labels of
`eval.val_split` (trainer/evaluation/evaluate.py, validation_metric; never the test split) and hand it to
`ValidationSchedule.observe`, which
- adapts the learning rate (AdaptiveLR, docs/protocol.md, Optimisation) in the optimizer's param groups,
- counts evaluations without improvement (EarlyStopping) and says when to stop,
- keeps a copy of the weights whenever the metric improves (BestModel; at ZeRO stage 3 a file).
Every rank sees the same metric (rank 0's, broadcast), so every rank takes the same decisions.

The state goes into lesa_state.json ("schedule") and the best weights into each checkpoint as
`model_best.pt`, so a resumed run, on any number of workers, continues with the lr, EMA,
cooldown, patience counter and best of the checkpoint it resumes from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import VAL_METRIC, Config
from trainer.distributed import distributed
from trainer.zero import full_state_dict

BEST_MODEL_FILE = "model_best.pt"


def metric_k(name: str) -> int | None:
    """K of a top-K metric name ('F1@5' -> 5), None for mAP."""
    match = VAL_METRIC.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown validation metric {name!r}: expected mAP, P@K, R@K or F1@K")
    return int(match.group(2)) if match.group(2) else None


@dataclass
class AdaptiveLR:
    """LESA's learning-rate rule (official core/utils.LearningRate.adapt), once per evaluation:

        ema_t = smoothing * ema_{t-1} + (1 - smoothing) * metric            (ema_0 = 0)
        if ema_t < ema_{t-1} and lr >= floor and cooldown <= 0:  lr *= decay; cooldown = patience
        cooldown -= 1

    The EMA starts at 0, so it rises over the first evaluations whatever the metric does; the lr
    decays only once the smoothed metric falls. The floor is checked before decaying, so the last
    decay may take lr just below it, as in the official code. The cooldown is decremented after
    the check, so a decay blocks the next `patience - 1` evaluations.
    """

    lr: float
    patience: int
    decay: float = 0.8
    smoothing: float = 0.7
    floor: float = 1e-6
    ema: float = 0.0
    cooldown: int = 0

    def adapt(self, metric: float) -> float:
        previous = self.ema
        self.ema = self.smoothing * self.ema + (1 - self.smoothing) * metric
        if self.ema < previous and self.lr >= self.floor and self.cooldown <= 0:
            self.lr *= self.decay
            self.cooldown = self.patience
        self.cooldown -= 1
        return self.lr

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, state: dict) -> "AdaptiveLR":
        return cls(**state)


@dataclass
class EarlyStopping:
    """Stop after `patience` evaluations in a row that did not beat the best by more than
    `min_delta` (metric units: percent). Higher is better for every metric we report."""

    patience: int
    min_delta: float = 0.0
    best: float | None = None  # the value improvements are measured against
    bad_evaluations: int = 0  # evaluations since the last improvement

    def update(self, metric: float) -> bool:
        """Count one evaluation; True when it is time to stop."""
        if self.best is None or metric > self.best + self.min_delta:
            self.best, self.bad_evaluations = metric, 0
        else:
            self.bad_evaluations += 1
        return self.should_stop

    @property
    def should_stop(self) -> bool:
        return self.bad_evaluations >= self.patience

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, state: dict) -> "EarlyStopping":
        return cls(**state)


@dataclass
class BestModel:
    """The step and metric of the best validation so far, and the weights then.

    Stages 0-2: every rank keeps a CPU copy (data parallelism keeps them equal), so all can score
    it. ZeRO stage 3 (`partitioned`): not a second whole model per rank but one file, rank 0's
    (`file`, in its temp folder; the other ranks hold nothing): the weights are gathered into it
    when the metric improves, and broadcast to every rank to score it (`broadcast_into`)."""

    step: int | None = None
    metric: float | None = None
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    partitioned: bool = False
    file: Path | None = None

    def update(self, step: int, metric: float, model: torch.nn.Module) -> bool:
        """Keep `model`'s weights if `metric` beats the best (ties keep the earlier model). Every
        rank calls it with the same metric: at stage 3 the gathering is a collective."""
        if self.metric is not None and not metric > self.metric:
            return False
        self.step, self.metric = step, metric
        weights = full_state_dict(model, keep=not self.partitioned or self.file is not None)
        if not self.partitioned:
            self.state = weights
        elif self.file is not None:
            torch.save(weights, self.file)
        return True

    def save(self, path: Path) -> None:
        """A plain state dict, like model.pt: `lesa evaluate` takes it. Rank 0 writes it."""
        if self.file is not None:
            shutil.copyfile(self.file, path)
        else:
            torch.save(self.state, path)

    def load(self, path: Path) -> None:
        if not self.partitioned:
            self.state = torch.load(path, map_location="cpu", weights_only=True)
        elif self.file is not None:
            shutil.copyfile(path, self.file)

    @contextlib.contextmanager
    def loaded_into(self, model: torch.nn.Module):
        """Stages 0-2: run the body with the best weights in `model`, then put the current ones back."""
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield model
        finally:
            model.load_state_dict(current)

    def broadcast_into(self, model: torch.nn.Module) -> None:
        """Stage 3: the best weights into `model`, a whole copy on every rank (a collective)."""
        if self.file is not None:
            model.load_state_dict(torch.load(self.file, map_location="cpu", weights_only=True))
        if distributed():
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)

    def close(self) -> None:
        if self.file is not None:
            shutil.rmtree(self.file.parent, ignore_errors=True)

    def to_json(self) -> dict:
        return {"step": self.step, "metric": self.metric}


def set_lr(optimizer, lr: float) -> None:
    """Set lr in every param group of DeepSpeed's optimizer, times the group's `lr_scale` (a
    trained backbone's, trainer/optim.py). DeepSpeed's wrappers (fp16/bf16, ZeRO) expose the
    param groups of the torch optimizer they wrap, and that one steps: check it."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    stepping = getattr(optimizer, "optimizer", optimizer)  # a wrapper's inner torch optimizer
    if any(group["lr"] != lr * group.get("lr_scale", 1.0) for group in stepping.param_groups):
        raise RuntimeError(f"setting lr={lr} did not reach {type(stepping).__name__}, the optimizer that steps")


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


class ValidationSchedule:
    """Adaptive LR (`optim.adaptive_lr`), early stopping (`train.early_stopping`) and the best model,
    all driven by one validation metric every `eval.every` steps (when `eval.val_split` is set)."""

    def __init__(self, cfg: Config, best: BestModel | None = None):
        self.metric_name, self.split = cfg.eval.val_metric, cfg.eval.val_split
        self.every = cfg.eval.every if cfg.eval.val_split else 0
        o, t = cfg.optim, cfg.train
        self.adaptive = AdaptiveLR(o.lr, o.lr_patience, o.lr_decay, o.lr_ema, o.lr_floor) if o.adaptive_lr else None
        self.stopping = (
            EarlyStopping(t.early_stopping_patience, t.early_stopping_min_delta) if t.early_stopping else None
        )
        self.best = best or BestModel()
        self.validations = 0
        self.report = ""

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    @property
    def should_stop(self) -> bool:
        return self.stopping is not None and self.stopping.should_stop

    def apply_lr(self, optimizer) -> None:
        """Put the schedule's lr into the optimizer (after a restore: the checkpoint's lr)."""
        if self.adaptive:
            set_lr(optimizer, self.adaptive.lr)

    def observe(self, step: int, metric: float, model: torch.nn.Module, optimizer) -> dict[str, float]:
        """Take one validation result (the same on every rank); return what to log. A line for the
        console is left in `report`."""
        self.validations += 1
        lr_before = current_lr(optimizer)
        self.best.update(step, metric, model)
        logged = {f"val/{self.metric_name}": metric, "val/best": self.best.metric}
        self.report = (
            f"[val @ step {step}] {self.split} seen {self.metric_name} {metric:.2f}; "
            f"best {self.best.metric:.2f} at step {self.best.step}"
        )
        if self.adaptive:
            set_lr(optimizer, self.adaptive.adapt(metric))
            logged["val/ema"] = self.adaptive.ema
            self.report += f"; EMA {self.adaptive.ema:.2f}; lr {self.adaptive.lr:.4g}"
            if self.adaptive.lr != lr_before:
                self.report += f" (decayed from {lr_before:.4g})"
        if self.stopping:
            self.stopping.update(metric)
            logged["val/bad_evaluations"] = self.stopping.bad_evaluations
            self.report += f"; {self.stopping.bad_evaluations}/{self.stopping.patience} without improvement"
            if self.stopping.should_stop:
                self.report += ": stopping early"
        return logged

    def to_json(self) -> dict:
        return {
            "metric": self.metric_name,
            "split": self.split,
            "validations": self.validations,
            "best": self.best.to_json(),
            "adaptive_lr": self.adaptive.to_json() if self.adaptive else None,
            "early_stopping": self.stopping.to_json() if self.stopping else None,
        }

    def load(self, state: dict | None, folder: Path | None = None) -> None:
        """Continue from a checkpoint's state (and its model_best.pt in `folder`). The config's
        hyperparameters (patience, decay, ...) apply from here on; lr, EMA, cooldown, counter and
        best are the checkpoint's. A part switched on only now starts fresh."""
        if not state or not state["validations"]:
            return
        if not self.every:  # no validation from here on: carry the best along, labelled as it was
            self.metric_name, self.split = state["metric"], state["split"]
        elif (state["metric"], state["split"]) != (self.metric_name, self.split):
            raise RuntimeError(
                f"the checkpoint's schedule follows {state['metric']} on '{state['split']}', not "
                f"{self.metric_name} on '{self.split}': resume with eval.val_metric="
                f"{state['metric']} eval.val_split={state['split']}"
            )
        self.validations = state["validations"]
        self.best.step, self.best.metric = state["best"]["step"], state["best"]["metric"]
        if self.best.step is not None:
            self.best.load(Path(folder, BEST_MODEL_FILE))
        if self.adaptive and state["adaptive_lr"]:
            saved = state["adaptive_lr"]
            self.adaptive = dataclasses.replace(
                self.adaptive, lr=saved["lr"], ema=saved["ema"], cooldown=saved["cooldown"]
            )
        if self.stopping and state["early_stopping"]:
            saved = state["early_stopping"]
            self.stopping = dataclasses.replace(
                self.stopping, best=saved["best"], bad_evaluations=saved["bad_evaluations"]
            )

    def best_on_test(self, step: int, last_results, evaluate_best: Callable) -> dict | None:
        """metrics.json's "best": the best validated model on the test split (`evaluate_best()`, a
        collective on every rank), or None without any validation."""
        if self.best.step is None:
            return None
        results = last_results if self.best.step == step else evaluate_best()  # the last is the best: no second run
        return {"step": self.best.step, "val_metric": self.best.metric, **results.settings()}

    def summary(self, optimizer) -> dict:
        """metrics.json's "schedule": what validation did over the run."""
        return {
            "val_split": self.split,
            "val_metric": self.metric_name,
            "validations": self.validations,
            "adaptive_lr": self.adaptive is not None,
            "final_lr": current_lr(optimizer),
            "stopped_early": self.should_stop,
        }

    def files(self) -> dict:
        """Files for rank 0 to put into a checkpoint: the best weights, once there are any."""
        return {BEST_MODEL_FILE: self.best.save} if self.best.step is not None else {}

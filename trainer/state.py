"""`TrainState`: everything a training checkpoint holds besides the engine's tensors.

One object, one schema: rank 0 writes it into every checkpoint as `lesa_state.json`
(trainer/checkpointing.py), every rank reads it back at a restore, and `lesa train --resume`
reads it on the driver. Nothing else writes or reads checkpoint keys.

Fields, and why each one makes a resume exact on any number of workers:

- `step`: optimizer steps done; the loop continues at `step + 1`, MLflow drops steps it has.
- `position`: which samples of which epoch the model has seen (datasets/position.py); a resume
  finishes the epoch under way without repeating or skipping a sample, whatever the world size.
- `eval_history`: metrics.json's `history`, one entry per evaluated step.
- `schedule`: the validation schedule (trainer/schedule.py): lr, EMA, cooldown, early-stopping
  counter, best step and metric (the best weights travel as `model_best.pt`).
- `rng`: rank 0's torch RNG, so a resumed step draws what an unbroken run would have.
- `mlflow_run_id`, `tracking_uri`: the MLflow run being written. Informational for a checkpoint
  from elsewhere: a resume never sends anything to a tracking URI it read from a checkpoint.
- `model_digest`: a hash of every model tensor at save; a restore recomputes and compares it.
- `bad_samples`, `throughput`: running totals over every attempt of the run, so metrics.json
  counts all of the run, not only what came after the last restart.
- `world_size`: the workers that wrote it (one `lesa_files_rank<R>.json` each); a resume on
  another number says how the global batch (data.batch_size per worker) changed, and at ZeRO
  stages 1-3 loads the universal conversion of the checkpoint (trainer/zero.py).
- `zero_stage`, `optimizer`: DeepSpeed's ZeRO stage and `optim.name` that wrote the optimizer
  state; a resume continues with the same ones.
- `optimizer_digest`: a hash of the gathered fp32 weights and optimizer state at save
  (trainer/zero.py); a restore recomputes and compares it, on any world size.
- `version`: the schema's version; a checkpoint of another version is refused, not misread.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from datasets.position import DataPosition
from trainer.bad_samples import EXAMPLES_KEPT

STATE_FILE = "lesa_state.json"
STATE_VERSION = 3  # 3: zero_stage, optimizer, optimizer_digest; RMSpropTF state named like Adam's


class StateError(ValueError):
    """A checkpoint's lesa_state.json is not one this version of the trainer can continue from."""


@dataclass
class BadSampleTotals:
    """Bad samples skipped by the training stream so far (trainer/bad_samples.py counts them)."""

    count: int = 0
    read: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)

    def plus(self, summary: dict) -> dict:
        """This total and one attempt's `BadSampleLog.summary()`, as metrics.json shows them."""
        by_kind = dict(self.by_kind)
        for kind, n in summary["by_kind"].items():
            by_kind[kind] = by_kind.get(kind, 0) + n
        return {
            "count": self.count + summary["count"],
            "read": self.read + summary["read"],
            "by_kind": by_kind,
            "examples": (self.examples + summary["examples"])[:EXAMPLES_KEPT],
        }


@dataclass
class Throughput:
    """Training speed so far: steps and seconds over all attempts, and step-weighted means of each
    attempt's steady samples/s and data-wait fraction (trainer/progress.py measures an attempt)."""

    steps: int = 0
    seconds: float = 0.0
    samples_per_s: float = 0.0
    data_wait_fraction: float = 0.0

    def plus(self, attempt: dict | None) -> dict:
        """This total and one attempt's `Progress.summary()` (None on ranks other than 0)."""
        if not attempt or not attempt["steps"]:
            return asdict(self)
        steps = self.steps + attempt["steps"]

        def mean(name: str) -> float:
            return (getattr(self, name) * self.steps + attempt[name] * attempt["steps"]) / steps

        return {
            "steps": steps,
            "seconds": self.seconds + attempt["seconds"],
            "samples_per_s": mean("samples_per_s"),
            "data_wait_fraction": mean("data_wait_fraction"),
        }


@dataclass
class TrainState:
    step: int
    position: DataPosition
    mlflow_run_id: str
    tracking_uri: str
    eval_history: list[dict] = field(default_factory=list)
    schedule: dict | None = None
    rng: list[int] = field(default_factory=list)
    model_digest: str = ""
    bad_samples: BadSampleTotals = field(default_factory=BadSampleTotals)
    throughput: Throughput = field(default_factory=Throughput)
    world_size: int = 0
    zero_stage: int = 0
    optimizer: str = ""
    optimizer_digest: str = ""
    version: int = STATE_VERSION

    def record_eval(self, step: int, values: dict) -> None:
        """One history entry per evaluated step: validation and test results of a step share it."""
        if self.eval_history and self.eval_history[-1]["step"] == step:
            self.eval_history[-1].update(values)
        else:
            self.eval_history.append({"step": step, **values})

    def to_json(self) -> str:
        data = asdict(self)
        data["position"] = self.position.to_json()
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str, where: str) -> "TrainState":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StateError(f"{where}: not valid JSON ({exc}); the checkpoint is damaged") from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            found = data.get("version", "none") if isinstance(data, dict) else "none"
            raise StateError(
                f"{where}: checkpoint state version {found}, this trainer reads version {STATE_VERSION}; "
                f"resume it with the lesa version that wrote it, or start a new run"
            )
        try:
            return cls(
                **{
                    **data,
                    "position": DataPosition.from_json(data["position"]),
                    "bad_samples": BadSampleTotals(**data["bad_samples"]),
                    "throughput": Throughput(**data["throughput"]),
                }
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{where}: a field is missing or malformed ({exc}); the checkpoint is damaged") from None


def rng_state() -> list[int]:
    return torch.get_rng_state().tolist()


def set_rng_state(state: list[int]) -> None:
    torch.set_rng_state(torch.tensor(state, dtype=torch.uint8))

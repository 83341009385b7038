"""Which worker errors Ray Train may retry.

`checkpoint.max_failures` restarts the workers from the last checkpoint after a failure: right for
a killed process, a lost node or a flaky connection, useless for an error that the restart will
raise again (a bad config key, a dataset that breaks the contract, too many bad samples, a corrupt
checkpoint): those would run `max_failures` more times before the run fails. Ray Train 2.60 has no
FailureConfig option for this; its failure policy (ray/train/v2/_internal/execution/
failure_handling/default.py) retries every worker-group error. What it does honour is a controller
error: an exception raised by a callback on the controller is not retryable and fails the run at
once. `FailFast` is that callback: when a worker's error is one of `deterministic_errors()` it raises it
on the controller, and `trainer.fit()` raises a `ray.train.ControllerError` wrapping it.
"""

from __future__ import annotations

from ray.train import UserCallback


class NotRetryable(Exception):
    """Raise this (or a subclass) in a worker for an error that a restart would meet again."""


def deterministic_errors() -> tuple[type[Exception], ...]:
    """The errors a restart from the same checkpoint meets again: a bad config key, a dataset that
    breaks the contract, a damaged or unsafe checkpoint, a loss that went NaN, weights that do not
    fit the model."""
    # Imported here, not at the top: Ray Train's controller unpickles FailFast before it starts
    # the workers, and these modules (MLflow, DeepSpeed's helpers) would add a second to every
    # run's start-up on its critical path.
    from datasets.contract import DatasetError
    from trainer.checkpointing import CheckpointError
    from trainer.config import ConfigError
    from trainer.loop import NonFiniteLoss
    from trainer.state import StateError
    from trainer.weights import WeightsError

    return NotRetryable, ConfigError, DatasetError, CheckpointError, StateError, NonFiniteLoss, WeightsError


class FailFast(UserCallback):
    """RunConfig(callbacks=[FailFast()]): no retry after a deterministic worker error."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank in sorted(worker_exceptions):
            error = worker_exceptions[rank]
            if isinstance(error, deterministic_errors()):
                raise NotRetryable(
                    f"rank {rank} failed and a retry would fail again: {type(error).__name__}: {error}"
                ) from error

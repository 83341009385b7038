"""Resume after a fault, with real Ray, real DeepSpeed and real shards on the CPU: a worker dying
while it writes a checkpoint, mid-epoch. The run shares the session's Ray cluster (its subject is
Ray Train's restart and our restore, not a fresh cluster). A worker SIGKILLed mid-run by another
process, with the same exactly-once checks, is test_zero_e2e.py's first run."""

from __future__ import annotations

import pytest
from resume_run import TRAIN_IMAGES, assert_exactly_once, digest_at, mlflow_steps, resume_data, train


@pytest.fixture(scope="module")
def data(synthetic):
    return resume_data(synthetic)


def test_crash_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, data, shared_ray):
    log = train(
        tmp_path,
        data,
        "--set",
        "train.max_steps=16",
        "--set",
        "checkpoint.every=5",
        "--set",
        "train.debug_fault=checkpoint@10",
        ray=shared_ray,
    )
    assert "dying while writing the checkpoint of step 10" in log
    # the half-written checkpoint of step 10 never became the latest: the retry starts at step 5
    assert "resumed from step 5 on 2 workers" in log
    assert digest_at(log, "resumed from step 5") == digest_at(log, "checkpoint at step 5")
    counts = assert_exactly_once(tmp_path, data, 16 * 16)
    assert counts[0] == TRAIN_IMAGES, "epoch 0, interrupted at step 10 of 12, used every sample once"
    assert mlflow_steps(tmp_path) == list(range(2, 17, 2))

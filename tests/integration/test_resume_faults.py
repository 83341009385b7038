"""Resume after faults, with real Ray, real DeepSpeed and real shards on the CPU: a Ray Train worker
SIGKILLed mid-epoch, a worker dying while it writes a checkpoint. The runs share the session's
Ray cluster (their subject is Ray Train's restart and our restore, not a fresh cluster)."""

from __future__ import annotations

import json
import os
import re
import signal
import time

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
    assert_exactly_once(tmp_path, data, 16 * 16)
    assert mlflow_steps(tmp_path) == list(range(2, 17, 2))


def test_a_worker_sigkilled_mid_epoch_is_replaced_and_the_run_uses_every_sample_once(tmp_path, data, shared_ray):
    steps = 30
    args = ("--set", f"train.max_steps={steps}", "--set", "checkpoint.every=5", "--set", "train.log_every=1")
    proc = train(tmp_path, data, *args, ray=shared_ray, background=True)
    log, killed = [], False
    deadline = time.time() + 600
    for line in proc.stdout:
        log.append(line)
        match = re.search(r"RayTrainWorker pid=(\d+)\).*step 8/", line)
        if match and not killed:  # step 8 of 12 in epoch 0: mid-epoch, after the step-5 checkpoint
            os.kill(int(match.group(1)), signal.SIGKILL)
            killed = True
        assert time.time() < deadline
    assert proc.wait(timeout=60) == 0, "".join(log)[-6000:]
    log = "".join(log)
    assert killed and re.search(r"resumed from step (5|10) on 2 workers", log)
    # What an uninterrupted run would have: every sample once per epoch, each step logged once,
    # the full step count and the final evaluation.
    counts = assert_exactly_once(tmp_path, data, steps * 16)
    assert counts[0] == TRAIN_IMAGES
    assert mlflow_steps(tmp_path) == list(range(1, steps + 1))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == steps and all(0 <= metrics[s]["mAP"] <= 100 for s in ("zsl", "gzsl"))

"""The checkpoint schema (trainer/state.py) and the checks a restore makes (trainer/checkpointing.py),
on real files: a planted pickle, flipped bytes, a damaged or foreign state file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.position import DataPosition
from trainer.checkpointing import (
    TEMP_PREFIX,
    CheckpointError,
    FaultPoint,
    check_loadable,
    remove_orphaned_folders,
    state_digest,
    tensors_only_loads,
    verify_files,
    write_manifest,
)
from trainer.config import ConfigError, load_config
from trainer.loop import LossMeter, NonFiniteLoss, StepOutput
from trainer.state import STATE_VERSION, BadSampleTotals, StateError, Throughput, TrainState
from trainer.training import resume_report
from trainer.zero import resume_load


def a_state() -> TrainState:
    position = DataPosition([4, 3])
    position.mark([(0, 0, 1), (0, 1, 2)])
    state = TrainState(7, position, "run-id", "sqlite:///x.db", rng=torch.get_rng_state().tolist())
    state.record_eval(5, {"val/mAP": 10.0})
    state.record_eval(5, {"zsl/mAP": 3.0})
    state.bad_samples = BadSampleTotals(2, 50, {"decode": 2}, [{"key": "a"}])
    state.throughput = Throughput(7, 3.5, 100.0, 0.25)
    return state


def test_train_state_round_trips_through_json():
    state = a_state()
    again = TrainState.from_json(state.to_json(), "x")
    assert again.to_json() == state.to_json()
    assert again.eval_history == [{"step": 5, "val/mAP": 10.0, "zsl/mAP": 3.0}]
    assert np.array_equal(again.position.used[0][1], state.position.used[0][1])


def test_a_damaged_or_foreign_state_file_is_refused_naming_it():
    with pytest.raises(StateError, match="lesa_state.json: not valid JSON"):
        TrainState.from_json('{"step": 7', "ck/lesa_state.json")
    old = json.loads(a_state().to_json())
    old["version"] = STATE_VERSION - 1
    with pytest.raises(StateError, match=f"version {STATE_VERSION - 1}, this trainer reads version {STATE_VERSION}"):
        TrainState.from_json(json.dumps(old), "ck/lesa_state.json")
    del old["position"]
    old["version"] = STATE_VERSION
    with pytest.raises(StateError, match="a field is missing or malformed"):
        TrainState.from_json(json.dumps(old), "ck/lesa_state.json")


def test_totals_add_up_over_attempts():
    bad = BadSampleTotals(2, 50, {"decode": 2}).plus({"count": 1, "read": 30, "by_kind": {"decode": 1, "tar": 0},
                                                     "examples": []})  # fmt: skip
    assert bad["count"] == 3 and bad["read"] == 80 and bad["by_kind"] == {"decode": 3, "tar": 0}
    speed = Throughput(10, 5.0, 100.0, 0.5).plus({"steps": 30, "seconds": 10.0, "samples_per_s": 200.0,
                                                  "data_wait_fraction": 0.1})  # fmt: skip
    assert speed == {"steps": 40, "seconds": 15.0, "samples_per_s": 175.0, "data_wait_fraction": pytest.approx(0.2)}
    assert Throughput().plus(None) == {"steps": 0, "seconds": 0.0, "samples_per_s": 0.0, "data_wait_fraction": 0.0}


def checkpoint_folder(root: Path) -> Path:
    folder = root / "checkpoint"
    (folder / "ds").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(3)}}, folder / "ds" / "mp_rank_00_model_states.pt")
    (folder / "lesa_state.json").write_text(a_state().to_json())
    write_manifest(folder, rank=0)
    return folder


class Plant:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling it creates the marker file: evidence that code ran
        return (open, (self.marker, "w"))


def test_a_planted_pickle_is_refused_unread_and_runs_nothing(tmp_path):
    folder = checkpoint_folder(tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"module": {"w": torch.ones(3)}, "x": Plant(marker)}, folder / "ds" / "mp_rank_00_model_states.pt")
    write_manifest(folder, rank=0)  # the attacker rewrites the digests too
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: holds more than plain tensors"):
        check_loadable(folder)
    assert not marker.exists()
    # DeepSpeed calls torch.load itself, with weights_only=False: inside the block that is overridden
    with tensors_only_loads(), pytest.raises(CheckpointError):
        torch.load(folder / "ds" / "mp_rank_00_model_states.pt", weights_only=False)
    assert not marker.exists() and torch.load is not None


def test_flipped_bytes_and_missing_files_are_named(tmp_path):
    folder = checkpoint_folder(tmp_path)
    check_loadable(folder)  # as written: fine
    target = folder / "ds" / "mp_rank_00_model_states.pt"
    raw = bytearray(target.read_bytes())
    raw[100:164] = bytes(b ^ 0xFF for b in raw[100:164])
    target.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{target}: sha256 .* when written; the checkpoint is damaged"):
        verify_files(folder)
    target.unlink()
    with pytest.raises(CheckpointError, match="sha256 missing"):
        verify_files(folder)
    for manifest in folder.glob("lesa_files_rank*.json"):
        manifest.unlink()
    with pytest.raises(CheckpointError, match="no lesa_files_rank"):
        verify_files(folder)


def test_state_digest_covers_bf16_and_zero_dim_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).to(torch.bfloat16)
    before = state_digest(model.state_dict())
    with torch.no_grad():
        model[0].weight[0, 0] += 1
    assert state_digest(model.state_dict()) != before


def test_orphaned_checkpoint_folders_of_dead_writers_are_removed():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{dead.stdout.strip()}-"))
    alive = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getppid()}-"))
    try:
        remove_orphaned_folders()
        assert not orphan.exists() and alive.exists()
    finally:
        alive.rmdir()


def test_fault_point_is_an_explicit_setting(tmp_path):
    assert FaultPoint.parse(None, str(tmp_path)) is None
    fault = FaultPoint.parse("checkpoint@10", str(tmp_path))
    assert (fault.where, fault.step, fault.marker.parent) == ("checkpoint", 10, tmp_path)
    assert fault.due("checkpoint", 10, rank=0) and not fault.due("checkpoint", 10, rank=0)  # once a run
    assert FaultPoint.parse("driver@4", str(tmp_path), driver_pid=123).driver_pid == 123
    with pytest.raises(ValueError, match="expected checkpoint@STEP or driver@STEP"):
        FaultPoint.parse("loss@3", str(tmp_path))
    with pytest.raises(ConfigError, match="train.debug_fault"):
        load_config(None, ["data.url=x", "train.debug_fault=checkpoint"])


def test_a_non_finite_loss_is_named_by_its_step():
    meter = LossMeter(log_every=4, max_steps=10, samples_per_step=8)
    for step, value in [(1, 1.0), (2, 0.9), (3, float("nan")), (4, float("inf"))]:
        meter.add(step, StepOutput(torch.tensor([value, value]), ["rank"], 0.1, 0.01))
    with pytest.raises(NonFiniteLoss, match="at step 3"):
        meter.check_finite()


def test_a_resume_on_another_world_size_says_how_the_global_batch_changed():
    from trainer.config import Config
    from trainer.schedule import ValidationSchedule

    state = a_state()
    state.world_size = 2
    report = resume_report(state, ValidationSchedule(Config()), world=4, batch_size=8, load=resume_load(0, 2, 4))
    assert "global batch is now 32 samples per step (was 16); --set data.batch_size=4 keeps it" in report
    state.world_size = 4
    same = resume_report(state, ValidationSchedule(Config()), world=4, batch_size=8, load=resume_load(0, 4, 4))
    assert "note:" not in same and "native load (4 workers, as saved)" in same

"""The pure parts of ZeRO stages 1-2 (trainer/zero.py, trainer/checkpointing.py): which load a
resume needs, the refusals of a stage or optimizer switch (in the workers and before Ray), a
checkpoint without one rank's manifest, DeepSpeed's records in a tensors-only load. The real
runs are tests/integration/test_zero_e2e.py."""

from __future__ import annotations

import json

import pytest
import torch

from datasets.position import DataPosition
from launch.preflight import check_resume_engine
from trainer.checkpointing import CheckpointError, check_loadable, tensors_only_loads, verify_files, write_manifest
from trainer.config import ConfigError, load_config
from trainer.state import STATE_FILE, StateError, TrainState
from trainer.training import check_same_engine
from trainer.zero import engine_switch_error, resume_load


def config(*overrides: str):
    return load_config(None, ["data.url=/x", *overrides])


def test_only_stages_1_to_3_on_another_world_size_load_the_universal_conversion():
    assert not resume_load(0, 2, 3).universal  # stage 0: the optimizer state is whole
    assert not resume_load(2, 2, 2).universal and not resume_load(3, 2, 2).universal
    assert resume_load(1, 2, 1).universal and resume_load(2, 1, 3).universal and resume_load(3, 2, 1).universal
    assert resume_load(2, 2, 1).describe() == "universal load: saved on 2 workers, repartitioned for 1"
    assert resume_load(2, 2, 2).describe() == "native load (2 workers, as saved)"


def test_a_stage_or_optimizer_switch_is_refused_naming_both():
    assert engine_switch_error(2, "rmsprop_tf", config("deepspeed.zero_stage=2")) is None
    stage = engine_switch_error(2, "rmsprop_tf", config("deepspeed.zero_stage=0"))
    assert "written at ZeRO stage 2, this run is at stage 0" in stage and "deepspeed.zero_stage=2" in stage
    optimizer = engine_switch_error(1, "adamw", config("deepspeed.zero_stage=1"))
    assert "adamw's, this run uses rmsprop_tf" in optimizer and "optim.name=adamw" in optimizer
    state = TrainState(4, DataPosition([8]), "run", "sqlite:///x.db", zero_stage=1, optimizer="rmsprop_tf")
    with pytest.raises(StateError, match="ZeRO stage 1, this run is at stage 2"):
        check_same_engine(state, config("deepspeed.zero_stage=2"))  # the workers' check: not retried


def test_stages_0_to_3_are_accepted_and_stage_3_passes_its_persistence_threshold_to_deepspeed():
    from trainer.engine import deepspeed_config

    with pytest.raises(ConfigError, match="deepspeed.zero_stage: must be 0, 1, 2 or 3"):
        config("deepspeed.zero_stage=4")
    with pytest.raises(ConfigError, match="deepspeed.stage3_param_persistence_threshold: must be 0 or more"):
        config("deepspeed.stage3_param_persistence_threshold=-1")
    zero = deepspeed_config(config("deepspeed.zero_stage=3", "deepspeed.stage3_param_persistence_threshold=0"), 2)
    assert zero["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    assert deepspeed_config(config("deepspeed.zero_stage=2"), 2)["zero_optimization"] == {"stage": 2}


def test_rmsprop_tf_counts_steps_for_the_stage_3_universal_load_and_continues_a_state_without():
    from trainer.optim import RMSpropTF

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = RMSpropTF([param], lr=0.1)
    for _ in range(2):
        param.grad = torch.full((3,), 0.5)
        optimizer.step()
    assert optimizer.state[param]["step"] == 2 and set(optimizer.state[param]) == {"exp_avg", "exp_avg_sq", "step"}
    older = optimizer.state_dict()
    del older["state"][0]["step"]  # a checkpoint written before the count
    again = RMSpropTF([param], lr=0.1)
    again.load_state_dict(older)
    param.grad = torch.full((3,), 0.5)
    again.step()
    assert again.state[param]["step"] == 1


def checkpoint(folder, world: int, ranks, stage: int = 2):
    """A checkpoint folder as `world` workers write it, with the manifests of `ranks` only."""
    folder.mkdir()
    state = TrainState(
        4, DataPosition([8]), "run", "sqlite:///x.db", world_size=world, zero_stage=stage, optimizer="rmsprop_tf"
    )
    (folder / STATE_FILE).write_text(state.to_json())
    for rank in ranks:
        torch.save({"partition": torch.arange(3.0) + rank}, folder / f"zero_pp_rank_{rank}_optim_states.pt")
    for rank in ranks:  # as Ray merges them: every rank's folder holds its own files only
        write_manifest(folder, rank)
    return folder


def test_a_checkpoint_without_one_ranks_manifest_is_refused_naming_it(tmp_path):
    verify_files(checkpoint(tmp_path / "whole", 2, [0, 1]))
    with pytest.raises(CheckpointError, match="written by 2 workers but lesa_files_rank1.json is missing"):
        verify_files(checkpoint(tmp_path / "part", 2, [0]))


def test_the_driver_refuses_a_stage_switch_of_resume_path_before_ray(tmp_path):
    folder = checkpoint(tmp_path / "ckpt", 2, [0, 1], stage=2)
    check_resume_engine(config("deepspeed.zero_stage=2"), None, str(folder))
    with pytest.raises(ConfigError, match="ZeRO stage 2, this run is at stage 1"):
        check_resume_engine(config("deepspeed.zero_stage=1"), None, str(folder))
    data = json.loads((folder / STATE_FILE).read_text())
    del data["zero_stage"]  # an older schema: left to the version check where it is read whole
    (folder / STATE_FILE).write_text(json.dumps(data))
    check_resume_engine(config("deepspeed.zero_stage=1"), None, str(folder))


def test_deepspeeds_records_in_its_zero_files_load_tensors_only(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients}, folder / "optim.pt")
    write_manifest(folder, 0)
    check_loadable(folder)
    with tensors_only_loads():
        assert torch.load(folder / "optim.pt")["zero_stage"] == ZeroStageEnum.gradients


def test_a_trained_backbone_has_its_own_lr_which_the_adaptive_lr_keeps_in_ratio():
    from trainer.optim import build_optimizer, param_groups
    from trainer.schedule import current_lr, set_lr

    model = torch.nn.Module()
    model.backbone, model.head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    cfg = config("optim.lr=0.2", "optim.backbone_lr_scale=0.1").optim
    optimizer = build_optimizer(param_groups(model, cfg), cfg)
    head, backbone = optimizer.param_groups
    assert head["params"] == list(model.head.parameters()) and head["lr"] == 0.2
    assert backbone["params"] == list(model.backbone.parameters()) and backbone["lr"] == pytest.approx(0.02)
    set_lr(optimizer, 0.5)  # what AdaptiveLR does at a decay, and a restore with the checkpoint's lr
    assert current_lr(optimizer) == 0.5 and backbone["lr"] == pytest.approx(0.05)
    model.backbone.requires_grad_(False)  # a frozen backbone: one group, as before
    assert [len(g["params"]) for g in param_groups(model, cfg)] == [2]

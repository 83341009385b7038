"""The validation schedule (trainer/schedule.py): LESA's adaptive lr against a sequence worked out
by hand, early stopping, the JSON round trip, the lr reaching the optimizer that DeepSpeed steps,
and the config checks (a run on real Ray + DeepSpeed: tests/integration/test_schedule_e2e.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.optim import RMSpropTF
from trainer.schedule import BEST_MODEL_FILE, AdaptiveLR, BestModel, EarlyStopping, ValidationSchedule, metric_k

REPO = Path(__file__).resolve().parents[1]


# --- AdaptiveLR: ema_t = 0.7 ema_{t-1} + 0.3 metric; decay x0.8 when ema falls, lr >= 1e-6, cooldown <= 0


def test_adaptive_lr_follows_the_hand_worked_sequence():
    rule = AdaptiveLR(lr=1e-3, patience=2)
    # metric -> (ema, lr, cooldown) after the call, worked out by hand:
    expected = [
        (10, 3.0, 1e-3, -1),  # 0.7*0 + 3 = 3: rises (EMA starts at 0)
        (10, 5.1, 1e-3, -2),  # 2.1 + 3: rises
        (5, 5.07, 8e-4, 1),  # 3.57 + 1.5 < 5.1, cooldown -2 <= 0: decay, cooldown 2 - 1
        (5, 5.049, 8e-4, 0),  # falls, but cooldown 1 > 0: no decay
        (5, 5.0343, 6.4e-4, 1),  # falls, cooldown 0: decay
        (20, 9.52401, 6.4e-4, 0),  # rises
        (0, 6.666807, 5.12e-4, 1),  # falls, cooldown 0: decay
    ]
    for metric, ema, lr, cooldown in expected:
        assert rule.adapt(metric) == pytest.approx(lr, rel=1e-12)
        assert (rule.ema, rule.lr, rule.cooldown) == (
            pytest.approx(ema, rel=1e-12),
            pytest.approx(lr, rel=1e-12),
            cooldown,
        )


def test_adaptive_lr_floor_allows_one_last_decay_below_it():
    rule = AdaptiveLR(lr=1.2e-6, patience=0, ema=10.0)
    assert rule.adapt(0.0) == pytest.approx(0.96e-6)  # 1.2e-6 >= 1e-6: decays, lands just below
    for _ in range(5):  # below the floor: never again
        assert rule.adapt(0.0) == pytest.approx(0.96e-6)
    assert rule.cooldown == -6


@pytest.mark.parametrize("patience, decays", [(0, 6), (1, 6), (2, 3), (3, 2)])
def test_adaptive_lr_patience_blocks_patience_minus_one_evaluations(patience, decays):
    rule = AdaptiveLR(lr=1.0, patience=patience, ema=100.0)
    for _ in range(6):
        rule.adapt(0.0)  # the EMA falls at every call
    assert rule.lr == pytest.approx(0.8**decays)


def test_adaptive_lr_released_nus_run_ends_after_seven_decays():
    """docs/protocol.md, Optimisation: the released NUS-WIDE run ended at lr = 2.097e-4 = 1e-3 * 0.8^7."""
    rule = AdaptiveLR(lr=1e-3, patience=5, ema=100.0)
    while rule.lr > 2.1e-4:
        rule.adapt(0.0)
    assert rule.lr == pytest.approx(2.097152e-4)


# --- EarlyStopping


def test_early_stopping_counts_evaluations_without_improvement_beyond_min_delta():
    stop = EarlyStopping(patience=2, min_delta=0.5)
    assert [stop.update(m) for m in (10, 10.3, 11, 11, 10)] == [False, False, False, False, True]
    assert (stop.best, stop.bad_evaluations) == (11, 2)  # 10.3 was not enough to count as better


def test_early_stopping_improvement_resets_the_counter():
    stop = EarlyStopping(patience=3)
    for m in (5, 4, 4):
        stop.update(m)
    assert stop.bad_evaluations == 2 and not stop.update(6) and stop.bad_evaluations == 0


# --- JSON round trips


def test_rule_and_stopper_round_trip_through_json():
    rule, stop = AdaptiveLR(lr=1e-3, patience=5), EarlyStopping(patience=4, min_delta=0.1)
    for m in (3.0, 7.0, 2.0, 1.0):
        rule.adapt(m)
        stop.update(m)
    assert AdaptiveLR.from_json(json.loads(json.dumps(rule.to_json()))) == rule
    assert EarlyStopping.from_json(json.loads(json.dumps(stop.to_json()))) == stop


def schedule_cfg(*overrides: str):
    return load_config(None, ["data.url=/x", "eval.every=5", "optim.name=rmsprop_tf", *overrides])


def tiny_model_and_optimizer(lr=1e-3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    return model, RMSpropTF(model.parameters(), lr=lr)


def test_validation_schedule_state_and_best_model_survive_a_round_trip(tmp_path):
    cfg = schedule_cfg(
        "optim.lr_patience=1", "optim.lr_ema=0", "train.early_stopping=true", "train.early_stopping_patience=3"
    )
    schedule = ValidationSchedule(cfg)
    model, optimizer = tiny_model_and_optimizer()
    for step, metric in ((5, 40.0), (10, 50.0), (15, 45.0)):
        with torch.no_grad():
            model[0].weight.add_(1.0)  # a different model at every validation
        logged = schedule.observe(step, metric, model, optimizer)
    assert logged == {"val/mAP": 45.0, "val/best": 50.0, "val/ema": 45.0, "val/bad_evaluations": 1}
    assert optimizer.param_groups[0]["lr"] == pytest.approx(8e-4)  # lr_ema 0: the EMA is the metric
    assert (schedule.best.step, schedule.best.metric) == (10, 50.0)
    assert "decayed from 0.001" in schedule.report
    for name, write in schedule.files().items():
        write(tmp_path / name)
    state = json.loads(json.dumps(schedule.to_json()))

    again = ValidationSchedule(cfg)
    again.load(state, tmp_path)
    assert again.to_json() == schedule.to_json()
    assert again.best.state.keys() == schedule.best.state.keys()
    assert all(torch.equal(again.best.state[k], v) for k, v in schedule.best.state.items())
    fresh_model, fresh_optimizer = tiny_model_and_optimizer()
    again.apply_lr(fresh_optimizer)
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(8e-4)
    with again.best.loaded_into(fresh_model):  # the best weights: two +1 steps after the init
        assert torch.allclose(fresh_model[0].weight, tiny_model_and_optimizer()[0][0].weight + 2.0)
    assert torch.equal(fresh_model[0].weight, tiny_model_and_optimizer()[0][0].weight)  # put back


def test_resume_with_another_val_metric_is_refused(tmp_path):
    schedule = ValidationSchedule(schedule_cfg())
    schedule.observe(5, 1.0, *tiny_model_and_optimizer())
    schedule.files()[BEST_MODEL_FILE](tmp_path / BEST_MODEL_FILE)
    with pytest.raises(RuntimeError, match="eval.val_metric=mAP"):
        ValidationSchedule(schedule_cfg("eval.val_metric=F1@5")).load(schedule.to_json(), tmp_path)


def test_best_model_keeps_the_first_of_equal_metrics():
    best, (model, _) = BestModel(), tiny_model_and_optimizer()
    assert best.update(1, 5.0, model) and not best.update(2, 5.0, model) and best.step == 1


def test_metric_names():
    assert [metric_k(n) for n in ("mAP", "F1@5", "P@3", "R@10")] == [None, 5, 3, 10]
    with pytest.raises(ValueError):
        metric_k("F1@0")


# --- the lr DeepSpeed steps with

DEEPSPEED_STEP = r"""
import json, os, sys, torch
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed, deepspeed.ops
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
from trainer.config import load_config
from trainer.optim import RMSpropTF
from trainer.schedule import set_lr
from trainer.engine import deepspeed_config

deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
model = torch.nn.Linear(4, 1, bias=False)
cfg = load_config(None, ["data.url=/x", "data.batch_size=2", f"deepspeed.bf16={sys.argv[2]}"])
engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=RMSpropTF(model.parameters(), lr=1e-3),
                                               config=deepspeed_config(cfg, 1))
set_lr(optimizer, 0.25)
before = model.weight.detach().float().clone()
x = torch.full((2, 4), 1.0, dtype=model.weight.dtype)
loss = engine(x).float().sum()  # gradient 2 per weight, norm 4: DeepSpeed's default would clip it to 1
engine.backward(loss)
engine.step()
print(json.dumps({"delta": (before - model.weight.detach().float()).tolist(), "engine_lr": engine.get_lr(),
                  "wrapper": type(optimizer).__name__}))
"""


@pytest.mark.parametrize(
    "bf16, wrapper, tolerance", [("false", "RMSpropTF", 1e-5), ("true", "FP16_UnfusedOptimizer", 5e-2)]
)
def test_the_lr_set_through_deepspeeds_optimizer_is_the_one_that_steps(bf16, wrapper, tolerance):
    """With bf16 DeepSpeed wraps the torch optimizer (fp32 master weights): set_lr reaches it too,
    and the gradient arrives unclipped."""
    port = 29500 + os.getpid() % 1000 + (bf16 == "true")
    proc = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_STEP, str(port), bf16],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # RMSpropTF's first step: ms = 0.9 + 0.1 g^2, delta = lr g / sqrt(ms + 1), with the raw g = 2
    # (no clipping, as the spec's optimizer) and the lr we set (lr 1e-3 would have moved 1.3e-3)
    assert result["delta"] == [[pytest.approx(0.25 * 2.0 / (0.9 + 0.4 + 1.0) ** 0.5, rel=tolerance)] * 4]
    assert result["engine_lr"] == [0.25] and result["wrapper"] == wrapper


# --- config checks


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.early_stopping=true", "eval.every=0"], "train.early_stopping"),
        (["eval.val_split=null"], "eval.val_split"),
        (["eval.val_split=test"], "eval.val_split"),
        (["eval.val_metric=F1@0"], "eval.val_metric"),
        (["eval.val_metric=accuracy"], "eval.val_metric"),
        (["optim.lr_decay=0"], "optim.lr_decay"),
        (["optim.lr_ema=1"], "optim.lr_ema"),
        (["optim.lr_patience=-1"], "optim.lr_patience"),
        (["optim.lr_floor=-1e-6"], "optim.lr_floor"),
        (["train.early_stopping_patience=0"], "train.early_stopping_patience"),
        (["train.early_stopping_min_delta=-1"], "train.early_stopping_min_delta"),
    ],
)
def test_bad_schedule_settings_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, ["data.url=/x", "eval.every=5", *overrides])


def test_schedule_defaults_follow_the_spec():
    cfg = load_config(None, ["data.url=/x"])
    assert (cfg.optim.adaptive_lr, cfg.optim.lr_patience, cfg.optim.lr_decay, cfg.optim.lr_ema, cfg.optim.lr_floor) == (
        True,
        2,
        0.8,
        0.7,
        1e-6,
    )
    assert (cfg.eval.val_split, cfg.eval.val_metric, cfg.train.early_stopping) == ("val", "mAP", False)
    # no validation at all is fine once nothing needs it
    load_config(None, ["data.url=/x", "eval.every=5", "eval.val_split=null", "optim.adaptive_lr=false"])

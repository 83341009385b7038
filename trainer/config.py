"""One config object for a run: loaded from YAML, overridden with `--set`, validated up front.

Every key a user can set is a field below, with its default; this file is the one place they are
documented (docs/configuration.md is generated from it). `load_config` checks the values alone
(types, ranges, rules between keys), and every error names the dotted key it is about; what needs
the registries or the dataset is checked by launch/preflight.py, still before any cluster work.
This module imports nothing else of the project, so anything may import it.

A Config is frozen: a run resolves it once (absolute paths, the checkpoint storage) into a new one
with `replaced`, and nothing changes it after that.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or a value out of range."""


VAL_METRIC = re.compile(r"mAP|(P|R|F1)@([1-9][0-9]*)")  # the names trainer/evaluation/metrics.py reports


@dataclass(frozen=True)
class DataConfig:
    url: str = ""  # dataset root in the format of docs/dataset-format.md (path or fsspec URL)
    image_size: int = 96  # model input side; images are resized (short side) + centre-cropped
    batch_size: int = 32  # per worker and step
    loader_workers: int = 1  # DataLoader processes per training worker
    shuffle_buffer: int = 1000  # samples held for shuffling within a worker's stream
    train_split: str = "train"
    max_bad_fraction: float = 0.05  # abort if more than this fraction of read samples are bad
    ledger: bool = False  # write OUT/ledger/: one line per sample whose gradient is in the model


@dataclass(frozen=True)
class ModelConfig:
    name: str = "lesa"  # registry in trainer/models/registry.py
    backbone: str = "small_cnn"  # registry in trainer/models/backbones.py
    # path or fsspec URL of a state dict (frozen backbones); for `clip`, of a CLIP checkpoint folder
    # as CLIPModel.save_pretrained writes it (docs/backbones.md)
    backbone_weights: str | None = None
    # null: the backbone's own way (vgg19, small_cnn_frozen, clip frozen; small_cnn trained);
    # false fine-tunes `clip` from its weights, the one backbone that can be either
    freeze_backbone: bool | None = None
    activation_checkpointing: bool = False  # a trained `clip` recomputes its layers' activations in backward
    num_attentions: int = 10  # M of docs/protocol.md, The head
    adapter: bool = True  # the 2x2 conv + BN + ReLU adapter of the official code
    conse_top: int = 10  # conse only: T, the most probable seen labels an image embedding mixes
    # torch.compile the backbone and the head, in place (checkpoints keep their keys). It pays for
    # the backbone on GPUs (frozen VGG-19 1.63x on an H200); the head alone gains nothing, its
    # step being bound by kernel launches (docs/performance.md). The first batches wait for it.
    compile: bool = False


@dataclass(frozen=True)
class LossConfig:
    # docs/protocol.md, Losses: L = rank + 0.1 dist + 0.001 rel + 0.01 div
    rank: float = 1.0
    dist: float = 0.1
    rel: float = 0.001
    div: float = 0.01


@dataclass(frozen=True)
class OptimConfig:
    name: str = "rmsprop_tf"  # registry in trainer/optim.py: rmsprop_tf | adamw
    lr: float = 1e-3
    # a trained backbone's lr is optim.lr times this (a param group of its own, kept through the
    # adaptive lr); a pretrained tower being fine-tuned usually wants 0.01-0.1
    backbone_lr_scale: float = 1.0
    weight_decay: float = 0.0
    # LESA's adaptive lr (docs/protocol.md, Optimisation; trainer/schedule.py) at every validation (eval.every):
    # ema = lr_ema * ema + (1 - lr_ema) * metric; when ema falls, lr >= lr_floor and no cooldown:
    # lr *= lr_decay and a cooldown of lr_patience evaluations. Inert when eval.every is 0.
    adaptive_lr: bool = True
    lr_patience: int = 2  # the official code: 2 on Open Images, 5 on NUS-WIDE
    lr_decay: float = 0.8
    lr_ema: float = 0.7  # weight of the previous EMA (the official signal strength is 0.3)
    lr_floor: float = 1e-6  # no decay once lr is below this


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 400
    seed: int = 0
    log_every: int = 10  # console + MLflow cadence, in steps
    early_stopping: bool = False  # stop once the validation metric stalls (the official code trains to
    # the end and only keeps the best model, which we always do)
    early_stopping_patience: int = 10  # validations in a row without improvement before stopping
    early_stopping_min_delta: float = 0.0  # an improvement must exceed this (metric units, percent)
    # Testing aid, never needed in a real run: "checkpoint@S" makes rank 0 die once (exit 137)
    # while writing the checkpoint of step S, as a lost machine would; "driver@S" kills the driver
    # once that checkpoint is committed, as a lost head node would (the resume tests use both).
    debug_fault: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # steps between evaluations during training; 0 = only at the end
    k: list[int] = field(default_factory=lambda: [3, 5])
    split: str = "test"
    batch_size: int = 64
    overlays: int = 4  # attention overlay PNGs of eval images at the end (OUT/attention/); 0: none
    # Validation every `every` steps: val_metric on the seen labels of val_split drives the adaptive
    # lr, early stopping and the best model (model_best.pt). null: no validation. Never the test split.
    val_split: str | None = "val"
    val_metric: str = "mAP"  # mAP (Open Images), or P@K / R@K / F1@K (F1@5 on NUS-WIDE)
    test_during_training: bool = True  # also evaluate `split` every `every` steps (metrics.json history)


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1


@dataclass(frozen=True)
class DeepSpeedConfig:
    # 0: the optimizer state whole on every worker (the frozen-backbone head needs no more);
    # 1: the optimizer state partitioned over the workers; 2: and the gradients; 3: and the
    # weights (docs/zero.md). A resume on another number of workers converts by itself.
    zero_stage: int = 0
    bf16: bool = False
    # stage 3: a parameter of fewer elements stays whole on every worker (DeepSpeed's default;
    # gathering many small ones costs more than they save); 0 partitions every one
    stage3_param_persistence_threshold: int = 100_000


@dataclass(frozen=True)
class CheckpointConfig:
    storage: str | None = None  # Ray Train storage for the run's checkpoints; default OUT/checkpoints
    every: int = 100  # steps between checkpoints (0: only the final one)
    keep: int = 2  # checkpoints kept in storage
    max_failures: int = 3  # worker failures Ray Train recovers from by resuming


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite in the cwd
    artifact_location: str | None = None  # default: ./mlartifacts next to the sqlite store
    experiment: str = "lesa"
    run_name: str | None = None
    # model.pt also as an MLflow model (torch.export's pt2, for `mlflow models` and the registry);
    # the export takes seconds for the small models and can take minutes for a large CLIP tower
    log_model: bool = True


@dataclass(frozen=True)
class SubmitConfig:
    """Read by `lesa submit` only: how the job reaches the cluster (launch/submit.py)."""

    address: str | None = None  # Ray dashboard URL; default $RAY_ADDRESS, else http://127.0.0.1:8265
    working_dir: str = "."  # shipped to the cluster with the job; CONFIG must lie inside it
    out: str | None = None  # --out of `lesa train` on the cluster (a path on the head node)
    runtime_env: dict = field(default_factory=dict)  # Ray runtime_env: env_vars, excludes, pip, ...


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, object]:
        """Dotted keys, as MLflow params."""
        out: dict[str, object] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out


def _coerce(value, annotation, key: str):
    """Check `value` against a field annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # PyYAML reads YAML 1.1, where 1e-3 (no dot) is a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # --set mlflow.run_name=2024
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown config key '{where}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, data[name] or {}, key)
        else:
            kwargs[name] = _coerce(data[name], hint, key)
    return cls(**kwargs)


def _check(cfg: Config) -> None:
    def need(ok: bool, key: str, why: str):
        if not ok:
            raise ConfigError(f"{key}: {why}")

    need(bool(cfg.data.url), "data.url", "is required (the dataset root, see docs/dataset-format.md)")
    for key in (
        "data.image_size",
        "data.batch_size",
        "train.max_steps",
        "train.log_every",
        "eval.batch_size",
        "scaling.num_workers",
        "scaling.cpus_per_worker",
        "model.num_attentions",
        "model.conse_top",
    ):
        section, name = key.split(".")
        need(getattr(getattr(cfg, section), name) >= 1, key, "must be at least 1")
    need(cfg.data.loader_workers >= 0, "data.loader_workers", "must be 0 or more")
    need(cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be at least 1")
    need(0.0 <= cfg.data.max_bad_fraction <= 1.0, "data.max_bad_fraction", "must be in [0, 1]")
    need(cfg.eval.every >= 0, "eval.every", "must be 0 (end only) or a number of steps")
    need(cfg.eval.overlays >= 0, "eval.overlays", "must be 0 (none) or a number of images")
    need(cfg.checkpoint.every >= 0, "checkpoint.every", "must be 0 (end only) or a number of steps")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be at least 1")
    need(cfg.checkpoint.max_failures >= 0, "checkpoint.max_failures", "must be 0 or more")
    need(cfg.deepspeed.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3 (docs/zero.md)")
    need(
        cfg.deepspeed.stage3_param_persistence_threshold >= 0,
        "deepspeed.stage3_param_persistence_threshold",
        "must be 0 or more",
    )
    need(
        len(cfg.eval.k) > 0 and all(k >= 1 for k in cfg.eval.k),
        "eval.k",
        "must be a non-empty list of positive integers",
    )
    need(cfg.optim.lr > 0, "optim.lr", "must be positive")
    need(cfg.optim.backbone_lr_scale > 0, "optim.backbone_lr_scale", "must be positive")
    _check_schedule(cfg, need)
    for name in ("rank", "dist", "rel", "div"):
        need(getattr(cfg.loss, name) >= 0, f"loss.{name}", "must be non-negative")


def _check_schedule(cfg: Config, need) -> None:
    """Validation, adaptive lr and early stopping (trainer/schedule.py)."""
    o, t, e = cfg.optim, cfg.train, cfg.eval
    need(o.lr_patience >= 0, "optim.lr_patience", "must be 0 or more")
    need(0 < o.lr_decay <= 1, "optim.lr_decay", "must be in (0, 1]")
    need(0 <= o.lr_ema < 1, "optim.lr_ema", "must be in [0, 1)")
    need(o.lr_floor >= 0, "optim.lr_floor", "must be 0 or more")
    need(
        t.debug_fault is None or re.fullmatch(r"(checkpoint|driver)@[0-9]+", t.debug_fault) is not None,
        "train.debug_fault",
        "expected checkpoint@STEP or driver@STEP (a testing aid; leave it unset)",
    )
    need(t.early_stopping_patience >= 1, "train.early_stopping_patience", "must be at least 1")
    need(t.early_stopping_min_delta >= 0, "train.early_stopping_min_delta", "must be 0 or more")
    need(
        VAL_METRIC.fullmatch(e.val_metric) is not None,
        "eval.val_metric",
        f"expected mAP, P@K, R@K or F1@K (K a positive integer), got {e.val_metric!r}",
    )
    need(
        e.val_split != e.split,
        "eval.val_split",
        f"must differ from eval.split ({e.split}): the schedule and the best model never see the test split",
    )
    need(
        not t.early_stopping or e.every > 0,
        "train.early_stopping",
        "stops on validations, which run every eval.every steps: set eval.every > 0",
    )
    need(
        not (t.early_stopping or o.adaptive_lr) or e.every == 0 or bool(e.val_split),
        "eval.val_split",
        "is null, but optim.adaptive_lr or train.early_stopping needs a validation split",
    )


def parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read a YAML file (or `base`), apply `key=value` overrides, validate, return the Config."""
    data: dict = copy.deepcopy(base or {})
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for part in keys[:-1]:
            if node.get(part) is None:  # absent, or an empty section in the YAML
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
        node[keys[-1]] = value
    cfg = _build(Config, data, "")
    _check(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config inside a Ray worker from `Config.to_dict()` (already validated)."""
    return _build(Config, data, "")


def replaced(cfg: Config, changes: dict[str, object]) -> Config:
    """A new Config with the dotted keys of `changes` set, e.g. {"data.url": "/abs/data"}; `cfg`
    itself stays as it was. The values are not checked again: callers resolve paths, not settings."""
    sections: dict[str, dict[str, object]] = {}
    for key, value in changes.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(
        cfg, **{section: dataclasses.replace(getattr(cfg, section), **values) for section, values in sections.items()}
    )

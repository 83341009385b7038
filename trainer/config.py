"""One config object for a run: loaded from YAML, overridden with `--set`, validated up front.

Every key a user can set is a field below, with its default; this file is the one place they are
documented (the README links here). Validation happens before any cluster work, and every error
names the dotted key it is about.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or a value out of range."""


@dataclass
class DataConfig:
    url: str = ""                 # dataset root in the contract of DESIGN.md (path or fsspec URL)
    image_size: int = 96          # model input side; images are resized (short side) + centre-cropped
    batch_size: int = 32          # per worker and step
    loader_workers: int = 1       # DataLoader processes per training worker
    shuffle_buffer: int = 1000    # samples held for shuffling within a worker's stream
    train_split: str = "train"
    max_bad_fraction: float = 0.05  # abort if more than this fraction of read samples are bad
    ledger: bool = False          # write OUT/ledger/: one line per sample whose gradient is in the model


@dataclass
class ModelConfig:
    name: str = "lesa"            # registry in trainer/model.py
    backbone: str = "small_cnn"   # registry in trainer/backbones.py
    backbone_weights: str | None = None  # path or fsspec URL of a state dict (vgg19)
    num_attentions: int = 10      # M of lesa_spec §1.2
    adapter: bool = True          # the 2x2 conv + BN + ReLU adapter of the official code


@dataclass
class LossConfig:
    # lesa_spec §2: L = rank + 0.1 dist + 0.001 rel + 0.01 div
    rank: float = 1.0
    dist: float = 0.1
    rel: float = 0.001
    div: float = 0.01


@dataclass
class OptimConfig:
    name: str = "rmsprop_tf"      # registry in trainer/optim.py: rmsprop_tf | adamw
    lr: float = 1e-3
    weight_decay: float = 0.0


@dataclass
class TrainConfig:
    max_steps: int = 400
    seed: int = 0
    log_every: int = 10           # console + MLflow cadence, in steps


@dataclass
class EvalConfig:
    every: int = 0                # steps between evaluations during training; 0 = only at the end
    k: list[int] = field(default_factory=lambda: [3, 5])
    split: str = "test"
    batch_size: int = 64


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0           # only 0: optimizer state whole, so a run resumes on any world size
    bf16: bool = False


@dataclass
class CheckpointConfig:
    storage: str | None = None    # Ray Train storage for the run's checkpoints; default OUT/checkpoints
    every: int = 100              # steps between checkpoints (0: only the final one)
    keep: int = 2                 # checkpoints kept in storage
    max_failures: int = 3         # worker failures Ray Train recovers from by resuming


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None   # default: $MLFLOW_TRACKING_URI, else sqlite in the cwd
    artifact_location: str | None = None  # default: ./mlartifacts next to the sqlite store
    experiment: str = "lesa"
    run_name: str | None = None


@dataclass
class SubmitConfig:
    """Read by `lesa submit` only: how the job reaches the cluster (launch/submit.py)."""
    address: str | None = None    # Ray dashboard URL; default $RAY_ADDRESS, else http://127.0.0.1:8265
    working_dir: str = "."        # shipped to the cluster with the job; CONFIG must lie inside it
    out: str | None = None        # --out of `lesa train` on the cluster (a path on the head node)
    runtime_env: dict = field(default_factory=dict)  # Ray runtime_env: env_vars, excludes, pip, ...


@dataclass
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

    need(bool(cfg.data.url), "data.url", "is required (the dataset root, see DESIGN.md)")
    for key in ("data.image_size", "data.batch_size", "train.max_steps", "train.log_every",
                "eval.batch_size", "scaling.num_workers", "scaling.cpus_per_worker",
                "model.num_attentions"):
        section, name = key.split(".")
        need(getattr(getattr(cfg, section), name) >= 1, key, "must be at least 1")
    need(cfg.data.loader_workers >= 0, "data.loader_workers", "must be 0 or more")
    need(cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be at least 1")
    need(0.0 <= cfg.data.max_bad_fraction <= 1.0, "data.max_bad_fraction", "must be in [0, 1]")
    need(cfg.eval.every >= 0, "eval.every", "must be 0 (end only) or a number of steps")
    need(cfg.checkpoint.every >= 0, "checkpoint.every", "must be 0 (end only) or a number of steps")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be at least 1")
    need(cfg.checkpoint.max_failures >= 0, "checkpoint.max_failures", "must be 0 or more")
    need(cfg.deepspeed.zero_stage == 0, "deepspeed.zero_stage",
         "only 0 is supported: its checkpoints resume on any number of workers (stages 1-3 would "
         "need an offline universal-checkpoint conversion), and LESA's head fits every GPU whole")
    need(len(cfg.eval.k) > 0 and all(k >= 1 for k in cfg.eval.k), "eval.k",
         "must be a non-empty list of positive integers")
    need(cfg.optim.lr > 0, "optim.lr", "must be positive")
    for name in ("rank", "dist", "rel", "div"):
        need(getattr(cfg.loss, name) >= 0, f"loss.{name}", "must be non-negative")
    # Registries are checked here too so that a typo fails before Ray starts.
    from trainer.backbones import BACKBONES
    from trainer.model import MODELS
    from trainer.optim import OPTIMIZERS

    need(cfg.model.name in MODELS, "model.name", f"unknown model (known: {', '.join(MODELS)})")
    need(cfg.model.backbone in BACKBONES, "model.backbone",
         f"unknown backbone (known: {', '.join(BACKBONES)})")
    need(cfg.optim.name in OPTIMIZERS, "optim.name",
         f"unknown optimizer (known: {', '.join(OPTIMIZERS)})")
    need(cfg.model.backbone != "vgg19" or cfg.model.backbone_weights is not None, "model.backbone_weights",
         "vgg19 is frozen, so it needs pretrained weights: a state dict path or URL")


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

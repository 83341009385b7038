"""Every check that must pass before any cluster work, in one place: each command calls its entry
point first and works only with what comes back.

- `preflight` (`lesa train`, `lesa evaluate`): the registries, the paths resolved once into a new
  frozen Config (data.url absolute, checkpoint.storage absolute and by default OUT/checkpoints),
  the dataset (its splits, enough training shards for the workers, unseen labels, the validation
  split) and what the backbone reads: a feature cache's backbone and image size, or a frozen
  backbone's weights.
- `preflight_extract` (`lesa extract`): the same for a frozen backbone over an image dataset.
- `preflight_predict` (`lesa predict`): the arguments, the checkpoint folder and its config.json.

The checks read metadata only (dataset.json, the label files, whether files exist), so a mistake
costs seconds, exits with status 2 from the CLI, and never starts Ray. `load_config` has checked
the values on their own already (trainer/config.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import fsspec

from datasets.contract import DatasetInfo, join, read_dataset
from launch.storage import check_storage, model_file, newest_checkpoint_text, read_text
from trainer.config import Config, ConfigError, config_from_dict, replaced
from trainer.run_folder import RunRecord


class Resolved(NamedTuple):
    """What a command runs with once its checks passed."""

    cfg: Config  # paths resolved: the config every worker gets
    out: Path | str  # OUT, absolute (a local folder, or for extract a path or URL)
    info: DatasetInfo  # the dataset at cfg.data.url
    splits: list[str]  # the splits the command reads, each known to exist


def absolute(url: str) -> str:
    """Workers run in other directories: make local paths absolute, leave URLs alone."""
    return url if "://" in url else str(Path(url).resolve())


def check_registries(cfg: Config) -> None:
    """model.name, model.backbone and optim.name name registered entries."""
    from trainer.models.backbones import BACKBONES
    from trainer.models.registry import MODELS
    from trainer.optim import OPTIMIZERS

    for key, name, known, what in (
        ("model.name", cfg.model.name, MODELS, "model"),
        ("model.backbone", cfg.model.backbone, BACKBONES, "backbone"),
        ("optim.name", cfg.optim.name, OPTIMIZERS, "optimizer"),
    ):
        if name not in known:
            raise ConfigError(f"{key}: unknown {what} (known: {', '.join(known)})")


def training_splits(cfg: Config) -> list[str]:
    """What `lesa train` reads: the training split, the test split, and the validation split
    when validations run (eval.every > 0 and eval.val_split set, trainer/schedule.py)."""
    validating = cfg.eval.every > 0 and cfg.eval.val_split
    return [cfg.data.train_split, cfg.eval.split] + ([cfg.eval.val_split] if validating else [])


def check_data(cfg: Config, splits: list[str]) -> DatasetInfo:
    """The dataset at data.url, with `splits`, as the config will read it."""
    from trainer.models.backbones import check_features, check_weights
    from trainer.models.registry import check_zero_shot

    info = read_dataset(cfg.data.url)
    if info.features is not None:  # a feature cache stands in only for the backbone that made it
        check_features(cfg.model, cfg.data.image_size, info.features, cfg.data.url)
    else:
        check_weights(cfg.model, cfg.data.url, cfg.data.image_size)
    check_zero_shot(cfg, info)
    if cfg.eval.val_split in splits and cfg.eval.val_split not in info.splits:
        raise ConfigError(
            f"eval.val_split: {cfg.data.url} has no '{cfg.eval.val_split}' split to validate on "
            f"every eval.every steps (has: {', '.join(info.splits)}); name another, write one "
            f"(lesa synth --val N), or run without validation: --set eval.val_split=null "
            f"--set optim.adaptive_lr=false"
        )
    for split in splits:
        info.shards(split)
    train = info.shards(cfg.data.train_split) if cfg.data.train_split in splits else None
    if train is not None and len(train) < cfg.scaling.num_workers:
        raise ConfigError(
            f"scaling.num_workers: {cfg.scaling.num_workers} workers but the "
            f"{cfg.data.train_split} split of {cfg.data.url} has only {len(train)} shards; "
            f"write smaller shards or use fewer workers"
        )
    if len(info.unseen) == 0:
        raise ConfigError(f"data.url: {cfg.data.url} has no unseen labels to evaluate ZSL on")
    return info


def preflight(cfg: Config, out: str | Path, splits: list[str]) -> Resolved:
    """`lesa train` (splits: `training_splits`) and `lesa evaluate` (the test split); creates OUT
    once everything passed."""
    check_registries(cfg)
    out = Path(out).resolve()
    cfg = replaced(
        cfg,
        {
            "data.url": absolute(cfg.data.url),
            "checkpoint.storage": absolute(cfg.checkpoint.storage or str(out / "checkpoints")),
        },
    )
    for key, url in (("data.url", cfg.data.url), ("checkpoint.storage", cfg.checkpoint.storage)):
        check_storage(url, key)
    info = check_data(cfg, splits)
    out.mkdir(parents=True, exist_ok=True)
    return Resolved(cfg, out, info, splits)


def resumed(cfg: Config, run: RunRecord | None) -> Config:
    """A resumed run keeps the checkpoint storage its run.json names, whatever the config says now."""
    return replaced(cfg, {"checkpoint.storage": run.storage}) if run and run.storage else cfg


def check_trains(cfg: Config) -> None:
    """`lesa train`: a model that trains nothing (clip_zeroshot) is evaluated, not trained."""
    from trainer.models.registry import MODELS

    if not MODELS[cfg.model.name].trains:
        raise ConfigError(
            f"model.name: {cfg.model.name} trains nothing; evaluate it with lesa evaluate CONFIG (no --checkpoint)"
        )


def evaluation_checkpoint(checkpoint: str | None, cfg: Config, info: DatasetInfo) -> str | None:
    """`lesa evaluate --checkpoint`: the model.pt it names, absolute, once it has been read (plain
    tensors only) and fits the model `cfg` builds over `info`, which every worker would otherwise
    fail on after Ray started. Built on the meta device, the model allocates nothing. None for a
    model that trains nothing (clip_zeroshot), which takes no checkpoint."""
    import torch

    from trainer.models.registry import MODELS, build_model
    from trainer.weights import WeightsError, fitting_state, read_state_dict

    if not MODELS[cfg.model.name].trains:
        if checkpoint is not None:
            raise ConfigError(f"--checkpoint: {cfg.model.name} trains nothing and takes no checkpoint; leave it out")
        return None
    if checkpoint is None:
        raise ConfigError(
            f"--checkpoint: model.name {cfg.model.name} is trained; give the model.pt lesa train wrote "
            f"(only a model that trains nothing, clip_zeroshot, needs none)"
        )

    check_storage(checkpoint, "--checkpoint")
    found = model_file(absolute(checkpoint))
    if found is None:
        raise ConfigError(f"--checkpoint: {checkpoint} is not a model.pt nor a folder holding one")
    with torch.device("meta"):
        model = build_model(replaced(cfg, {"model.compile": False}), info.embeddings, info.seen, info.features)
    try:
        fitting_state(model, read_state_dict(found), found)
    except WeightsError as exc:
        raise ConfigError(f"--checkpoint: {exc}") from None
    return found


def preflight_extract(cfg: Config, out: str, splits: list[str] | None) -> Resolved:
    """`lesa extract`: a frozen backbone (with its weights) over an image dataset, into another
    root; `splits` default to all of the dataset's."""
    from trainer.models.backbones import BACKBONES, check_weights, trains_backbone

    check_registries(cfg)
    cfg, out = replaced(cfg, {"data.url": absolute(cfg.data.url)}), absolute(out)
    check_storage(cfg.data.url, "data.url")
    check_storage(out, "--out")
    info = read_dataset(cfg.data.url)
    if trains_backbone(cfg.model):
        raise ConfigError(
            f"model.backbone: {cfg.model.backbone} is trainable, so its features change as it "
            f"trains and cannot be cached; lesa extract needs a frozen backbone "
            f"({', '.join(name for name, b in BACKBONES.items() if not b.trainable)})"
        )
    if info.kind != "image":
        raise ConfigError(f"data.url: {cfg.data.url} is a {info.kind} dataset; extract from the image dataset")
    check_weights(cfg.model, cfg.data.url, cfg.data.image_size)
    if out.rstrip("/") == cfg.data.url.rstrip("/"):
        raise ConfigError(f"--out {out}: is data.url itself; write the features to another root")
    splits = splits or list(info.splits)
    for split in splits:
        info.shards(split)  # an unknown split is an error naming dataset.json
    return Resolved(cfg, out, info, splits)


def preflight_predict(checkpoint: str, top_k: int, device: str) -> tuple[str, Config]:
    """`lesa predict`: (model.pt, the Config of its config.json) for DIR or DIR/model.pt."""
    if top_k < 1:
        raise ConfigError(f"--top-k: must be at least 1, got {top_k}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is available")
    check_storage(checkpoint, "--checkpoint")
    model_url = model_file(checkpoint)
    if model_url is None:
        raise ConfigError(f"--checkpoint: {checkpoint} is not a model.pt nor a folder holding one")
    config_url = join(model_url.rsplit("/", 1)[0], "config.json")
    try:
        with fsspec.open(config_url, "rt") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"{config_url}: missing; predict needs the config.json that `lesa train --out` writes next to model.pt"
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config_url}: not valid JSON ({exc})") from None
    try:
        cfg = config_from_dict(data)
        check_registries(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{config_url}: {exc}") from None
    return model_url, cfg


def check_resume_engine(cfg: Config, run: RunRecord | None, resume_from: str | None) -> None:
    """`lesa train --resume`: the optimizer state continues only at the ZeRO stage and with the
    optimizer that wrote it (trainer/training.py checks the same in the workers); a switch is
    refused here, naming both, before any cluster work. Reads --resume PATH's lesa_state.json, or
    the newest checkpoint's of the run being continued."""
    from trainer.state import STATE_FILE
    from trainer.zero import engine_switch_error

    if resume_from:
        text = read_text(join(resume_from, STATE_FILE))
    elif run and run.storage:
        text = newest_checkpoint_text(run.storage, run.run_name, STATE_FILE)
    else:
        return
    try:
        saved = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return  # a damaged state is named by the check that reads it whole (the workers')
    if not isinstance(saved, dict) or "zero_stage" not in saved:
        return  # an older schema: refused by its version where it is read
    problem = engine_switch_error(saved["zero_stage"], saved.get("optimizer", ""), cfg)
    if problem:
        raise ConfigError(problem)

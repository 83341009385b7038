"""Models: a backbone and a head that score every label from its vector. A registry by `model.name`.

The label vectors are fixed and L2-normalised (docs/protocol.md, The head); they are a buffer of the model so
a saved model carries the vocabulary it was trained against. `forward(images, label_ids)` scores
the chosen labels: seen ones in training, unseen (ZSL) or all (GZSL) at evaluation.

Each entry of MODELS says how to build its head and which terms of trainer/models/losses.py train it,
with their weights; the train loop asks for those and knows nothing else about the model.
`clip_zeroshot` trains nothing: CLIP's image embedding against the label vectors, the floor every
trained head must beat (`lesa evaluate CONFIG` without --checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets.contract import DatasetInfo, FeatureSpec
from trainer.config import Config, ConfigError
from trainer.models.backbones import ClipVision, build_backbone
from trainer.models.baselines import CONSEHead, Fast0TagHead, LabelEMHead, OneAttentionPerLabelHead
from trainer.models.lesa import LESAHead
from trainer.models.output import HeadOutput


def unit_rows(vectors: np.ndarray) -> torch.Tensor:
    return F.normalize(torch.as_tensor(vectors, dtype=torch.float32), dim=1)


class TaggingModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module, label_vectors: np.ndarray):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("label_vectors", unit_rows(label_vectors))

    def forward(self, images: torch.Tensor, label_ids: torch.Tensor) -> HeadOutput:
        fmap = self.backbone(images)
        return self.head(fmap, self.label_vectors[label_ids])


def lesa_head(cfg: Config, channels: int, vectors: np.ndarray, seen_ids) -> nn.Module:
    return LESAHead(channels, vectors.shape[1], cfg.model.num_attentions, cfg.model.adapter)


def conse_head(cfg: Config, channels: int, vectors: np.ndarray, seen_ids) -> nn.Module:
    if seen_ids is None:
        raise ValueError("model.name conse needs the seen label ids (build_model(..., seen_ids))")
    return CONSEHead(channels, unit_rows(vectors[np.asarray(seen_ids)]), cfg.model.conse_top)


class CosineHead(nn.Module):
    """clip_zeroshot: score(image, label) = cosine of the image's one feature (a 1x1 map: CLIP's
    projected class token) and the label's unit vector. No parameters."""

    def forward(self, fmap: torch.Tensor, label_vectors: torch.Tensor) -> HeadOutput:
        return HeadOutput(scores=F.normalize(fmap.flatten(1), dim=1) @ label_vectors.to(fmap.dtype).t())


@dataclass(frozen=True)
class ModelEntry:
    head: Callable  # (cfg, backbone channels, label vectors, seen ids) -> head module
    loss_weights: Callable  # cfg -> {term of trainer.models.losses.LOSSES: weight}
    trains: bool = True  # False: evaluated as built, with no checkpoint (clip_zeroshot)
    class_token: bool = False  # the backbone gives CLIP's image embedding instead of regions


def lesa_losses(cfg: Config) -> dict[str, float]:
    return {name: getattr(cfg.loss, name) for name in ("rank", "dist", "rel", "div")}


def ranking_only(cfg: Config) -> dict[str, float]:
    return {"rank": 1.0}


MODELS = {
    "lesa": ModelEntry(lesa_head, lesa_losses),
    "fast0tag": ModelEntry(lambda cfg, c, v, seen: Fast0TagHead(c, v.shape[1]), ranking_only),
    "labelem": ModelEntry(lambda cfg, c, v, seen: LabelEMHead(c, v.shape[1]), ranking_only),
    "conse": ModelEntry(conse_head, lambda cfg: {"seen_logistic": 1.0}),
    "one_attention_per_label": ModelEntry(
        lambda cfg, c, v, seen: OneAttentionPerLabelHead(c, v.shape[1]), ranking_only
    ),
    "clip_zeroshot": ModelEntry(lambda cfg, c, v, seen: CosineHead(), lambda cfg: {}, trains=False, class_token=True),
}


def check_zero_shot(cfg: Config, info: DatasetInfo) -> None:
    """clip_zeroshot runs the `clip` tower on images (its class token is not in a feature cache)
    and scores label vectors of the tower's joint-space size (`clip-text:PATH` vectors)."""
    if not MODELS[cfg.model.name].class_token:
        return
    if cfg.model.backbone != ClipVision.name:
        raise ConfigError(f"model.backbone: {cfg.model.name} needs the clip backbone, not {cfg.model.backbone}")
    if info.features is not None:
        raise ConfigError(
            f"data.url: {cfg.data.url} is a feature dataset; {cfg.model.name} needs the images (CLIP's class "
            f"token is not cached)"
        )
    dim = ClipVision.joint_dim(cfg.model.backbone_weights)
    if info.embeddings.shape[1] != dim:
        raise ConfigError(
            f"data.url: {cfg.data.url} has {info.embeddings.shape[1]}-d label vectors, but the CLIP "
            f"joint space is {dim}-d; convert with --vectors clip-text:{cfg.model.backbone_weights}"
        )


def build_model(
    cfg: Config, label_vectors: np.ndarray, seen_ids: np.ndarray | None = None, features: FeatureSpec | None = None
) -> TaggingModel:
    """`seen_ids`: the labels training sees (the dataset's seen role); CONSE's embedding needs them.
    `features`: the FeatureSpec of a feature dataset (`DatasetInfo.features`); its cached rows then
    stand in for the frozen backbone (trainer/models/backbones.py, FeatureInput)."""
    entry = MODELS[cfg.model.name]
    backbone = build_backbone(cfg.model, features, class_token=entry.class_token)
    head = entry.head(cfg, backbone.out_channels, label_vectors, seen_ids)
    if cfg.model.compile:
        backbone.compile()
        head.compile()
    return TaggingModel(backbone, head, label_vectors)


def loss_weights(cfg: Config) -> dict[str, float]:
    """What trains `model.name`: weights for trainer.models.losses.total_loss."""
    return MODELS[cfg.model.name].loss_weights(cfg)

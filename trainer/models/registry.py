"""Models: a backbone and a head that score every label from its vector. A registry by `model.name`.

The label vectors are fixed and L2-normalised (docs/protocol.md, The head); they are a buffer of the model so
a saved model carries the vocabulary it was trained against. `forward(images, label_ids)` scores
the chosen labels: seen ones in training, unseen (ZSL) or all (GZSL) at evaluation.

Each entry of MODELS says how to build its head and which terms of trainer/models/losses.py train it,
with their weights; the train loop asks for those and knows nothing else about the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets.contract import FeatureSpec
from trainer.config import Config
from trainer.models.backbones import build_backbone
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


@dataclass(frozen=True)
class ModelEntry:
    head: Callable  # (cfg, backbone channels, label vectors, seen ids) -> head module
    loss_weights: Callable  # cfg -> {term of trainer.models.losses.LOSSES: weight}


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
}


def build_model(
    cfg: Config, label_vectors: np.ndarray, seen_ids: np.ndarray | None = None, features: FeatureSpec | None = None
) -> TaggingModel:
    """`seen_ids`: the labels training sees (the dataset's seen role); CONSE's embedding needs them.
    `features`: the FeatureSpec of a feature dataset (`DatasetInfo.features`); its cached rows then
    stand in for the frozen backbone (trainer/models/backbones.py, FeatureInput)."""
    backbone = build_backbone(cfg.model, features)
    head = MODELS[cfg.model.name].head(cfg, backbone.out_channels, label_vectors, seen_ids)
    if cfg.model.compile:
        backbone.compile()
        head.compile()
    return TaggingModel(backbone, head, label_vectors)


def loss_weights(cfg: Config) -> dict[str, float]:
    """What trains `model.name`: weights for trainer.models.losses.total_loss."""
    return MODELS[cfg.model.name].loss_weights(cfg)

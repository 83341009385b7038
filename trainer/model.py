"""Models: a backbone and a head that score every label from its vector. A registry by `model.name`.

The label vectors are fixed and L2-normalised (lesa_spec §1.3); they are a buffer of the model so
a saved model carries the vocabulary it was trained against. `forward(images, label_ids)` scores
the chosen labels: seen ones in training, unseen (ZSL) or all (GZSL) at evaluation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.backbones import build_backbone
from trainer.lesa import LESAHead


class TaggingModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module, label_vectors: np.ndarray):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("label_vectors", F.normalize(torch.as_tensor(label_vectors, dtype=torch.float32), dim=1))

    def forward(self, images: torch.Tensor, label_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.backbone(images)
        return self.head(fmap, self.label_vectors[label_ids])


def build_lesa(cfg, label_vectors: np.ndarray) -> TaggingModel:
    backbone = build_backbone(cfg.model)
    head = LESAHead(backbone.out_channels, label_vectors.shape[1], cfg.model.num_attentions, cfg.model.adapter)
    return TaggingModel(backbone, head, label_vectors)


MODELS = {"lesa": build_lesa}


def build_model(cfg, label_vectors: np.ndarray) -> TaggingModel:
    return MODELS[cfg.model.name](cfg, label_vectors)

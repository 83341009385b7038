"""The baselines of LESA's tables (docs/protocol.md, The paper's numbers), each a head on the same backbone as LESA.

Every head takes the backbone's region map X = {x_r} [B, C, H, W] and unit label vectors v_k
[K, dim] and returns {"scores": [B, K]}, like LESAHead, so training and evaluation treat all
models alike. Three of them see the image only through its holistic feature

    f(x) = (1/R) sum_r x_r                                          mean-pooled region map

and one attends over regions, but with one attention per label instead of LESA's M shared ones.
The losses they train with are chosen in trainer/models/registry.py (MODELS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.lesa import variance_scaling_
from trainer.models.output import HeadOutput


def holistic(fmap: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C]: the mean over regions, what a holistic model sees of the image."""
    return fmap.mean(dim=(2, 3))


class Fast0TagHead(nn.Module):
    """Fast0Tag (Zhang et al., CVPR 2016): a nonlinear map g of the holistic feature into the label
    space, where relevant labels' vectors lie ahead of irrelevant ones along g(f(x)):

        g(f)  = W2 ReLU(W1 f + b1) + b2                            two-layer MLP, C -> C -> dim
        s_k   = g(f(x)) . v_k
    """

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, embed_dim))

    def forward(self, fmap: torch.Tensor, label_vectors: torch.Tensor) -> HeadOutput:
        return HeadOutput(self.mlp(holistic(fmap)) @ label_vectors.T)


class LabelEMHead(nn.Module):
    """Label embedding (Akata et al., TPAMI 2016): a bilinear compatibility of the holistic feature
    and the label vector,

        s_k = f(x)^T W v_k                                          W [C, dim]
    """

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.W = nn.Parameter(variance_scaling_(torch.empty(channels, embed_dim), channels))

    def forward(self, fmap: torch.Tensor, label_vectors: torch.Tensor) -> HeadOutput:
        return HeadOutput((holistic(fmap) @ self.W) @ label_vectors.T)


class CONSEHead(nn.Module):
    """CONSE (Norouzi et al., ICLR 2014): a classifier of the seen labels, and an image embedding
    that mixes the vectors of the T seen labels it finds most probable:

        p_j   = sigmoid(w_j . f(x) + b_j)                           j over the S seen labels
        e(x)  = (1/Z) sum_{t=1..T} p_(t) v_(t),   Z = sum_t p_(t)    (t) the t-th most probable
        s_k   = cos(e(x), v_k)                                      any label, seen or unseen

    CONSE's classifier is single-label (softmax); for multi-label images it is one logistic
    classifier per seen label, trained on the annotated ones (losses.seen_logistic_loss on
    "seen_logits"). Only the classifier learns: the embedding and the cosine have no parameters.
    The seen vectors come from the dataset being scored, like TaggingModel.label_vectors, so they
    are not saved with the model.
    """

    def __init__(self, channels: int, seen_vectors: torch.Tensor, top: int = 10):
        super().__init__()
        self.classifier = nn.Linear(channels, len(seen_vectors))
        self.register_buffer("seen_vectors", seen_vectors, persistent=False)
        self.top = min(top, len(seen_vectors))

    def embed(self, seen_logits: torch.Tensor) -> torch.Tensor:
        """[B, S] classifier logits -> e(x) [B, dim]."""
        p, ranked = seen_logits.sigmoid().topk(self.top, dim=1)  # [B, T]
        mixed = (p[:, :, None] * self.seen_vectors[ranked]).sum(dim=1)  # [B, dim]
        return mixed / p.sum(dim=1, keepdim=True)

    def forward(self, fmap: torch.Tensor, label_vectors: torch.Tensor) -> HeadOutput:
        seen_logits = self.classifier(holistic(fmap))
        scores = F.normalize(self.embed(seen_logits), dim=1) @ label_vectors.T  # v_k are unit rows
        return HeadOutput(scores, seen_logits=seen_logits)


class OneAttentionPerLabelHead(nn.Module):
    """One attention per label (Kim et al., 2018, as LESA's tables use it): every label looks at
    the regions through its own vector,

        a_{k,r} = softmax_r((U x_r) . v_k)                          U [dim, C]
        z_k     = sum_r a_{k,r} x_r                                 attended feature of label k
        s_k     = (W^T z_k) . v_k  =  sum_r a_{k,r} (W^T x_r) . v_k   W [C, dim]

    The last form never builds z_k ([B, K, C], 4 GB for 64 images x 7,586 labels x 512 channels
    at Open Images GZSL), and labels are scored `label_chunk` at a time, so memory stays at
    B x R x label_chunk however many labels are scored. U has no bias: it would add the same
    b . v_k to every region and leave the softmax unchanged.
    """

    label_chunk = 1024

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.U = nn.Linear(channels, embed_dim, bias=False)
        self.W = nn.Parameter(variance_scaling_(torch.empty(channels, embed_dim), channels))

    def forward(self, fmap: torch.Tensor, label_vectors: torch.Tensor) -> HeadOutput:
        x = fmap.flatten(2).transpose(1, 2)  # [B, R, C]
        keys, values = self.U(x), x @ self.W  # [B, R, dim] each
        scores = [self.score_chunk(keys, values, v) for v in label_vectors.split(self.label_chunk)]
        return HeadOutput(torch.cat(scores, dim=1))

    @staticmethod
    def score_chunk(keys: torch.Tensor, values: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a = (keys @ v.T).softmax(dim=1)  # [B, R, k]: over regions
        return (a * (values @ v.T)).sum(dim=1)  # [B, k]

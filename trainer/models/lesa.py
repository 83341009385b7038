"""The LESA head (Huynh & Elhamifar, CVPR 2020) as the official code computes it (docs/protocol.md, The head).

    x_r      = ReLU(BN(conv2x2(X)))_r                      adapter features, r = 1..R regions
    h_r      = tanh(W1 x_r + b1)                          shared by all M attentions
    e_{m,r}  = W2_m h_r + b2_m                            attention logits
    a_{m,r}  = softmax_r(e_{m,r})
    z_m      = sum_r a_{m,r} x_r                          attention features
    s_{m,k}  = (W^T z_m) . v_k                            v_k = unit label vector
    s_k      = max_m s_{m,k}                              label-agnostic attention selection
    g_k      = (W^T mean_r x_r) . v_k                     global score (relevance loss only)

The bias trick of the official code (a constant 1 appended to every feature) is exactly a Linear
layer with bias for W1 and W2, and contributes nothing to s because c_k is padded with a 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.output import HeadOutput


class Adapter(nn.Module):
    """2x2 conv with TF 'SAME' padding (0 before, 1 after), no bias, BN as TF defaults, ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=2, bias=False)
        self.bn = nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)  # TF momentum 0.99
        nn.init.xavier_uniform_(self.conv.weight)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(F.pad(fmap, (0, 1, 0, 1)))))


def variance_scaling_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """TF's variance_scaling_initializer defaults: truncated normal, sigma = sqrt(2 / fan_in)."""
    std = math.sqrt(2.0 / fan_in)
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


class LESAHead(nn.Module):
    def __init__(self, channels: int, embed_dim: int, num_attentions: int = 10, adapter: bool = True):
        super().__init__()
        self.adapter = Adapter(channels) if adapter else nn.Identity()
        self.W1 = nn.Linear(channels, channels)
        self.W2 = nn.Linear(channels, num_attentions)
        self.W = nn.Parameter(torch.empty(channels, embed_dim))
        # fan_in of the stored matrices is channels + 1 (bias row) for W1, W2 and channels for W.
        for layer in (self.W1, self.W2):
            variance_scaling_(layer.weight, channels + 1)
            variance_scaling_(layer.bias, channels + 1)
        variance_scaling_(self.W, channels)

    def forward(self, fmap: torch.Tensor, label_vectors: torch.Tensor) -> HeadOutput:
        """fmap [B, C, H, W], label_vectors [K, dim] (unit rows) -> scores and what the losses need."""
        x = self.adapter(fmap).flatten(2).transpose(1, 2)  # [B, R, C]
        h = torch.tanh(self.W1(x))  # [B, R, C]
        e = self.W2(h).transpose(1, 2)  # [B, M, R]
        a = e.softmax(dim=-1)  # [B, M, R]
        z = a @ x  # [B, M, C]
        attention_scores = (z @ self.W) @ label_vectors.T  # [B, M, K]
        scores = attention_scores.max(dim=1).values  # [B, K]
        global_scores = (x.mean(dim=1) @ self.W) @ label_vectors.T  # [B, K]
        return HeadOutput(scores, attention_scores, attention_logits=e, attention=a, global_scores=global_scores)

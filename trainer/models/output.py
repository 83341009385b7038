"""What a head returns: the scores every model has, and the parts that LESA's (or CONSE's) losses
and the attention overlays read. A field a head does not compute is None."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HeadOutput:
    scores: torch.Tensor  # [B, K] s_k: one score per label scored
    attention_scores: torch.Tensor | None = None  # LESA [B, M, K] s_{m,k}: each attention's scores
    attention_logits: torch.Tensor | None = None  # LESA [B, M, R] e_{m,r}
    attention: torch.Tensor | None = None  # LESA [B, M, R] a_{m,r}: softmax over the regions
    global_scores: torch.Tensor | None = None  # LESA [B, K] g_k: the relevance loss's global scores
    seen_logits: torch.Tensor | None = None  # CONSE [B, seen labels]: its seen-label classifier

    def float(self) -> HeadOutput:
        """Every field in float32, as the losses want it under bf16."""
        return HeadOutput(**{name: None if v is None else v.float() for name, v in vars(self).items()})

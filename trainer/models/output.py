"""What a head returns: the scores every model has, and the parts that LESA's (or CONSE's) losses
and the attention overlays read. A field a head does not compute is None."""

from __future__ import annotations

from typing import NamedTuple

import torch


class HeadOutput(NamedTuple):
    """A NamedTuple, not a dataclass: at ZeRO stage 3 DeepSpeed finds the tensors a module returns,
    to gather its weights again for the backward pass, only in tuples, lists and dicts; through a
    dataclass the backward met the empty partition ("mat2 must be a matrix")."""

    scores: torch.Tensor  # [B, K] s_k: one score per label scored
    attention_scores: torch.Tensor | None = None  # LESA [B, M, K] s_{m,k}: each attention's scores
    attention_logits: torch.Tensor | None = None  # LESA [B, M, R] e_{m,r}
    attention: torch.Tensor | None = None  # LESA [B, M, R] a_{m,r}: softmax over the regions
    global_scores: torch.Tensor | None = None  # LESA [B, K] g_k: the relevance loss's global scores
    seen_logits: torch.Tensor | None = None  # CONSE [B, seen labels]: its seen-label classifier

    def float(self) -> HeadOutput:
        """Every field in float32, as the losses want it under bf16."""
        return HeadOutput(*(None if v is None else v.float() for v in self))

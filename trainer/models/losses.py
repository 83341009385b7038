"""LESA's losses exactly as the official code computes them (docs/protocol.md, Losses).

Labels y are +1 present, -1 verified absent, 0 unknown; unknowns take part in no loss. Each loss
takes the head's outputs and y over the scored labels; `total_loss` weighs them by the config.
`seen_logistic_loss` trains the CONSE baseline (trainer/models/baselines.py); each model's terms and
weights are chosen in trainer/models/registry.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.models.output import HeadOutput


def ranking_loss(out: HeadOutput, y: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_i [sum_{p in P_i, n in N_i} max(0, 1 + s_n - s_p)] / (#violating pairs_i + 1e-8)."""
    annotated = (y != 0).any(dim=0)  # drop labels unknown for the whole batch: value-neutral,
    s, y = out.scores[:, annotated], y[:, annotated]  # and keeps B x K x K small at 7,186 labels
    pos, neg = (y > 0).float(), (y < 0).float()
    hinge = (1 + s[:, None, :] - s[:, :, None]).clamp_min(0)  # [B, p, n]
    pairs = pos[:, :, None] * neg[:, None, :]
    violating = pairs * (hinge > 0).float()
    per_image = (hinge * pairs).sum(dim=(1, 2)) / (violating.sum(dim=(1, 2)) + 1e-8)
    return per_image.mean()


def distribution_loss(out: HeadOutput, y: torch.Tensor) -> torch.Tensor:
    """(1/BM) sum_{i,m} (sum_{k in P_i} softmax_m(s_{i,m,k}))^2: positives spread over attentions."""
    pi = out.attention_scores.softmax(dim=1)  # [B, M, K]
    q = (pi * (y > 0).float()[:, None, :]).sum(dim=2)  # [B, M]
    return (q**2).mean()


def relevance_loss(out: HeadOutput, y: torch.Tensor, delta: float = 0.0) -> torch.Tensor:
    """sum_{i,k annotated} max(0, -y_ik (s_ik - g_ik) + delta): summed, not averaged, as the code."""
    margin = (-y.float() * (out.scores - out.global_scores) + delta).clamp_min(0)
    return (margin * (y != 0).float()).sum()


def diversity_loss(out: HeadOutput, y: torch.Tensor) -> torch.Tensor:
    """|| offdiag(E^ E^T) ||_F over the whole batch, E^ the row-normalised pre-softmax logits."""
    e = out.attention_logits  # [B, M, R]
    e_hat = e / e.norm(dim=2, keepdim=True).clamp_min(1e-12)
    gram = e_hat @ e_hat.transpose(1, 2)  # [B, M, M]
    off_diagonal = gram - torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2))
    # clamp: sqrt's gradient at exactly 0 (M = 1) would be inf * 0 = nan.
    return (off_diagonal**2).sum().clamp_min(1e-12).sqrt()


def seen_logistic_loss(out: HeadOutput, y: torch.Tensor) -> torch.Tensor:
    """CONSE's seen-label classifier: mean over annotated (i, j) of log(1 + exp(-y_ij l_ij)).

    `seen_logits` are the classifier's logits for all seen labels in their dataset order, which
    is the order of y's columns in training."""
    logits = out.seen_logits
    if logits.shape != y.shape:
        raise ValueError(
            f"seen_logistic_loss: logits {tuple(logits.shape)} but labels {tuple(y.shape)}; "
            f"train on the seen labels, in the dataset's order"
        )
    annotated = (y != 0).float()
    per_cell = F.binary_cross_entropy_with_logits(logits, (y > 0).float(), reduction="none")
    return (per_cell * annotated).sum() / annotated.sum().clamp_min(1)


LOSSES = {
    "rank": ranking_loss,
    "dist": distribution_loss,
    "rel": relevance_loss,
    "div": diversity_loss,
    "seen_logistic": seen_logistic_loss,
}


def total_loss(
    out: HeadOutput, y: torch.Tensor, weights: dict[str, float]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the losses with non-zero weight; also each component, detached, for logging.

    The components stay tensors on the loss's device: reading one waits for the GPU, so the train
    loop reads them only when it logs."""
    parts = {name: LOSSES[name](out, y) for name, weight in weights.items() if weight != 0}
    total = sum(weights[name] * value for name, value in parts.items())
    return total, {name: value.detach() for name, value in parts.items()}

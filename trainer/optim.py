"""Optimizers, a registry by `optim.name`. They are plain torch optimizers handed to DeepSpeed.

`rmsprop_tf` is TF1's RMSPropOptimizer, which the official LESA code trains with (lesa_spec §3);
its semantics differ from torch.optim.RMSprop in three ways that matter with epsilon = 1.0:
the mean square starts at 1, epsilon sits inside the square root, and the learning rate is folded
into the momentum buffer.
"""

from __future__ import annotations

import torch


class RMSpropTF(torch.optim.Optimizer):
    """ms <- a ms + (1 - a) g^2;  mom <- mu mom + lr g / sqrt(ms + eps);  theta <- theta - mom."""

    def __init__(self, params, lr=1e-3, alpha=0.9, momentum=0.9, eps=1.0):
        super().__init__(params, dict(lr=lr, alpha=alpha, momentum=momentum, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["square_avg"] = torch.ones_like(p)
                    state["momentum"] = torch.zeros_like(p)
                ms, mom = state["square_avg"], state["momentum"]
                ms.mul_(group["alpha"]).addcmul_(p.grad, p.grad, value=1 - group["alpha"])
                mom.mul_(group["momentum"]).addcdiv_(p.grad, (ms + group["eps"]).sqrt(), value=group["lr"])
                p.sub_(mom)
        return loss


OPTIMIZERS = {
    "rmsprop_tf": lambda params, cfg: RMSpropTF(params, lr=cfg.lr),
    "adamw": lambda params, cfg: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
}


def build_optimizer(params, optim_cfg) -> torch.optim.Optimizer:
    return OPTIMIZERS[optim_cfg.name](params, optim_cfg)

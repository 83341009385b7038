"""Optimizers, a registry by `optim.name`. They are plain torch optimizers handed to DeepSpeed.

`rmsprop_tf` is TF1's RMSPropOptimizer, which the official LESA code trains with (docs/protocol.md, Optimisation);
its semantics differ from torch.optim.RMSprop in three ways that matter with epsilon = 1.0:
the mean square starts at 1, epsilon sits inside the square root, and the learning rate is folded
into the momentum buffer.
"""

from __future__ import annotations

import torch

from trainer.config import OptimConfig


class RMSpropTF(torch.optim.Optimizer):
    """ms <- a ms + (1 - a) g^2;  mom <- mu mom + lr g / sqrt(ms + eps);  theta <- theta - mom.

    The state keeps Adam's names, ms as `exp_avg_sq` and mom as `exp_avg`, and a `step` count the
    update never reads: DeepSpeed's conversion to a universal checkpoint (a resume on another
    number of workers at ZeRO stages 1-3, trainer/zero.py) knows those names only, and fails with
    KeyError 'exp_avg' on any other; its stage-3 load fails with KeyError 'step' without one."""

    def __init__(self, params, lr=1e-3, alpha=0.9, momentum=0.9, eps=1.0):
        super().__init__(params, dict(lr=lr, alpha=alpha, momentum=momentum, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    state["exp_avg_sq"] = torch.ones_like(p)
                    state["exp_avg"] = torch.zeros_like(p)
                # a Python number: no kernel per parameter (a checkpoint before it had none)
                state["step"] = state.get("step", 0) + 1
            if not params:
                continue
            # One multi-tensor kernel per operation over all parameters, not one per parameter:
            # on a GPU the head's step is bound by kernel launches (docs/performance.md).
            grads = [p.grad for p in params]
            ms = [self.state[p]["exp_avg_sq"] for p in params]
            mom = [self.state[p]["exp_avg"] for p in params]
            torch._foreach_mul_(ms, group["alpha"])
            torch._foreach_addcmul_(ms, grads, grads, value=1 - group["alpha"])
            root = torch._foreach_add(ms, group["eps"])
            torch._foreach_sqrt_(root)
            torch._foreach_mul_(mom, group["momentum"])
            torch._foreach_addcdiv_(mom, grads, root, value=group["lr"])
            torch._foreach_sub_(params, mom)
        return loss


OPTIMIZERS = {
    "rmsprop_tf": lambda params, cfg: RMSpropTF(params, lr=cfg.lr),
    "adamw": lambda params, cfg: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
}


def param_groups(model: torch.nn.Module, optim_cfg: OptimConfig) -> list[dict]:
    """The trainable parameters: the head's at optim.lr, first (the lr the schedule and the logs
    read), and a trained backbone's at optim.lr * optim.backbone_lr_scale. Each group keeps its
    `lr_scale`, so the adaptive lr (trainer/schedule.py, set_lr) keeps the ratio."""
    backbone = getattr(model, "backbone", None)
    trained = [p for p in backbone.parameters() if p.requires_grad] if backbone is not None else []
    in_backbone = {id(p) for p in trained}
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in in_backbone]
    scale = optim_cfg.backbone_lr_scale
    groups = [
        {"params": head, "lr_scale": 1.0},
        {"params": trained, "lr": optim_cfg.lr * scale, "lr_scale": scale},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(params, optim_cfg: OptimConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[optim_cfg.name](params, optim_cfg)

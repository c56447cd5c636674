"""Optimizers and learning-rate schedules of the `optim/` config group.

    adam_linear  Adam, lr decayed linearly from `lr` to `min_lr` over `decay_steps`, then held (Chainer recipe:
                 1e-3 -> 7e-5 over 108,000 iterations).
    adam         Adam at a constant rate.
    sgd          SGD (optional momentum) at a constant rate.
Gradient-norm clipping (`optim.grad_clip`, null = none) is applied by the trainer before the step.
"""

from __future__ import annotations

import torch

from mlstm.errors import UserError

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "linear")


def linear_decay(step: int, lr: float, min_lr: float, decay_steps: int) -> float:
    """lr at `step`: straight line from lr (step 0) to min_lr (step decay_steps), constant afterwards."""
    if decay_steps <= 0:
        return lr
    fraction = min(step, decay_steps) / decay_steps
    return lr + (min_lr - lr) * fraction


def check(optim_cfg) -> None:
    name = optim_cfg.get("name")
    if name not in OPTIMIZERS:
        raise UserError(f"optim.name={name!r} is not one of {', '.join(OPTIMIZERS)}")
    schedule = optim_cfg.get("schedule", "constant")
    if schedule not in SCHEDULES:
        raise UserError(f"optim.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    lr = optim_cfg.get("lr")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise UserError(f"optim.lr={lr!r} must be a positive number")
    clip = optim_cfg.get("grad_clip")
    if clip is not None and (not isinstance(clip, (int, float)) or clip <= 0):
        raise UserError(f"optim.grad_clip={clip!r} must be a positive number or null (no clipping)")


def build_optimizer(optim_cfg, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    check(optim_cfg)
    lr = float(optim_cfg.lr)
    weight_decay = float(optim_cfg.get("weight_decay", 0.0) or 0.0)
    if optim_cfg.name == "adam":
        betas = tuple(optim_cfg.get("betas", (0.9, 0.999)))
        optimizer = torch.optim.Adam(params, lr=lr, betas=betas, eps=float(optim_cfg.get("eps", 1e-8)),
                                     weight_decay=weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=lr, momentum=float(optim_cfg.get("momentum", 0.0) or 0.0),
                                    weight_decay=weight_decay)
    if optim_cfg.get("schedule", "constant") == "linear":
        min_lr, decay_steps = float(optim_cfg.min_lr), int(optim_cfg.decay_steps)
        factor = lambda step: linear_decay(step, lr, min_lr, decay_steps) / lr  # noqa: E731
    else:
        factor = lambda step: 1.0  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

"""Optimizers and learning-rate schedules of the `optim/` config group.

    adam_linear  Adam, lr decayed linearly from `lr` to `min_lr` over `decay_steps`, then held (Chainer recipe:
                 1e-3 -> 7e-5 over 108,000 iterations).
    adam         Adam at a constant rate.
    adam_plateau Adam whose rate is halved when validation stops improving (schedule=plateau: PyTorch's
                 ReduceLROnPlateau, built by mlstm.training.plateau and stepped by the trainer at each evaluation).
    sgd          SGD (optional momentum) at a constant rate.
    rmsprop_norm RMSprop (decay 0.9) whose whole update is rescaled to a norm threshold that starts at 10 (mLSTM)
                 or 2 (LSTM), is multiplied by 0.9999 per step and floored at 0.01 (authors' MATLAB recipe).
Gradient-norm clipping (`optim.grad_clip`, null = none) is applied by the trainer before the step.
"""

from __future__ import annotations

import torch

from mlstm.errors import UserError


def linear_decay(step: int, lr: float, min_lr: float, decay_steps: int) -> float:
    """lr at `step`: straight line from lr (step 0) to min_lr (step decay_steps), constant afterwards."""
    if decay_steps <= 0:
        return lr
    fraction = min(step, decay_steps) / decay_steps
    return lr + (min_lr - lr) * fraction


class RMSpropNorm(torch.optim.Optimizer):
    """RMSprop whose whole update vector (all parameters together) has norm `lr * threshold` (MATLAB recipe).

        MS_p  <- alpha MS_p + (1 - alpha) g_p^2                   per parameter element, MS_p starts at 0
        u_p    = g_p / (sqrt(MS_p) + eps)                         the RMSprop-normalised gradient
        theta <- theta - lr * threshold * u / ||u||                ||u|| over every parameter of every group
        threshold <- max(threshold * threshold_decay, min_threshold)

    The rescaling makes the step length exactly lr * threshold whatever the gradient's scale, so MS needs no bias
    correction. `lr` is a multiplier (1.0 in the recipe) so the trainer's schedules still apply. The current threshold
    and the step count live in the param groups, so `state_dict()` / `load_state_dict()` resume exactly.
    """

    def __init__(
        self,
        params,
        lr: float = 1.0,
        threshold: float = 10.0,
        threshold_decay: float = 0.9999,
        min_threshold: float = 0.01,
        alpha: float = 0.9,
        eps: float = 1e-8,
    ):
        for name, value in (("lr", lr), ("threshold", threshold), ("eps", eps)):
            if not value > 0:
                raise UserError(f"optim.{name}={value!r} must be a positive number")
        if not 0 < threshold_decay <= 1:
            raise UserError(f"optim.threshold_decay={threshold_decay!r} must be in (0, 1]")
        if not 0 <= min_threshold <= threshold:
            raise UserError(f"optim.min_threshold={min_threshold!r} must be in [0, optim.threshold={threshold}]")
        if not 0 <= alpha < 1:
            raise UserError(f"optim.alpha={alpha!r} (the RMS decay) must be in [0, 1)")
        defaults = dict(
            lr=lr,
            threshold=float(threshold),
            threshold_decay=threshold_decay,
            min_threshold=min_threshold,
            alpha=alpha,
            eps=eps,
            step=0,
        )
        super().__init__(params, defaults)

    @property
    def threshold(self) -> float:
        """The norm the next update will have (before the lr multiplier)."""
        return self.param_groups[0]["threshold"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pairs = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        # pass 1: update the mean squares, accumulate ||u||^2 (one small temporary per tensor, no host sync)
        sq_norm = None
        for group, p in pairs:
            if "mean_square" not in self.state[p]:
                self.state[p]["mean_square"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            ms = self.state[p]["mean_square"]
            ms.mul_(group["alpha"]).addcmul_(p.grad, p.grad, value=1 - group["alpha"])
            term = (p.grad / (ms.sqrt() + group["eps"])).square().sum(dtype=torch.float32)
            sq_norm = term if sq_norm is None else sq_norm + term.to(sq_norm.device)
        if sq_norm is not None:
            # a zero gradient gives u = 0, so any finite scale leaves the weights unchanged
            inv_norm = sq_norm.sqrt().clamp_min(torch.finfo(torch.float32).tiny).reciprocal()
            # pass 2: theta <- theta - lr * threshold * u / ||u||
            for group, p in pairs:
                ms = self.state[p]["mean_square"]
                scale = (inv_norm * (-group["lr"] * group["threshold"])).to(device=p.device, dtype=p.dtype)
                p.add_((p.grad / (ms.sqrt() + group["eps"])) * scale)
        for group in self.param_groups:
            group["step"] += 1
            group["threshold"] = max(group["threshold"] * group["threshold_decay"], group["min_threshold"])
        return loss


def norm_threshold(step: int, threshold: float, threshold_decay: float = 0.9999, min_threshold: float = 0.01) -> float:
    """The RMSpropNorm threshold after `step` steps, in closed form: max(threshold * decay^step, min_threshold)."""
    return max(threshold * threshold_decay**step, min_threshold)


def check(optim_cfg) -> None:
    """The `optim:` group against its schema (mlstm.config.schema): every key's type and range, and the keys a
    schedule or an optimizer needs, before any step (`optim.lr=inf` or `nan` is refused here, not after a step)."""
    from mlstm.config.schema import check_group

    check_group("optim", optim_cfg)


def build_optimizer(optim_cfg, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    check(optim_cfg)
    lr = float(optim_cfg.lr)
    weight_decay = float(optim_cfg.get("weight_decay", 0.0) or 0.0)
    if optim_cfg.name == "adam":
        betas = tuple(optim_cfg.get("betas", (0.9, 0.999)))
        optimizer = torch.optim.Adam(
            params, lr=lr, betas=betas, eps=float(optim_cfg.get("eps", 1e-8)), weight_decay=weight_decay
        )
    elif optim_cfg.name == "rmsprop_norm":
        if weight_decay:
            raise UserError("optim.weight_decay is not supported by optim=rmsprop_norm; set it to 0")
        optimizer = RMSpropNorm(
            params,
            lr=lr,
            threshold=float(optim_cfg.threshold),
            threshold_decay=float(optim_cfg.get("threshold_decay", 0.9999)),
            min_threshold=float(optim_cfg.get("min_threshold", 0.01)),
            alpha=float(optim_cfg.get("alpha", 0.9)),
            eps=float(optim_cfg.get("eps", 1e-8)),
        )
    else:
        optimizer = torch.optim.SGD(
            params, lr=lr, momentum=float(optim_cfg.get("momentum", 0.0) or 0.0), weight_decay=weight_decay
        )
    if optim_cfg.get("schedule", "constant") == "linear":
        min_lr, decay_steps = float(optim_cfg.min_lr), int(optim_cfg.decay_steps)
        factor = lambda step: linear_decay(step, lr, min_lr, decay_steps) / lr  # noqa: E731
    elif optim_cfg.get("schedule") == "plateau":
        # the per-step schedule must leave the rate alone: ReduceLROnPlateau changes it between steps, and a LambdaLR
        # would set it back to base * factor at the next step; ConstantLR(1, 0) in its chainable form keeps it
        return optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        factor = lambda step: 1.0  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def scale_learning_rate(optimizer: torch.optim.Optimizer, scheduler, ratio: float) -> None:
    """Multiply every learning rate by `ratio` from now on: the current one of each parameter group and the
    schedule's base (its `base_lrs` and the groups' `initial_lr`), so the schedule continues at the lower level."""
    scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]

"""Training to convergence: the rate halved when validation stops improving, and a stop when halving no longer helps.

    optim.schedule=plateau     torch.optim.lr_scheduler.ReduceLROnPlateau on the validation bpc, mode "min":
                               after more than `optim.plateau_patience` evaluations in a row that do not beat the best
                               by `optim.plateau_threshold` bpc (absolute), every rate is multiplied by
                               `optim.plateau_factor`, down to `optim.min_lr`.
    trainer.early_stop_patience  the run stops once a reduction made since the best point is followed by
                               `early_stop_patience` evaluations without such an improvement (`EarlyStopping`). With
                               early_stop_patience = plateau_patience + 1 a run stops when a halving of the rate was
                               followed by as long a plateau as the one that caused it, with no improvement between.
    trainer.max_steps          the cap, a safety net: a run that reaches it has not converged (its metrics carry no
                               `early_stop` event, and the converged study's report says so).

The test split is then read with the weights of best.pt (the lowest validation bpc), not the last ones.
Both objects' state goes into every checkpoint, so a run stopped mid-plateau resumes exactly.
"""

from __future__ import annotations

import math

import torch

from mlstm.errors import UserError


def build_plateau(optim_cfg, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.ReduceLROnPlateau | None:
    """PyTorch's own ReduceLROnPlateau for `optim.schedule=plateau`; None for every other schedule."""
    if optim_cfg.get("schedule", "constant") != "plateau":
        return None
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=float(optim_cfg.get("plateau_factor", 0.5)),
        patience=int(optim_cfg.get("plateau_patience", 1)),
        threshold=float(optim_cfg.get("plateau_threshold", 0.002)),
        threshold_mode="abs",
        cooldown=0,
        min_lr=float(optim_cfg.get("min_lr", 0.0) or 0.0),
    )


class EarlyStopping:
    """The stop of a run trained to convergence. It counts the evaluations without an improvement of more than
    `threshold` bpc over the best so far, since the later of the best point and the last reduction of the rate.
    The run stops once that count reaches `patience` after a reduction made since the best point (a halving was
    tried, and a whole window followed it without improvement), or, when the rate cannot be reduced (no plateau
    schedule, or already at its floor), as soon as the count reaches `patience` (classic early stopping)."""

    def __init__(self, patience: int, threshold: float = 0.0):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise UserError(f"trainer.early_stop_patience={patience!r} must be an integer >= 1 or null")
        self.patience = patience
        self.threshold = float(threshold)
        self.best = math.inf
        self.bad = 0  # evaluations without improvement since the later of the best point and the last reduction
        self.reduced_since_best = False
        self.stopped = False

    def update(self, valid: float, reduced: bool, can_reduce: bool = True) -> bool:
        """Record one validation bpc, whether the rate was just reduced at it, and whether it could have been;
        True when the run stops here."""
        improved = valid < self.best - self.threshold  # "better" as in ReduceLROnPlateau(threshold_mode="abs")
        if improved:
            self.best, self.bad, self.reduced_since_best = valid, 0, False
        else:
            self.bad += 1
        self.stopped = not improved and self.bad >= self.patience and (self.reduced_since_best or not can_reduce)
        if reduced and not self.stopped:  # the lower rate gets a window of its own
            self.bad, self.reduced_since_best = 0, True
        return self.stopped

    def state_dict(self) -> dict:
        return {
            "best": self.best,
            "bad": self.bad,
            "reduced_since_best": self.reduced_since_best,
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad = float(state["best"]), int(state["bad"])
        self.reduced_since_best, self.stopped = bool(state["reduced_since_best"]), bool(state["stopped"])


def build_early_stopping(trainer_cfg, optim_cfg) -> EarlyStopping | None:
    patience = trainer_cfg.get("early_stop_patience")
    if patience is None:
        return None
    return EarlyStopping(patience, threshold=float(optim_cfg.get("plateau_threshold", 0.0) or 0.0))


def can_reduce(plateau, optimizer: torch.optim.Optimizer) -> bool:
    """Whether the plateau schedule could still lower the rate (it exists, and the rate is above its floor)."""
    return plateau is not None and any(
        group["lr"] - floor > plateau.eps for group, floor in zip(optimizer.param_groups, plateau.min_lrs)
    )


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])

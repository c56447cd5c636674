"""The divergence guard: a non-finite loss or gradient skips the step; `trainer.max_nonfinite_in_row` of them in a
row end the run as `trainer.on_divergence` says: stop (an error), reload (back to the last good checkpoint at a lower
rate) or end (the run's result is "diverged", which a tuning sweep scores as the worst)."""

from __future__ import annotations

import math
import sys

from mlstm.errors import UserError
from mlstm.training import checkpoint
from mlstm.training.optim import scale_learning_rate
from mlstm.training.resume import finite_weights, restore


def limit_reached(trainer) -> bool:
    return trainer.nonfinite_in_row >= int(trainer.tcfg.get("max_nonfinite_in_row", 10))


def on_nonfinite(trainer, loss: float, grad_norm: float) -> None:
    """Divergence guard: the step was skipped; the carried state may be poisoned, so restart it at zero.

    After `max_nonfinite_in_row` such steps, `on_divergence=stop` ends the run with a UserError; `reload` makes
    `fit` go back to the last good checkpoint with a lower learning rate (`_reload_after_divergence`)."""
    trainer.nonfinite_total += 1
    trainer.nonfinite_in_row += 1
    trainer.state = trainer.model.init_state(trainer.local_batch, trainer.ctx.device)
    if trainer.ctx.is_main and trainer.nonfinite_in_row == 1:  # once per streak; every skip is counted in the metrics
        print(
            f"warning: step {trainer.step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); step "
            f"skipped and hidden state reset ({trainer.nonfinite_total} skipped so far)",
            file=sys.stderr,
        )
    if limit_reached(trainer) and trainer.tcfg.get("on_divergence", "stop") == "stop":
        raise UserError(
            f"training diverged: {trainer.nonfinite_in_row} non-finite losses or gradients in a row "
            f"at step {trainer.step}; lower optim.lr or set optim.grad_clip (or "
            f"trainer.on_divergence=reload to retry from the last checkpoint with a lower lr, "
            f"or =end to record the divergence as the run's result)"
        )


def reload_after_divergence(trainer) -> None:
    """on_divergence=reload: back to the newest checkpoint with finite weights, every learning rate (and the
    schedule's base) times `divergence_lr_factor`. The metrics logged after that checkpoint belong to the
    abandoned trajectory: they move to metrics.rewound.jsonl, so metrics.jsonl stays one record per step."""
    in_row, total, max_reloads = (
        trainer.nonfinite_in_row,
        trainer.nonfinite_total,
        int(trainer.tcfg.get("max_divergence_reloads", 3)),
    )
    what = f"training diverged: {in_row} non-finite losses or gradients in a row at step {trainer.step}"
    if trainer.divergence_reloads >= max_reloads:
        raise UserError(
            f"{what}, after {trainer.divergence_reloads} reload(s) with a lower learning rate "
            f"(trainer.max_divergence_reloads={max_reloads}); lower optim.lr or set optim.grad_clip"
        )
    payload = checkpoint.load_latest(trainer.run_dir, accept=finite_weights, set_aside=trainer.ctx.is_main)
    if payload is None:
        raise UserError(
            f"{what} and {trainer.run_dir} holds no checkpoint with finite weights to reload; lower "
            f"optim.lr or set optim.grad_clip"
        )
    scale = trainer.lr_scale * float(trainer.tcfg.get("divergence_lr_factor", 0.5))
    reloads = trainer.divergence_reloads + 1
    restore(trainer, payload)
    # (the checkpoint's may be lowered)
    scale_learning_rate(trainer.optimizer, trainer.scheduler, scale / trainer.lr_scale)
    trainer.lr_scale, trainer.divergence_reloads = scale, reloads
    trainer.nonfinite_total, trainer.nonfinite_in_row = total, 0  # the skipped steps stay counted
    trainer.sinks.rewind(trainer.step)
    trainer.save()  # a crash from here on resumes the reloaded state at its lower rate, not the diverging one
    trainer.sinks.log(
        {
            "step": trainer.step,
            "chars": trainer.chars,
            "time": round(trainer.train_seconds, 3),
            "event": "divergence_reload",
            "train/lr": trainer.scheduler.get_last_lr()[0],
            "train/lr_scale": scale,
            "train/divergence_reloads": reloads,
            "train/nonfinite_steps": total,
        }
    )
    if trainer.ctx.is_main:
        print(
            f"warning: {what}; reloaded the checkpoint of step {trainer.step} with the learning rate times "
            f"{scale:g} (reload {reloads} of at most {max_reloads})",
            file=sys.stderr,
        )


def end_diverged(trainer) -> dict:
    """on_divergence=end: the run ends here as a diverged run (`event: diverged`; no test pass). A tuning sweep
    then scores it as the worst (mlstm.studies.tuning) instead of stopping, and a rerun finds it finished."""
    if trainer.ctx.is_main:
        print(
            f"warning: training diverged: {trainer.nonfinite_in_row} non-finite losses or gradients in a row at "
            f"step {trainer.step}; the run ends here as diverged (trainer.on_divergence=end)",
            file=sys.stderr,
        )
    trainer.sinks.log(
        {
            "step": trainer.step,
            "chars": trainer.chars,
            "time": round(trainer.train_seconds, 3),
            "event": "diverged",
            "train/nonfinite_steps": trainer.nonfinite_total,
        }
    )
    result = {
        "step": trainer.step,
        "chars": trainer.chars,
        "train_seconds": trainer.train_seconds,
        "num_parameters": trainer.num_params,
        "valid/bpc": math.nan,
        "best_valid/bpc": trainer.best_valid,
        "diverged": True,
        "run_dir": str(trainer.run_dir),
    }
    trainer.sinks.summary({k: v for k, v in result.items() if k != "run_dir"})
    trainer.sinks.close()
    return result

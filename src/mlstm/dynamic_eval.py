"""Dynamic evaluation (Krause et al. 2016 MATLAB; the RMS-normalised rule of Krause et al. 2018).

The model keeps learning while it is evaluated: the text is read in segments of `seq_len` characters; each segment is
first scored (its loss counts towards the bpc), then one gradient step on that same segment adapts the weights to
the text just seen, before the next segment is scored. The rule, per parameter element:

    g      = d loss(segment) / d theta                      mean cross-entropy of the segment, nats per character
    MS    <- rms_decay MS + (1 - rms_decay) g^2              MS starts at 0; used bias-corrected, MS / (1 - rms_decay^k)
    theta <- theta - lr g / (sqrt(MS) + eps) + decay_to_init (theta_0 - theta)      theta_0: the trained weights

Defaults are the MATLAB recipe (PAPER.md §3): segments of 50, RMS decay 0.99, lr 2e-4, decay toward the trained
weights 0.01, one stream (batch_size=1: every character is predicted by a model adapted to ALL the text before it).
batch_size > 1 reads B contiguous streams at once and takes one step on their mean loss (faster, not the protocol).

The static bpc is measured on exactly the same characters (same streams and segments) with `evaluate_bpc`, so the two
numbers differ only by the adaptation. The model's weights are restored to theta_0 at the end.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from mlstm.data import StreamBatcher
from mlstm.errors import UserError
from mlstm.evaluate import LN2, autocast, cross_entropy_nats, evaluate_bpc
from mlstm.model import detach_state


def check_hyperparameters(
    *, seq_len: int, batch_size: int, lr: float, rms_decay: float, decay_to_init: float, eps: float
) -> None:
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"{name}={value!r} must be a positive integer")
    if not isinstance(lr, (int, float)) or lr < 0:
        raise UserError(f"lr={lr!r} must be a number >= 0 (0 = static evaluation)")
    if not isinstance(rms_decay, (int, float)) or not 0 <= rms_decay < 1:
        raise UserError(f"rms_decay={rms_decay!r} must be in [0, 1)")
    if not isinstance(decay_to_init, (int, float)) or not 0 <= decay_to_init <= 1:
        raise UserError(f"decay_to_init={decay_to_init!r} must be in [0, 1]")
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise UserError(f"eps={eps!r} must be a positive number")


class _EvalModeWithGradients:
    """Eval mode (no dropout) for the whole model, except torch RNN modules: cuDNN has no backward in eval mode.

    The only RNN modules are the single-layer nn.LSTM inside cell.impl=cudnn layers, whose own dropout is 0, so
    training mode changes nothing in what they compute; the variational dropout lives in the layer around them and
    stays off.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        for module in self.model.modules():
            if isinstance(module, nn.RNNBase):
                module.train()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def dynamic_evaluate(
    model: nn.Module,
    tokens: np.ndarray,
    *,
    seq_len: int = 50,
    lr: float = 2e-4,
    rms_decay: float = 0.99,
    decay_to_init: float = 0.01,
    eps: float = 1e-8,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    max_chars: int | None = None,
    precision: str = "fp32",
    static: bool = True,
    progress: bool = False,
    split_name: str = "test",
) -> dict:
    """Static and dynamic bits per character of `tokens` (uint8 ids in the model's vocabulary).

    Returns {"static_bpc", "dynamic_bpc", "chars", "segments"}; static_bpc is NaN when static=False. The model is
    left with its original weights and training/eval mode.
    """
    check_hyperparameters(
        seq_len=seq_len, batch_size=batch_size, lr=lr, rms_decay=rms_decay, decay_to_init=decay_to_init, eps=eps
    )
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if max_chars:
        tokens = tokens[: int(max_chars)]
    batches = StreamBatcher(tokens, batch_size, seq_len, device=device, split_name=split_name)
    static_bpc = math.nan
    if static:
        static_bpc = evaluate_bpc(
            model,
            tokens,
            batch_size=batch_size,
            seq_len=seq_len,
            device=device,
            precision=precision,
            split_name=split_name,
        )

    params = [p for p in model.parameters() if p.requires_grad]
    trained = [p.detach().clone() for p in params]  # theta_0
    mean_square = [torch.zeros_like(p) for p in params]
    state = model.init_state(batch_size, device)
    total_nats, total_chars = 0.0, 0
    bar = tqdm(batches, total=len(batches), disable=not progress, desc="dynamic eval", dynamic_ncols=True)
    try:
        with _EvalModeWithGradients(model), torch.enable_grad():
            for k, batch in enumerate(bar, start=1):
                with autocast(device, precision):
                    logits, state = model(batch.x, state)  # (T, B, V)
                loss = cross_entropy_nats(logits, batch.y)  # mean over the T*B characters of the segment
                total_nats += loss.item() * batch.y.numel()  # scored BEFORE the weights see this segment
                total_chars += batch.y.numel()
                state = detach_state(state)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                _rms_step(
                    params,
                    grads,
                    mean_square,
                    trained,
                    step=k,
                    lr=lr,
                    rms_decay=rms_decay,
                    decay_to_init=decay_to_init,
                    eps=eps,
                )
                if progress and k % 100 == 0:
                    bar.set_postfix(bpc=f"{total_nats / total_chars / LN2:.4f}")
    finally:
        bar.close()
        with torch.no_grad():  # leave the caller's model as it was given
            for p, p0 in zip(params, trained):
                p.copy_(p0)
    return {
        "static_bpc": static_bpc,
        "dynamic_bpc": total_nats / total_chars / LN2,
        "chars": total_chars,
        "segments": len(batches),
    }


@torch.no_grad()
def _rms_step(
    params, grads, mean_square, trained, *, step: int, lr: float, rms_decay: float, decay_to_init: float, eps: float
) -> None:
    """theta <- theta - lr g / (sqrt(MS / (1 - rms_decay^step)) + eps) + decay_to_init (theta_0 - theta)."""
    correction = 1.0 - rms_decay**step
    for p, g, ms, p0 in zip(params, grads, mean_square, trained):
        pull = (p0 - p).mul_(decay_to_init)  # from theta before this step, as in the rule above
        if g is not None:
            g = g.to(ms.dtype)
            ms.mul_(rms_decay).addcmul_(g, g, value=1.0 - rms_decay)
            p.sub_(lr * g / ((ms / correction).sqrt_() + eps))
        p.add_(pull)

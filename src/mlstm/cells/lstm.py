"""LSTM baselines: `LSTMCudnn` wraps torch.nn.LSTM (cuDNN on GPU, oneDNN on CPU); `LSTMLoop` runs the same equations
through the same Python loop as the reference mLSTM (`common.RecurrentLayer`), so that a speed or convergence
difference can be split into implementation effects (loop vs. fused kernel) and architecture effects (LSTM vs. mLSTM).

    z_t = W_x x_t + W_h h_{t-1} + b                   rows [i; f; g; o], as nn.LSTM
    c_t = σ(z_f [+ forget_bias]) ⊙ c_{t-1} + σ(z_i) ⊙ act(z_g)
    h_t = σ(z_o) ⊙ act(c_t)                           then h = W_P h and ±proj_clip when num_proj
Loop only: Gers' peepholes (i, f see c_{t-1}; o sees c_t after cell_clip), cell_clip, proj_clip, weight_norm (on
W_x, W_h), a forget_bias constant, another activation, variational dropout inside the recurrence. The cudnn impl cannot
honour those and raises UserError naming cell.impl=loop — except dropout, which it applies as one mask per forward call
on its OUTPUT y only (the recurrence and the returned state are not masked). Under bf16 autocast nn.LSTM itself may
compute in bf16 (oneDNN/cuDNN); its output and returned state are cast back to float32.

Tensors of `to_paper_weights` / `load_paper_weights` (same names for both impls, so weights move between them):
    name   shape     loop parameter    cudnn parameter (nn.LSTM, one layer)
    W_x    (4H, I)   W_x.weight        lstm.weight_ih_l0
    W_h    (4H, P)   W_h.weight        lstm.weight_hh_l0
    b      (4H,)     b                 lstm.bias_ih_l0 + lstm.bias_hh_l0 (load sets bias_ih = b, bias_hh = 0)
    W_P    (P, H)    W_P.weight        lstm.weight_hr_l0          (num_proj only)
    w_I, w_F, w_O (H,)  peepholes, loop only
Init: the forget rows of the bias get cell.forget_bias_init (3.0 by default); for nn.LSTM that is bias_ih's f block,
with bias_hh's f block 0.
"""

from __future__ import annotations

import torch
from torch import nn

from mlstm.cells.common import CellConfig, RecurrentLayer, check_paper_weights
from mlstm.cells.weights import get_tensor, set_tensor
from mlstm.errors import UserError


class LSTMLoop(RecurrentLayer):
    """Standard LSTM through the reference Python loop (hoisted input projection, per-step autograd)."""

    PAPER_LAYOUT = {n: ((n,), 0) for n in ("W_x", "W_h", "b")}
    NORMED = ("W_x", "W_h")

    def __init__(self, input_size: int, cfg: CellConfig):
        super().__init__(input_size, cfg)
        H, P = cfg.hidden_size, cfg.output_size
        self._linear("W_x", input_size, 4 * H, x_side=True)  # (4H, I), rows [i; f; g; o]
        self._linear("W_h", P, 4 * H)  # (4H, P)
        self._vector("b", 4 * H)  # (4H,)
        self.weight_groups += [("W_x",), ("W_h",)]
        self._finish()

    def forget_slots(self):
        H = self.hidden_size
        return [("b", slice(H, 2 * H), self.cfg.forget_bias_init)]

    def _project_inputs(self, x, w):
        return self._hoisted(x, w["W_x"], w["b"])  # (T, B, 4H): W_x x + b

    def _step(self, xp, h, c, w):
        zi, zf, zg, zo = (xp + self._lin(h, w["W_h"])).chunk(4, dim=1)  # z_t = W_x x_t + W_h h_{t-1} + b
        c = self._gated_cell(zi, zf, self.act(zg), c, w)  # c_t = f ⊙ c_{t-1} + i ⊙ act(g)
        h = self._output_gate(zo, c, w) * self.act(c)  # h_t = o ⊙ act(c_t)
        return self._project(h, w), c


class LSTMCudnn(RecurrentLayer):
    """One nn.LSTM layer (the model stacks layers itself), behind the common layer interface."""

    UNSUPPORTED = ("use_peepholes", "cell_clip", "proj_clip", "weight_norm", "forget_bias")

    def __init__(self, input_size: int, cfg: CellConfig):
        super().__init__(input_size, cfg)
        for key in self.UNSUPPORTED:
            if getattr(cfg, key):
                raise UserError(f"cell.{key} is not supported by cell.impl=cudnn (torch.nn.LSTM); use cell.impl=loop")
        if cfg.activation != "tanh":
            raise UserError("cell.activation must be tanh for cell.impl=cudnn (torch.nn.LSTM); use cell.impl=loop")
        if cfg.num_proj is not None and cfg.num_proj >= cfg.hidden_size:
            raise UserError(f"cell.num_proj must be < cell.hidden_size for cell.impl=cudnn, got {cfg.num_proj}")
        self.lstm = nn.LSTM(input_size, cfg.hidden_size, proj_size=cfg.num_proj or 0)
        self.weight_groups = [("lstm.weight_ih_l0",), ("lstm.weight_hh_l0",)]
        self.weight_groups += [("lstm.weight_hr_l0",)] if cfg.num_proj else []
        self.input_weights = {"lstm.weight_ih_l0"}
        self.bias_names = ["lstm.bias_ih_l0", "lstm.bias_hh_l0"]
        self.reset_parameters()

    def forget_slots(self):
        f = slice(self.hidden_size, 2 * self.hidden_size)  # nn.LSTM rows [i; f; g; o]
        return [("lstm.bias_ih_l0", f, self.cfg.forget_bias_init), ("lstm.bias_hh_l0", f, 0.0)]

    def forward(self, x: torch.Tensor, state=None):
        T, B, _ = x.shape  # (T, B, I)
        if state is None:
            state = self.init_state(B, x.device)
        sd = self.state_dtype
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lstm.weight_ih_l0.dtype)
        h0, c0 = (s.to(sd).unsqueeze(0) for s in state)  # (1, B, P), (1, B, H)
        y, (h, c) = self.lstm(x, (h0, c0))  # (T, B, P)
        y, h, c = y.to(sd), h[0].to(sd), c[0].to(sd)
        mask = self.dropout_mask(B, x.device, sd)
        if mask is not None:
            y = y * mask  # variational dropout on the output only: nn.LSTM's recurrence cannot be masked
        return y, (h, c)

    def to_paper_weights(self) -> dict[str, torch.Tensor]:
        p = self.lstm
        out = {"W_x": p.weight_ih_l0, "W_h": p.weight_hh_l0, "b": p.bias_ih_l0 + p.bias_hh_l0}
        if self.cfg.num_proj:
            out["W_P"] = p.weight_hr_l0
        return {k: v.detach().clone() for k, v in out.items()}

    def load_paper_weights(self, weights: dict) -> None:
        t = check_paper_weights({k: tuple(v.shape) for k, v in self.to_paper_weights().items()}, weights)
        names = {"W_x": "weight_ih_l0", "W_h": "weight_hh_l0", "b": "bias_ih_l0", "W_P": "weight_hr_l0"}
        for src, name in names.items():
            if src in t:
                set_tensor(self, f"lstm.{name}", t[src])
        set_tensor(self, "lstm.bias_hh_l0", torch.zeros_like(get_tensor(self, "lstm.bias_hh_l0")))

"""Multiplicative LSTM (Krause, Lu, Murray, Renals 2016), the reference (autograd, Python time loop) implementation.

Three forms, selected by `cell.form` (equations: ../shared/PAPER.md §1; x_t input, h_{t-1} previous output):

paper  — the transcribed paper = the authors' Chainer code, OpenAI, NVIDIA            `MultiplicativeLSTM`
    m_t = (W_mx x_t) ⊙ (W_mh h_{t-1})                 no biases on the factors
    z_t = W_x x_t + W_m m_t + b                        rows [ĥ; i; f; o]
    c_t = σ(z_f) ⊙ c_{t-1} + σ(z_i) ⊙ act(z_ĥ);      h_t = σ(z_o) ⊙ act(c_t)
matlab — the authors' MATLAB code (the 1900-unit, 1.42 bpc Hutter Prize model)      `MatlabMultiplicativeLSTM`
    m_t as paper;  z_t = W_x x_t + W_m m_t  (no bias); i, f, o = σ(z_i + b_i), σ(z_f + b_f), σ(z_o + b_o)
    c_t = f ⊙ c_{t-1} + i ⊙ z_ĥ  (linear candidate); h_t = act(o ⊙ c_t + b_h)
seed   — the third-party TensorFlow 0.12 cell in ../shared/seed                        `SeedMultiplicativeLSTM`
    [a_t; b_t] = A [x_t; h_{t-1}] + a;  m_t = a_t ⊙ b_t;  [i; j; f; o] = W [x_t; m_t] + w
    c_t = c_{t-1} ⊙ σ(f + forget_bias) + σ(i) ⊙ j;   h_t = act(c_t ⊙ o)          (no sigmoid on o)
    peepholes: c_t = c_{t-1} ⊙ σ(f + forget_bias + w_F⊙c_{t-1}) + σ(i + w_I⊙c_{t-1}) ⊙ j
               h_t = σ(o + w_O⊙c_t) ⊙ act(c_t ⊙ (o + w_O⊙c_t))                     (c_t after cell_clip)
    cell.seed_output=gated (an ablation, not the posted cell): h_t = σ(o [+ w_O⊙c_t]) ⊙ act(c_t), the paper's output
In every form: `forget_bias` (a constant; default 1.0 for seed, 0.0 otherwise) is added to the forget pre-activation
each step; paper/matlab peepholes are Gers' (i, f see c_{t-1}; o sees c_t after the clip); cell_clip, then
h = W_P h and ±proj_clip when num_proj (see `common`). act = cell.activation (tanh by default).

Tensors of `to_paper_weights` / `load_paper_weights`, (out, in) convention (y = W x); I input, H hidden,
P = num_proj or H; parameter = the state_dict key (`X.weight`: the weight of a bias-free nn.Linear named X):
    form    name   shape        rows / columns                  parameter
    paper   W_mx   (H, I)                                       W_mx.weight
            W_mh   (H, P)                                       W_mh.weight
            W_x    (4H, I)      rows [ĥ; i; f; o]               W_x.weight
            W_m    (4H, H)      rows [ĥ; i; f; o]               W_m.weight
            b      (4H,)        rows [ĥ; i; f; o]               b
    matlab  W_mx, W_mh, W_x, W_m as paper
            b      (3H,)        gate biases, rows [i; f; o]     b      (no ĥ bias exists: not stored, not named)
            b_h    (H,)         output bias inside act          b_h
    seed    A      (2H, I + P)  rows [a; b], columns [x; h]     A_x.weight (2H, I) | A_h.weight (2H, P)
            a      (2H,)        rows [a; b]                     a
            W      (4H, I + H)  rows [i; j; f; o], cols [x; m]  W_x.weight (4H, I) | W_m.weight (4H, H)
            w      (4H,)        rows [i; j; f; o]               w
    all     w_I, w_F, w_O (H,)  peepholes (use_peepholes)       w_I, w_F, w_O
            W_P    (P, H)       projection (num_proj)           W_P.weight     (TF stores its transpose, (H, P))
The seed's TF matrices are the transposes: A_TF = A.T (I + P, 2H), W_TF = W.T (I + H, 4H). The x-parts are separate
parameters so that all input projections of a segment are one matrix product before the time loop. With weight_norm
the four main matrices (paper/matlab: W_mx, W_mh, W_x, W_m; seed: A_x, A_h, W_x, W_m) are parametrised
w = g v/|v| per output row: keys `<name>.parametrizations.weight.original0` (g, (out, 1)) and `...original1` (v);
`to_paper_weights` returns the effective w. Parameter count, paper form, H=1900, I=205: 20,005,100 (PAPER.md); the
matlab form has the same count (its 3H gate biases + H output biases replace the paper's 4H).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mlstm.cells.common import CellConfig, RecurrentLayer


class MultiplicativeLSTM(RecurrentLayer):
    """The paper form; the matlab form changes only the biases and the output (`MatlabMultiplicativeLSTM`)."""

    PAPER_LAYOUT = {n: ((n,), 0) for n in ("W_mx", "W_mh", "W_x", "W_m", "b")}
    NORMED = ("W_mx", "W_mh", "W_x", "W_m")

    def __init__(self, input_size: int, cfg: CellConfig):
        super().__init__(input_size, cfg)
        I, H, P = input_size, cfg.hidden_size, cfg.output_size
        self._linear("W_mx", I, H, x_side=True)  # (H, I)
        self._linear("W_mh", P, H)  # (H, P)
        self._linear("W_x", I, 4 * H, x_side=True)  # (4H, I), rows [ĥ; i; f; o]
        self._linear("W_m", H, 4 * H)  # (4H, H)
        self.weight_groups += [("W_mx",), ("W_mh",), ("W_x",), ("W_m",)]
        self._biases()
        self._finish()

    def _biases(self) -> None:
        self._vector("b", 4 * self.hidden_size)  # (4H,), rows [ĥ; i; f; o]

    def forget_slots(self):
        H = self.hidden_size
        return [("b", slice(2 * H, 3 * H), self.cfg.forget_bias_init)]

    def _input_bias(self, w) -> torch.Tensor:
        return F.pad(w["b"], (self.hidden_size, 0))  # (5H,): [0 (the factor W_mx x has no bias); b]

    def _input_projection(self, w):
        """(W, b) of the hoisted input projection xp = W x + b (also what impl=fast projects inside its segment)."""
        return torch.cat([w["W_mx"], w["W_x"]]), self._input_bias(w)  # (5H, I), (5H,)

    def _project_inputs(self, x, w):
        return self._hoisted(x, *self._input_projection(w))  # (T, B, 5H): [W_mx x; W_x x + b]

    def _preactivations(self, xp, h, w):
        H = self.hidden_size
        m = xp[:, :H] * self._lin(h, w["W_mh"])  # m_t = (W_mx x_t) ⊙ (W_mh h_{t-1})   (B, H)
        z = xp[:, H:] + self._lin(m, w["W_m"])  # z_t = W_x x_t + W_m m_t (+ b)        (B, 4H)
        return z.chunk(4, dim=1)  # z_ĥ, z_i, z_f, z_o, each (B, H)

    def _step(self, xp, h, c, w):
        zh, zi, zf, zo = self._preactivations(xp, h, w)
        c = self._gated_cell(zi, zf, self.act(zh), c, w)  # c_t = f ⊙ c_{t-1} + i ⊙ act(z_ĥ)
        h = self._output_gate(zo, c, w) * self.act(c)  # h_t = o ⊙ act(c_t)
        return self._project(h, w), c


class MatlabMultiplicativeLSTM(MultiplicativeLSTM):
    """The authors' MATLAB form: linear candidate, gate biases outside z, output gate inside the output tanh."""

    PAPER_LAYOUT = {n: ((n,), 0) for n in ("W_mx", "W_mh", "W_x", "W_m", "b", "b_h")}

    def _biases(self) -> None:
        self._vector("b", 3 * self.hidden_size)  # (3H,): gate biases b_i, b_f, b_o (the candidate has none)
        self._vector("b_h", self.hidden_size)  # (H,): output bias inside act

    def forget_slots(self):
        H = self.hidden_size
        return [("b", slice(H, 2 * H), self.cfg.forget_bias_init)]

    def _input_bias(self, w) -> torch.Tensor:
        return F.pad(w["b"], (2 * self.hidden_size, 0))  # (5H,): [0; 0 (ĥ); b_i; b_f; b_o], σ(z + b) per gate

    def _step(self, xp, h, c, w):
        zh, zi, zf, zo = self._preactivations(xp, h, w)
        c = self._gated_cell(zi, zf, zh, c, w)  # c_t = f ⊙ c_{t-1} + i ⊙ z_ĥ   (linear candidate)
        h = self.act(self._output_gate(zo, c, w) * c + w["b_h"])  # h_t = act(o ⊙ c_t + b_h)
        return self._project(h, w), c


class SeedMultiplicativeLSTM(RecurrentLayer):
    """The TensorFlow cell of the seed: factors are affine maps of [x; h], no sigmoid on the output gate."""

    PAPER_LAYOUT = {"A": (("A_x", "A_h"), 1), "a": (("a",), 0), "W": (("W_x", "W_m"), 1), "w": (("w",), 0)}
    NORMED = ("A_x", "A_h", "W_x", "W_m")

    def __init__(self, input_size: int, cfg: CellConfig):
        super().__init__(input_size, cfg)
        I, H, P = input_size, cfg.hidden_size, cfg.output_size
        self._linear("A_x", I, 2 * H, x_side=True)  # (2H, I): x-columns of A, rows [a; b]
        self._linear("A_h", P, 2 * H)  # (2H, P): h-columns of A
        self._vector("a", 2 * H)  # (2H,)
        self._linear("W_x", I, 4 * H, x_side=True)  # (4H, I): x-columns of W, rows [i; j; f; o]
        self._linear("W_m", H, 4 * H)  # (4H, H): m-columns of W
        self._vector("w", 4 * H)  # (4H,)
        self.weight_groups += [("A_x", "A_h"), ("W_x", "W_m")]  # TF initialises A and W as one matrix each
        self._finish()

    def forget_slots(self):
        H = self.hidden_size
        return [("w", slice(2 * H, 3 * H), self.cfg.forget_bias_init)]

    def _input_projection(self, w):
        return torch.cat([w["A_x"], w["W_x"]]), torch.cat([w["a"], w["w"]])  # (6H, I), (6H,)

    def _project_inputs(self, x, w):
        return self._hoisted(x, *self._input_projection(w))  # (T, B, 6H): [A_x x + a; W_x x + w]

    def _step(self, xp, h, c, w):
        H, cfg = self.hidden_size, self.cfg
        ab = xp[:, : 2 * H] + self._lin(h, w["A_h"])  # [a_t; b_t] = A [x_t; h_{t-1}] + a    (B, 2H)
        m = ab[:, :H] * ab[:, H:]  # m_t = a_t ⊙ b_t                                         (B, H)
        z = xp[:, 2 * H :] + self._lin(m, w["W_m"])  # [i; j; f; o] = W [x_t; m_t] + w      (B, 4H)
        i, j, f, o = z.chunk(4, dim=1)
        if cfg.use_peepholes:  # c_t = c ⊙ σ(f + fb + w_F⊙c) + σ(i + w_I⊙c) ⊙ j, c = c_{t-1}
            c = c * torch.sigmoid(f + cfg.forget_bias + w["w_F"] * c) + torch.sigmoid(i + w["w_I"] * c) * j
        else:  # c_t = c_{t-1} ⊙ σ(f + forget_bias) + σ(i) ⊙ j
            c = c * torch.sigmoid(f + cfg.forget_bias) + torch.sigmoid(i) * j
        c = self._clip_cell(c)  # TF clips before the output; the clipped c is carried
        if cfg.seed_output == "gated":  # not the posted cell: the LSTM's output gate, h_t = σ(o [+ w_O⊙c_t]) ⊙ act(c_t)
            h = self._output_gate(o, c, w) * self.act(c)
        elif cfg.use_peepholes:  # h_t = σ(o + w_O⊙c_t) ⊙ act(c_t ⊙ (o + w_O⊙c_t))
            o = o + w["w_O"] * c
            h = torch.sigmoid(o) * self.act(c * o)
        else:  # h_t = act(c_t ⊙ o): no sigmoid on o, as posted
            h = self.act(c * o)
        return self._project(h, w), c


MLSTM_FORMS = {"paper": MultiplicativeLSTM, "matlab": MatlabMultiplicativeLSTM, "seed": SeedMultiplicativeLSTM}

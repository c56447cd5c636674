"""Independent float64 NumPy references of the recurrent layers, written straight from ../shared/PAPER.md §1.

They share no code with mlstm.cells: weights come as the PAPER.md-named dict that `to_paper_weights` returns (numpy
arrays, (out, in) convention: y = W x, so a batch of row vectors x maps to x @ W.T). Peepholes are on when `w_F` is in
the dict, the projection when `W_P` is. Each function runs x (T, B, I) from (h0, c0) one step at a time and returns
(ys (T, B, P), cs (T, B, H), (h_T, c_T)); cs lets a test check that a clip value actually clipped.
"""

import numpy as np


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


ACT = {"tanh": np.tanh, "relu": lambda v: np.maximum(v, 0.0), "identity": lambda v: v}


def clip(v, bound):
    return v if bound is None else np.clip(v, -bound, bound)


def blocks(z, n):
    return np.split(z, n, axis=1)


def project(W, h, proj_clip):
    return clip(h @ W["W_P"].T, proj_clip) if "W_P" in W else h


def mlstm_paper(W, x, h, c, forget_bias=0.0, cell_clip=None, proj_clip=None, activation="tanh"):
    """m = (W_mx x) ⊙ (W_mh h); z = W_x x + W_m m + b, rows [ĥ; i; f; o]; c = f c + i act(ĥ); h = σ(o) act(c)."""
    act, peep = ACT[activation], "w_F" in W
    ys, cs = [], []
    for x_t in x:
        m = (x_t @ W["W_mx"].T) * (h @ W["W_mh"].T)
        zh, zi, zf, zo = blocks(x_t @ W["W_x"].T + m @ W["W_m"].T + W["b"], 4)
        if peep:
            zi, zf = zi + W["w_I"] * c, zf + W["w_F"] * c
        c = clip(sigmoid(zf + forget_bias) * c + sigmoid(zi) * act(zh), cell_clip)
        if peep:
            zo = zo + W["w_O"] * c
        h = project(W, sigmoid(zo) * act(c), proj_clip)
        ys.append(h)
        cs.append(c)
    return np.stack(ys), np.stack(cs), (h, c)


def mlstm_matlab(W, x, h, c, forget_bias=0.0, cell_clip=None, proj_clip=None, activation="tanh"):
    """m as paper; z = W_x x + W_m m; i, f, o = σ(z + b_{i,f,o}); c = f c + i z_ĥ; h = act(o c + b_h)."""
    act, peep = ACT[activation], "w_F" in W
    b_i, b_f, b_o = np.split(W["b"], 3)  # gate biases stored as rows [i; f; o]
    ys, cs = [], []
    for x_t in x:
        m = (x_t @ W["W_mx"].T) * (h @ W["W_mh"].T)
        zh, zi, zf, zo = blocks(x_t @ W["W_x"].T + m @ W["W_m"].T, 4)
        zi, zf, zo = zi + b_i, zf + b_f, zo + b_o
        if peep:
            zi, zf = zi + W["w_I"] * c, zf + W["w_F"] * c
        c = clip(sigmoid(zf + forget_bias) * c + sigmoid(zi) * zh, cell_clip)
        if peep:
            zo = zo + W["w_O"] * c
        h = project(W, act(sigmoid(zo) * c + W["b_h"]), proj_clip)
        ys.append(h)
        cs.append(c)
    return np.stack(ys), np.stack(cs), (h, c)


def mlstm_seed(W, x, h, c, forget_bias=1.0, cell_clip=None, proj_clip=None, activation="tanh", output="posted"):
    """[a; b] = A [x; h] + a; m = a b; [i; j; f; o] = W [x; m] + w; c = c σ(f + fb) + σ(i) j; h = act(c o).
    output="gated" (cell.seed_output, not the posted cell): h = σ(o [+ w_O c]) act(c)."""
    act, peep = ACT[activation], "w_F" in W
    ys, cs = [], []
    for x_t in x:
        a_t, b_t = blocks(np.concatenate([x_t, h], axis=1) @ W["A"].T + W["a"], 2)
        m = a_t * b_t
        i, j, f, o = blocks(np.concatenate([x_t, m], axis=1) @ W["W"].T + W["w"], 4)
        if peep:
            c = c * sigmoid(f + forget_bias + W["w_F"] * c) + sigmoid(i + W["w_I"] * c) * j
        else:
            c = c * sigmoid(f + forget_bias) + sigmoid(i) * j
        c = clip(c, cell_clip)
        if output == "gated":
            h = sigmoid(o + W["w_O"] * c if peep else o) * act(c)
        elif peep:
            h = sigmoid(o + W["w_O"] * c) * act(c * (o + W["w_O"] * c))
        else:
            h = act(c * o)
        h = project(W, h, proj_clip)
        ys.append(h)
        cs.append(c)
    return np.stack(ys), np.stack(cs), (h, c)


def lstm(W, x, h, c, forget_bias=0.0, cell_clip=None, proj_clip=None, activation="tanh"):
    """z = W_x x + W_h h + b, rows [i; f; g; o] (nn.LSTM); c = f c + i act(g); h = σ(o) act(c)."""
    act, peep = ACT[activation], "w_F" in W
    ys, cs = [], []
    for x_t in x:
        zi, zf, zg, zo = blocks(x_t @ W["W_x"].T + h @ W["W_h"].T + W["b"], 4)
        if peep:
            zi, zf = zi + W["w_I"] * c, zf + W["w_F"] * c
        c = clip(sigmoid(zf + forget_bias) * c + sigmoid(zi) * act(zg), cell_clip)
        if peep:
            zo = zo + W["w_O"] * c
        h = project(W, sigmoid(zo) * act(c), proj_clip)
        ys.append(h)
        cs.append(c)
    return np.stack(ys), np.stack(cs), (h, c)


REFERENCES = {
    "paper": mlstm_paper,
    "matlab": mlstm_matlab,
    "seed": mlstm_seed,
    "loop": lstm,
    "cudnn": lstm,
    "seed_gated": lambda *args, **kwargs: mlstm_seed(*args, output="gated", **kwargs),
}

"""Weight initialisation of the recurrent layers (`cell.init`, `cell.init_scale`, `cell.forget_bias_init`).

orthogonal (default) — the seed's `orthogonal_initializer`: a Gaussian matrix of the weight's shape, its thin SVD
    U S V^T, and whichever of U, V^T has that shape, times init_scale: a semi-orthogonal matrix (orthonormal columns
    when out >= in, orthonormal rows otherwise). Each weight matrix is one such matrix as a whole (W_m (4H, H) has
    orthonormal columns, not orthogonal gate blocks); the seed form's A = [A_x | A_h] and W = [W_x | W_m] are each
    initialised as ONE matrix, as TensorFlow's `_linear` does. Biases and peepholes start at zero.
matlab — the authors' MATLAB code: N(0, 0.1) for the weights that multiply x (W_mx, W_x, A_x, LSTM W_x), N(0, 0.02) for
    the recurrent ones (W_mh, W_m, A_h, W_h, W_P), times init_scale; biases and peepholes zero.
torch — PyTorch's default for recurrent layers (nn.LSTM): every weight, bias and peephole U(-1/√H, 1/√H) (weights
    times init_scale).
Then, in every scheme, the forget-gate bias rows are set to forget_bias_init (the layer's `forget_slots()`).
Weight-normalised weights are set through their parametrisation, so g = |row| and v = the drawn row.
"""

from __future__ import annotations

import math

import torch

from mlstm.cells.weights import get_tensor, set_tensor


def orthogonal(rows: int, cols: int, scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (rows, cols) semi-orthogonal matrix: the seed's SVD-of-a-Gaussian recipe, times scale (float32, CPU)."""
    a = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(a, full_matrices=False)  # u (rows, k), vh (k, cols), k = min(rows, cols)
    q = u if u.shape == (rows, cols) else vh
    return (scale * q).float()


@torch.no_grad()
def initialize(layer) -> None:
    """Initialise `layer` (a `common.RecurrentLayer`) according to its cfg; see the module docstring."""
    cfg = layer.cfg
    bound = 1.0 / math.sqrt(cfg.hidden_size)
    for group in layer.weight_groups:
        shapes = [get_tensor(layer, n).shape for n in group]
        rows, cols = shapes[0][0], sum(s[1] for s in shapes)
        if cfg.init == "orthogonal":
            full = orthogonal(rows, cols, cfg.init_scale)
        elif cfg.init == "matlab":
            std = [0.1 if n in layer.input_weights else 0.02 for n in group]
            full = torch.cat([torch.randn(s) * sd * cfg.init_scale for s, sd in zip(shapes, std)], dim=1)
        else:
            full = torch.empty(rows, cols).uniform_(-bound, bound) * cfg.init_scale
        for name, part in zip(group, full.split([s[1] for s in shapes], dim=1)):
            set_tensor(layer, name, part)
    for name in layer.bias_names:  # biases and peepholes
        shape = get_tensor(layer, name).shape
        value = torch.empty(shape).uniform_(-bound, bound) if cfg.init == "torch" else torch.zeros(shape)
        set_tensor(layer, name, value)
    for name, rows, value in layer.forget_slots():
        get_tensor(layer, name)[rows] = value

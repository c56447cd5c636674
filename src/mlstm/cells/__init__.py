"""Recurrent layers and the one factory that builds them from the `cell:` config group.

Every layer has the same interface (the model and the trainer code against exactly this):

    input_size, hidden_size, output_size          # output_size = num_proj if projected else hidden_size
    init_state(batch_size, device=None) -> (h, c)  # zeros: h (B, output_size), c (B, hidden_size), float32
    forward(x, state) -> (y, (h, c))               # x (T, B, input_size) time-major; y (T, B, output_size) = h_t
    to_paper_weights() -> dict; load_paper_weights(dict)   # tensors named as in PAPER.md (see mlstm.py / lstm.py)

The layer does not detach its state (the trainer does). State and pointwise math stay float32 under bf16 autocast.

`cell:` keys (null = the form's default)        name=mlstm                         name=lstm
    name            "mlstm" | "lstm"              mlstm
    form            "paper" | "matlab" | "seed"   paper                              must be null
    impl            implementation                reference | fast                   cudnn | loop
    hidden_size     int > 0                       required
    use_peepholes   bool                          false
    cell_clip       null | float > 0              null
    num_proj        null | int > 0                null
    proj_clip       null | float > 0              null (needs num_proj)
    forget_bias     constant added to the forget pre-activation each step: seed 1.0, else 0.0
    forget_bias_init  initial forget-gate bias: seed 0.0 (TF bias_start=0), else 3.0
    init            "orthogonal" | "matlab" | "torch"                orthogonal
    init_scale      float > 0                     1.0
    activation      "tanh" | "relu" | "identity"  tanh
    weight_norm     bool                          false
    dropout         variational dropout on h, [0, 1)                 0.0
    seed_output     form=seed only: "posted" (h = act(c ⊙ o)) | "gated" (h = σ(o) ⊙ act(c))   posted
Unknown keys or invalid values raise mlstm.errors.UserError with one line naming the key and the allowed values.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mlstm.cells.common import CellConfig, RecurrentLayer
from mlstm.cells.lstm import LSTMCudnn, LSTMLoop
from mlstm.cells.mlstm import MLSTM_FORMS, MatlabMultiplicativeLSTM, MultiplicativeLSTM, SeedMultiplicativeLSTM
from mlstm.errors import UserError

__all__ = [
    "CellConfig",
    "LSTMCudnn",
    "LSTMLoop",
    "MatlabMultiplicativeLSTM",
    "MultiplicativeLSTM",
    "RecurrentLayer",
    "SeedMultiplicativeLSTM",
    "build_layer",
]


def build_layer(cell_cfg: Any, input_size: int) -> nn.Module:
    """One recurrent layer from the `cell:` config (DictConfig or dict) for inputs of size `input_size`."""
    cfg = CellConfig.resolve(cell_cfg)
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
        raise UserError(f"the input size of a recurrent layer must be an integer > 0, got {input_size!r}")
    if cfg.name == "lstm":
        return (LSTMCudnn if cfg.impl == "cudnn" else LSTMLoop)(input_size, cfg)
    if cfg.impl == "fast":
        from mlstm.cells.fast_mlstm import FAST_MLSTM_FORMS  # subclasses of the reference forms below

        return FAST_MLSTM_FORMS[cfg.form](input_size, cfg)
    return MLSTM_FORMS[cfg.form](input_size, cfg)

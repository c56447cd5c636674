"""Parameter access that sees through weight normalisation: the effective tensor of a named weight, read and set.

Used by the initialisers (`mlstm.cells.init`) and the paper-weight import/export of the layers."""

from __future__ import annotations

from functools import reduce

import torch
from torch import nn
from torch.nn.utils import parametrize


def get_tensor(layer: nn.Module, name: str) -> torch.Tensor:
    """The effective tensor of `name`: `module.weight` for a Linear-style weight (g v/|v| under weight_norm)."""
    obj = reduce(getattr, name.split("."), layer)
    return obj.weight if isinstance(obj, nn.Module) else obj


@torch.no_grad()
def set_tensor(layer: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set the effective tensor of `name`; under weight_norm this sets g = |row| and v = row (torch's right_inverse)."""
    obj = reduce(getattr, name.split("."), layer)
    if isinstance(obj, nn.Module) and parametrize.is_parametrized(obj, "weight"):
        ref = obj.parametrizations.weight.original1
        obj.weight = value.detach().to(device=ref.device, dtype=ref.dtype).clone()
    else:
        target = obj.weight if isinstance(obj, nn.Module) else obj
        target.copy_(value.detach())

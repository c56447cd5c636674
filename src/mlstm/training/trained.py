"""A trained model back from a checkpoint file, for the commands that use one (sampling, dynamic evaluation).

The checkpoint is read with `mlstm.training.checkpoint.load_file` (weights_only: opening it never runs code) and the
model is rebuilt from the resolved config the checkpoint carries, so any checkpoint of this project loads without its
run directory. The file is only read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from mlstm.errors import UserError
from mlstm.model import CharLM, build_model
from mlstm.training.checkpoint import load_file


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[CharLM, dict]:
    """(the CharLM in eval mode on `device`, the checkpoint payload); UserError (one line) for an unusable file."""
    payload = load_file(Path(path))
    if "vocab_size" not in payload or "symbols" not in payload:
        raise UserError(f"checkpoint {path} holds no vocabulary (vocab_size / symbols)")
    try:
        model = build_model(OmegaConf.create(payload["config"]), int(payload["vocab_size"]))
        model.load_state_dict(payload["model"])
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - a config that does not build, or weights that do not fit it
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UserError(
            f"checkpoint {path} does not rebuild into its own model ({type(error).__name__}: {detail})"
        ) from None
    return model.to(device).eval(), payload

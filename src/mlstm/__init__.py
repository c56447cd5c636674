"""Multiplicative LSTM (Krause et al., 2016) against LSTM on character-level language modelling.

The public API (loaded on first use, so `import mlstm.data` stays light):

    load_config(overrides)        compose the Hydra config, as the command line does   (mlstm.config)
    train(cfg, run_dir=None)      train one model; returns its final metrics           (mlstm.training.trainer)
    build_model(cfg, vocab_size)  the character model a config describes               (mlstm.model)
    load_model(path)              a trained model and its vocabulary from a checkpoint (mlstm.training.trained)
    sample(model, symbols, ...)   generate text                                        (mlstm.sampling)

Everything else is internal and may move; the packages follow the road of one batch (README, "Map").
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_config": "mlstm.config",
    "train": "mlstm.training.trainer",
    "build_model": "mlstm.model",
    "load_model": "mlstm.training.trained",
    "sample": "mlstm.sampling",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mlstm' has no attribute {name!r}")

"""Checks of the `trainer:` config group and of a whole run config, before any data is read: bad input fails in a
second with one line."""

from __future__ import annotations

from mlstm.cells import CellConfig
from mlstm.errors import UserError
from mlstm.model import ModelConfig
from mlstm.training.optim import check as check_optim

PRECISIONS = ("fp32", "bf16", "fp16")
DIVERGENCE_POLICIES = ("stop", "reload", "end")


def check_trainer(tcfg) -> None:
    for key in ("batch_size", "seq_len", "max_steps"):
        value = tcfg.get(key)
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"trainer.{key}={value!r} must be a positive integer")
    if tcfg.get("precision", "fp32") not in PRECISIONS:
        raise UserError(f"trainer.precision={tcfg.precision!r} is not one of {', '.join(PRECISIONS)}")
    for key in ("eval_every", "log_every", "checkpoint_every"):
        value = tcfg.get(key)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise UserError(f"trainer.{key}={value!r} must be a positive integer or null")
    for key, default in (("max_nonfinite_in_row", 10), ("max_divergence_reloads", 3)):
        value = tcfg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "max_nonfinite_in_row" else 0):
            raise UserError(f"trainer.{key}={value!r} must be an integer >= {1 if key == 'max_nonfinite_in_row' else 0}")
    policy = tcfg.get("on_divergence", "stop")
    if policy not in DIVERGENCE_POLICIES:
        raise UserError(f"trainer.on_divergence={policy!r} is not one of {', '.join(DIVERGENCE_POLICIES)}")
    factor = tcfg.get("divergence_lr_factor", 0.5)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
        raise UserError(f"trainer.divergence_lr_factor={factor!r} must be a number in (0, 1): the learning rate is "
                        f"multiplied by it at each reload")


def check_config(cfg) -> None:
    """Every check that needs no data, before any data is read or downloaded: bad input fails in a second."""
    check_trainer(cfg.trainer)
    check_optim(cfg.optim)
    CellConfig.resolve(cfg.cell)
    ModelConfig.from_cfg(cfg.model, vocab_size=2)
    logger_cfg = cfg.get("logger")
    if logger_cfg is not None and logger_cfg.get("name", "none") == "wandb" \
            and logger_cfg.get("mode", "offline") not in ("offline", "online", "disabled"):
        raise UserError(f"logger.mode={logger_cfg.mode!r} is not one of offline, online, disabled")


def check_eval_sizes(tcfg, corpus) -> None:
    """Validation and test must fit one evaluation batch: find out now, not after hours of training."""
    B, T = int(tcfg.get("eval_batch_size") or tcfg.batch_size), int(tcfg.seq_len)
    splits = [("valid", "eval_chars")] + ([("test", "test_chars")] if tcfg.get("test_at_end", True) else [])
    for split, limit_key in splits:
        available = len(corpus.split(split))
        limit = tcfg.get(limit_key)
        n = min(available, int(limit)) if limit else available
        if n < B * (T + 1):
            where = f"trainer.{limit_key}={limit} of the {available}" if limit and limit < available else \
                f"the {available}"
            raise UserError(f"the {split} evaluation reads {where} characters of split {split!r}, fewer than "
                            f"eval_batch_size*(seq_len+1)={B * (T + 1)}; use a smaller trainer.eval_batch_size "
                            f"/ trainer.seq_len, a larger trainer.{limit_key} or a bigger corpus")
        streams = tcfg.get("cold_start_streams")
        if split == "test" and streams and n < int(streams) * (T + 1):
            raise UserError(f"the cold-start check cuts the {n} test characters into trainer.cold_start_streams="
                            f"{streams} streams, fewer than cold_start_streams*(seq_len+1)="
                            f"{int(streams) * (T + 1)}; use fewer streams (null: no check) or more test characters")

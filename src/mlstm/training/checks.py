"""Checks of a whole run config before any data is read (bad input fails in a second, with one line), and of the
evaluation sizes against the data once it is loaded. The rules themselves live in one place, the config schema
(mlstm.config.schema): every key's type and allowed values, and the rules between keys."""

from __future__ import annotations

from mlstm.config.schema import check_group, validate
from mlstm.errors import UserError


def check_trainer(tcfg) -> None:
    """The `trainer:` group against its schema."""
    check_group("trainer", tcfg)


def check_config(cfg) -> None:
    """Every check that needs no data, before any data is read or downloaded: every key of every group."""
    validate(cfg)


def check_eval_sizes(tcfg, corpus) -> None:
    """Validation and test must fit one evaluation batch: find out now, not after hours of training."""
    B, T = int(tcfg.get("eval_batch_size") or tcfg.batch_size), int(tcfg.seq_len)
    splits = [("valid", "eval_chars")] + ([("test", "test_chars")] if tcfg.get("test_at_end", True) else [])
    for split, limit_key in splits:
        available = len(corpus.split(split))
        limit = tcfg.get(limit_key)
        n = min(available, int(limit)) if limit else available
        if n < B * (T + 1):
            where = (
                f"trainer.{limit_key}={limit} of the {available}" if limit and limit < available else f"the {available}"
            )
            raise UserError(
                f"the {split} evaluation reads {where} characters of split {split!r}, fewer than "
                f"eval_batch_size*(seq_len+1)={B * (T + 1)}; use a smaller trainer.eval_batch_size "
                f"/ trainer.seq_len, a larger trainer.{limit_key} or a bigger corpus"
            )
        streams = tcfg.get("cold_start_streams")
        if split == "test" and streams and n < int(streams) * (T + 1):
            raise UserError(
                f"the cold-start check cuts the {n} test characters into trainer.cold_start_streams="
                f"{streams} streams, fewer than cold_start_streams*(seq_len+1)="
                f"{int(streams) * (T + 1)}; use fewer streams (null: no check) or more test characters"
            )

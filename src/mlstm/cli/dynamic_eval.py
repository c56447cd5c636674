"""`make dynamic-eval ARGS="checkpoint=... [dataset=...]"`: static and dynamic-evaluation bpc of a checkpoint.

The last line printed is `static bpc: X  dynamic bpc: Y`. The result also goes to a JSON file beside the checkpoint
(`output=` to choose another) and, with `logger=wandb`, to a W&B run under <checkpoint dir>/dynamic_eval/. The
checkpoint file itself is only read. Config: configs/dynamic_eval.yaml; the method: mlstm.dynamic_eval.
"""

import json
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mlstm.cli import CONFIG_DIR, NO_OUTPUT_DIR, exit_on_user_error, hydra_entry
from mlstm.data import load_corpus
from mlstm.dynamic_eval import check_hyperparameters, dynamic_evaluate
from mlstm.errors import UserError
from mlstm.sampling import symbol_table
from mlstm.training.distributed import resolve_device
from mlstm.training.tracking import WandbSink
from mlstm.training.trained import load_model

HYPERPARAMETERS = (
    "split",
    "max_chars",
    "seq_len",
    "batch_size",
    "lr",
    "rms_decay",
    "decay_to_init",
    "eps",
    "precision",
)


def tokens_in_model_vocabulary(corpus, split: str, model_symbols: bytes, max_chars) -> np.ndarray:
    """The split's token ids renumbered into the checkpoint's vocabulary (the corpus may have another one)."""
    tokens = corpus.split(split)
    if max_chars:
        tokens = tokens[: int(max_chars)]
    if corpus.symbols == model_symbols:
        return tokens
    lookup = np.full(256, -1, dtype=np.int16)
    lookup[np.frombuffer(model_symbols, dtype=np.uint8)] = np.arange(len(model_symbols))
    remap = lookup[np.frombuffer(corpus.symbols, dtype=np.uint8)]  # corpus id -> model id (-1: unknown)
    present = np.unique(tokens)
    missing = present[remap[present] < 0]
    if missing.size:
        shown = ", ".join(repr(corpus.symbols[i : i + 1]) for i in missing[:8])
        raise UserError(
            f"the {split} split of {corpus.name} holds {missing.size} byte value(s) the checkpoint's "
            f"vocabulary lacks ({shown}); evaluate on data from the corpus it was trained on"
        )
    return remap[tokens].astype(np.uint8)


def default_output(cfg: DictConfig) -> Path:
    checkpoint = Path(cfg.checkpoint)
    return checkpoint.with_name(f"dynamic_eval-{checkpoint.stem}-{cfg.split}.json")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="dynamic_eval")
@exit_on_user_error
def task(cfg: DictConfig) -> dict:
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    check_hyperparameters(
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        rms_decay=cfg.rms_decay,
        decay_to_init=cfg.decay_to_init,
        eps=cfg.eps,
    )  # before any loading: fail fast
    if cfg.split not in ("test", "valid"):
        raise UserError(f"split={cfg.split!r} must be test or valid")
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"precision={cfg.precision!r} is not one of fp32, bf16, fp16")
    device = resolve_device(cfg.device)
    model, payload = load_model(cfg.checkpoint, device)
    trained_cfg = OmegaConf.create(payload["config"])
    dataset_cfg = cfg.get("dataset") or trained_cfg.dataset  # default: the data the checkpoint was trained on
    corpus = load_corpus(dataset_cfg, cfg.data_dir or trained_cfg.get("data_dir") or "data_cache")
    symbols = symbol_table(payload["symbols"])
    tokens = tokens_in_model_vocabulary(corpus, cfg.split, symbols, cfg.max_chars)
    print(
        f"checkpoint {cfg.checkpoint} (step {payload['step']}); {corpus.name}/{cfg.split}: {len(tokens):,} chars, "
        f"{cfg.batch_size} stream(s), segments of {cfg.seq_len}; lr {cfg.lr}, rms_decay {cfg.rms_decay}, "
        f"decay_to_init {cfg.decay_to_init}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    result = dynamic_evaluate(
        model,
        tokens,
        seq_len=cfg.seq_len,
        lr=cfg.lr,
        rms_decay=cfg.rms_decay,
        decay_to_init=cfg.decay_to_init,
        eps=cfg.eps,
        batch_size=cfg.batch_size,
        device=device,
        precision=cfg.precision,
        progress=bool(cfg.progress),
        split_name=cfg.split,
    )
    record = {
        "checkpoint": str(cfg.checkpoint),
        "checkpoint_step": int(payload["step"]),
        "dataset": corpus.name,
        **{key: cfg[key] for key in HYPERPARAMETERS},
        **result,
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_outputs(cfg, record, trained_cfg)
    print(f"static bpc: {result['static_bpc']:.4f}  dynamic bpc: {result['dynamic_bpc']:.4f}")
    return record


def write_outputs(cfg: DictConfig, record: dict, trained_cfg: DictConfig) -> None:
    output = Path(cfg.output) if cfg.get("output") else default_output(cfg)
    try:
        output.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {output}", file=sys.stderr)
    except OSError as error:
        print(f"warning: could not write {output} ({error.strerror}); set output=<writable path>", file=sys.stderr)
    if cfg.logger.get("name", "none") == "wandb":
        # its own directory: the training run's wandb_run_id.txt beside the checkpoint stays untouched
        run_dir = Path(cfg.checkpoint).parent / "dynamic_eval"
        run_dir.mkdir(exist_ok=True)
        config = {
            "dynamic_eval": OmegaConf.to_container(cfg, resolve=True),
            "train": OmegaConf.to_container(trained_cfg),
        }
        sink = WandbSink(cfg.logger, run_dir, config, resume=False)
        sink.log(
            {
                "step": record["checkpoint_step"],
                "dynamic_eval/static_bpc": record["static_bpc"],
                "dynamic_eval/dynamic_bpc": record["dynamic_bpc"],
            }
        )
        sink.summary(record)
        sink.close()


main = hydra_entry(task, NO_OUTPUT_DIR)

if __name__ == "__main__":
    main()

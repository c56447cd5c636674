"""`train(cfg) -> result`: one straight road from bytes to bits per character.

    Corpus ─► StreamBatcher (B streams × segments of T) ─► CharLM (state carried, detached) ─► loss (nats)
           ─► optimizer step ─► metrics.jsonl + W&B ─► periodic validation, checkpoints ─► final test bpc

A plain function: tests call it directly, `mlstm.cli.train` wraps it with `@hydra.main`. Under torchrun every rank runs
it; the B streams are split across ranks so the global batch equals the single-process one, and rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from mlstm import checkpoint, distributed
from mlstm.cells import CellConfig, cpu_kernel
from mlstm.data import StreamBatcher, load_corpus
from mlstm.data.corpus import SPLITS
from mlstm.errors import UserError
from mlstm.evaluate import LN2, autocast, bits_per_position, cross_entropy_nats, evaluate_bpc, evaluate_nats
from mlstm.model import ModelConfig, build_model, detach_state, num_parameters
from mlstm.optim import build_optimizer
from mlstm.optim import check as check_optim
from mlstm.optim import scale_learning_rate
from mlstm.resume import (check_compatible, finished_result, finite_weights, rank_seed, rng_state, seed_everything,
                          set_rng_state)
from mlstm.run_lock import RunLock
from mlstm.tracking import METRICS_FILE, JsonlSink, Sinks, WandbSink, read_metrics
from mlstm.tuning import run_score

PRECISIONS = ("fp32", "bf16", "fp16")
DIVERGENCE_POLICIES = ("stop", "reload", "end")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # SLURM: --signal=USR1@120 before the time limit
STOPPED_STATUS = 3  # exit status of a run stopped by a signal with last.pt saved (2 is bad input)


class TrainingStopped(Exception):
    """A signal stopped the run after a completed step, with last.pt saved: the same command resumes it."""

    def __init__(self, message: str, signum: int | None, orphaned: bool = False):
        super().__init__(message)
        self.signum = signum
        self.orphaned = orphaned  # the stop came from the parent's death (ParentWatch)


class GracefulStop:
    """SIGTERM, SIGINT and SIGUSR1 while `fit` runs. The first only raises a flag: the loop finishes the current
    optimizer step, saves last.pt and raises TrainingStopped. A second exits at once with status 128 + the signal's
    number (how a shell reports a death by that signal), saving nothing more. The handlers found on entry are put
    back on exit; a Python one among them (e.g. submitit's, which requeues a SLURM job) is called after the save.

    Signals within `SAME_REQUEST_S` of the first count as the same request: Ctrl-C reaches torchrun and its workers
    alike, and torchrun passes it on, so each worker gets it twice within milliseconds.

    A run in a worker process whose parent has died is stopped the same way (see `ParentWatch`)."""

    SAME_REQUEST_S = 1.0

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.signum: int | None = None
        self.since = 0.0
        self.previous: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signal.signal works in the main thread only
            self.previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
            ParentWatch.start(self)
        return self

    def __exit__(self, *exc) -> None:
        with ParentWatch.lock:  # the watch then sees "between runs" and no longer asks this run to stop
            ParentWatch.stopping = None
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            if time.monotonic() - self.since < self.SAME_REQUEST_S:
                return
            os.write(2, f"{name} again: exiting at once (status {128 + signum}) without saving\n".encode())
            os._exit(128 + signum)
        self.ask(signum)
        if self.announce:  # os.write: a handler may interrupt a print, and print is not reentrant
            os.write(2, f"received {name}: saving last.pt after the current step (a second signal exits at "
                        f"once)\n".encode())

    def ask(self, signum: int) -> None:
        """Raise the flag the loop checks after each step, as the first `signum` does."""
        self.signum, self.since = signum, time.monotonic()

    def chain(self) -> None:
        """Call the handler this one replaced, if it was a Python function (not the default, nor Python's own
        KeyboardInterrupt for SIGINT): it may requeue the job, and may exit."""
        previous = self.previous.get(self.signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)


class ParentWatch:
    """A worker process of a Python parent (the joblib launcher's loky workers, any multiprocessing child) has nobody
    to report to once that parent dies, yet a signal to the parent alone (`kill PID`, an OOM kill) does not reach it:
    it would train on, and a worker between jobs waits for the dead parent forever (both seen). One thread per such
    process checks every `POLL_S` whether the parent is still the one it started under. Once it is not, at every
    check: during a run, it asks the run to stop as SIGTERM does (last.pt saved after the step, the lock released;
    the command line then exits at once, see mlstm.cli.train); between runs, when nothing is held, it exits the
    process. It keeps checking after asking: a run asked during its last step (or its final evaluation) finishes
    instead, and its worker must exit after it. The flag is raised under `lock`, not by a signal, so that a run
    ending at that moment cannot meet a SIGTERM with the default handler back. A run started from a shell (`nohup`,
    `setsid`, make) is no such child and is not watched: it keeps training, as asked."""

    POLL_S = 1.0
    stopping: "GracefulStop | None" = None  # the run's graceful stop while a run is in `fit`
    lock = threading.Lock()  # held to change or act on `stopping`
    orphaned = threading.Event()
    _thread: threading.Thread | None = None

    @classmethod
    def start(cls, stop: "GracefulStop") -> None:
        with cls.lock:
            cls.stopping = stop
        if cls._thread is None and multiprocessing.parent_process() is not None:
            cls._thread = threading.Thread(target=cls._watch, args=(os.getppid(),), name="mlstm-parent-watch",
                                           daemon=True)
            cls._thread.start()

    @classmethod
    def _watch(cls, parent: int) -> None:
        while os.getppid() == parent:
            time.sleep(cls.POLL_S)
        cls.orphaned.set()
        while True:
            with cls.lock:
                if cls.stopping is None:  # between runs: nothing to save
                    os.write(2, f"the parent process {parent} is gone: exiting\n".encode())
                    os._exit(STOPPED_STATUS)
                if not cls.stopping.requested:
                    os.write(2, f"the parent process {parent} is gone: stopping as on SIGTERM\n".encode())
                    cls.stopping.ask(signal.SIGTERM)
            time.sleep(cls.POLL_S)


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


def prepare_run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(f"output directory {run_dir} is not writable ({error.strerror}); "
                        f"set hydra.run.dir to a writable path") from None
    return run_dir


class Trainer:
    """Holds the pieces of one run; `fit()` is the loop. Split out of `train` so every piece stays small."""

    stop: GracefulStop | None = None  # the signals `fit` listens to while it runs
    stop_agreed = False  # some rank was asked to stop by the latest step's all-reduce: every rank stops after it

    def __init__(self, cfg, run_dir: Path):
        self.cfg = cfg
        self.tcfg = cfg.trainer
        check_config(cfg)
        if self.tcfg.get("threads"):
            torch.set_num_threads(int(self.tcfg.threads))
        self.ctx = distributed.setup(self.tcfg.get("device", "auto"))
        run_dir = self._agree_on_run_dir(Path(run_dir))
        self.run_dir = prepare_run_dir(run_dir) if self.ctx.is_main else Path(run_dir)
        self.precision = self.tcfg.get("precision", "fp32")
        self._set_precision_flags()
        seed_everything(int(cfg.seed))

        self.corpus = self._load_corpus()
        self.model = build_model(cfg, self.corpus.vocab_size).to(self.ctx.device)
        self.num_params = num_parameters(self.model)
        self.ddp_model = self._wrap_ddp(self.model)  # DDP broadcasts rank 0's initial parameters
        if self.ctx.distributed:  # one RNG stream per rank: the dropout masks of different streams stay independent
            torch.manual_seed(rank_seed(int(cfg.seed), self.ctx.rank))
        self.optimizer, self.scheduler = build_optimizer(cfg.optim, self.model.parameters())
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self.precision == "fp16")

        B, T = int(self.tcfg.batch_size), int(self.tcfg.seq_len)
        self.batches = StreamBatcher(self.corpus.train, B, T, rank=self.ctx.rank,
                                     world_size=self.ctx.world_size, device=self.ctx.device,
                                     split_name="train")
        self.local_batch = B // self.ctx.world_size
        self.state = self.model.init_state(self.local_batch, self.ctx.device)
        self._check_eval_sizes()

        # counters that a checkpoint must restore for an exact resume
        self.step = 0
        self.chars = 0
        self.train_seconds = 0.0
        self.best_valid = math.inf
        self.window = {"nats": 0.0, "steps": 0}  # train bpc is the mean over the steps since the last log
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self.divergence_reloads = 0  # trainer.on_divergence=reload: how often the last good checkpoint was reloaded
        self.lr_scale = 1.0  # the product of divergence_lr_factor over those reloads

        resumed = self._maybe_resume()
        # world size, TF32 flags, torch/CUDA/cuDNN versions: logged once, in config.yaml and the W&B config
        self.runtime = distributed.runtime_info(self.ctx)
        if self.ctx.is_main:
            # the resolved config beside the metrics: what plots and reports group runs by
            config = OmegaConf.to_container(self.cfg, resolve=True)
            config["runtime"] = self.runtime
            config["num_parameters"] = self.num_params
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
            print(f"runtime: {self.runtime}", file=sys.stderr)
        self.sinks = self._open_sinks(resumed) if self.ctx.is_main else Sinks([])

    # ----------------------------------------------------------------------------------------------- setup pieces
    def _set_precision_flags(self) -> None:
        # TF32 on Ampere+ changes fp32 matmul numerics: set it explicitly (config) and log it, never inherit it.
        allow_tf32 = bool(self.tcfg.get("allow_tf32", False))
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
        # Producing subnormal floats (magnitudes below 1.2e-38) costs an x86 core 10-100x per operation. A run whose
        # state saturates or blows up makes many: such tuning runs took 1,300-4,800 s of one core for 800 steps where
        # healthy ones took 180-300 s (results/bench/denormal.md). Flushing them to zero changes only values below
        # 1.2e-38. Set explicitly either way, on every intra-op thread, and logged (measured), like TF32.
        cpu_kernel.set_flush_denormal(bool(self.tcfg.get("flush_denormal", False)))
        if self.precision == "bf16" and self.ctx.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("trainer.precision=bf16 is not supported on this GPU; use fp16 or fp32")

    def _agree_on_run_dir(self, run_dir: Path) -> Path:
        """Rank 0's run directory on every rank. Hydra runs in every rank under torchrun, and a run dir made from
        ${now:...} can differ by a second between ranks; the others' own (empty) Hydra directory is removed."""
        agreed = Path(distributed.broadcast_object(str(run_dir), self.ctx))
        if not self.ctx.is_main and agreed.resolve() != run_dir.resolve() and run_dir.is_dir():
            try:
                run_dir.rmdir()  # only ever removes an empty directory
            except OSError:
                pass
        return agreed

    def _load_corpus(self):
        # rank 0 builds the token cache first, the others then only open the memmaps
        if self.ctx.is_main:
            corpus = load_corpus(self.cfg.dataset, self.cfg.data_dir)
        distributed.barrier(self.ctx)
        if not self.ctx.is_main:
            corpus = load_corpus(self.cfg.dataset, self.cfg.data_dir)
        return corpus

    def _check_eval_sizes(self) -> None:
        """Validation and test must fit one evaluation batch: find out now, not after hours of training."""
        B, T = int(self.tcfg.get("eval_batch_size") or self.tcfg.batch_size), int(self.tcfg.seq_len)
        splits = [("valid", "eval_chars")] + ([("test", "test_chars")] if self.tcfg.get("test_at_end", True) else [])
        for split, limit_key in splits:
            available = len(self.corpus.split(split))
            limit = self.tcfg.get(limit_key)
            n = min(available, int(limit)) if limit else available
            if n < B * (T + 1):
                where = f"trainer.{limit_key}={limit} of the {available}" if limit and limit < available else \
                    f"the {available}"
                raise UserError(f"the {split} evaluation reads {where} characters of split {split!r}, fewer than "
                                f"eval_batch_size*(seq_len+1)={B * (T + 1)}; use a smaller trainer.eval_batch_size "
                                f"/ trainer.seq_len, a larger trainer.{limit_key} or a bigger corpus")
            streams = self.tcfg.get("cold_start_streams")
            if split == "test" and streams and n < int(streams) * (T + 1):
                raise UserError(f"the cold-start check cuts the {n} test characters into trainer.cold_start_streams="
                                f"{streams} streams, fewer than cold_start_streams*(seq_len+1)="
                                f"{int(streams) * (T + 1)}; use fewer streams (null: no check) or more test characters")

    def _wrap_ddp(self, model):
        if not self.ctx.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def _open_sinks(self, resumed: bool) -> Sinks:
        sinks = [JsonlSink(self.run_dir, resume_step=self.step if resumed else None)]
        logger_cfg = self.cfg.get("logger")
        if logger_cfg is not None and logger_cfg.get("name", "none") == "wandb":
            config = OmegaConf.to_container(self.cfg, resolve=True)
            config["num_parameters"] = self.num_params
            config["runtime"] = self.runtime
            sinks.append(WandbSink(logger_cfg, self.run_dir, config, resume=resumed))
        return Sinks(sinks)

    # ------------------------------------------------------------------------------------------------- checkpoints
    def _checkpoint_payload(self) -> dict:
        # the hidden state of every stream (all ranks), so a DDP checkpoint resumes in one process and vice versa
        state = [[distributed.gather_streams(t.detach(), self.ctx).cpu() for t in layer] for layer in self.state]
        payload = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "chars": self.chars,
            "train_seconds": self.train_seconds,
            "best_valid": self.best_valid,
            "window": dict(self.window),
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_row": self.nonfinite_in_row,
            "divergence_reloads": self.divergence_reloads,
            "lr_scale": self.lr_scale,
            "corpus": {"name": self.corpus.name, "split_sizes": [len(self.corpus.split(s)) for s in SPLITS]},
            "batcher": self.batches.state_dict(),
            "hidden_state": state,
            "rng": rng_state(),  # rank 0's: what a single process resumes with
            "rng_per_rank": distributed.gather_objects(rng_state(), self.ctx),  # exact resume at the same world size
            "vocab_size": self.corpus.vocab_size,
            "symbols": torch.tensor(list(self.corpus.symbols), dtype=torch.uint8),
            "num_parameters": self.num_params,
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
        }
        return payload

    def save(self, best: bool = False) -> None:
        payload = self._checkpoint_payload()  # collective under DDP: every rank gathers
        if self.ctx.is_main:
            checkpoint.save_checkpoint(payload, self.run_dir, keep=int(self.tcfg.get("keep_checkpoints", 2)),
                                       best=best)
        distributed.barrier(self.ctx)

    def _maybe_resume(self) -> bool:
        mode = self.tcfg.get("resume", "auto")
        if mode not in (True, False, "auto"):
            raise UserError(f"trainer.resume={mode!r} must be true, false or auto")
        if mode is False:
            if checkpoint.has_checkpoint(self.run_dir):
                # a fresh run here would rotate away, and mix with, the checkpoints of the run already there
                raise UserError(f"trainer.resume=false but {self.run_dir} already holds checkpoints of a run; use a new "
                                f"hydra.run.dir, or trainer.resume=auto to continue that run")
            return False
        payload = checkpoint.load_latest(self.run_dir, set_aside=self.ctx.is_main)
        # every rank reads the checkpoint itself: they must all see the same one (a run dir on a shared file system)
        found = distributed.gather_objects(None if payload is None else int(payload["step"]), self.ctx)
        if len(set(found)) > 1:
            raise UserError(f"the ranks see different checkpoints in {self.run_dir} (steps by rank: {found}); "
                            f"under multi-node DDP hydra.run.dir must be on a file system shared by all nodes")
        if payload is None:
            if mode is True:
                raise UserError(f"trainer.resume=true but {self.run_dir} holds no checkpoint (last.pt)")
            return False
        self._restore(payload)
        if self.ctx.is_main:
            print(f"resumed from step {self.step} in {self.run_dir}", file=sys.stderr)
        return True

    def _restore(self, payload: dict) -> None:
        check_compatible(payload, self.cfg, self.corpus, self.run_dir)
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.batches.load_state_dict(payload["batcher"])
        lo = self.ctx.rank * self.local_batch
        self.state = [tuple(t[lo:lo + self.local_batch].to(self.ctx.device) for t in layer)
                      for layer in payload["hidden_state"]]
        for key in ("step", "chars", "train_seconds", "best_valid", "nonfinite_total"):
            setattr(self, key, payload[key])
        self.nonfinite_in_row = int(payload.get("nonfinite_in_row", 0))
        self.divergence_reloads = int(payload.get("divergence_reloads", 0))
        self.lr_scale = float(payload.get("lr_scale", 1.0))
        self.window = dict(payload["window"])
        per_rank = payload.get("rng_per_rank") or [payload["rng"]]
        if len(per_rank) == self.ctx.world_size:
            set_rng_state(per_rank[self.ctx.rank])
        elif self.ctx.is_main:  # another world size: rank 0 continues rank 0's stream, the others start fresh ones
            set_rng_state(payload["rng"])
        else:
            torch.manual_seed(rank_seed(int(self.cfg.seed), self.ctx.rank, self.step))

    # ------------------------------------------------------------------------------------------------- the loop
    def train_step(self, batch) -> tuple[float, float]:
        """One truncated-BPTT segment: forward, backward, clip, step. Returns (loss in nats, grad norm)."""
        if batch.reset:  # a new epoch starts every stream from the beginning of its text: zero state
            self.state = self.model.init_state(self.local_batch, self.ctx.device)
        with autocast(self.ctx.device, self.precision):
            logits, state = self.ddp_model(batch.x, self.state)  # (T, B, V)
        loss = cross_entropy_nats(logits, batch.y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.get("grad_clip")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(clip) if clip else math.inf).item()
        # the step's only other sync; it also carries the stop flag, so every rank stops after the same step
        asked = bool(self.stop and self.stop.requested)
        loss_value, self.stop_agreed = distributed.mean_and_any(loss.detach(), asked, self.ctx)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite or self.precision == "fp16":  # fp16: the scaler itself skips overflowing steps
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.state = detach_state(state)
        if self.precision == "fp16" and math.isfinite(loss_value):
            # dynamic loss scaling: an overflow of the *scaled* gradients is expected while the scale settles (the
            # scaler skipped the step and lowered the scale); the forward pass and carried state are fine
            finite = True
        if not finite:
            self._on_nonfinite(loss_value, grad_norm)
        else:
            self.nonfinite_in_row = 0
        return loss_value, grad_norm

    def _on_nonfinite(self, loss: float, grad_norm: float) -> None:
        """Divergence guard: the step was skipped; the carried state may be poisoned, so restart it at zero.

        After `max_nonfinite_in_row` such steps, `on_divergence=stop` ends the run with a UserError; `reload` makes
        `fit` go back to the last good checkpoint with a lower learning rate (`_reload_after_divergence`)."""
        self.nonfinite_total += 1
        self.nonfinite_in_row += 1
        self.state = self.model.init_state(self.local_batch, self.ctx.device)
        if self.ctx.is_main and self.nonfinite_in_row == 1:  # once per streak; every skip is counted in the metrics
            print(f"warning: step {self.step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); step "
                  f"skipped and hidden state reset ({self.nonfinite_total} skipped so far)", file=sys.stderr)
        if self._divergence_limit_reached() and self.tcfg.get("on_divergence", "stop") == "stop":
            raise UserError(f"training diverged: {self.nonfinite_in_row} non-finite losses or gradients in a row "
                            f"at step {self.step}; lower optim.lr or set optim.grad_clip (or "
                            f"trainer.on_divergence=reload to retry from the last checkpoint with a lower lr, "
                            f"or =end to record the divergence as the run's result)")

    def _divergence_limit_reached(self) -> bool:
        return self.nonfinite_in_row >= int(self.tcfg.get("max_nonfinite_in_row", 10))

    def _reload_after_divergence(self) -> None:
        """on_divergence=reload: back to the newest checkpoint with finite weights, every learning rate (and the
        schedule's base) times `divergence_lr_factor`. The metrics logged after that checkpoint belong to the
        abandoned trajectory: they move to metrics.rewound.jsonl, so metrics.jsonl stays one record per step."""
        in_row, total, max_reloads = self.nonfinite_in_row, self.nonfinite_total, int(
            self.tcfg.get("max_divergence_reloads", 3))
        what = f"training diverged: {in_row} non-finite losses or gradients in a row at step {self.step}"
        if self.divergence_reloads >= max_reloads:
            raise UserError(f"{what}, after {self.divergence_reloads} reload(s) with a lower learning rate "
                            f"(trainer.max_divergence_reloads={max_reloads}); lower optim.lr or set optim.grad_clip")
        payload = checkpoint.load_latest(self.run_dir, accept=finite_weights, set_aside=self.ctx.is_main)
        if payload is None:
            raise UserError(f"{what} and {self.run_dir} holds no checkpoint with finite weights to reload; lower "
                            f"optim.lr or set optim.grad_clip")
        scale = self.lr_scale * float(self.tcfg.get("divergence_lr_factor", 0.5))
        reloads = self.divergence_reloads + 1
        self._restore(payload)
        scale_learning_rate(self.optimizer, self.scheduler, scale / self.lr_scale)  # (the checkpoint's may be lowered)
        self.lr_scale, self.divergence_reloads = scale, reloads
        self.nonfinite_total, self.nonfinite_in_row = total, 0  # the skipped steps stay counted
        self.sinks.rewind(self.step)
        self.save()  # a crash from here on resumes the reloaded state at its lower rate, not the diverging one
        self.sinks.log({"step": self.step, "chars": self.chars, "time": round(self.train_seconds, 3),
                        "event": "divergence_reload", "train/lr": self.scheduler.get_last_lr()[0],
                        "train/lr_scale": scale, "train/divergence_reloads": reloads,
                        "train/nonfinite_steps": total})
        if self.ctx.is_main:
            print(f"warning: {what}; reloaded the checkpoint of step {self.step} with the learning rate times "
                  f"{scale:g} (reload {reloads} of at most {max_reloads})", file=sys.stderr)

    def evaluate(self, split: str) -> float:
        """bpc on the valid split (first `eval_chars`) or the test split (first `test_chars`; null = all).

        Collective under DDP, and every rank gets the same number: the evaluation streams are sharded across the
        ranks like the training streams when `eval_batch_size` is a multiple of the world size (the summed nats are
        the single-process ones), otherwise rank 0 evaluates alone while the others wait for its result."""
        tcfg = self.tcfg
        max_chars = tcfg.get("eval_chars") if split == "valid" else tcfg.get("test_chars")
        batch_size = int(tcfg.get("eval_batch_size") or tcfg.batch_size)
        kwargs = dict(split_name=split, batch_size=batch_size, seq_len=int(tcfg.seq_len), device=self.ctx.device,
                      max_chars=max_chars, precision=self.precision)
        if batch_size % self.ctx.world_size == 0:
            nats, chars = evaluate_nats(self.model, self.corpus.split(split), rank=self.ctx.rank,
                                        world_size=self.ctx.world_size, **kwargs)
            totals = torch.tensor([nats, chars], dtype=torch.float64, device=self.ctx.device)
            nats, chars = distributed.all_reduce_sum(totals, self.ctx).tolist()
            return nats / chars / LN2
        bpc = evaluate_bpc(self.model, self.corpus.split(split), **kwargs) if self.ctx.is_main else None
        return distributed.broadcast_object(bpc, self.ctx)

    def cold_starts(self, split: str, streams: int) -> dict:
        """The split (its first `test_chars` / `eval_chars`) cut into `streams` streams, each read from a zero state:
        their bpc, and each stream's. One stream from the split's start is one draw of where a model starts cold;
        this is `streams` draws, and a state that falls into a regime it never leaves shows as a stream far above
        the rest (mlstm.tuning.blown_streams). Under DDP every rank computes it on its own copy of the (identical)
        parameters: no collective, so no rank waits on another at the end of a run."""
        limit = self.tcfg.get("eval_chars") if split == "valid" else self.tcfg.get("test_chars")
        tokens = self.corpus.split(split)
        tokens = tokens[: int(limit)] if limit else tokens
        bits = bits_per_position(self.model, tokens, batch_size=streams, seq_len=int(self.tcfg.seq_len),
                                 device=self.ctx.device, precision=self.precision)
        return {f"{split}/cold_start_bpc": bits.mean().item(),
                f"{split}/cold_start_stream_bpc": [round(v, 4) for v in bits.mean(0).tolist()]}

    def _sync(self) -> None:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)

    def _throughput(self, window_seconds: float, window_chars: int) -> dict:
        """chars/s of every rank (its own B/W streams over its own time) and in total (all characters over the
        slowest rank's time), and peak GPU memory per rank. Collective under DDP: every rank calls it."""
        memory = torch.cuda.max_memory_allocated(self.ctx.device) / 2**30 if self.ctx.device.type == "cuda" else None
        seconds, memories = zip(*distributed.gather_objects((max(window_seconds, 1e-9), memory), self.ctx))
        per_rank = [window_chars / self.ctx.world_size / s for s in seconds]
        perf = {"perf/chars_per_s": window_chars / max(seconds),
                "perf/chars_per_s_per_rank": sum(per_rank) / len(per_rank)}
        if memory is not None:
            perf["perf/gpu_mem_gb"] = max(memories)  # peak allocated, the largest over the ranks
        if self.ctx.distributed:
            perf.update({f"perf/chars_per_s/rank{r}": rate for r, rate in enumerate(per_rank)})
            if memory is not None:
                perf.update({f"perf/gpu_mem_gb/rank{r}": m for r, m in enumerate(memories)})
        return perf

    def _log_train(self, grad_norm: float, window_seconds: float, window_chars: int) -> None:
        record = {
            "step": self.step,
            "chars": self.chars,
            "time": round(self.train_seconds, 3),
            "epoch": self.batches.epoch,
            # no train/bpc when every step since the last record was skipped (non-finite)
            **({"train/bpc": self.window["nats"] / self.window["steps"] / LN2} if self.window["steps"] else {}),
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/grad_norm": grad_norm,
            "train/nonfinite_steps": self.nonfinite_total,
            **self._throughput(window_seconds, window_chars),
        }
        if hasattr(self.optimizer, "threshold"):  # optim=rmsprop_norm: the norm of the next update
            record["train/update_norm_threshold"] = self.optimizer.threshold
        self.sinks.log(record)
        self.window = {"nats": 0.0, "steps": 0}

    def _evaluate_and_log(self) -> float:
        """Validation on every rank (sharded, see `evaluate`): all ranks agree on the value, hence on `best.pt`."""
        valid = self.evaluate("valid")
        self.sinks.log({"step": self.step, "chars": self.chars, "time": round(self.train_seconds, 3),
                        "valid/bpc": valid})
        return valid

    def fit(self) -> dict:
        """The loop, stopping gracefully on SIGTERM, SIGINT or SIGUSR1 (see `GracefulStop`, `_stop_after_step`)."""
        with GracefulStop(announce=self.ctx.is_main) as self.stop:
            return self._fit()

    def _fit(self) -> dict:
        tcfg = self.tcfg
        max_steps = int(tcfg.max_steps)
        log_every = int(tcfg.get("log_every") or 10)
        eval_every = tcfg.get("eval_every")
        ckpt_every = tcfg.get("checkpoint_every")
        max_seconds = tcfg.get("max_time_s")
        valid = math.nan
        if self.step >= max_steps:  # a resumed run with nothing left to do: rerunning its ending would log it twice
            if self.ctx.is_main:
                print(f"nothing to do: the run in {self.run_dir} already reached step {self.step}", file=sys.stderr)
            self.sinks.close()
            return {"step": self.step, "chars": self.chars, "train_seconds": self.train_seconds,
                    "num_parameters": self.num_params, "best_valid/bpc": self.best_valid, "run_dir": str(self.run_dir)}
        bar = tqdm(total=max_steps, initial=self.step, disable=not (self.ctx.is_main and tcfg.get("progress", True)),
                   dynamic_ncols=True, desc="train")
        self.model.train()
        if tcfg.get("on_divergence", "stop") == "reload" and not checkpoint.has_checkpoint(self.run_dir):
            self.save()  # the initial state is the last good checkpoint until the first periodic one
        window_seconds, window_chars = 0.0, 0
        while self.step < max_steps and not (max_seconds and self.train_seconds >= max_seconds):
            batch = self.batches.next_batch()
            self._sync()
            started = time.perf_counter()
            loss, grad_norm = self.train_step(batch)
            if self._divergence_limit_reached() and tcfg.get("on_divergence", "stop") == "end":
                return self._end_diverged()  # a result, not an error: what a learning-rate sweep needs
            if self._divergence_limit_reached():  # on_divergence=reload (stop has raised in train_step)
                self._reload_after_divergence()
                bar.n = self.step
                window_seconds, window_chars = 0.0, 0
                continue
            self._sync()
            elapsed = time.perf_counter() - started
            window_seconds += elapsed  # this rank's own time, for its throughput
            if max_seconds and self.ctx.distributed:  # a time budget must stop every rank at the same step
                elapsed = distributed.broadcast_object(elapsed, self.ctx)
            self.train_seconds += elapsed
            window_chars += self.batches.chars_per_step
            self.step += 1
            self.chars += self.batches.chars_per_step
            if math.isfinite(loss):
                self.window["nats"] += loss
                self.window["steps"] += 1
            last = self.step >= max_steps or bool(max_seconds and self.train_seconds >= max_seconds)
            if self.step % log_every == 0 or last:  # also when every step of the window was skipped as non-finite
                if self.window["steps"]:
                    bar.set_postfix(bpc=f"{self.window['nats'] / self.window['steps'] / LN2:.3f}",
                                    chars_s=f"{window_chars / max(window_seconds, 1e-9):.0f}")
                self._log_train(grad_norm, window_seconds, window_chars)
                window_seconds, window_chars = 0.0, 0
            is_best = False
            if (eval_every and self.step % eval_every == 0) or last:
                valid = self._evaluate_and_log()
                is_best = valid < self.best_valid  # the same on every rank: save() is collective
                if is_best:
                    self.best_valid = valid
            saved = bool((ckpt_every and self.step % ckpt_every == 0) or last or is_best)
            if saved:
                self.save(best=is_best)
            bar.update(1)
            if self.stop_agreed and not last:  # a stop asked during the last step lets the run finish
                bar.close()
                self._stop_after_step(saved)
        bar.close()
        return self._finish(valid)

    def _stop_after_step(self, saved: bool) -> None:
        """Every rank agreed to stop after this step: save last.pt (collective), flush and close metrics.jsonl and
        W&B, say how to resume, let a replaced handler act (e.g. requeue), raise TrainingStopped."""
        if not saved:
            self.save()
        self.sinks.close()
        name = signal.Signals(self.stop.signum).name if self.stop.requested else "a signal to another rank"
        message = (f"stopped by {name} at step {self.step}; last.pt saved in {self.run_dir}; rerun the same command "
                   f"to resume")
        if self.ctx.is_main:
            print(message, file=sys.stderr, flush=True)
        self.stop.chain()
        raise TrainingStopped(message, self.stop.signum, ParentWatch.orphaned.is_set())

    def _end_diverged(self) -> dict:
        """on_divergence=end: the run ends here as a diverged run (`event: diverged`; no test pass). A tuning sweep
        then scores it as the worst (mlstm.tuning) instead of stopping, and a rerun finds it finished."""
        if self.ctx.is_main:
            print(f"warning: training diverged: {self.nonfinite_in_row} non-finite losses or gradients in a row at "
                  f"step {self.step}; the run ends here as diverged (trainer.on_divergence=end)", file=sys.stderr)
        self.sinks.log({"step": self.step, "chars": self.chars, "time": round(self.train_seconds, 3),
                        "event": "diverged", "train/nonfinite_steps": self.nonfinite_total})
        result = {"step": self.step, "chars": self.chars, "train_seconds": self.train_seconds,
                  "num_parameters": self.num_params, "valid/bpc": math.nan, "best_valid/bpc": self.best_valid,
                  "diverged": True, "run_dir": str(self.run_dir)}
        self.sinks.summary({k: v for k, v in result.items() if k != "run_dir"})
        self.sinks.close()
        return result

    def _finish(self, valid: float) -> dict:
        result = {"step": self.step, "chars": self.chars, "train_seconds": self.train_seconds,
                  "num_parameters": self.num_params, "valid/bpc": valid, "best_valid/bpc": self.best_valid,
                  "run_dir": str(self.run_dir)}
        if self.tcfg.get("test_at_end", True):
            result["test/bpc"] = self.evaluate("test")
            record = {"step": self.step, "chars": self.chars, "time": round(self.train_seconds, 3),
                      "test/bpc": result["test/bpc"]}
            if self.tcfg.get("cold_start_streams"):
                record.update(self.cold_starts("test", int(self.tcfg.cold_start_streams)))
            self.sinks.log(record)  # one record: a run counted as finished has its cold-start check too
        self.sinks.summary({k: v for k, v in result.items() if k != "run_dir"})
        self.sinks.close()
        return result


def train(cfg, run_dir: str | Path | None = None) -> dict:
    """Train the model a composed config describes; returns the final metrics. Raises UserError on bad input (a run
    directory in use by another process included) and TrainingStopped when a signal stopped it (last.pt saved)."""
    if run_dir is None:
        run_dir = default_run_dir()
    with run_dir_lock(Path(run_dir)):  # before anything in the run directory is read or written
        done = finished_result(Path(run_dir), cfg)  # a sweep run again skips the runs it finished (or committed)
        if done is not None:
            print(f"nothing to do: {run_dir} holds a finished run (metrics.jsonl); use a new hydra.run.dir to train "
                  f"again", file=sys.stderr)
            return done
        trainer = Trainer(cfg, Path(run_dir))
        if trainer.ctx.is_main:
            print(f"parameters: {trainer.num_params:,}", file=sys.stderr)
        try:
            result = trainer.fit()
        except TrainingStopped:
            distributed.teardown(trainer.ctx, finished=True)  # every rank stopped after the same step
            raise
        except BaseException:
            distributed.teardown(trainer.ctx)
            raise
        distributed.teardown(trainer.ctx, finished=True)
        if trainer.ctx.is_main:  # the tuning rule's score of this run: what the training task returns to sweepers
            result["score"] = run_score(read_metrics(trainer.run_dir / METRICS_FILE), int(cfg.trainer.max_steps))
        return result


@contextlib.contextmanager
def run_dir_lock(run_dir: Path):
    """Hold `run_dir` (mlstm.run_lock) while training; under torchrun rank 0 holds it for the whole job (the rank
    is known from the environment before any process group exists)."""
    if distributed.env_rank() != 0:
        yield
        return
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except OSError as error:
        raise UserError(f"output directory {run_dir} is not writable ({error.strerror}); set hydra.run.dir to a "
                        f"writable path") from None
    try:
        yield
    finally:
        lock.release()


def default_run_dir() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not under @hydra.main
        return Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S")

"""`train(cfg) -> result`: one straight road from bytes to bits per character.

    Corpus ─► StreamBatcher (B streams × segments of T) ─► CharLM (state carried, detached) ─► loss (nats)
           ─► optimizer step ─► metrics.jsonl + W&B ─► periodic validation, checkpoints ─► final test bpc

A plain function: tests call it directly, `mlstm.cli.train` wraps it with `@hydra.main`. Under torchrun every rank runs
it; the B streams are split across ranks so the global batch equals the single-process one, and rank 0 alone writes.
"""

from __future__ import annotations

import math
import signal
import sys
import time
import weakref
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mlstm.cells.kernels import cpu_kernel
from mlstm.data import StreamBatcher
from mlstm.errors import UserError
from mlstm.evaluate import LN2, autocast, cross_entropy_nats
from mlstm.model import build_model, detach_state, num_parameters
from mlstm.training import checkpoint, distributed, divergence, evaluation, resume
from mlstm.training.checks import check_config, check_eval_sizes
from mlstm.training.optim import build_optimizer
from mlstm.training.plateau import build_early_stopping, build_plateau, can_reduce, current_lr
from mlstm.training.progress import progress_bar, throughput
from mlstm.training.resume import finished_result, rank_seed, seed_everything
from mlstm.training.run_dir import agree_on_run_dir, default_run_dir, prepare_run_dir, run_dir_lock
from mlstm.training.score import run_score
from mlstm.training.stopping import GracefulStop, ParentWatch, TrainingStopped
from mlstm.training.tracking import METRICS_FILE, JsonlSink, Sinks, WandbSink, read_metrics


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
        try:
            self._build(cfg, run_dir)
        except BaseException as error:
            self.close(error=error)  # bad input met with the process group up: leave it, or its threads abort the exit
            raise

    def _build(self, cfg, run_dir: Path) -> None:
        """Everything a run needs once the process group is up: data, model, optimizer, the checkpoint to resume."""
        run_dir = agree_on_run_dir(Path(run_dir), self.ctx)
        self.run_dir = prepare_run_dir(run_dir) if self.ctx.is_main else Path(run_dir)
        self.precision = self.tcfg.get("precision", "fp32")
        self._set_precision_flags()
        seed_everything(int(cfg.seed))

        self.corpus = distributed.load_corpus_once(self.cfg.dataset, self.cfg.data_dir, self.ctx)
        self.model = build_model(cfg, self.corpus.vocab_size).to(self.ctx.device)
        self.num_params = num_parameters(self.model)
        self.ddp_model = distributed.wrap_ddp(self.model, self.ctx)  # DDP broadcasts rank 0's initial parameters
        if self.ctx.distributed:  # one RNG stream per rank: the dropout masks of different streams stay independent
            torch.manual_seed(rank_seed(int(cfg.seed), self.ctx.rank))
        self.optimizer, self.scheduler = build_optimizer(cfg.optim, self.model.parameters())
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self.precision == "fp16")
        self.plateau = build_plateau(cfg.optim, self.optimizer)  # optim.schedule=plateau: stepped at each evaluation
        self.early_stop = build_early_stopping(self.tcfg, cfg.optim)  # trainer.early_stop_patience

        B, T = int(self.tcfg.batch_size), int(self.tcfg.seq_len)
        self.batches = StreamBatcher(
            self.corpus.train,
            B,
            T,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            device=self.ctx.device,
            split_name="train",
        )
        self.local_batch = B // self.ctx.world_size
        self.state = self.model.init_state(self.local_batch, self.ctx.device)
        check_eval_sizes(self.tcfg, self.corpus)

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

        resumed = resume.maybe_resume(self)
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

    def _open_sinks(self, resumed: bool) -> Sinks:
        sinks = [JsonlSink(self.run_dir, resume_step=self.step if resumed else None)]
        logger_cfg = self.cfg.get("logger")
        if logger_cfg is not None and logger_cfg.get("name", "none") == "wandb":
            config = OmegaConf.to_container(self.cfg, resolve=True)
            config["num_parameters"] = self.num_params
            config["runtime"] = self.runtime
            sinks.append(WandbSink(logger_cfg, self.run_dir, config, resume=resumed))
        return Sinks(sinks)

    def close(self, finished: bool = False, error: BaseException | None = None) -> None:
        """Leave the process group (under torchrun; a no-op otherwise). The DDP wrapper goes first, while the group
        registry still holds the group: see `distributed.teardown` for why its reducer must not hold the last
        reference. error: the exception that ends the run, whose traceback may hold the wrapper too."""
        if error is not None:
            distributed.drop_traceback_locals(error)
        wrapper = None
        if getattr(self, "ddp_model", None) is not None and self.ddp_model is not self.model:
            wrapper = weakref.ref(self.ddp_model)
            self.ddp_model = self.model
        distributed.teardown(self.ctx, finished, wrapper)

    def save(self, best: bool = False) -> None:
        payload = resume.checkpoint_payload(self)  # collective under DDP: every rank gathers
        if self.ctx.is_main:
            checkpoint.save_checkpoint(payload, self.run_dir, keep=int(self.tcfg.get("keep_checkpoints", 2)), best=best)
        distributed.barrier(self.ctx)

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
        asked = bool(self.stop and self.stop.poll())
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
            divergence.on_nonfinite(self, loss_value, grad_norm)
        else:
            self.nonfinite_in_row = 0
        return loss_value, grad_norm

    def _divergence_limit_reached(self) -> bool:
        return self.nonfinite_in_row >= int(self.tcfg.get("max_nonfinite_in_row", 10))

    def _sync(self) -> None:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)

    def _log_train(self, grad_norm: float, window_seconds: float, window_chars: int) -> None:
        record = {
            "step": self.step,
            "chars": self.chars,
            "time": round(self.train_seconds, 3),
            "epoch": self.batches.epoch,
            # no train/bpc when every step since the last record was skipped (non-finite)
            **({"train/bpc": self.window["nats"] / self.window["steps"] / LN2} if self.window["steps"] else {}),
            "train/lr": current_lr(self.optimizer),
            "train/grad_norm": grad_norm,
            "train/nonfinite_steps": self.nonfinite_total,
            **throughput(self.ctx, window_seconds, window_chars),
        }
        if hasattr(self.optimizer, "threshold"):  # optim=rmsprop_norm: the norm of the next update
            record["train/update_norm_threshold"] = self.optimizer.threshold
        self.sinks.log(record)
        self.window = {"nats": 0.0, "steps": 0}

    def _evaluate_and_log(self) -> float:
        """Validation on every rank (sharded, see `evaluate`): all ranks agree on the value, hence on `best.pt`."""
        valid = evaluation.evaluate(self, "valid")
        self.sinks.log(
            {"step": self.step, "chars": self.chars, "time": round(self.train_seconds, 3), "valid/bpc": valid}
        )
        return valid

    def _plateau_step(self, valid: float) -> bool:
        """The to-convergence protocol (mlstm.training.plateau) after an evaluation: maybe halve the rate, and say
        whether the run stops here. Both decisions are logged as events in metrics.jsonl."""
        if self.plateau is None and self.early_stop is None:
            return False
        before, reducible = current_lr(self.optimizer), can_reduce(self.plateau, self.optimizer)
        if self.plateau is not None:
            self.plateau.step(valid)
        reduced = current_lr(self.optimizer) < before
        where = {"step": self.step, "chars": self.chars, "time": round(self.train_seconds, 3)}
        if self.early_stop is not None and self.early_stop.update(valid, reduced, reducible):
            self.sinks.log({**where, "event": "early_stop", "best_valid/bpc": self.best_valid})
            return True
        if reduced:
            self.sinks.log({**where, "event": "lr_reduced", "train/lr": current_lr(self.optimizer)})
        return False

    def _stopped_early(self) -> bool:
        return self.early_stop is not None and self.early_stop.stopped

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
        if self._stopped_early():  # stopped by the rule, then interrupted before its test pass: only that is left
            return self._finish(self.best_valid)
        if self.step >= max_steps:  # a resumed run with nothing left to do: rerunning its ending would log it twice
            if self.ctx.is_main:
                print(f"nothing to do: the run in {self.run_dir} already reached step {self.step}", file=sys.stderr)
            self.sinks.close()
            return {
                "step": self.step,
                "chars": self.chars,
                "train_seconds": self.train_seconds,
                "num_parameters": self.num_params,
                "best_valid/bpc": self.best_valid,
                "run_dir": str(self.run_dir),
            }
        bar = progress_bar(max_steps, self.step, enabled=self.ctx.is_main and tcfg.get("progress", True))
        self.model.train()
        if tcfg.get("on_divergence", "stop") == "reload" and not checkpoint.has_checkpoint(self.run_dir):
            self.save()  # the initial state is the last good checkpoint until the first periodic one
        window_seconds, window_chars = 0.0, 0
        while (
            self.step < max_steps
            and not (max_seconds and self.train_seconds >= max_seconds)
            and not self._stopped_early()
        ):
            batch = self.batches.next_batch()
            self._sync()
            started = time.perf_counter()
            loss, grad_norm = self.train_step(batch)
            if divergence.limit_reached(self) and tcfg.get("on_divergence", "stop") == "end":
                return divergence.end_diverged(self)  # a result, not an error: what a learning-rate sweep needs
            if divergence.limit_reached(self):  # on_divergence=reload (stop has raised in train_step)
                divergence.reload_after_divergence(self)
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
                    bar.set_postfix(
                        bpc=f"{self.window['nats'] / self.window['steps'] / LN2:.3f}",
                        chars_s=f"{window_chars / max(window_seconds, 1e-9):.0f}",
                        refresh=False,  # shown at the bar's next refresh: in a log file at most once a minute
                    )
                self._log_train(grad_norm, window_seconds, window_chars)
                window_seconds, window_chars = 0.0, 0
            is_best = False
            if (eval_every and self.step % eval_every == 0) or last:
                valid = self._evaluate_and_log()
                is_best = valid < self.best_valid  # the same on every rank: save() is collective
                if is_best:
                    self.best_valid = valid
                last = self._plateau_step(valid) or last
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
        message = (
            f"stopped by {name} at step {self.step}; last.pt saved in {self.run_dir}; rerun the same command to resume"
        )
        if self.ctx.is_main:
            print(message, file=sys.stderr, flush=True)
        self.stop.chain()
        raise TrainingStopped(message, self.stop.signum, ParentWatch.orphaned.is_set())

    def _finish(self, valid: float) -> dict:
        result = {
            "step": self.step,
            "chars": self.chars,
            "train_seconds": self.train_seconds,
            "num_parameters": self.num_params,
            "valid/bpc": valid,
            "best_valid/bpc": self.best_valid,
            "run_dir": str(self.run_dir),
        }
        if self.tcfg.get("test_at_end", True):
            if self.early_stop is not None:  # to convergence: the reported model is the best validation point's
                self.model.load_state_dict(checkpoint.load_file(self.run_dir / "best.pt")["model"])
                result["tested_checkpoint"] = "best.pt"
            result["test/bpc"] = evaluation.evaluate(self, "test")
            record = {
                "step": self.step,
                "chars": self.chars,
                "time": round(self.train_seconds, 3),
                "test/bpc": result["test/bpc"],
            }
            if self.tcfg.get("cold_start_streams"):
                record.update(evaluation.cold_starts(self, "test", int(self.tcfg.cold_start_streams)))
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
            print(
                f"nothing to do: {run_dir} holds a finished run (metrics.jsonl); use a new hydra.run.dir to train "
                f"again",
                file=sys.stderr,
            )
            return done
        trainer = Trainer(cfg, Path(run_dir))
        if trainer.ctx.is_main:
            print(f"parameters: {trainer.num_params:,}", file=sys.stderr)
        try:
            result = trainer.fit()
        except TrainingStopped:
            trainer.close(finished=True)  # every rank stopped after the same step
            raise
        except BaseException as error:
            trainer.close(error=error)
            raise
        trainer.close(finished=True)
        if trainer.ctx.is_main:  # the tuning rule's score of this run: what the training task returns to sweepers
            result["score"] = run_score(
                read_metrics(trainer.run_dir / METRICS_FILE),
                int(cfg.trainer.max_steps),
                best=trainer.early_stop is not None,
            )
        return result

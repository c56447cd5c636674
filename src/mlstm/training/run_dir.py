"""The run directory: made writable, held by one process at a time (mlstm.training.run_lock), and its default."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from mlstm.errors import UserError
from mlstm.training import distributed
from mlstm.training.run_lock import RunLock


def prepare_run_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UserError(
            f"output directory {run_dir} is not writable ({error.strerror}); set hydra.run.dir to a writable path"
        ) from None
    return run_dir


@contextlib.contextmanager
def run_dir_lock(run_dir: Path):
    """Hold `run_dir` (mlstm.training.run_lock) while training; under torchrun rank 0 holds it for the whole job (the
    rank is known from the environment before any process group exists)."""
    if distributed.env_rank() != 0:
        yield
        return
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except OSError as error:
        raise UserError(
            f"output directory {run_dir} is not writable ({error.strerror}); set hydra.run.dir to a writable path"
        ) from None
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


def agree_on_run_dir(run_dir: Path, ctx) -> Path:
    """Rank 0's run directory on every rank. Hydra runs in every rank under torchrun, and a run dir made from
    ${now:...} can differ by a second between ranks; the others' own (empty) Hydra directory is removed."""
    agreed = Path(distributed.broadcast_object(str(run_dir), ctx))
    if not ctx.is_main and agreed.resolve() != run_dir.resolve() and run_dir.is_dir():
        try:
            run_dir.rmdir()  # only ever removes an empty directory
        except OSError:
            pass
    return agreed

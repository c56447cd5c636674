"""PyTorch's own distributed engine, as torchrun sets it up.

torchrun exports RANK / WORLD_SIZE / LOCAL_RANK; we only read them, start the process group (nccl on CUDA, gloo on
CPU) and wrap the model in DistributedDataParallel. A plain `python -m mlstm.cli.train` is world size 1 and touches
none of this.
"""

from __future__ import annotations

import gc
import os
import traceback
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mlstm.cells import fast_mlstm
from mlstm.data import load_corpus
from mlstm.errors import UserError


@dataclass
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("trainer.device=cuda but no CUDA device is visible; use trainer=cpu or trainer.device=auto")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"trainer.device={name!r} is not one of auto, cpu, cuda")


def env_rank() -> int:
    """This process's global rank as torchrun exports it (0 outside torchrun), known before any process group."""
    return int(os.environ.get("RANK", "0"))


def setup(device_name: str) -> Context:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _bind_group_defaults_before_init()
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(rank=rank, world_size=world_size, device=device)


def _bind_group_defaults_before_init() -> None:
    """Import torch.distributed.nn while no process group exists.

    Its functions take `group=group.WORLD` as a default argument, evaluated once, at import. DistributedDataParallel's
    constructor imports it (through torch._dynamo), so imported after init_process_group it keeps the default group
    in those defaults for the life of the process: destroy_process_group() then cannot free it, and the gloo group's
    worker threads live on into interpreter shutdown, where their teardown now and then ends the process with
    "terminate called without an active exception" (SIGABRT) after a run that had finished. Imported first, the
    defaults are None (= the default group at call time) and teardown() really ends the group."""
    import torch.distributed.nn  # noqa: F401


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= ctx.world_size
    return value


def gather_streams(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Concatenate every rank's (B/W, ...) slice into the full (B, ...) tensor, in rank order (= stream order)."""
    if not ctx.distributed:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def mean_and_any(value: torch.Tensor, flag: bool, ctx: Context) -> tuple[float, bool]:
    """The mean of a scalar over the ranks and whether `flag` is set on any rank, in one all-reduce: a flag rides
    along a collective the step makes anyway (elementwise sums, so the mean is the one all_reduce_mean gives)."""
    if not ctx.distributed:
        return value.item(), flag
    both = torch.stack([value.reshape(()), torch.ones_like(value.reshape(())) * float(flag)])
    mean, share = all_reduce_mean(both, ctx).tolist()
    return mean, share > 0


def all_reduce_sum(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_object(obj, ctx: Context):
    """Rank 0's `obj` on every rank (any picklable value; e.g. the run directory all ranks must agree on)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, ctx: Context) -> list:
    """`[obj of rank 0, obj of rank 1, ...]` on every rank."""
    if not ctx.distributed:
        return [obj]
    boxes = [None] * ctx.world_size
    dist.all_gather_object(boxes, obj)
    return boxes


def secondary_rank_overrides() -> list[str]:
    """Hydra overrides for ranks > 0 under torchrun: Hydra runs in every rank, only rank 0 writes `.hydra/` and the
    job log (the run directory itself is agreed on in the trainer, see `Trainer._agree_on_run_dir`)."""
    if int(os.environ.get("RANK", "0")) == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=disabled"]


def flushes_denormals() -> bool:
    """Whether the CPU arithmetic of every intra-op thread flushes subnormal floats to zero (trainer.flush_denormal):
    measured, not assumed, with float32 subnormals times one, enough of them (64k per thread) that PyTorch splits the
    product over all its threads (its grain is 32k elements). The subnormals are written as bits (0x000fffff, about
    1.5e-39): converting 1e-39 to float32 would itself be flushed on the calling thread and leave only zeros."""
    bits = torch.full((65536 * torch.get_num_threads(),), 0x000FFFFF, dtype=torch.int32)
    return not bool((bits.view(torch.float32) * 1.0).any())


def runtime_info(ctx: Context) -> dict:
    """What the numbers of a run also depend on, logged once (config.yaml `runtime:` and the W&B config)."""
    matmul = torch.backends.cuda.matmul
    info = {
        "world_size": ctx.world_size,
        "backend": dist.get_backend() if ctx.distributed else None,
        "device": str(ctx.device),
        "device_name": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "tf32_matmul": bool(matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "flush_denormal": flushes_denormals(),
        **fast_mlstm.kernel_status(ctx.device),  # what the fast mLSTM runs on (its kernels, graphs)
    }
    return info


def teardown(ctx: Context, finished: bool = False, ddp_wrapper: weakref.ref | None = None) -> None:
    """Destroy the process group (and with it, on gloo, its worker threads: see `_bind_group_defaults_before_init`).
    finished (every rank completed the run, or stopped at the same step on a signal): first a barrier, so that no rank
    takes its process group down while another may still have work in flight with it. A run that ended in an error
    skips the barrier: the other ranks may be gone.

    ddp_wrapper: a weak reference to the DistributedDataParallel wrapper, which the caller has let go of. It must be
    gone before the group is destroyed. Its C++ reducer holds a reference to the group, and pybind11 frees the C++
    part of an object with the GIL held: were the reducer the group's last owner, the gloo group's destructor would
    join its worker threads with the GIL held while a worker still frees the tensors of the last collective (the
    barrier below), which takes the GIL. That deadlock at exit hung one rank in about 25 two-rank runs. The group's own
    Python binding releases the GIL before destroying it, so the last reference must be the registry's, which
    `destroy_process_group` drops: hence the wrapper first (collected, should it sit in a reference cycle)."""
    if ddp_wrapper is not None and ddp_wrapper() is not None:
        gc.collect()
    if ctx.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def drop_traceback_locals(error: BaseException) -> None:
    """Clear the local variables of the finished frames that an exception's traceback (its cause and context
    included) keeps alive. A frame of DistributedDataParallel.forward holds the wrapper as `self`: while the
    exception lives, the wrapper's reducer would keep the process group alive past `teardown` (see there), and its
    gloo threads with it. The traceback still prints: that needs code and line numbers, not locals. Frames still
    running (the caller's) are left as they are."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending += [current.__cause__, current.__context__]


def load_corpus_once(dataset_cfg, data_dir, ctx: Context):
    """The corpus on every rank: rank 0 builds the token cache first, the others then only open its memmaps."""
    if ctx.is_main:
        corpus = load_corpus(dataset_cfg, data_dir)
    barrier(ctx)
    if not ctx.is_main:
        corpus = load_corpus(dataset_cfg, data_dir)
    return corpus


def wrap_ddp(model, ctx: Context):
    """The model in DistributedDataParallel under torchrun (it broadcasts rank 0's initial parameters), else itself."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)

"""CUDA-graph capture of the fast mLSTM's segment, forward and backward (`GraphedSegment`).

Why: a segment is T steps of small launches (two matrix products and two fused kernels each way, plus casts), and at
T = 200 their launch cost on the CPU exceeds the GPU's work. The segment has a fixed shape during training, so each
layer captures its forward loop once, and its backward loop once, into CUDA graphs, and then replays them: one launch
per segment each way. Measured on an H200 (results/bench/gpu_runs/run4/ablation.md; paper form, H=1024, B=128, T=200,
bf16): 10.1 ms per training step with graphs, 65.1 without.

How (`GraphedSegment`, an autograd Function around `fast_mlstm._forward_segment` / `_backward_segment`, the code the
eager `MLSTMSegment` runs):
  - Graphs are kept per layer (`SegmentGraphs`, an attribute of the layer, not a parameter or buffer), keyed by the
    segment spec, whether it saves for backward, and the shapes, dtypes and strides of its tensors. A new key runs
    eagerly once (warm-up: Triton compiles, cuBLAS picks its kernels), the second call with that key captures.
  - Replay reads static input tensors (each call copies its inputs into them) and writes static outputs, which are
    cloned on the way out, so nothing a caller holds is overwritten by a later replay.
  - The backward graph reads the forward graph's buffers. If the forward graph ran again (another segment of the
    same shape) before a backward, that backward first replays the forward on its own saved inputs: the same
    arithmetic on the same numbers, so the result does not depend on the order of calls.
  - At most `SegmentGraphs.capacity` keys are kept per layer (least recently used dropped): a short last segment or
    an evaluation batch size adds a key, not a leak.

    MLSTM_CUDA_GRAPH=auto   (default) capture on CUDA (not inside someone else's capture)
    MLSTM_CUDA_GRAPH=0      never (every launch from Python, e.g. to compare)

The graph object is injectable (`SegmentGraphs(graph_factory=...)`): the tests, on a CPU, use `Rerun`, which
'replays' by running the captured function again and copying its results into the tensors of the capture, the
memory semantics of a replay, so that the bookkeeping above is tested without a GPU.
"""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import torch
from torch.autograd.function import once_differentiable

from mlstm.cells.kernels.cpu_kernel import env_switch


def mode() -> str:
    return env_switch("MLSTM_CUDA_GRAPH")


def applies(device: torch.device) -> bool:
    return device.type == "cuda" and mode() != "off" and not torch.cuda.is_current_stream_capturing()


def describe(device: torch.device) -> str:
    """For run metadata."""
    if device.type != "cuda":
        return "not applicable"
    return "off" if mode() == "off" else "on"


class CudaGraph:
    """A captured CUDA graph: `capture(fn)` records fn's launches (and returns what fn returns, whose tensors live
    in the graph's memory pool); `replay()` runs them again."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn):
        # relaxed: a first-time Triton module load or cuBLAS set-up inside the capture is allowed
        with torch.cuda.graph(self.graph, capture_error_mode="relaxed"):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class Rerun:
    """A graph stand-in for tests on a CPU: replay runs the captured function again and copies every tensor of its
    result into the corresponding tensor returned at capture, as a replay overwrites the graph's memory."""

    def capture(self, fn):
        self.fn = fn
        self.result = fn()
        return self.result

    def replay(self) -> None:
        _copy_into(self.result, self.fn())


def _copy_into(old, new) -> None:
    if isinstance(old, torch.Tensor):
        old.copy_(new)
    elif isinstance(old, (tuple, list)):
        for a, b in zip(old, new):
            _copy_into(a, b)
    elif isinstance(old, SimpleNamespace):
        for name, value in vars(old).items():
            _copy_into(value, getattr(new, name))


class _Entry:
    """One key's graph: static inputs, what the capture returned, and how often it was replayed."""

    def __init__(self):
        self.calls = 0  # eager runs so far (the warm-up)
        self.graph = None
        self.static = None  # the static inputs (None where the argument is None)
        self.result = None  # what the captured function returned (static outputs)
        self.replays = 0
        self.ns = None  # forward entries: the ctx stand-in of the capture (buffers and saved tensors)
        self.backward: OrderedDict = OrderedDict()  # forward entries: the backward graphs reading its buffers


class SegmentGraphs:
    """One layer's captured segments. Not copied with the layer (a deep copy or a pickle starts empty)."""

    capacity = 4
    warmup = 1  # eager calls of a key before it is captured

    def __init__(self, graph_factory=CudaGraph):
        self.graph_factory = graph_factory
        self.entries: OrderedDict = OrderedDict()

    def entry(self, table: OrderedDict, key) -> _Entry:
        if key not in table:
            table[key] = _Entry()
            while len(table) > self.capacity:
                table.popitem(last=False)
        table.move_to_end(key)
        return table[key]

    def __deepcopy__(self, memo):
        return SegmentGraphs(self.graph_factory)

    def __getstate__(self):
        return {"graph_factory": self.graph_factory, "entries": OrderedDict()}


def _signature(tensors) -> tuple:
    return tuple(None if v is None else (tuple(v.shape), v.dtype, v.stride(), v.device) for v in tensors)


def _ctx() -> SimpleNamespace:
    """A stand-in for an autograd ctx that `_forward_segment` / `_backward_segment` can write to and read from."""
    ns = SimpleNamespace()
    ns.save_for_backward = lambda *tensors: setattr(ns, "saved_tensors", tensors)
    return ns


def _static(tensors) -> list:
    return [None if v is None else v.detach().clone() for v in tensors]


def _load(static, tensors) -> None:
    for s, v in zip(static, tensors):
        if s is not None:
            s.copy_(v)


def _clone(values) -> tuple:
    return tuple(None if v is None else v.clone() for v in values)


def _run_forward(segment, spec, save, tensors):
    ns = _ctx()
    return segment.forward(ns, spec, save, *tensors), ns


class GraphedSegment(torch.autograd.Function):
    """`fast_mlstm.MLSTMSegment` through CUDA graphs: apply(graphs, segment, spec, save, *tensors), tensors as there;
    `segment` holds the eager functions it captures (`segment.forward(ns, spec, save, *tensors)` and
    `segment.backward(ns, need, dY, dh_T, dc_T)`), passed in so that this module needs nothing from the layer's."""

    @staticmethod
    def forward(ctx, graphs: SegmentGraphs, segment, spec, save, *tensors):
        device_type = tensors[0].device.type
        with torch.autocast(device_type, enabled=False):
            entry = graphs.entry(graphs.entries, (spec, save, _signature(tensors)))
            ctx.graphs, ctx.entry, ctx.eager, ctx.segment = graphs, entry, None, segment
            if entry.graph is None and entry.calls < graphs.warmup:
                entry.calls += 1
                outputs, ctx.eager = _run_forward(segment, spec, save, tensors)
                return outputs
            if entry.graph is None:
                entry.static = _static(tensors)
                entry.graph = graphs.graph_factory()
                entry.result, entry.ns = entry.graph.capture(lambda: _run_forward(segment, spec, save, entry.static))
            _load(entry.static, tensors)
            entry.graph.replay()
            entry.replays += 1
            ctx.replay = entry.replays
            if save:
                ctx.save_for_backward(*tensors)  # to replay this forward again if another one overwrote the buffers
            return _clone(entry.result)

    @staticmethod
    @once_differentiable
    def backward(ctx, dY, dh_T, dc_T):
        _backward_segment = ctx.segment.backward
        with torch.autocast(dY.device.type, enabled=False):
            need = ctx.needs_input_grad[4:]  # of the tensors: (x, W_in, b_in, W_r, ...)
            if ctx.eager is not None:
                return (None, None, None, None) + _backward_segment(ctx.eager, need, dY, dh_T, dc_T)
            entry, graphs = ctx.entry, ctx.graphs
            if entry.replays != ctx.replay:  # the forward graph ran since: recompute this segment's buffers
                _load(entry.static, ctx.saved_tensors)
                entry.graph.replay()
                entry.replays += 1
            grads = (dY, dh_T, dc_T)
            back = graphs.entry(entry.backward, (need, _signature(grads)))
            if back.graph is None and back.calls < graphs.warmup:
                back.calls += 1
                return (None, None, None, None) + _backward_segment(entry.ns, need, dY, dh_T, dc_T)
            if back.graph is None:
                back.static = _static(grads)
                back.graph = graphs.graph_factory()
                back.result = back.graph.capture(lambda: _backward_segment(entry.ns, need, *back.static))
            _load(back.static, grads)
            back.graph.replay()
            return (None, None, None, None) + _clone(back.result)

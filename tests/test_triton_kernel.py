"""The GPU side of the fast mLSTM, checked on a CPU: the Triton kernels (`mlstm.cells.kernels.triton_kernel`) through
Triton's interpreter (MLSTM_TRITON=interpret) against the reference layer for every form and option, and the CUDA-graph
bookkeeping (`mlstm.cells.kernels.cuda_graph`) with its `Rerun` stand-in, whose replay rewrites the captured tensors as
a real replay rewrites the graph's memory. On a machine with a GPU, scripts/gpu_check.sh runs both for real."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlstm.bench import steps as bench
from mlstm.cells import fast_mlstm
from mlstm.cells.fast_mlstm import MLSTMSegment
from mlstm.cells.kernels import cuda_graph, triton_kernel
from mlstm.errors import UserError
from test_fast_mlstm import FORMS, VARIANTS, assert_close, inputs_for, pair, run

needs_triton = pytest.mark.skipif(not triton_kernel.importable(), reason="Triton is not installed")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("MLSTM_TRITON", "interpret")


# ---- the Triton kernels, interpreted ---------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("form", FORMS)
def test_triton_kernels_match_reference_float32(form, variant, interpret):
    ref, fast = pair(form, variant)
    ref.train(), fast.train()
    assert fast.segment_spec("cpu").pointwise == "triton-interpret"
    x, h0, c0 = inputs_for(ref, T=6, B=3, dtype=torch.float32)
    assert_close(run(ref, x, h0, c0), run(fast, x, h0, c0), rtol=1e-5)


@needs_triton
@pytest.mark.slow  # Triton's CPU interpreter: seconds a case
@pytest.mark.parametrize("form", FORMS)
def test_triton_kernels_several_blocks_per_row(form, interpret):
    """H = 600: two programs per batch row (BLOCK 512), the second one partly masked."""
    ref, fast = pair(form, "all", hidden=600, inputs=4)
    ref.train(), fast.train()
    assert triton_kernel.TritonSegmentCall.block_for(600) == 512
    x, h0, c0 = inputs_for(ref, T=3, B=2, dtype=torch.float32)
    assert_close(run(ref, x, h0, c0), run(fast, x, h0, c0), rtol=1e-5)


@needs_triton
@pytest.mark.slow  # Triton's CPU interpreter: seconds a case
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("form", FORMS)
def test_triton_kernels_bf16_products(form, variant, interpret, monkeypatch):
    """Under autocast the products reach the kernels in bf16 and are widened on load, and (without a projection: the
    fused form) the kernels write the products' operands in bf16, rounded to nearest even: the same numbers as the
    reference's casts and F.linear(...).to(float32), so the outputs agree to float32 rounding."""
    fused = []
    init = triton_kernel.TritonSegmentCall.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        fused.append(self.fused)

    monkeypatch.setattr(triton_kernel.TritonSegmentCall, "__init__", recording_init)
    ref, fast = pair(form, variant)
    ref.train(), fast.train()
    x, h0, c0 = inputs_for(ref, T=6, B=4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, ref_low = run(fast, x, h0, c0), run(ref, x, h0, c0)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in low.values())
    assert_close(ref_low, low, rtol=2e-2)  # the weight gradients: one bf16 product against T summed ones
    assert_close({k: ref_low[k] for k in ("y", "h", "c")}, {k: low[k] for k in ("y", "h", "c")}, rtol=1e-5)
    assert fused == [fast.cfg.num_proj is None] * 2  # forward and backward, fused exactly when there is no projection


@pytest.mark.parametrize("form", FORMS)
def test_pytorch_path_when_the_kernels_cannot_take_the_segment(form, interpret, monkeypatch):
    """A segment the kernels refuse (`_kernel_call` answers None, e.g. for a non-contiguous tensor) runs the PyTorch
    path with the buffers laid out for the kernels (r and m in bf16 under autocast, act(c) kept after all)."""
    monkeypatch.setattr(fast_mlstm, "_kernel_call", lambda *args, **kwargs: None)
    ref, fast = pair(form, "peepholes")
    x, h0, c0 = inputs_for(ref, T=5, B=3, dtype=torch.float32)
    assert_close(run(ref, x, h0, c0), run(fast, x, h0, c0), rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, ref_low = run(fast, x, h0, c0), run(ref, x, h0, c0)
    assert_close({k: ref_low[k] for k in ("y", "h", "c")}, {k: low[k] for k in ("y", "h", "c")}, rtol=1e-5)
    assert_close(ref_low, low, rtol=2e-2)


def test_triton_switch(monkeypatch):
    monkeypatch.setenv("MLSTM_TRITON", "0")
    assert triton_kernel.applies(torch.device("cuda"), torch.float32) is None
    assert triton_kernel.describe(torch.device("cuda")) == "off"
    monkeypatch.setenv("MLSTM_TRITON", "auto")
    assert triton_kernel.applies(torch.device("cpu"), torch.float32) is None  # CPU: the C kernel's place
    assert triton_kernel.applies(torch.device("cuda"), torch.float64) is None  # float64 state: PyTorch ops
    assert triton_kernel.describe(torch.device("cpu")) == "not applicable"
    monkeypatch.setenv("MLSTM_TRITON", "sometimes")
    with pytest.raises(UserError, match="MLSTM_TRITON must be auto, 1 or 0"):
        triton_kernel.applies(torch.device("cuda"), torch.float32)


# ---- CUDA-graph bookkeeping, with the Rerun stand-in ---------------------------------------------------------------
def graphed(layer) -> cuda_graph.SegmentGraphs:
    """Route this fast layer through GraphedSegment on the CPU, with Rerun graphs."""
    layer.__dict__["_segment_graphs"] = graphs = cuda_graph.SegmentGraphs(graph_factory=cuda_graph.Rerun)
    assert layer.segment_graphs(torch.device("cpu")) is graphs
    return graphs


def _train_steps(layer, segments, lr=0.05, hold=None):
    """Carried-state truncated BPTT over `segments` with an SGD step after each; returns every output and gradient."""
    torch.manual_seed(5)
    h, c = (torch.zeros(segments[0].shape[1], n) for n in (layer.output_size, layer.hidden_size))
    record = []
    for x in segments:
        y, (h, c) = layer(x, (h, c))
        if hold is not None:
            hold.append(y)
        loss = (y * torch.linspace(-1, 1, y.shape[-1])).sum() + h.square().sum() + c.sum()
        layer.zero_grad()
        loss.backward()
        record.append(
            [y.detach().clone(), h.detach().clone(), c.detach().clone()] + [p.grad.clone() for p in layer.parameters()]
        )
        with torch.no_grad():
            for p in layer.parameters():
                p -= lr * p.grad
        h, c = h.detach(), c.detach()
    return record


@pytest.mark.parametrize("form", ["paper", "seed"])
def test_graphed_training_equals_eager(form):
    """Warm-up, capture, then replays: each reloads the new weights, inputs and carried state, and the results are
    those of the eager segment bit for bit; outputs handed out earlier are clones a later replay does not touch."""
    _, eager = pair(form, "all")
    graphed_layer = copy.deepcopy(eager)
    graphs = graphed(graphed_layer)
    g = torch.Generator().manual_seed(2)
    segments = [torch.randn(5, 3, 8, generator=g) for _ in range(4)]
    want = _train_steps(eager, segments)
    held = []
    got = _train_steps(graphed_layer, segments, hold=held)
    for a, b in zip(want, got):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert all(torch.equal(y.detach(), step[0]) for y, step in zip(held, got))
    (entry,) = graphs.entries.values()
    assert entry.calls == 1 and entry.replays == 3  # one eager warm-up, then captured and replayed
    (back,) = entry.backward.values()
    assert back.calls == 1 and back.graph is not None


@needs_triton
@pytest.mark.slow  # Triton's CPU interpreter: seconds a case
def test_graphed_fused_bf16_training_equals_eager(interpret):
    """The fused Triton form (bf16 autocast, dropout mask) through the graphs: the same numbers as without them."""
    _, eager = pair("paper", "dropout")
    layer = copy.deepcopy(eager)
    graphs = graphed(layer)
    g = torch.Generator().manual_seed(3)
    segments = [torch.randn(4, 3, 8, generator=g) for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = _train_steps(eager, segments), _train_steps(layer, segments)
    for a, b in zip(want, got):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    (entry,) = graphs.entries.values()
    assert entry.replays == 2 and entry.ns.buffers[-1] is not None  # captured, and fused (the bias of xp kept)


def test_graphed_backward_after_another_forward_recomputes():
    """Two segments of one shape forward, then both backward (gradient accumulation): the second forward replay
    overwrote the buffers the first backward needs, so that backward replays its forward first."""
    _, eager = pair("paper", "peepholes")
    layer = copy.deepcopy(eager)
    graphs = graphed(layer)
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(4, 2, 8, generator=g) for _ in range(2)]
    h0 = (torch.zeros(2, 16), torch.zeros(2, 16))
    for model in (eager, layer):  # warm the graphed layer up to capture, and give both the same history
        for _ in range(2):
            model(xs[0], h0)[0].sum().backward()
        model.zero_grad()

    def accumulate(model):
        ys = [model(x, h0)[0] for x in xs]
        sum((y * y).sum() for y in ys).backward()
        return [p.grad.clone() for p in model.parameters()]

    replays = graphs.entries[next(iter(graphs.entries))].replays
    for a, b in zip(accumulate(eager), accumulate(layer)):
        assert torch.equal(a, b)
    (entry,) = graphs.entries.values()
    assert entry.replays == replays + 3  # two forwards and one recomputation


def test_graphed_eval_between_forward_and_backward():
    """A no-grad evaluation (another key: nothing saved) between a training forward and its backward."""
    _, eager = pair("matlab", "cell_clip")
    layer = copy.deepcopy(eager)
    graphs = graphed(layer)
    g = torch.Generator().manual_seed(6)
    x, xe = torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    state = (torch.zeros(3, 16), torch.zeros(3, 16))
    for model in (eager, layer):
        for _ in range(3):
            y, _ = model(x, state)
            with torch.no_grad():
                ye, _ = model(xe, state)
            y.sum().backward()
    for a, b in zip(eager.parameters(), layer.parameters()):
        assert torch.equal(a.grad, b.grad)
    assert torch.equal(ye, model(xe, state)[0].detach())
    assert len(graphs.entries) == 2


def test_graph_cache_is_bounded_and_not_copied():
    _, layer = pair("paper", "plain")
    graphs = graphed(layer)
    for T in range(1, 8):
        for _ in range(2):
            layer(torch.randn(T, 2, 8), None)[0].sum().backward()
    assert len(graphs.entries) == cuda_graph.SegmentGraphs.capacity
    twin = copy.deepcopy(layer)
    twin_graphs = twin.segment_graphs(torch.device("cpu"))
    assert len(twin_graphs.entries) == 0 and twin_graphs is not graphs


def test_graph_switch(monkeypatch):
    monkeypatch.setenv("MLSTM_CUDA_GRAPH", "0")
    assert not cuda_graph.applies(torch.device("cuda")) and cuda_graph.describe(torch.device("cuda")) == "off"
    monkeypatch.setenv("MLSTM_CUDA_GRAPH", "auto")
    assert not cuda_graph.applies(torch.device("cpu"))
    assert cuda_graph.describe(torch.device("cpu")) == "not applicable"


def test_segment_function_unchanged_without_graphs():
    """On a CPU the layer calls MLSTMSegment directly (no graph state is made)."""
    _, layer = pair("paper", "plain")
    y, _ = layer(torch.randn(3, 2, 8), None)
    assert type(y.grad_fn).__name__ == MLSTMSegment.__name__ + "Backward"
    assert "_segment_graphs" not in layer.__dict__ and layer.segment_graphs(torch.device("cpu")) is None


# ---- the GPU session's scripts, where they can run without one -----------------------------------------------------
@pytest.mark.slow
def test_gpu_selfcheck_dry_run_on_cpu():
    """scripts/gpu_selfcheck.py with --device cpu (the C kernel, no graphs): every case passes its tolerances."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/gpu_selfcheck.py"),
            "--device",
            "cpu",
            "--hidden",
            "16",
            "--batch",
            "3",
            "--seq-len",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpu_selfcheck: 0 of 12 cases failed" in done.stdout and done.stdout.count("\nok   ") == 12


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without a GPU")
def test_gpu_scripts_say_one_line_without_a_gpu():
    for script in ("gpu_selfcheck.py", "gpu_profile.py"):
        done = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / script)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"{script[:-3]}: no CUDA device"]


def test_recorded_commit_can_be_given(monkeypatch):
    """A tree copied without its git metadata (to a GPU machine) states the commit it was copied from."""
    monkeypatch.setenv("MLSTM_GIT_COMMIT", "7dd8662")
    assert bench.git_commit() == "7dd8662"
    monkeypatch.delenv("MLSTM_GIT_COMMIT")
    assert bench.git_commit() != "7dd8662"

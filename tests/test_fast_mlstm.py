"""cell.impl=fast (`mlstm.cells.fast_mlstm`) against autograd: gradcheck in float64, and the reference layer
(impl=reference, the autograd loop) on the same weights for every form and option, in float32 and under bf16 autocast.
Every test runs twice: with the pointwise math in the fused C loops (`mlstm.cells.kernels.cpu_kernel`) and float32
products on MKL's packed weights where they gain (`mlstm.cells.kernels.packed_gemm`: weights above 2^16 elements, where
this build has them), and with PyTorch ops and torch.mm. At the small sizes of most tests every product is torch.mm's;
every pairing of pointwise path and product is tested at H=256, where W_m is packed, W_mh is not, and the C loops split
the batch over threads."""

import copy
import re

import pytest
import torch
from torch.func import functional_call

from mlstm.cells import build_layer
from mlstm.cells.fast_mlstm import (
    FAST_MLSTM_FORMS,
    FastMatlabMultiplicativeLSTM,
    FastMultiplicativeLSTM,
    FastSeedMultiplicativeLSTM,
)
from mlstm.cells.kernels import cpu_kernel, packed_gemm
from mlstm.cells.mlstm import MLSTM_FORMS

FORMS = ("paper", "matlab", "seed", "seed-gated")  # seed-gated: form=seed with seed_output=gated
VARIANTS = {
    "plain": {},
    "peepholes": dict(use_peepholes=True),
    "cell_clip": dict(cell_clip=0.3),
    "proj": dict(num_proj=5),
    "proj_clip": dict(num_proj=5, proj_clip=0.15),
    "forget_bias": dict(forget_bias=-0.7),
    "dropout": dict(dropout=0.4),
    "weight_norm": dict(weight_norm=True, use_peepholes=True),
    "relu": dict(activation="relu", use_peepholes=True, dropout=0.3),
    "identity": dict(activation="identity", num_proj=5, proj_clip=0.5),
    "all": dict(use_peepholes=True, cell_clip=0.3, num_proj=5, proj_clip=0.15, forget_bias=0.5, dropout=0.3),
}


@pytest.fixture(autouse=True, params=["c_kernel", "torch_ops"])
def pointwise_path(request, monkeypatch):
    """For the whole test: MLSTM_CPU_KERNEL=1 (the C kernel, required) with MLSTM_PACKED_GEMM=auto, or
    MLSTM_CPU_KERNEL=0 (PyTorch ops) with MLSTM_PACKED_GEMM=0 (torch.mm)."""
    if request.param == "c_kernel" and cpu_kernel._compiler() is None:
        pytest.skip("no C compiler on this machine: the fused CPU kernel cannot be built")
    monkeypatch.setenv("MLSTM_CPU_KERNEL", "1" if request.param == "c_kernel" else "0")
    monkeypatch.setenv("MLSTM_PACKED_GEMM", "auto" if request.param == "c_kernel" else "0")
    return request.param


def pair(form, variant, hidden=16, inputs=8, dtype=torch.float32, seed=0, **extra):
    """(reference, fast) layers of the same form and options holding the same weights (moved by state_dict)."""
    form, _, output = form.partition("-")
    cfg = dict(name="mlstm", form=form, hidden_size=hidden, **dict(VARIANTS[variant], **extra))
    if output:
        cfg["seed_output"] = output
    torch.manual_seed(seed)
    ref = build_layer(dict(cfg, impl="reference"), inputs).to(dtype)
    with torch.no_grad():  # biases and peepholes away from their zero init, so that every path carries signal
        for _name, p in ref.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.3)
    fast = build_layer(dict(cfg, impl="fast"), inputs).to(dtype)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def inputs_for(layer, T, B, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, layer.input_size, generator=g, dtype=dtype)
    h0 = 0.5 * torch.randn(B, layer.output_size, generator=g, dtype=dtype)
    c0 = torch.randn(B, layer.hidden_size, generator=g, dtype=dtype)
    return x, h0, c0


def run(layer, x, h0, c0, seed=7):
    """Forward (dropout mask drawn from `seed`) and backward of a fixed random projection of (y, h_T, c_T);
    returns {name: tensor} of the outputs and of the gradients of x, h0, c0 and every parameter."""
    x, h0, c0 = (v.clone().requires_grad_() for v in (x, h0, c0))
    torch.manual_seed(seed)
    y, (h, c) = layer(x, (h0, c0))
    g = torch.Generator().manual_seed(3)
    loss = sum((v * torch.randn(v.shape, generator=g, dtype=v.dtype)).sum() for v in (y, h, c))
    layer.zero_grad()
    loss.backward()
    out = {"y": y, "h": h, "c": c, "dx": x.grad, "dh0": h0.grad, "dc0": c0.grad}
    out.update({f"d{name}": p.grad for name, p in layer.named_parameters()})
    return out


def assert_close(a, b, rtol):
    assert a.keys() == b.keys()
    for k in a:
        scale = max(1.0, a[k].abs().max().item())
        err = (a[k] - b[k]).abs().max().item()
        assert err <= rtol * scale, f"{k}: max error {err:.3g} (scale {scale:.3g})"


# ---- the classes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
def test_fast_layer_is_the_reference_class_with_its_parameters(form):
    ref, fast = pair(form, "all")
    form = form.partition("-")[0]
    assert isinstance(fast, FAST_MLSTM_FORMS[form]) and isinstance(fast, MLSTM_FORMS[form])
    assert isinstance(FastMultiplicativeLSTM(8, fast.cfg), FAST_MLSTM_FORMS[form])  # the symbol build_layer uses
    assert list(fast.state_dict()) == list(ref.state_dict())
    # a checkpoint of impl=fast loads strictly into impl=reference, and the paper weights agree
    again = build_layer(dict(name="mlstm", form=form, hidden_size=16, **VARIANTS["all"]), 8)
    again.load_state_dict(fast.state_dict(), strict=True)
    for k, v in fast.to_paper_weights().items():
        torch.testing.assert_close(v, again.to_paper_weights()[k], rtol=0, atol=0)
    twin = copy.deepcopy(fast)
    assert type(twin) is type(fast)
    assert {FastMatlabMultiplicativeLSTM, FastSeedMultiplicativeLSTM} < set(FAST_MLSTM_FORMS.values())


# ---- float64 gradcheck, carried state, every option ------------------------------------------------------------------
GRADCHECK_VARIANTS = ["plain", "peepholes", "cell_clip", "proj_clip", "dropout", "relu", "all"]  # weight_norm: outside
# the Function (ordinary autograd), compared with the reference below
PROJ_CLIP = 0.04  # small enough to clip h (values of order 0.1 at these sizes) in every form


@pytest.mark.parametrize("variant", GRADCHECK_VARIANTS)
@pytest.mark.parametrize("form", FORMS)
def test_gradcheck_float64(form, variant):
    extra = dict(proj_clip=PROJ_CLIP) if VARIANTS[variant].get("proj_clip") else {}
    ref, fast = pair(form, variant, hidden=3, inputs=2, dtype=torch.float64, **extra)
    fast.train()
    T, B = 4, 2
    x, h0, c0 = inputs_for(fast, T, B, torch.float64)
    mask = None
    if fast.cfg.dropout:  # one fixed mask (with zeros) for all of gradcheck's evaluations
        mask = torch.tensor([[0.0, 2.0], [2.0, 0.0]], dtype=torch.float64).repeat(1, 3)[:, : fast.output_size]
        fast.dropout_mask = lambda batch_size, device, dtype: mask
    names = [n for n, _ in fast.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in fast.named_parameters()]

    def f(x, h0, c0, *ps):
        y, (h, c) = functional_call(fast, dict(zip(names, ps)), (x, (h0, c0)))
        return y, h, c

    args = (x.requires_grad_(), h0.requires_grad_(), c0.requires_grad_(), *params)
    y, h, c = f(*args)
    if fast.cfg.cell_clip:  # the clips are active at these values
        assert (c.abs() == fast.cfg.cell_clip).any()
    if fast.cfg.proj_clip:
        assert (y.abs() == fast.cfg.proj_clip * (1.0 if mask is None else 2.0)).any()
    if mask is not None:
        assert (y == 0).any()
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---- fast against the reference layer, float32 ----------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("form", FORMS)
def test_fast_matches_reference_float32(form, variant, pointwise_path):
    ref, fast = pair(form, variant)
    ref.train(), fast.train()
    x, h0, c0 = inputs_for(ref, T=20, B=4, dtype=torch.float32)
    expected, got = run(ref, x, h0, c0), run(fast, x, h0, c0)
    assert all(v.dtype == torch.float32 for v in got.values())
    assert fast.segment_spec("cpu").cpu_kernel == (pointwise_path == "c_kernel")
    assert packed_gemm.applies(x.device, x.dtype) == (pointwise_path == "c_kernel" and packed_gemm.available())
    assert_close(expected, got, rtol=1e-5)


# from this many B x H cells on, the C loops split the rows over threads: read from the C source, so that the test
# follows the threshold wherever it moves
PARALLEL_MIN = int(
    re.search(r"#define MLSTM_PARALLEL_MIN (\d+)", (cpu_kernel.SOURCE_DIR / "mlstm_cpu.c").read_text())[1]
)


@pytest.mark.parametrize("products", ["packed", "mm"])
@pytest.mark.parametrize("variant", ["plain", "all"])
@pytest.mark.parametrize("form", FORMS)
def test_fast_matches_reference_with_threads_and_either_product(form, variant, products, pointwise_path, monkeypatch):
    """Every pairing of pointwise path and products, at B x H above the C loops' threading threshold with an odd
    batch (33 rows over 2 threads: 16 and 17), so that each thread's share of the rows is checked."""
    if products == "packed" and not packed_gemm.available():
        pytest.skip("this PyTorch build has no MKL packed GEMM")
    monkeypatch.setenv("MLSTM_PACKED_GEMM", "1" if products == "packed" else "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref, fast = pair(form, variant, hidden=256)
        ref.train(), fast.train()
        x, h0, c0 = inputs_for(ref, T=4, B=33, dtype=torch.float32)
        assert 33 * 256 >= PARALLEL_MIN
        assert_close(run(ref, x, h0, c0), run(fast, x, h0, c0), rtol=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("form", FORMS)
def test_no_grad_forward_matches_and_default_state(form):
    ref, fast = pair(form, "all")
    ref.eval(), fast.eval()
    x, _, _ = inputs_for(ref, T=9, B=3, dtype=torch.float32)
    with torch.no_grad():
        y_ref, (h_ref, c_ref) = ref(x)
        y, (h, c) = fast(x)  # zero initial state, nothing saved for backward
    for a, b in ((y_ref, y), (h_ref, h), (c_ref, c)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, y[-1], rtol=0, atol=0)


# ---- variational dropout: the reference's mask, drawn identically ---------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
def test_dropout_draws_the_reference_mask(form):
    ref, fast = pair(form, "dropout")
    ref.train(), fast.train()
    x, h0, c0 = inputs_for(ref, T=12, B=4, dtype=torch.float32)
    torch.manual_seed(11)
    y_ref, _ = ref(x, (h0, c0))
    torch.manual_seed(11)
    y, _ = fast(x, (h0, c0))
    dropped = y == 0
    assert dropped.any() and torch.equal(dropped, y_ref == 0)
    assert torch.equal(dropped, dropped[:1].expand_as(dropped))  # one mask for the whole segment
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    fast.eval()
    assert not (fast(x, (h0, c0))[0] == 0).any()  # no mask in eval mode


# ---- bf16 autocast on CPU --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
def test_bf16_autocast_close_to_float32(form):
    ref, fast = pair(form, "peepholes")
    x, h0, c0 = inputs_for(ref, T=6, B=4, dtype=torch.float32)
    fp32 = run(fast, x, h0, c0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run(fast, x, h0, c0)
        ref_low = run(ref, x, h0, c0)
    assert low["h"].dtype == low["c"].dtype == torch.float32  # carried state stays float32
    assert all(v.dtype == torch.float32 for k, v in low.items())  # grads land in the parameters' dtype
    assert all(torch.isfinite(v).all() for v in low.values())
    assert_close(fp32, low, rtol=0.1)
    assert_close(ref_low, low, rtol=0.1)

"""Fast multiplicative LSTM (`cell.impl=fast`, every form): the reference equations with a hand-written backward.

The reference layer (`mlstm.cells.mlstm`, `impl=reference`) runs the time loop through autograd: about fifteen graph
nodes per step, each saving its own inputs, and T small products for every recurrent weight gradient. Here the whole
segment is one `torch.autograd.Function`, `MLSTMSegment`:

    MLSTMSegment(x, W_in, b_in, W_r, W_m, h0, c0, mask, peepholes, W_P, b_h):   W_r = W_mh (H, P) or A_h (2H, P)
      forward   xp = W_in x + b_in (T, B, K), the reference's hoisted projection (`_input_projection`: W_mx, W_x,
                biases / A_x, a, W_x, w) = [factor part F (paper/matlab: W_mx x, K_F = H; seed: A_x x + a,
                K_F = 2H) ; z part (4H)], one product for the segment
                for t: r_t = W_r h_{t-1}                            one (B, P)(P, K_F) product
                       m_t = xp_F ⊙ r_t  |  seed: m_t = a_t ⊙ b_t, [a_t; b_t] = xp_F + r_t
                       z_t = xp_z + W_m m_t                           one (B, H)(H, 4H) product
                       the form's pointwise math (below), in place on slices of one (B, 4H) gate buffer
                saving per step only what backward needs in preallocated (T, B, ·) buffers
      backward  for t = T-1..0: dz_t, dm_t = W_m^T dz_t, dr_t, dh_{t-1} = W_r^T dr_t, dc_{t-1}; dz_t and dr_t are
                written into (T, B, ·) buffers, and after the loop each weight gradient is ONE large product:
                dW_m = dZ^T M, dW_r = dR^T H_prev, dW_P = dP^T H_raw; then the projection's: dx, dW_in = dXP^T x,
                db_in (autograd takes them on to the weights' cat and weight-norm g, v). xp and d xp, the largest
                tensors of a step, never leave the Function (with CUDA graphs: never leave the graph).

Pointwise math per form (slots of z; act = cell.activation; σ' and act' computed from the saved outputs):
    paper   [ĥ; i; f; o]  c = σ(f + fb [+ w_F c_)) c_ + σ(i [+ w_I c_)) act(ĥ);  h = σ(o [+ w_O c]) act(c)
    matlab  [ĥ; i; f; o]  c = same with the linear candidate ĥ;                    h = act(σ(o [+ w_O c]) c + b_h)
    seed    [i; j; f; o]  c = c_ σ(f + fb [+ w_F c_)) + σ(i [+ w_I c_)) j;        h = act(c o)   (no σ on o)
                          peepholes: o' = o + w_O c;  h = σ(o') act(c o')
    all     c clipped to ±cell_clip after the update (the clipped c is carried; gradient zero where clipped, as
            torch.clamp); h = clip(W_P h, ±proj_clip) when num_proj; h = h ⊙ mask (variational dropout).
The fast layers subclass the reference classes (same parameters, state_dict keys, init, paper weights, dropout mask
sampling), so a checkpoint moves freely between impl=fast and impl=reference; only `forward` differs. Every option of
the reference is supported (all three activations); nothing falls back.

Where the pointwise math runs (`SegmentSpec.pointwise`): on CPU with float32/float64 state, in the fused C loops of
`cpu_kernel` (two calls per step each way: `_kernel_call`; they also add the hoisted xp parts to the products, and
split the batch rows over PyTorch's OpenMP threads); on CUDA with float32 state, in their Triton twins
(`triton_kernel`); otherwise, and with MLSTM_CPU_KERNEL=0 / MLSTM_TRITON=0, as PyTorch ops on per-step views
(`_cell_step`, `_cell_step_backward`). All paths fill the same buffers with the same quantities; the tests run every
form and option through each (the Triton kernels through Triton's CPU interpreter). On CUDA the layer also captures
each segment in CUDA graphs (`cuda_graph.GraphedSegment`, the same `_forward_segment` / `_backward_segment`).

The fused form (`_fused_io`: Triton kernels, a lower compute dtype, no projection; the paper's models under bf16):
the kernels also write y = h ⊙ mask, add the input projection's bias to xp (kept as the bf16 product) as they load
it, and write the next products' operands in bf16 (rounded to nearest even, as torch's casts): four launches per step
each way and no casts in between. r, m, h, dz and dr are then kept in bf16 only: they are only ever product operands
(of the next step and of the weight gradients), where the reference rounds them to bf16 too, so the numbers are the
reference's.

The per-step products (`_Products`): on CPU in float32 each recurrent weight of more than 2^16 elements is packed once
per segment for MKL's packed GEMM (`packed_gemm`: the T products of a segment share one packed copy instead of
repacking the weight on every call), and the C loops read each product from the tensor it returns; smaller weights,
and other devices and dtypes, use torch.mm into the step's buffer slot.

Mixed precision: under autocast the two products per step (and the backward ones) run in the autocast dtype, the
weights cast once per segment; c, the gates, the pointwise math and the carried h, c stay float32, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mlstm.cells.kernels import cpu_kernel, cuda_graph, packed_gemm, triton_kernel
from mlstm.cells.mlstm import MatlabMultiplicativeLSTM, MultiplicativeLSTM, SeedMultiplicativeLSTM

# Fused backward kernels with an out= argument (one launch each): grad ⊙ y(1-y), grad ⊙ (1-y²), grad ⊙ [y > 0].
_sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input
_tanh_backward = torch.ops.aten.tanh_backward.grad_input
_threshold_backward = torch.ops.aten.threshold_backward.grad_input


@dataclass(frozen=True)
class SegmentSpec:
    """What the segment computes, besides its tensors."""

    form: str  # "paper" | "matlab" | "seed"
    activation: str  # "tanh" | "relu" | "identity"
    peepholes: bool  # diagonal peepholes w_I, w_F, w_O
    forget_bias: float  # constant added to the forget pre-activation each step
    cell_clip: float | None  # c clipped to ±cell_clip (None: no clip)
    proj_clip: float | None  # projected h clipped to ±proj_clip (None: no clip)
    compute_dtype: torch.dtype  # dtype of the matrix products (the autocast dtype, else the weights' dtype)
    # where the pointwise math runs: "c" (the C loops of `cpu_kernel`: CPU, float32/float64 state), "triton" (the
    # kernels of `triton_kernel`: CUDA, float32 state), "triton-interpret" (those kernels through Triton's CPU
    # interpreter: tests), "torch" (PyTorch ops)
    pointwise: str = "torch"
    seed_output: str | None = None  # seed form: "posted" (h = act(c o)) | "gated" (h = σ(o) act(c)); else None

    @property
    def cpu_kernel(self) -> bool:
        return self.pointwise == "c"

    @property
    def gated_output(self) -> bool:
        """h = o ⊙ act(c) with o = σ(z_o [+ w_O c]): the paper form, and the seed form with seed_output=gated."""
        return self.form == "paper" or self.seed_output == "gated"


class _Activation:
    """act in place, act into out, and its backward from the saved output y = act(v)."""

    def __init__(self, name: str):
        self.name = name

    def inplace(self, v: torch.Tensor) -> None:
        if self.name == "tanh":
            v.tanh_()
        elif self.name == "relu":
            v.relu_()

    def into(self, v: torch.Tensor, out: torch.Tensor) -> None:
        if self.name == "tanh":
            torch.tanh(v, out=out)
        elif self.name == "relu":
            torch.clamp(v, min=0, out=out)
        else:
            out.copy_(v)

    def backward(self, grad: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> None:
        """out = grad ⊙ act'(v), from y = act(v); out may be grad itself."""
        if self.name == "tanh":
            _tanh_backward(grad, y, grad_input=out)
        elif self.name == "relu":
            _threshold_backward(grad, y, 0, grad_input=out)  # relu'(v) = [v > 0] = [y > 0], 0 at v = 0 as torch
        elif out is not grad:
            out.copy_(grad)


class _Products:
    """The per-step products a @ L^T of one segment, in the compute dtype; operands and results in the state dtype
    (float32 under autocast). `operand(L)` prepares a right operand once per segment: the weight cast (and
    transposed into a plain row-major right operand, markedly faster for BLAS at B = 32), or on CPU in float32, for
    weights large enough to gain, MKL's packed copy (`packed_gemm.PackedWeight`). With a lower compute dtype each
    product rounds its result to that dtype before it is added to float32, exactly as the reference's
    `F.linear(...).to(float32)` under autocast."""

    def __init__(
        self,
        compute_dtype: torch.dtype,
        state_dtype: torch.dtype,
        device: torch.device,
        batch: int,
        widening_reader: bool = False,
    ):
        self.dtype = compute_dtype
        self.low = compute_dtype != state_dtype
        self.widening = self.low and widening_reader  # the kernel reading `product` widens it itself (Triton)
        self.packed = not self.low and packed_gemm.applies(device, compute_dtype)
        self.batch = batch

    def operand(self, L: torch.Tensor):
        """The right operand of a @ L^T for L (N, K) (a view such as W.t() is fine)."""
        L = L.detach().to(self.dtype)
        if self.packed and packed_gemm.worth_packing(L):
            return packed_gemm.PackedWeight(L, self.batch)
        return L.t().contiguous()

    def product(self, a: torch.Tensor, op, out: torch.Tensor) -> torch.Tensor:
        """a @ L^T: written into `out` and returned, or (packed) returned as a new tensor: callers that can read
        the product where it is (the C kernel) save a copy."""
        if isinstance(op, packed_gemm.PackedWeight):
            return op.product(a)
        if self.widening:
            return torch.mm(a.to(self.dtype), op)  # left in the compute dtype: the kernel widens it on load
        self.mm(a, op, out)
        return out

    def mm(self, a: torch.Tensor, op, out: torch.Tensor) -> None:
        if isinstance(op, packed_gemm.PackedWeight):
            out.copy_(op.product(a))
        elif self.low:
            out.copy_(torch.mm(a.to(self.dtype), op))
        else:
            torch.mm(a, op, out=out)

    def addmm(self, add: torch.Tensor, a: torch.Tensor, op, out: torch.Tensor) -> None:
        if isinstance(op, packed_gemm.PackedWeight):
            torch.add(add, op.product(a), out=out)
        elif self.low:
            torch.add(add, torch.mm(a.to(self.dtype), op), out=out)
        else:
            torch.addmm(add, a, op, out=out)

    def grad(self, a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """a @ b as a new tensor in the dtype of `like` (a weight gradient after the loop: one large product)."""
        return torch.mm(a.to(self.dtype), b.to(self.dtype)).to(like.dtype)


def _flat(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, v.shape[-1])  # (T, B, n) -> (T*B, n); a view also for a column slice of a (T, B, K) buffer


class MLSTMSegment(torch.autograd.Function):
    """One segment of any mLSTM form, forward and hand-written backward (see the module docstring).

    apply(spec, save, x, W_in, b_in, W_r, W_m, h0, c0, mask, w_I, w_F, w_O, W_P, b_h) -> y (T, B, P), h_T (B, P),
    c_T (B, H)
        x (T, B, I) the layer's input; W_in (K, I), b_in (K,) or None its hoisted projection (`_input_projection`
        of the reference: xp = W_in x + b_in, K = K_F + 4H); W_r (K_F, P); W_m (4H, H); h0 (B, P), c0 (B, H);
        mask (B, P) or None; w_I, w_F, w_O (H,) or None; W_P (P, H) or None; b_h (H,) (matlab) or None.
        save: keep what backward needs (False under no_grad: the scratch buffers are one step long).
    """

    @staticmethod
    def forward(ctx, spec, save, *tensors):
        with torch.autocast(tensors[0].device.type, enabled=False):
            return _forward_segment(ctx, spec, save, *tensors)

    @staticmethod
    @once_differentiable
    def backward(ctx, dY, dh_T, dc_T):
        with torch.autocast(dY.device.type, enabled=False):
            return (None, None) + _backward_segment(ctx, ctx.needs_input_grad[2:], dY, dh_T, dc_T)


# The input projection is part of the segment (not left to autograd) so that the (T, B, K) tensor xp and its
# gradient never leave it: with CUDA graphs they would otherwise be copied into and out of the graph's memory each
# step (`cuda_graph`), and under autocast the gradient cast to bf16 once more (the fused form has it in bf16 already).
def _project(spec, x, W_in, b_in, state_dtype, fused: bool):
    """xp = W_in x + b_in (T, B, K), as the reference's `_hoisted`, and the bias left for the kernels to add (or None).
    Under autocast the product runs in the compute dtype and the bias is added after widening (one kernel: the add
    promotes), or, fused, not here: the kernels add it as they load xp, which stays the bf16 product. Else one
    addmm, in the state dtype."""
    if spec.compute_dtype == state_dtype:
        return F.linear(x, W_in, b_in), None
    xp = F.linear(x.to(spec.compute_dtype), W_in.to(spec.compute_dtype))
    bias = b_in if b_in is not None else xp.new_zeros(xp.shape[-1], dtype=state_dtype)
    return (xp, bias) if fused else (torch.add(xp, bias), None)


def _forward_segment(ctx, spec, save, x, W_in, b_in, *rest):
    h0, mask, W_P = rest[2], rest[4], rest[8]  # rest: W_r, W_m, h0, c0, mask, w_I, w_F, w_O, W_P, b_h
    xp, bias = _project(spec, x, W_in, b_in, h0.dtype, _fused_io(spec, W_P, h0.dtype, mask))
    return _forward(ctx, spec, save, xp, *rest, keep=(x, W_in), xp_bias=bias)


def _backward_segment(ctx, need, dY, dh_T, dc_T):
    """need: needs_input_grad of (x, W_in, b_in, W_r, ...). The recurrence's backward, then the projection's."""
    dXP, DXP_lo, *grads = _backward(ctx, (any(need[:3]),) + tuple(need[3:]), dY, dh_T, dc_T)
    x, W_in = ctx.saved_tensors[-2:]
    low = ctx.spec.compute_dtype
    dXP_low = DXP_lo if DXP_lo is not None else dXP.to(low)  # (a no-op without autocast)
    dx = dW_in = db_in = None
    if need[0]:  # dx = dxp W_in, as F.linear's backward (then widened, as autocast's cast of x)
        dx = torch.matmul(dXP_low, W_in.to(low)).to(x.dtype)
    if need[1]:  # dW_in = Σ dxp^T x, one product as the other weight gradients
        dW_in = _products(ctx.spec, dXP, x.shape[1]).grad(_flat(dXP_low).t(), _flat(x), W_in)
    if need[2]:
        db_in = dXP.sum((0, 1))
    return (dx, dW_in, db_in, *grads)


# the eager segment, as the CUDA-graph wrapper captures it (cells.kernels.cuda_graph.GraphedSegment)
SEGMENT = SimpleNamespace(forward=_forward_segment, backward=_backward_segment)


def _forward(ctx, spec, save, xp, W_r, W_m, h0, c0, mask, w_I, w_F, w_O, W_P, b_h, keep=(), xp_bias=None):
    """xp_bias (fused only): xp is the product W_in x in the products' dtype, and the kernels add this bias (K,) to
    it as they load it (the same float32 sum as the reference's, in the same order, without writing xp in
    float32)."""
    T, B, K = xp.shape
    H, P, KF = W_m.shape[1], h0.shape[1], W_r.shape[0]
    seed, peep, clip, pclip = spec.form == "seed", spec.peepholes, spec.cell_clip, spec.proj_clip
    act, pm = _Activation(spec.activation), _products(spec, h0, B)
    op_r, op_m = pm.operand(W_r), pm.operand(W_m)  # right operands: h @ W_r^T (B, K_F), m @ W_m^T (B, 4H)
    op_P = pm.operand(W_P) if W_P is not None else None  # h @ W_P^T (B, P)

    S = T if save else 1  # steps kept in the per-step buffers (one scratch step when nothing is saved)

    def buf(width, steps=S, dtype=None):
        return h0.new_empty(steps, B, width, dtype=dtype)

    # fused (Triton kernels, products in a lower dtype, no projection): the kernels also write y and the products'
    # operands; m_t and h_t are kept in the products' dtype only (they are used only as product operands: the next
    # step's and dW_m = Σ dz^T m, dW_r = Σ dr^T h), and so is r_t in the paper and matlab forms (an unrounded product
    # in that dtype: exact)
    fused = xp_bias is not None
    low = pm.dtype if fused else None
    R = buf(KF, dtype=None if seed else low)  # r_t (seed: [a_t; b_t])
    M, G = buf(H, dtype=low), buf(4 * H)  # m_t, gates after their nonlinearity
    H_lo = buf(H, dtype=low) if fused else None  # h_t (y_t, after the mask) in the products' dtype
    C = buf(H, T if save else 2)  # c_t after the clip (two slots when not saving: c_{t-1} and c_t)
    CR = buf(H) if clip is not None else C  # c_t before the clip
    gated = spec.gated_output  # h = o act(c)

    def saved_activations():  # (the Triton kernels recompute these in the backward: not kept for them)
        AC = buf(H) if gated or (seed and peep) else None  # act(c_t); posted seed + peepholes: act(c_t o'_t)
        SO = buf(H) if seed and peep and not gated else None  # posted seed + peepholes: σ(o'_t)
        return AC, SO

    AC, SO = saved_activations() if not spec.pointwise.startswith("triton") else (None, None)
    Y = h0.new_empty(T, B, P)  # the output, also h_{t-1} of the next step
    # h before projection and mask: needed by dW_P, and by act' in matlab/seed when the mask hides it in y
    HR = buf(H) if W_P is not None or (mask is not None and not gated) else Y
    PR = buf(P) if pclip is not None else Y  # W_P h before the clip

    # per-step views, made once (indexing costs about as much as a small kernel)
    gates = (0, 2 * H, H, 3 * H) if seed else (H, 2 * H, 0, 3 * H)  # offsets of i, f, candidate, o in z
    r, m, g, c, cr, y, hr, pr = (_steps(v, T) for v in (R, M, G, C, CR, Y, HR, PR))
    kern = _kernel_call(
        spec,
        xp,
        h0.dtype,
        dict(R=R, M=M, G=G, C=C, CR=CR, AC=AC, SO=SO, HR=HR),
        dict(c0=c0, w_I=w_I, w_F=w_F, w_O=w_O, b_h=b_h),
        dict(H_lo=H_lo, Y=Y, mask=mask, bias=xp_bias) if fused else None,
    )
    if fused and kern is None:  # the PyTorch path after all (it takes R and M in the lower dtype as well): float32 xp
        xp, fused = torch.add(xp, xp_bias), False
    if kern is None and spec.pointwise.startswith("triton"):
        AC, SO = saved_activations()
    if kern is None:  # views of the hoisted parts and the gate slots for the PyTorch pointwise path
        xf, xz = _steps(xp[..., :KF], T), _steps(xp[..., KF:], T)
        gi, gf, gc, go = (_steps(G[..., a : a + H], T) for a in gates)
        if seed:
            g_sig = _steps(G.view(S, B, 2, 2 * H)[..., :H], T)  # i and f: one σ call; j and o stay linear
        else:
            g_sig = _steps(G[..., H : 3 * H] if peep else G[..., H:], T)  # σ(i), σ(f) [, σ(o)]
        slots = (gi, gf, gc, go, g_sig, _steps(AC, T), _steps(SO, T))

    if fused:  # four launches a step: products from H_lo and M, the kernels write y[t], H_lo[t] and M[t]
        h_lo, m_lo = h0.to(low), _steps(M, T)
        for t, h_t in enumerate(_steps(H_lo, T)):
            kern.fwd_product(t, torch.mm(h_lo, op_r))
            kern.fwd_cell(t, torch.mm(m_lo[t], op_m))
            h_lo = h_t
    else:
        for t in range(T):
            h_prev, c_prev = (h0, c0) if t == 0 else (y[t - 1], c[t - 1])
            if kern is not None:  # the C loops add the hoisted parts xp_F (seed) and xp_z to the products
                kern.fwd_product(t, pm.product(h_prev, op_r, r[t]))  # m_t from W_mh h_{t-1} | A_h h_{t-1}
                kern.fwd_cell(t, pm.product(m[t], op_m, g[t]))  # the pointwise math of _cell_step, from W_m m_t
            else:
                if seed:
                    pm.addmm(xf[t], h_prev, op_r, r[t])  # [a; b] = A_x x + a + A_h h_{t-1}       (B, 2H)
                    torch.mul(r[t][:, :H], r[t][:, H:], out=m[t])  # m = a ⊙ b                    (B, H)
                else:
                    pm.mm(h_prev, op_r, r[t])  # W_mh h_{t-1}                                  (B, H)
                    torch.mul(xf[t], r[t], out=m[t])  # m = (W_mx x) ⊙ (W_mh h_{t-1})
                pm.addmm(xz[t], m[t], op_m, g[t])  # z = W_x x (+ b) + W_m m                    (B, 4H)
                _cell_step(spec, act, t, c_prev, slots, cr, c, hr, w_I, w_F, w_O, b_h)
            if W_P is not None:  # h = clip(W_P h)
                pm.mm(hr[t], op_P, pr[t])
                if pclip is not None:
                    torch.clamp(pr[t], -pclip, pclip, out=y[t])
            if mask is not None:
                torch.mul(y[t] if W_P is not None else hr[t], mask, out=y[t])

    h_T, c_T = y[T - 1].clone(), c[T - 1].clone()
    if save:
        keep_c = CR.abs() <= clip if clip is not None and kern is None else None  # torch.clamp's gradient mask
        keep_p = PR.abs() <= pclip if pclip is not None else None
        ctx.spec = spec
        ctx.buffers = (
            R,
            M,
            G,
            C,
            CR if kern is not None else None,
            AC,
            SO,
            None if HR is Y else HR,
            keep_c,
            keep_p,
            H_lo if fused else None,
            xp_bias if fused else None,
        )
        ctx.save_for_backward(xp, W_r, W_m, h0, c0, mask, w_I, w_F, w_O, W_P, b_h, Y, *keep)
    return Y, h_T, c_T


def _cell_step(spec, act, t, c_prev, slots, cr, c, hr, w_I, w_F, w_O, b_h):
    """The pointwise math of step t with PyTorch ops, in place on the per-step views (what the C kernel fuses)."""
    seed, paper, peep, gated = spec.form == "seed", spec.form == "paper", spec.peepholes, spec.gated_output
    clip, fb = spec.cell_clip, spec.forget_bias
    gi, gf, gc, go, g_sig, ac, so = slots
    if peep:  # the input and forget gates see c_{t-1}
        gi[t].addcmul_(c_prev, w_I)
        gf[t].addcmul_(c_prev, w_F)
    if fb:
        gf[t].add_(fb)
    if paper:
        act.inplace(gc[t])  # act(ĥ); the matlab and seed candidates are linear
    g_sig[t].sigmoid_()
    torch.mul(gf[t], c_prev, out=cr[t])  # c = f ⊙ c_{t-1} + i ⊙ candidate
    cr[t].addcmul_(gi[t], gc[t])
    if clip is not None:
        torch.clamp(cr[t], -clip, clip, out=c[t])
    if seed and not gated:
        if peep:  # o' = o + w_O c;  h = σ(o') act(c o')
            go[t].addcmul_(c[t], w_O)
            torch.mul(c[t], go[t], out=ac[t])
            act.inplace(ac[t])
            torch.sigmoid(go[t], out=so[t])
            torch.mul(so[t], ac[t], out=hr[t])
        else:  # h = act(c o)
            torch.mul(c[t], go[t], out=hr[t])
            act.inplace(hr[t])
    else:
        if peep:  # o = σ(z_o + w_O c), c after the clip
            go[t].addcmul_(c[t], w_O).sigmoid_()
        elif seed:  # seed_output=gated: the paper's σ(i), σ(f) [, σ(o)] slice is not the seed's layout
            go[t].sigmoid_()
        if gated:  # h = o act(c)
            act.into(c[t], ac[t])
            torch.mul(go[t], ac[t], out=hr[t])
        else:  # h = act(o c + b_h)
            torch.addcmul(b_h, go[t], c[t], out=hr[t])
            act.inplace(hr[t])


def _products(spec, state: torch.Tensor, batch: int) -> _Products:
    return _Products(spec.compute_dtype, state.dtype, state.device, batch, spec.pointwise.startswith("triton"))


def _kernel_call(spec, xp, state_dtype, buffers: dict, tensors: dict, low: dict | None = None):
    """The fused kernels' view of this segment's buffers (`cpu_kernel.SegmentCall` or its Triton twin), or None for
    the PyTorch path (not asked for by the spec, or a tensor the kernels cannot address: another dtype, or not
    contiguous). low: the Triton kernels' fused input/output tensors (`TritonSegmentCall`), or None."""
    if spec.pointwise == "torch":
        return None
    lowered = {"R", "M"} if low is not None else set()  # fused: these (and xp) may be in the products' dtype
    used = [v for k, v in (*buffers.items(), *tensors.items()) if v is not None and k not in lowered]
    if any(v.dtype != state_dtype or not v.is_contiguous() for v in used) or not xp.is_contiguous():
        return None
    if low is None and xp.dtype != state_dtype:
        return None
    if spec.pointwise == "c":
        return cpu_kernel.SegmentCall(cpu_kernel.load(), xp.dtype, spec, xp, buffers, tensors)
    if any(v is not None and not v.is_contiguous() for v in (buffers["R"], buffers["M"])):
        return None
    if any(v is not None and v.stride(-1) != 1 for v in (low or {}).values()):  # (rows may be apart: DR_lo)
        return None
    return triton_kernel.TritonSegmentCall(
        spec, xp, buffers, tensors, low, interpret=spec.pointwise == "triton-interpret"
    )


def _fused_io(spec, W_P, state_dtype, mask) -> bool:
    """Whether the Triton kernels also do the layer's output, the mask, the products' operands and the input
    projection's bias (`TritonSegmentCall`'s low): a layer without projection whose products run in a lower dtype
    (autocast)."""
    return (
        spec.pointwise.startswith("triton")
        and W_P is None
        and spec.compute_dtype != state_dtype
        and (mask is None or mask.is_contiguous())
    )


def _steps(buffer: torch.Tensor | None, T: int) -> list:
    """T per-step views of a (S, B, n) buffer, cycling through its S slots (S = T, or 1-2 scratch slots)."""
    if buffer is None:
        return [None] * T
    views = buffer.unbind(0)
    return list(views) if len(views) == T else [views[t % len(views)] for t in range(T)]


def _backward(ctx, need, dY, dh_T, dc_T):
    """need: which of (xp, W_r, W_m, h0, c0, mask, w_I, w_F, w_O, W_P, b_h) need a gradient. Returns d xp, d xp in
    the products' dtype (fused; else None), and the gradients of the others."""
    spec = ctx.spec
    xp, W_r, W_m, h0, c0, mask, w_I, w_F, w_O, W_P, b_h, Y = ctx.saved_tensors[:12]
    R, M, G, C, CR, AC, SO, HR, keep_c, keep_p, H_lo, xp_bias = ctx.buffers
    T, B, K = xp.shape
    H, P, KF = W_m.shape[1], h0.shape[1], W_r.shape[0]
    seed, peep = spec.form == "seed", spec.peepholes
    act, pm = _Activation(spec.activation), _products(spec, h0, B)
    op_r, op_m = pm.operand(W_r.t()), pm.operand(W_m.t())  # right operands: dr @ W_r (B, P), dz @ W_m (B, H)
    op_P = pm.operand(W_P.t()) if W_P is not None else None  # dp @ W_P (B, H)
    XF = xp[..., :KF]
    HR = HR if HR is not None else Y  # (without W_P and mask, y is the h that act' needs)
    dY = dY.contiguous()

    dXP = h0.new_empty(T, B, K)  # d xp: [dF ; dZ], written step by step        (T, B, K)
    dF, dZ = dXP[..., :KF], dXP[..., KF:]
    # fused as the forward (see there): d xp is also kept in the products' dtype, and dr only there (paper, matlab):
    # the operands of the next products and of dW_m, dW_r, dW_in
    fused = H_lo is not None
    DXP_lo = h0.new_empty(T, B, K, dtype=pm.dtype) if fused else None  # [dF ; dZ] in the products' dtype
    DZ_lo = DXP_lo[..., KF:] if fused else None
    DR_lo = None if not fused else DXP_lo[..., :KF] if seed else h0.new_empty(T, B, KF, dtype=pm.dtype)
    # grad of r_t = W_r h_{t-1} (seed: r_t enters [a; b] additively, so it is d xp_F)
    dR = dF if seed else DR_lo if fused else h0.new_empty(T, B, KF)
    dPP = h0.new_empty(T, B, P) if W_P is not None else None  # grad of W_P h before the clip
    dU = h0.new_empty(T, B, H) if spec.form == "matlab" else None  # grad of o c + b_h (for db_h)
    dh = torch.add(dY[T - 1], dh_T)  # grad of h_t (output and recurrence)          (B, P)
    dc = dc_T.clone()  # grad of c_t; becomes that of c_{t-1} during the step            (B, H)
    tmp, dm = h0.new_empty(B, H), h0.new_empty(B, H)
    dh0 = None
    kern = None
    if CR is not None:  # the forward ran the fused kernels: so does the backward
        kern = _kernel_call(
            spec,
            xp,
            h0.dtype,
            dict(R=R, M=M, G=G, C=C, CR=CR, AC=AC, SO=SO, HR=HR),
            dict(
                c0=c0,
                w_I=w_I,
                w_F=w_F,
                w_O=w_O,
                b_h=b_h,
                dXP=dXP,
                dR=None if seed or fused else dR,
                dU=dU,
                dhr=tmp if W_P is not None else dh,
                dc=dc,
            ),
            dict(DXP_lo=DXP_lo, DR_lo=DR_lo, dY=dY, mask=mask, bias=xp_bias) if fused else None,
        )
        assert kern is not None, "the backward's buffers are those of the forward, which the kernel accepted"

    if fused:  # four launches a step: the grad of h from the last product and dY, products from DZ_lo and DR_lo
        dh_in, add_dy = dh, False  # at T-1: dY[T-1] + dh_T
        for t in range(T - 1, -1, -1):
            kern.bwd_cell(t, dh_in, add_dy)
            kern.bwd_product(t, torch.mm(DZ_lo[t], op_m))
            dh_in, add_dy = torch.mm(DR_lo[t], op_r), True  # W_r^T dr_t: the recurrent part of dh_{t-1}
        dh0 = dh_in.to(h0.dtype)
    else:
        for t in range(T - 1, -1, -1):
            d = dZ[t]
            if mask is not None:
                dh.mul_(mask)
            if W_P is not None:  # through h = clip(W_P h_raw)
                if keep_p is not None:
                    torch.mul(dh, keep_p[t], out=dPP[t])
                else:
                    dPP[t].copy_(dh)
                dhr = tmp
                pm.mm(dPP[t], op_P, dhr)
            else:
                dhr = dh
            if kern is not None:
                kern.bwd_cell(t)  # the pointwise backward below, in one C loop
            else:
                _cell_step_backward(
                    spec,
                    act,
                    t,
                    G[t],
                    C[t],
                    c0 if t == 0 else C[t - 1],
                    d,
                    dhr,
                    dc,
                    tmp,
                    AC,
                    SO,
                    HR,
                    dU,
                    keep_c,
                    w_I,
                    w_F,
                    w_O,
                )
            # the products: z = xp_z + W_m m, m from r = W_r h_{t-1}
            if kern is not None:
                kern.bwd_product(t, pm.product(d, op_m, dm))  # d xp_F, dr_t from the grad of m_t (B, H)
            else:
                pm.mm(d, op_m, dm)  # grad of m_t                                      (B, H)
                if seed:  # m = a ⊙ b, [a; b] = xp_F + r
                    torch.mul(dm, R[t][:, H:], out=dF[t][:, :H])
                    torch.mul(dm, R[t][:, :H], out=dF[t][:, H:])
                else:  # m = xp_F ⊙ r
                    torch.mul(dm, R[t], out=dF[t])
                    torch.mul(dm, XF[t], out=dR[t])
            if t > 0:
                pm.addmm(dY[t - 1], dR[t], op_r, dh)  # grad of h_{t-1}: its output grad + the recurrence
            else:
                dh0 = h0.new_empty(B, P)
                pm.mm(dR[0], op_r, dh0)

    dW_r = dW_m = dw_I = dw_F = dw_O = dW_P = db_h = None
    DRp, Hp, DZp = (DR_lo, H_lo, DZ_lo) if fused else (dR, Y, dZ)  # (their casts are no-ops: already that dtype)
    if need[1]:  # dW_r = Σ_t dr_t^T h_{t-1}
        dW_r = pm.grad(DRp[0].t(), h0, W_r)
        if T > 1:
            dW_r += pm.grad(_flat(DRp[1:]).t(), _flat(Hp[:-1]), W_r)
    if need[2]:
        dW_m = pm.grad(_flat(DZp).t(), _flat(M), W_m)  # Σ_t dz_t^T m_t
    if peep and any(need[6:9]):
        slots = (0, 2, 3) if seed else (1, 2, 3)  # i, f, o
        dz_i, dz_f, dz_o = (dZ[..., s * H : (s + 1) * H] for s in slots)
        C_prev = torch.cat([c0[None], C[:-1]])
        dw_I = (dz_i * C_prev).sum((0, 1)).to(w_I.dtype)
        dw_F = (dz_f * C_prev).sum((0, 1)).to(w_F.dtype)
        dw_O = (dz_o * C).sum((0, 1)).to(w_O.dtype)
    if W_P is not None and need[9]:
        dW_P = pm.grad(_flat(dPP).t(), _flat(HR), W_P)  # Σ_t dp_t^T h_raw_t
    if dU is not None and need[10]:
        db_h = dU.sum((0, 1)).to(b_h.dtype)
    return dXP, DXP_lo, dW_r, dW_m, dh0, dc, None, dw_I, dw_F, dw_O, dW_P, db_h


def _cell_step_backward(spec, act, t, g, c, c_prev, d, dhr, dc, tmp, AC, SO, HR, dU, keep_c, w_I, w_F, w_O):
    """The pointwise backward of step t with PyTorch ops: dz_t into d, and dc from that of c_t to that of c_{t-1}.
    tmp: a (B, H) scratch buffer (may be dhr itself, which is not read after tmp is first written)."""
    seed, paper, peep, gated = spec.form == "seed", spec.form == "paper", spec.peepholes, spec.gated_output
    B, H = c.shape
    if seed:
        gi, gc, gf, go = g.split(H, 1)
        di, dcand, df, do = d.split(H, 1)
    else:
        gc, gi, gf, go = g.split(H, 1)
        dcand, di, df, do = d.split(H, 1)
    # the output: dc += ∂h/∂c dhr, do = grad of the o pre-activation (after σ' where there is a σ)
    if seed and peep and not gated:  # h = σ(o') a, a = act(c o'), o' = o + w_O c
        torch.mul(dhr, AC[t], out=do)
        _sigmoid_backward(do, SO[t], grad_input=do)
        torch.mul(dhr, SO[t], out=tmp)
        act.backward(tmp, AC[t], tmp)  # grad of c o'
        do.addcmul_(tmp, c)
        dc.addcmul_(tmp, go)
        dc.addcmul_(do, w_O)
    elif seed and not gated:  # h = act(c o)
        act.backward(dhr, HR[t], tmp)
        torch.mul(tmp, c, out=do)
        dc.addcmul_(tmp, go)
    else:
        if gated:  # h = o act(c)
            torch.mul(dhr, AC[t], out=do)
            torch.mul(dhr, go, out=tmp)
            act.backward(tmp, AC[t], tmp)
            dc.add_(tmp)
        else:  # h = act(o c + b_h)
            act.backward(dhr, HR[t], dU[t])
            torch.mul(dU[t], c, out=do)
            dc.addcmul_(dU[t], go)
        if peep or seed:  # o = σ(z_o [+ w_O c]) (paper without peepholes: with i and f below)
            _sigmoid_backward(do, go, grad_input=do)
        if peep:
            dc.addcmul_(do, w_O)
    if keep_c is not None:
        dc.mul_(keep_c[t])
    # the cell update c = f c_{t-1} + i candidate
    torch.mul(dc, gc, out=di)
    torch.mul(dc, c_prev, out=df)
    torch.mul(dc, gi, out=dcand)
    dc.mul_(gf)  # now the grad of c_{t-1}
    if seed:
        gv, dv = g.view(B, 2, 2 * H)[:, :, :H], d.view(B, 2, 2 * H)[:, :, :H]  # i and f
        _sigmoid_backward(dv, gv, grad_input=dv)
    else:
        if paper:
            act.backward(dcand, gc, dcand)
        sl = slice(H, 3 * H) if peep else slice(H, 4 * H)  # (o is done above when peepholes)
        _sigmoid_backward(d[:, sl], g[:, sl], grad_input=d[:, sl])
    if peep:
        dc.addcmul_(di, w_I)
        dc.addcmul_(df, w_F)


def kernel_status(device: torch.device) -> dict:
    """For run metadata and bench rows: what the fast mLSTM uses on this device (building the C kernel now on CPU, so
    that a build failure is reported before training starts)."""
    return {
        "cpu_kernel": cpu_kernel.describe(device),  # fused C pointwise steps (CPU)
        "packed_gemm": packed_gemm.describe(device),  # per-step products on MKL's packed weights (CPU)
        "triton_kernel": triton_kernel.describe(device),  # fused Triton pointwise steps (CUDA)
        "cuda_graph": cuda_graph.describe(device),  # segments captured in CUDA graphs (CUDA)
    }


def _pointwise(device: torch.device, dtype: torch.dtype) -> str:
    """SegmentSpec.pointwise for this device and state dtype: the fused kernels where they apply, else PyTorch ops
    (MLSTM_TRITON=interpret takes precedence over the C kernel, so that the Triton kernels can be checked on a CPU)."""
    triton = triton_kernel.applies(device, dtype)
    if triton == "triton-interpret":
        return triton
    if cpu_kernel.applies(device, dtype) and cpu_kernel.load() is not None:
        return "c"
    return triton or "torch"


class _FastForward:
    """`forward` of the fast layers; everything else (parameters, init, paper weights, dropout) is the reference's."""

    def segment_spec(self, device_type: str) -> SegmentSpec:
        cfg, dtype = self.cfg, next(self.parameters()).dtype
        low = torch.is_autocast_enabled(device_type) and dtype != torch.float64  # autocast leaves float64 alone
        return SegmentSpec(
            form=cfg.form,
            activation=cfg.activation,
            peepholes=cfg.use_peepholes,
            forget_bias=float(cfg.forget_bias or 0.0),
            cell_clip=cfg.cell_clip,
            proj_clip=cfg.proj_clip,
            seed_output=cfg.seed_output,
            compute_dtype=torch.get_autocast_dtype(device_type) if low else dtype,
            pointwise=_pointwise(torch.device(device_type), dtype),
        )

    def forward(self, x: torch.Tensor, state=None):
        # the reference's own prologue: same state casts, weights, hoisted projection (autograd) and dropout mask
        h, c, w, x, mask = self._begin(x, state)
        W_r = w["A_h"] if self.cfg.form == "seed" else w["W_mh"]
        tensors = (
            x,
            *self._input_projection(w),
            W_r,
            w["W_m"],
            h,
            c,
            mask,
            w.get("w_I"),
            w.get("w_F"),
            w.get("w_O"),
            w.get("W_P"),
            w.get("b_h"),
        )
        save = torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in tensors)
        spec = self.segment_spec(x.device.type)
        graphs = self.segment_graphs(x.device)
        if graphs is not None:  # the same segment, captured once and replayed
            y, h, c = cuda_graph.GraphedSegment.apply(graphs, SEGMENT, spec, save, *tensors)
        else:
            y, h, c = MLSTMSegment.apply(spec, save, *tensors)
        return y, (h, c)  # (T, B, P), ((B, P), (B, H))

    def segment_graphs(self, device: torch.device) -> cuda_graph.SegmentGraphs | None:
        """This layer's captured segments, or None when segments run uncaptured: made on first use on CUDA
        (`cuda_graph.applies`), or attached beforehand (the tests attach ones with `cuda_graph.Rerun` on a CPU).
        An attribute outside the state_dict."""
        graphs = self.__dict__.get("_segment_graphs")
        if graphs is None:
            if not cuda_graph.applies(device):
                return None
            graphs = self.__dict__["_segment_graphs"] = cuda_graph.SegmentGraphs()
        return graphs if cuda_graph.mode() != "off" else None


class FastMatlabMultiplicativeLSTM(_FastForward, MatlabMultiplicativeLSTM):
    """The matlab form, impl=fast."""


class FastSeedMultiplicativeLSTM(_FastForward, SeedMultiplicativeLSTM):
    """The seed form, impl=fast."""


class FastMultiplicativeLSTM(_FastForward, MultiplicativeLSTM):
    """The paper form, impl=fast. As the one symbol `build_layer` asks for, `FastMultiplicativeLSTM(input_size, cfg)`
    builds the fast class of `cfg.form` (`FAST_MLSTM_FORMS`); each is a subclass of that form's reference class."""

    def __new__(cls, *args, **kwargs):
        cfg = args[1] if len(args) > 1 else kwargs.get("cfg")
        if cls is FastMultiplicativeLSTM and cfg is not None and cfg.form != "paper":
            return FAST_MLSTM_FORMS[cfg.form](*args, **kwargs)  # not an instance of cls: __init__ is not rerun
        return super().__new__(cls)


FAST_MLSTM_FORMS = {
    "paper": FastMultiplicativeLSTM,
    "matlab": FastMatlabMultiplicativeLSTM,
    "seed": FastSeedMultiplicativeLSTM,
}

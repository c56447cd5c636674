"""The Triton kernels of `triton_kernel` (see there). A module of its own: Triton resolves the helpers a kernel calls
among the module's globals, and `triton_kernel.kernels` loads this file once for the GPU and once for Triton's CPU
interpreter, which is chosen when a kernel is decorated. Each stage mirrors its C twin in csrc/mlstm_cpu_body.h.

Form numbers as in the C code: 0 paper, 1 matlab, 2 seed as posted, 3 seed with the gated output; ACT: 0 tanh,
1 relu, 2 identity. Slots of z: paper/matlab [ĥ; i; f; o], seed [i; j; f; o]. One program: BLOCK units of one batch
row b; every (B, n) operand has contiguous rows, z and d xp rows are K apart. The state is float32.

Unlike the C loops, the backward recomputes act(c) (and σ(o'), act(c o') of the posted seed form with peepholes) from
what it reads anyway, with the forward's own arithmetic, so the same values: the forward does not write AC and SO,
two (B, H) passes fewer each way.
"""

import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # (1 - e^{-2|x|}) / (1 + e^{-2|x|}) with the sign of x; near 0 its series, which keeps relative precision
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    x2 = x * x
    small = x + x * x2 * (
        -0.33333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.053968253968253968 + x2 * 0.021869488536155203))
    )
    return tl.where(a < 0.0625, small, big)


@triton.jit
def act(v, ACT: tl.constexpr):
    if ACT == 0:
        y = tanh(v)
    elif ACT == 1:
        y = tl.where(v < 0, 0.0, v)  # a NaN passes, as torch.relu
    else:
        y = v
    return y


@triton.jit
def act_back(grad, y, ACT: tl.constexpr):  # grad ⊙ act'(v) from y = act(v), as torch's backward kernels
    if ACT == 0:
        g = grad * (1.0 - y * y)
    elif ACT == 1:
        g = tl.where(y > 0, grad, 0.0)
    else:
        g = grad
    return g


@triton.jit
def sigmoid_back(grad, y):
    return grad * (1.0 - y) * y


@triton.jit
def to_low(x, dtype, BF16: tl.constexpr):
    """x in the products' dtype, rounded to nearest even as torch's .to() (for bfloat16 by hand: Triton's
    interpreter truncates; NaN kept apart, since the rounding carry would turn some NaNs into -0)."""
    if BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16  # shifts: no constant beyond int32
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def hoisted(xp, bias, k, ok, XB: tl.constexpr):
    """Units k of a row of xp in float32: with XB (fused) xp holds the bf16 product W_in x, and the bias is added
    here, the reference's float32 sum (widened product + b) in its order."""
    v = tl.load(xp + k, mask=ok).to(tl.float32)
    if XB:
        v = v + tl.load(bias + k, mask=ok)
    return v


@triton.jit
def fwd_product(
    xp, prod, r, m, bias, H, K, KF, SEED: tl.constexpr, XB: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr
):
    # r and m may be in the products' dtype (fused: BF16 when that is bfloat16)
    b = tl.program_id(0)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = k < H
    dt = tl.float32  # the state dtype (the kernels run for float32 state only)
    xb, pb, rb, mb = xp + b * K, prod + b * KF, r + b * KF, m + b * H
    if SEED:  # [a; b] = xp_F + A_h h_{t-1};  m = a ⊙ b
        a = hoisted(xb, bias, k, ok, XB) + tl.load(pb + k, mask=ok).to(dt)
        bb = hoisted(xb, bias, H + k, ok, XB) + tl.load(pb + H + k, mask=ok).to(dt)
        tl.store(rb + k, a, mask=ok)
        tl.store(rb + H + k, bb, mask=ok)
        mv = a * bb
    else:  # r = W_mh h_{t-1};  m = (W_mx x) ⊙ r
        rv = tl.load(pb + k, mask=ok).to(dt)
        tl.store(rb + k, rv.to(r.dtype.element_ty), mask=ok)  # (exact: rv is the product, in r's dtype or wider)
        mv = hoisted(xb, bias, k, ok, XB) * rv
    tl.store(mb + k, to_low(mv, m.dtype.element_ty, BF16), mask=ok)


@triton.jit
def fwd_cell(
    xz,
    prod,
    c_prev,
    g,
    cr,
    c,
    hr,
    w_I,
    w_F,
    w_O,
    b_h,
    y,
    mask,
    h_lo,
    bias_z,
    forget_bias,
    clip,
    H,
    K,
    FORM: tl.constexpr,
    ACT: tl.constexpr,
    PEEP: tl.constexpr,
    CLIP: tl.constexpr,
    ii: tl.constexpr,
    ci: tl.constexpr,
    OUT: tl.constexpr,
    MASK: tl.constexpr,
    STORE_HR: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # ii, ci: the slots of i and the candidate in z and dz (paper/matlab [ĥ; i; f; o], seed [i; j; f; o]).
    # OUT (fused): xz is the bf16 product and bias_z its bias (`hoisted`); also the layer's output y = h ⊙ mask
    # (MASK) and its copy in the products' dtype (h_lo, the next step's operand); h itself is stored in hr only when
    # STORE_HR (hr is not y).
    b = tl.program_id(0)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = k < H
    dt = tl.float32
    xb, pb, gb = xz + b * K, prod + b * 4 * H, g + b * 4 * H
    zi = hoisted(xb, bias_z, ii * H + k, ok, OUT) + tl.load(pb + ii * H + k, mask=ok).to(dt)
    zf = hoisted(xb, bias_z, 2 * H + k, ok, OUT) + tl.load(pb + 2 * H + k, mask=ok).to(dt)
    zc = hoisted(xb, bias_z, ci * H + k, ok, OUT) + tl.load(pb + ci * H + k, mask=ok).to(dt)
    zo = hoisted(xb, bias_z, 3 * H + k, ok, OUT) + tl.load(pb + 3 * H + k, mask=ok).to(dt)
    cp = tl.load(c_prev + b * H + k, mask=ok)
    if PEEP:  # the input and forget gates see c_{t-1}
        zi = zi + cp * tl.load(w_I + k, mask=ok)
        zf = zf + cp * tl.load(w_F + k, mask=ok)
    zf = zf + forget_bias
    if FORM == 0:
        cand = act(zc, ACT)
    else:  # the matlab and seed candidates are linear
        cand = zc
    si = sigmoid(zi)
    sf = sigmoid(zf)
    crv = sf * cp + si * cand  # c = f c_{t-1} + i candidate, then the clip (a NaN passes)
    cv = crv
    if CLIP:
        cv = tl.where(crv > clip, clip, tl.where(crv < -clip, -clip, crv))
    tl.store(gb + ii * H + k, si, mask=ok)
    tl.store(gb + 2 * H + k, sf, mask=ok)
    tl.store(gb + ci * H + k, cand, mask=ok)
    if CLIP:  # (without a clip cr is c)
        tl.store(cr + b * H + k, crv, mask=ok)
    tl.store(c + b * H + k, cv, mask=ok)
    if FORM == 2:
        if PEEP:  # o' = o + w_O c;  h = σ(o') act(c o')
            o2 = zo + cv * tl.load(w_O + k, mask=ok)
            a = act(cv * o2, ACT)
            so2 = sigmoid(o2)
            tl.store(gb + 3 * H + k, o2, mask=ok)
            hv = so2 * a
        else:  # h = act(c o), no σ on o
            tl.store(gb + 3 * H + k, zo, mask=ok)
            hv = act(cv * zo, ACT)
    else:
        if PEEP:  # o sees the clipped c
            zo = zo + cv * tl.load(w_O + k, mask=ok)
        o = sigmoid(zo)
        tl.store(gb + 3 * H + k, o, mask=ok)
        if FORM == 1:  # h = act(o c + b_h)
            hv = act(tl.load(b_h + k, mask=ok) + o * cv, ACT)
        else:  # h = o act(c)
            a = act(cv, ACT)
            hv = o * a
    if OUT:
        yv = hv
        if MASK:
            yv = hv * tl.load(mask + b * H + k, mask=ok)
        if STORE_HR:
            tl.store(hr + b * H + k, hv, mask=ok)
        tl.store(y + b * H + k, yv, mask=ok)
        tl.store(h_lo + b * H + k, to_low(yv, h_lo.dtype.element_ty, BF16), mask=ok)
    else:
        tl.store(hr + b * H + k, hv, mask=ok)


@triton.jit
def bwd_cell(
    g,
    cr,
    c,
    c_prev,
    hr,
    w_I,
    w_F,
    w_O,
    dhr,
    dc,
    dz,
    du,
    dh_in,
    dy,
    mask,
    dz_lo,
    clip,
    H,
    K,
    FORM: tl.constexpr,
    ACT: tl.constexpr,
    PEEP: tl.constexpr,
    CLIP: tl.constexpr,
    ii: tl.constexpr,
    ci: tl.constexpr,
    IN: tl.constexpr,
    ADD_DY: tl.constexpr,
    MASK: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # ii, ci: the slots of i and the candidate in z and dz (paper/matlab [ĥ; i; f; o], seed [i; j; f; o]).
    # IN (fused): the grad of h is (dy (ADD_DY) + dh_in) ⊙ mask (MASK), dh_in the product W_r^T dr of the step
    # after (any dtype), instead of dhr; dz is also written in the products' dtype (dz_lo, rows K apart).
    b = tl.program_id(0)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = k < H
    dt = g.dtype.element_ty
    gb, zb, row = g + b * 4 * H, dz + b * K, b * H + k
    if IN:
        d = tl.load(dh_in + row, mask=ok).to(dt)
        if ADD_DY:
            d = tl.load(dy + row, mask=ok) + d
        if MASK:
            d = d * tl.load(mask + row, mask=ok)
    else:
        d = tl.load(dhr + row, mask=ok)
    dcv = tl.load(dc + row, mask=ok)
    gi = tl.load(gb + ii * H + k, mask=ok)
    gf = tl.load(gb + 2 * H + k, mask=ok)
    gc = tl.load(gb + ci * H + k, mask=ok)
    go = tl.load(gb + 3 * H + k, mask=ok)
    cv = tl.load(c + row, mask=ok)
    if FORM == 2:
        if PEEP:  # h = σ(o') a, a = act(c o')
            a = act(cv * go, ACT)  # go is o' here: act(c o') and σ(o') as the forward computed them
            so2 = sigmoid(go)
            d_o = sigmoid_back(d * a, so2)
            tmp = act_back(d * so2, a, ACT)  # grad of c o'
            d_o = d_o + tmp * cv
            dcv = dcv + tmp * go
            dcv = dcv + d_o * tl.load(w_O + k, mask=ok)
        else:  # h = act(c o)
            tmp = act_back(d, tl.load(hr + row, mask=ok), ACT)
            d_o = tmp * cv
            dcv = dcv + tmp * go
    else:
        if FORM == 1:  # h = act(o c + b_h)
            u = act_back(d, tl.load(hr + row, mask=ok), ACT)
            tl.store(du + row, u, mask=ok)
            d_o = u * cv
            dcv = dcv + u * go
        else:  # h = o act(c)
            a = act(cv, ACT)
            d_o = d * a
            dcv = dcv + act_back(d * go, a, ACT)
        d_o = sigmoid_back(d_o, go)
        if PEEP:
            dcv = dcv + d_o * tl.load(w_O + k, mask=ok)
    if CLIP:  # torch.clamp's gradient: zero where c was clipped
        dcv = tl.where(tl.abs(tl.load(cr + row, mask=ok)) <= clip, dcv, 0.0)
    cp = tl.load(c_prev + row, mask=ok)
    di = sigmoid_back(dcv * gc, gi)  # c = f c_{t-1} + i candidate
    df = sigmoid_back(dcv * cp, gf)
    dcand = dcv * gi
    dc_prev = dcv * gf
    if FORM == 0:
        dcand = act_back(dcand, gc, ACT)
    if PEEP:
        dc_prev = dc_prev + di * tl.load(w_I + k, mask=ok)
        dc_prev = dc_prev + df * tl.load(w_F + k, mask=ok)
    tl.store(zb + ii * H + k, di, mask=ok)
    tl.store(zb + 2 * H + k, df, mask=ok)
    tl.store(zb + ci * H + k, dcand, mask=ok)
    tl.store(zb + 3 * H + k, d_o, mask=ok)
    tl.store(dc + row, dc_prev, mask=ok)
    if IN:
        lt = dz_lo.dtype.element_ty
        zl = dz_lo + b * K  # (rows K apart, as dz: the dz part of d xp in the products' dtype)
        tl.store(zl + ii * H + k, to_low(di, lt, BF16), mask=ok)
        tl.store(zl + 2 * H + k, to_low(df, lt, BF16), mask=ok)
        tl.store(zl + ci * H + k, to_low(dcand, lt, BF16), mask=ok)
        tl.store(zl + 3 * H + k, to_low(d_o, lt, BF16), mask=ok)


@triton.jit
def bwd_product(
    xp,
    r,
    dm,
    dF,
    dR,
    dF_lo,
    dr_lo,
    bias,
    H,
    K,
    KF,
    SEED: tl.constexpr,
    LO: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # LO (fused): xp is the bf16 product and bias its bias (`hoisted`); d xp_F is also written in the products'
    # dtype (dF_lo, rows K apart), and dr goes to dr_lo in that dtype (paper, matlab; the seed's dr is d xp_F
    # itself), not to dR; r may be in that dtype
    b = tl.program_id(0)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = k < H
    dt = tl.float32
    rb, fb, lb = r + b * KF, dF + b * K, dF_lo + b * K
    dmv = tl.load(dm + b * H + k, mask=ok).to(dt)
    if SEED:  # m = a ⊙ b:  d[a; b] = [dm ⊙ b; dm ⊙ a], which is also dr (r enters [a; b] additively)
        da = dmv * tl.load(rb + H + k, mask=ok).to(dt)
        db = dmv * tl.load(rb + k, mask=ok).to(dt)
        tl.store(fb + k, da, mask=ok)
        tl.store(fb + H + k, db, mask=ok)
        if LO:
            tl.store(lb + k, to_low(da, dF_lo.dtype.element_ty, BF16), mask=ok)
            tl.store(lb + H + k, to_low(db, dF_lo.dtype.element_ty, BF16), mask=ok)
    else:  # m = xp_F ⊙ r:  d xp_F = dm ⊙ r, dr = dm ⊙ xp_F
        df = dmv * tl.load(rb + k, mask=ok).to(dt)
        tl.store(fb + k, df, mask=ok)
        dr = dmv * hoisted(xp + b * K, bias, k, ok, LO)
        if LO:
            tl.store(lb + k, to_low(df, dF_lo.dtype.element_ty, BF16), mask=ok)
            tl.store(dr_lo + b * KF + k, to_low(dr, dr_lo.dtype.element_ty, BF16), mask=ok)
        else:
            tl.store(dR + b * KF + k, dr, mask=ok)

/* One precision of the fused steps; included by mlstm_cpu.c with `real` = float, then double (see there).
 * Each stage is a worker with the form, activation and peepholes as compile-time constants (always inlined into a
 * dispatcher), so that every inner loop is branch-free and vectorises. form: 0 paper, 1 matlab, 2 seed as posted,
 * 3 seed with the gated output (cell.seed_output=gated: h = σ(o) act(c), as the paper). Slots of z: paper/matlab
 * [ĥ; i; f; o], seed [i; j; f; o]; the arithmetic order follows the PyTorch path in fast_mlstm.py. */

static inline real *SUFFIX(at)(mlstm_buf b, int64_t t, int64_t step) { return (real *)b.p + (t % b.slots) * step; }

/* e^x: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor polynomial, 2^n put into the exponent bits. */
static inline real SUFFIX(exp_)(real x) {
    x = x > EXP_HI ? EXP_HI : x; /* comparisons, not fmin/fmax: a NaN passes through */
    x = x < EXP_LO ? EXP_LO : x;
    real t = x * R(1.4426950408889634074) + SHIFTER; /* round(x / ln2), held in the low bits of t */
    real n = t - SHIFTER;
    real r = x - n * LN2_HI - n * LN2_LO;
#if MANTISSA == 23 /* degree 7: truncation r^8/8! < 6e-9 */
    real p = R(1.0) + r * (R(1.0) + r * (R(0.5) + r * (R(1.6666666666666666e-1) + r * (R(4.1666666666666667e-2) +
             r * (R(8.3333333333333333e-3) + r * (R(1.3888888888888889e-3) + r * R(1.9841269841269841e-4)))))));
#else /* degree 13: truncation r^14/14! < 5e-18 */
    real p = 1.0 + r * (1.0 + r * (0.5 + r * (1.6666666666666666667e-1 + r * (4.1666666666666666667e-2 +
             r * (8.3333333333333333333e-3 + r * (1.3888888888888888889e-3 + r * (1.9841269841269841270e-4 +
             r * (2.4801587301587301587e-5 + r * (2.7557319223985890653e-6 + r * (2.7557319223985890653e-7 +
             r * (2.5052108385441718775e-8 + r * (2.0876756987868098979e-9 + r * 1.6059043836821614599e-10))))))))))));
#endif
    UINT bits;
    memcpy(&bits, &t, sizeof bits);
    bits = (bits + EXP_BIAS) << MANTISSA; /* the low bits of t are n: exponent field n + bias */
    real scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline real SUFFIX(sigmoid_)(real x) { return R(1.0) / (R(1.0) + SUFFIX(exp_)(-x)); }

/* tanh x = (1 - e^{-2|x|}) / (1 + e^{-2|x|}) with the sign of x; near 0 its series, which keeps relative precision */
static inline real SUFFIX(tanh_)(real x) {
    real a = x < 0 ? -x : x, x2 = x * x;
    real small = x + x * x2 * (R(-0.33333333333333333333) + x2 * (R(0.13333333333333333333) +
                 x2 * (R(-0.053968253968253968254) + x2 * R(0.021869488536155202822))));
    real e = SUFFIX(exp_)(R(-2.0) * a);
    real big = (R(1.0) - e) / (R(1.0) + e);
    big = x < 0 ? -big : big;
    return a < TANH_SMALL ? small : big;
}

/* cell.activation: 0 tanh, 1 relu, 2 identity; and grad ⊙ act'(v) from y = act(v), as torch's backward kernels */
static inline real SUFFIX(act_)(real v, const int act) {
    return act == 0 ? SUFFIX(tanh_)(v) : act == 1 ? (v < 0 ? R(0.0) : v) : v;
}

static inline real SUFFIX(act_back_)(real grad, real y, const int act) {
    return act == 0 ? grad * (R(1.0) - y * y) : act == 1 ? (y > 0 ? grad : R(0.0)) : grad;
}

static inline real SUFFIX(sigmoid_back_)(real grad, real y) { return grad * (R(1.0) - y) * y; }

/* m_t = xp_F ⊙ r_t with r_t = W_mh h_{t-1} (paper, matlab), or m_t = a_t ⊙ b_t with [a_t; b_t] = xp_F + r_t (seed,
 * xp_F = A_x x_t + a). The product arrives in `prod` (B, KF), which may be the slot R[t] itself or a separate tensor;
 * r_t (seed: [a_t; b_t]) is kept in R[t] for backward. */
void SUFFIX(mlstm_fwd_product)(const mlstm_segment *s, int64_t t, const real *prod) {
    const int64_t B = s->B, H = s->H, KF = s->KF, K = s->K;
    const real *xf = (const real *)s->xp + t * B * K;
    real *r = SUFFIX(at)(s->R, t, B * KF), *m = SUFFIX(at)(s->M, t, B * H);
#pragma omp parallel for if (B * H >= MLSTM_PARALLEL_MIN)
    for (int64_t b = 0; b < B; b++) {
        const real *xb = xf + b * K, *pb = prod + b * KF;
        real *rb = r + b * KF, *mb = m + b * H;
        if (s->form >= 2) {
#pragma omp simd
            for (int64_t k = 0; k < H; k++) {
                real a = xb[k] + pb[k], bb = xb[H + k] + pb[H + k];
                rb[k] = a, rb[H + k] = bb, mb[k] = a * bb;
            }
        } else {
#pragma omp simd
            for (int64_t k = 0; k < H; k++) {
                real rv = pb[k];
                rb[k] = rv, mb[k] = xb[k] * rv;
            }
        }
    }
}

/* gates, c_t and h_t (before projection and mask) from z_t = xp_z + W_m m_t and c_{t-1}, for rows [b0, b1). The
 * product W_m m_t arrives in `prod` (B, 4H), which may be the slot G[t] itself; xp_z is added here, and the gates are
 * written to G[t]. */
static inline __attribute__((always_inline)) void SUFFIX(fwd_cell)(const mlstm_segment *s, int64_t t, const real *prod,
                                                                    int64_t b0, int64_t b1, const int form,
                                                                    const int act, const int peep) {
    const int64_t B = s->B, H = s->H;
    const int64_t ii = form >= 2 ? 0 : H, ci = form >= 2 ? H : 0, fi = 2 * H, oi = 3 * H;
    const real fb = (real)s->forget_bias, clip = s->has_clip ? (real)s->clip : (real)INFINITY;
    const real *cp = t == 0 ? (const real *)s->c0 : SUFFIX(at)(s->C, t - 1, B * H);
    const real *wI = (const real *)s->w_I, *wF = (const real *)s->w_F, *wO = (const real *)s->w_O;
    const real *bh = (const real *)s->b_h, *XZ = (const real *)s->xp + t * B * s->K + s->KF;
    real *G = SUFFIX(at)(s->G, t, B * 4 * H), *CR = SUFFIX(at)(s->CR, t, B * H), *C = SUFFIX(at)(s->C, t, B * H);
    real *HR = SUFFIX(at)(s->HR, t, B * H);
    real *AC = s->AC.p ? SUFFIX(at)(s->AC, t, B * H) : 0, *SO = s->SO.p ? SUFFIX(at)(s->SO, t, B * H) : 0;
    for (int64_t b = b0; b < b1; b++) {
        real *g = G + b * 4 * H, *cr = CR + b * H, *c = C + b * H, *hr = HR + b * H;
        real *ac = AC ? AC + b * H : 0, *so = SO ? SO + b * H : 0;
        const real *cpb = cp + b * H, *xz = XZ + b * s->K, *p = prod + b * 4 * H;
#pragma omp simd
        for (int64_t k = 0; k < H; k++) {
            real zi = xz[ii + k] + p[ii + k], zf = xz[fi + k] + p[fi + k], zc = xz[ci + k] + p[ci + k];
            real zo = xz[oi + k] + p[oi + k], c_prev = cpb[k];
            if (peep) { /* the input and forget gates see c_{t-1} */
                zi = zi + c_prev * wI[k];
                zf = zf + c_prev * wF[k];
            }
            zf = zf + fb;
            real cand = form == 0 ? SUFFIX(act_)(zc, act) : zc; /* matlab and seed candidates are linear */
            real si = SUFFIX(sigmoid_)(zi), sf = SUFFIX(sigmoid_)(zf);
            real crv = sf * c_prev + si * cand; /* c = f c_{t-1} + i candidate, then the clip (NaN passes) */
            real cv = crv > clip ? clip : (crv < -clip ? -clip : crv);
            g[ii + k] = si, g[fi + k] = sf, g[ci + k] = cand;
            cr[k] = crv, c[k] = cv; /* cr and c are one buffer without a clip: the same value twice */
            if (form == 2) {
                if (peep) { /* o' = o + w_O c;  h = σ(o') act(c o') */
                    real o2 = zo + cv * wO[k], a = SUFFIX(act_)(cv * o2, act), so2 = SUFFIX(sigmoid_)(o2);
                    g[oi + k] = o2, ac[k] = a, so[k] = so2, hr[k] = so2 * a;
                } else { /* h = act(c o), no σ on o */
                    g[oi + k] = zo, hr[k] = SUFFIX(act_)(cv * zo, act);
                }
            } else {
                real o = SUFFIX(sigmoid_)(peep ? zo + cv * wO[k] : zo); /* o sees the clipped c */
                g[oi + k] = o;
                if (form == 0 || form == 3) { /* h = o act(c) */
                    real a = SUFFIX(act_)(cv, act);
                    ac[k] = a, hr[k] = o * a;
                } else { /* h = act(o c + b_h) */
                    hr[k] = SUFFIX(act_)(bh[k] + o * cv, act);
                }
            }
        }
    }
}

/* dz_t (into d xp) and the grad of c_{t-1} (dc, in place) from the grad of h_t before projection and mask (dhr) */
static inline __attribute__((always_inline)) void SUFFIX(bwd_cell)(const mlstm_segment *s, int64_t t, int64_t b0,
                                                                    int64_t b1, const int form, const int act,
                                                                    const int peep) {
    const int64_t B = s->B, H = s->H, K = s->K;
    const int64_t ii = form >= 2 ? 0 : H, ci = form >= 2 ? H : 0, fi = 2 * H, oi = 3 * H;
    const real clip = s->has_clip ? (real)s->clip : (real)INFINITY;
    const real *cp = t == 0 ? (const real *)s->c0 : SUFFIX(at)(s->C, t - 1, B * H);
    const real *wI = (const real *)s->w_I, *wF = (const real *)s->w_F, *wO = (const real *)s->w_O;
    const real *G = SUFFIX(at)(s->G, t, B * 4 * H), *CR = SUFFIX(at)(s->CR, t, B * H), *C = SUFFIX(at)(s->C, t, B * H);
    const real *HR = SUFFIX(at)(s->HR, t, B * H);
    const real *AC = s->AC.p ? SUFFIX(at)(s->AC, t, B * H) : 0, *SO = s->SO.p ? SUFFIX(at)(s->SO, t, B * H) : 0;
    const real *DHR = (const real *)s->dhr;
    real *DC = (real *)s->dc, *DZ = (real *)s->dXP + t * B * K + s->KF;
    real *DU = s->dU ? (real *)s->dU + t * B * H : 0;
    for (int64_t b = b0; b < b1; b++) {
        const real *g = G + b * 4 * H, *cr = CR + b * H, *c = C + b * H, *hr = HR + b * H, *cpb = cp + b * H;
        const real *ac = AC ? AC + b * H : 0, *so = SO ? SO + b * H : 0, *dhr = DHR + b * H;
        real *dc = DC + b * H, *dz = DZ + b * K, *du = DU ? DU + b * H : 0;
#pragma omp simd
        for (int64_t k = 0; k < H; k++) {
            real d = dhr[k], dcv = dc[k], gi = g[ii + k], gf = g[fi + k], gc = g[ci + k], go = g[oi + k], cv = c[k];
            real d_o;
            if (form == 2 && peep) { /* h = σ(o') a, a = act(c o') */
                real a = ac[k], so2 = so[k];
                d_o = SUFFIX(sigmoid_back_)(d * a, so2);
                real tmp = SUFFIX(act_back_)(d * so2, a, act); /* grad of c o' */
                d_o = d_o + tmp * cv;
                dcv = dcv + tmp * go;
                dcv = dcv + d_o * wO[k];
            } else if (form == 2) { /* h = act(c o) */
                real tmp = SUFFIX(act_back_)(d, hr[k], act);
                d_o = tmp * cv;
                dcv = dcv + tmp * go;
            } else {
                if (form == 0 || form == 3) { /* h = o act(c) */
                    d_o = d * ac[k];
                    dcv = dcv + SUFFIX(act_back_)(d * go, ac[k], act);
                } else { /* h = act(o c + b_h) */
                    real u = SUFFIX(act_back_)(d, hr[k], act);
                    du[k] = u;
                    d_o = u * cv;
                    dcv = dcv + u * go;
                }
                d_o = SUFFIX(sigmoid_back_)(d_o, go);
                if (peep) dcv = dcv + d_o * wO[k];
            }
            real ar = cr[k] < 0 ? -cr[k] : cr[k];
            dcv = dcv * (ar <= clip ? R(1.0) : R(0.0)); /* torch.clamp's gradient */
            real di = dcv * gc, df = dcv * cpb[k], dcand = dcv * gi, dc_prev = dcv * gf; /* c = f c_ + i cand */
            di = SUFFIX(sigmoid_back_)(di, gi);
            df = SUFFIX(sigmoid_back_)(df, gf);
            if (form == 0) dcand = SUFFIX(act_back_)(dcand, gc, act);
            if (peep) {
                dc_prev = dc_prev + di * wI[k];
                dc_prev = dc_prev + df * wF[k];
            }
            dz[ii + k] = di, dz[fi + k] = df, dz[ci + k] = dcand, dz[oi + k] = d_o;
            dc[k] = dc_prev;
        }
    }
}

/* d xp_F and dr_t from dm_t = W_m^T dz_t (B, H): paper/matlab d xp_F = dm ⊙ r, dr = dm ⊙ xp_F; seed d[a; b] =
 * [dm ⊙ b; dm ⊙ a] */
void SUFFIX(mlstm_bwd_product)(const mlstm_segment *s, int64_t t, const real *dm) {
    const int64_t B = s->B, H = s->H, KF = s->KF, K = s->K;
    const real *xf = (const real *)s->xp + t * B * K, *r = SUFFIX(at)(s->R, t, B * KF);
    real *dF = (real *)s->dXP + t * B * K, *dR = s->dR ? (real *)s->dR + t * B * KF : 0;
#pragma omp parallel for if (B * H >= MLSTM_PARALLEL_MIN)
    for (int64_t b = 0; b < B; b++) {
        const real *rb = r + b * KF, *xb = xf + b * K, *dmb = dm + b * H;
        real *dfb = dF + b * K;
        if (s->form >= 2) {
#pragma omp simd
            for (int64_t k = 0; k < H; k++) {
                dfb[k] = dmb[k] * rb[H + k];
                dfb[H + k] = dmb[k] * rb[k];
            }
        } else {
            real *drb = dR + b * KF;
#pragma omp simd
            for (int64_t k = 0; k < H; k++) {
                dfb[k] = dmb[k] * rb[k];
                drb[k] = dmb[k] * xb[k];
            }
        }
    }
}

/* dispatch to the worker compiled for this form, activation and peephole setting (24 constant instances); `call` is
 * a macro of (form, act, peep) that calls the worker. The cell stages open their parallel region here, around the
 * dispatch, and give each thread its rows: a `parallel for` inside a worker is outlined before the worker is inlined,
 * so form, act and peep would reach the loop as variables, and its branches would stop it vectorising. */
#define MLSTM_CASE(call, f, a)                                                                                        \
    case (f) * 6 + (a) * 2: call(f, a, 0); break;                                                                     \
    case (f) * 6 + (a) * 2 + 1: call(f, a, 1); break;
#define MLSTM_DISPATCH(call)                                                                                          \
    switch (s->form * 6 + s->act * 2 + (s->peep != 0)) {                                                              \
        MLSTM_CASE(call, 0, 0) MLSTM_CASE(call, 0, 1) MLSTM_CASE(call, 0, 2)                                          \
        MLSTM_CASE(call, 1, 0) MLSTM_CASE(call, 1, 1) MLSTM_CASE(call, 1, 2)                                          \
        MLSTM_CASE(call, 2, 0) MLSTM_CASE(call, 2, 1) MLSTM_CASE(call, 2, 2)                                          \
        MLSTM_CASE(call, 3, 0) MLSTM_CASE(call, 3, 1) MLSTM_CASE(call, 3, 2)                                          \
    }
#define MLSTM_FWD_CELL(f, a, p) SUFFIX(fwd_cell)(s, t, prod, b0, b1, f, a, p)
#define MLSTM_BWD_CELL(f, a, p) SUFFIX(bwd_cell)(s, t, b0, b1, f, a, p)

void SUFFIX(mlstm_fwd_cell)(const mlstm_segment *s, int64_t t, const real *prod) {
#pragma omp parallel if (s->B * s->H >= MLSTM_PARALLEL_MIN)
    {
        int64_t b0, b1;
        mlstm_rows(s->B, &b0, &b1);
        MLSTM_DISPATCH(MLSTM_FWD_CELL)
    }
}
void SUFFIX(mlstm_bwd_cell)(const mlstm_segment *s, int64_t t) {
#pragma omp parallel if (s->B * s->H >= MLSTM_PARALLEL_MIN)
    {
        int64_t b0, b1;
        mlstm_rows(s->B, &b0, &b1);
        MLSTM_DISPATCH(MLSTM_BWD_CELL)
    }
}
#undef MLSTM_FWD_CELL
#undef MLSTM_BWD_CELL
#undef MLSTM_CASE
#undef MLSTM_DISPATCH

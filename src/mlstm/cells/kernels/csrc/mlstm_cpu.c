/* Fused pointwise steps of the fast mLSTM layer on CPU (see mlstm/cells/cpu_kernel.py, which builds and loads this
 * file, and mlstm/cells/fast_mlstm.py, which calls it once or twice per time step between the matrix products).
 *
 * PyTorch runs the pointwise math of one step as about twenty small kernels; at B = 32 each costs microseconds of
 * dispatch and a pass over memory. Here each stage of a step is one C loop the compiler vectorises:
 *     forward   mlstm_fwd_product   m_t = xp_F ⊙ r_t  (seed: m_t = a_t ⊙ b_t, [a_t; b_t] = xp_F + r_t)
 *               mlstm_fwd_cell      gates, c_t, h_t from z_t and c_{t-1}   (every form and option of the layer)
 *     backward  mlstm_bwd_cell      dz_t and dc_{t-1} from dh_t, dc_t       (its exact derivative)
 *               mlstm_bwd_product   d xp_F and dr_t from dm_t
 * The three that follow a matrix product take a pointer to it (contiguous rows): the caller's output slot, or the new
 * tensor of a packed product (fast_mlstm._Products), so that no copy is needed.
 * The buffers, their layout and what each holds after the forward are those of the PyTorch path in fast_mlstm.py
 * (the C backward also reads c before its clip, CR, where PyTorch keeps a mask). No torch headers: it compiles in
 * seconds with any C99 compiler.
 *
 * Both precisions come from one body, mlstm_cpu_body.h, included twice with `real` = float and double. exp is a
 * vectorisable Cody-Waite range reduction with a Taylor polynomial (a few ulp; NaN propagates, so the trainer's
 * divergence guard still sees it); sigmoid and tanh are built from it. */

#include <math.h> /* INFINITY only: no libm function is called */
#include <stdint.h>
#include <string.h>

typedef struct {
    void *p;       /* first element of a (slots, B, width) contiguous buffer */
    int64_t slots; /* step t lives in slot t % slots (T when saved for backward, 1 or 2 as scratch) */
} mlstm_buf;

typedef struct {
    int64_t B, H, KF, K;        /* streams, cell units, factor width (H, seed 2H), row width of xp (KF + 4H) */
    int32_t form, act, peep;    /* form 0 paper, 1 matlab, 2 seed, 3 gated seed; act 0 tanh, 1 relu, 2 identity */
    int32_t has_clip;           /* clip c to ±clip */
    double forget_bias, clip;
    mlstm_buf R, M, G, C, CR, AC, SO, HR; /* widths KF, H, 4H, H, H, H, H, H (CR may be C; AC, SO may be unused) */
    void *xp;                   /* (T, B, K): [xp_F | xp_z] */
    void *c0, *w_I, *w_F, *w_O, *b_h; /* (B, H); (H,) each, or NULL */
    /* backward */
    void *dXP;                  /* (T, B, K): [d xp_F | dz], written step by step */
    void *dR;                   /* (T, B, KF) grad of r (paper, matlab); the seed writes d xp_F only */
    void *dU;                   /* (T, B, H) grad of o c + b_h (matlab), or NULL */
    void *dhr, *dc;             /* (B, H) each: grad of h before projection and mask; of c_t (in), c_{t-1} (out) */
} mlstm_segment;

#ifdef _OPENMP
#include <omp.h>
#endif

/* Below this many cells (B x H) a step runs on one thread: forking costs more than it saves. */
#define MLSTM_PARALLEL_MIN 8192

/* rows [b0, b1) of B for the calling thread of a parallel region (all of them without OpenMP) */
static inline void mlstm_rows(int64_t B, int64_t *b0, int64_t *b1) {
#ifdef _OPENMP
    int64_t n = omp_get_num_threads(), i = omp_get_thread_num();
#else
    int64_t n = 1, i = 0;
#endif
    *b0 = B * i / n, *b1 = B * (i + 1) / n;
}

#define real float
#define SUFFIX(name) name##_f32
#define UINT uint32_t
#define MANTISSA 23
#define EXP_BIAS 127
#define SHIFTER 12582912.0f      /* 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits */
#define EXP_HI 88.0f             /* exp(88) < FLT_MAX, and 2^n stays a normal number over [EXP_LO, EXP_HI] */
#define EXP_LO -87.0f
#define LN2_HI 0.693359375f      /* ln 2 = LN2_HI + LN2_LO, LN2_HI with few bits so that n LN2_HI is exact */
#define LN2_LO -2.12194440e-4f
#define TANH_SMALL 0.0625f
#define R(v) v##f
#include "mlstm_cpu_body.h"
#undef real
#undef SUFFIX
#undef UINT
#undef MANTISSA
#undef EXP_BIAS
#undef SHIFTER
#undef EXP_HI
#undef EXP_LO
#undef LN2_HI
#undef LN2_LO
#undef TANH_SMALL
#undef R

#define real double
#define SUFFIX(name) name##_f64
#define UINT uint64_t
#define MANTISSA 52
#define EXP_BIAS 1023
#define SHIFTER 6755399441055744.0 /* 1.5 * 2^52 */
#define EXP_HI 709.0
#define EXP_LO -708.0
#define LN2_HI 6.93147180369123816490e-01
#define LN2_LO 1.90821492927058770002e-10
#define TANH_SMALL 0.0625
#define R(v) v
#include "mlstm_cpu_body.h"

/* The struct layout, checked by the loader against its ctypes mirror. */
int64_t mlstm_segment_size(void) { return (int64_t)sizeof(mlstm_segment); }

/* Flush subnormal floats to zero (MXCSR FTZ and DAZ) on every thread of the OpenMP team, or stop flushing: 1 for
 * done, 0 where the CPU has no MXCSR. Why here: torch.set_flush_denormal sets the calling thread alone, and PyTorch's
 * intra-op workers are this same libgomp's threads (threads created later inherit the creator's setting, but the pool
 * usually exists by the time a run sets its flags). The team is omp_get_max_threads() wide, what torch.set_num_threads
 * set, so each of its threads runs this once. */
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define MLSTM_MXCSR_FLUSH 0x8040u /* FTZ (bit 15): subnormal results become 0; DAZ (bit 6): subnormal inputs read as 0 */
static void mlstm_set_mxcsr_flush(int32_t on) {
    unsigned csr = _mm_getcsr();
    _mm_setcsr(on ? (csr | MLSTM_MXCSR_FLUSH) : (csr & ~MLSTM_MXCSR_FLUSH));
}
int32_t mlstm_set_flush_denormal(int32_t on) {
#ifdef _OPENMP
#pragma omp parallel
#endif
    mlstm_set_mxcsr_flush(on);
    mlstm_set_mxcsr_flush(on); /* the calling thread, also when it is not in the team (no OpenMP) */
    return 1;
}
#else
int32_t mlstm_set_flush_denormal(int32_t on) { (void)on; return 0; }
#endif

/* 1 when built with OpenMP (rows split over threads), for the run metadata */
int32_t mlstm_threaded(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

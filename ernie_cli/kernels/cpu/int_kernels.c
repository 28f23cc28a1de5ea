/* Matrix-vector products for x86 CPUs with AVX-512 or AVX2: int4/int8 weights by integer dot
 * products, bf16 weights by a float32 GEMV, reading the disk layout (ernie_cli.quant.formats) as it is.
 *
 * Why: decoding one token reads every active weight once, so a product is as fast as it reads.
 * torch's batch-1 int kernels and oneDNN's M=1 bf16 matmul read at a fraction of the DRAM rate.
 *
 * This file is the driver: the activations' quantization and layouts, the threads, the loops over
 * rows, tokens and experts, and the exported functions. The instructions that touch the weights
 * are in one header per instruction set, chosen by the compiler's target (native.FEATURE_SETS):
 *   isa_avx512.h: AVX-512 VNNI (VPDPBUSD) for int4/int8, AVX512_BF16 (VDPBF16PS) for bf16 where
 *                 the CPU has it;
 *   isa_avx2.h:   AVX2's VPMADDUBSW + VPMADDWD for int4/int8 (as llama.cpp's AVX2 paths), bf16 as
 *                 floats by a 16-bit shift.
 * Both give the same exported functions, so native.py does not care which was built.
 *
 * int8/int4: like llama.cpp's Q4_0 x Q8_0 dot product, the activations are quantized once per call
 * to int8 per block of 64 (one scale per block), so that a few instructions multiply and add 64
 * weight codes by 64 activation codes; the weights never become floats.
 *
 * int4 (group size a multiple of 64): W = (q - 8) * s + z per group, so
 *     sum_k W_k x_k ~= sum_b s_g d_b (<q, xq>_b - 8 sum(xq_b)) + z_g sum(x_b)
 * over the 64-blocks b of each group g (d_b: the scale of the quantized activations). The offset of
 * the codes is removed with the quantized sum, so that it cancels exactly; the zero multiplies the
 * exact float sum. The disk layout keeps column 2j in the low nibble and 2j+1 in the high one, so a
 * shift and a mask give the even and the odd columns of a run of bytes; the activations are stored
 * in that order once per call (see the layouts below), and no load-time repacking is needed (the
 * weights stay memory-mapped).
 *
 * One token (decode): one row at a time, read PREFETCH bytes ahead; threads split every matrix by
 * output rows. Several tokens (up to native.PREFILL_TOKENS): one row at a time against up
 * to MAX_TOKENS tokens, each weight block expanded once for all of them.
 *
 * Threads: OpenMP, as many as ernie_set_threads says (torch's thread count: where torch bundles its
 * own OpenMP runtime under another name, ours would not see torch's setting). A row's sum never
 * depends on the thread count.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64
#define MAX_TOKENS 4 /* tokens computed together: each weight block is expanded once for all */
#define MAX_BLOCKS 1024 /* K <= 65536 */
#ifndef PREFETCH
/* Bytes ahead in the weight stream to prefetch (several tokens): rows are short (1-1.3 KB), so the
 * hardware streamers alone left half the DRAM bandwidth unused (11-13 GB/s against 17-21 GB/s). */
#define PREFETCH 4096
#endif

/* Layout of the quantized activations: as x (int8), [32 even | 32 odd] per 64 columns (int4),
 * [64 even | 64 odd] per 128 columns (int4, one token, where the ISA reads 64 bytes of codes at a
 * time: ONE_TOKEN_INT4_LAYOUT). */
enum { PLAIN = 0, PAIRS64 = 1, PAIRS128 = 2 };

/* Per token, what the ISA's kernels take from the activations (each uses the fields it needs). */
typedef struct {
    int8_t *q;     /* [M, K] activation codes, in one of the layouts above */
    float *d;      /* [M, K/64] block scales */
    float *sum;    /* [M, K/64] float sums of x per block (int4) */
    float *qsum;   /* [M, K/64] sums of xq per block (int4) */
    float *dq;     /* [M, K/64] 128 * d_b * sum(xq_b) */
    float *m8dq;   /* [M, K/64 + 16] -8 * d_b * sum(xq_b), zero past the end (AVX-512 int4, one token) */
    float *corr;   /* [M] 128 * sum_b d_b * sum(xq_b) (AVX-512 int8: the weights' sign bit flipped) */
} Acts;

static int threads = 0; /* 0: OpenMP's default */

void ernie_set_threads(int n) { threads = n; }

static inline int team(void) { return threads > 0 ? threads : omp_get_max_threads(); }

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float -> bfloat16, rounded to nearest even (as torch rounds). */
static inline uint16_t float_to_bf16(float v) {
    uint32_t bits;
    memcpy(&bits, &v, 4);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* One output element, as float or as bfloat16. */
static inline void store_out(void *out, int bf16, int64_t at, float v) {
    if (bf16)
        ((uint16_t *)out)[at] = float_to_bf16(v);
    else
        ((float *)out)[at] = v;
}

/* A macro: as a static function without side effects GCC deletes its calls. PREFETCH_HINT, the cache
 * level, is each instruction set's header's choice. */
#define prefetch_ahead(at) _mm_prefetch((const char *)(at) + PREFETCH, PREFETCH_HINT)

/* Each header defines, with the same signatures:
 *   ONE_TOKEN_INT4_LAYOUT, and HAVE_BF16_GEMV where it has a bf16 GEMV;
 *   quantize_block: 64 values of x -> int8 codes ([32 even | 32 odd] or plain), d, float sum, code sum;
 *   q4_dot, q8_dot, bf16_dot: one row against one token, the finished sum (q8: before the row scale);
 *   q4_row, q8_row: one row against mt tokens, stored;
 *   dequant_row4, dequant_row8: one row to floats. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include "isa_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__)
#include "isa_avx2.h"
#else
#error "int_kernels.c needs AVX-512 VNNI or AVX2 with FMA (native.FEATURE_SETS gives the flags)"
#endif

/* x [M, K] float or bfloat16 -> int8 codes per 64-block with one scale each (amax / 127), plus the
 * block's float sum and code sum, the codes placed as `layout` says. */
static void quantize_acts(const void *x, int bf16, int64_t m_count, int64_t k, int layout, Acts *a) {
    const int64_t blocks = k / BLOCK;
#pragma omp parallel for schedule(static) num_threads(team()) if (m_count * k >= (1 << 16))
    for (int64_t mb = 0; mb < m_count * blocks; mb++) {
        const int64_t m = mb / blocks, b = mb % blocks;
        int8_t codes[BLOCK];
        float d, sum;
        const int32_t qs = quantize_block(x, bf16, m * k + b * BLOCK, layout != PLAIN, codes, &d, &sum);
        int8_t *qm = a->q + m * k;
        if (layout == PLAIN) {
            memcpy(qm + b * BLOCK, codes, BLOCK);
        } else {
            /* PAIRS128: block 2c+h of a full chunk c: evens at 128c + 32h, odds 64 further; the
             * last block of an odd count is a chunk of its own, like PAIRS64 */
            const int64_t c = b / 2, h = b % 2, half = (layout == PAIRS128 && (c + 1) * 128 <= k) ? 64 : 32;
            const int64_t even = layout == PAIRS128 ? c * 128 + h * 32 : b * BLOCK;
            memcpy(qm + even, codes, 32);
            memcpy(qm + even + half, codes + 32, 32);
        }
        a->d[mb] = d;
        a->sum[mb] = sum;
        a->qsum[mb] = (float)qs;
        a->dq[mb] = 128.0f * d * (float)qs;
    }
    for (int64_t m = 0; m < m_count; m++) {
        float corr = 0.0f;
        for (int64_t b = 0; b < blocks; b++) corr += a->dq[m * blocks + b];
        a->corr[m] = corr;
    }
    if (a->m8dq) {
        for (int64_t b = 0; b < blocks; b++) a->m8dq[b] = -a->dq[b] / 16.0f;
        for (int64_t b = blocks; b < blocks + 16; b++) a->m8dq[b] = 0.0f;
    }
}

static int alloc_acts(Acts *a, int64_t m_count, int64_t k) {
    int64_t blocks = k / BLOCK;
    /* padded so that the one-token kernels may read a whole 16 blocks past the end */
    int64_t padded = m_count * blocks + 16;
    a->q = aligned_alloc(64, (size_t)((m_count * k + 63) / 64 * 64 + 64));
    a->d = calloc((size_t)padded, sizeof(float));
    a->sum = calloc((size_t)padded, sizeof(float));
    a->qsum = malloc(sizeof(float) * padded);
    a->dq = malloc(sizeof(float) * padded);
    a->m8dq = m_count == 1 ? malloc(sizeof(float) * padded) : NULL;
    a->corr = malloc(sizeof(float) * m_count);
    return a->q && a->d && a->sum && a->qsum && a->dq && a->corr && (m_count != 1 || a->m8dq);
}

static void free_acts(Acts *a) {
    free(a->q);
    free(a->d);
    free(a->sum);
    free(a->qsum);
    free(a->dq);
    free(a->m8dq);
    free(a->corr);
}

/* ---- one token -------------------------------------------------------------------------------------
 *
 * One output row at a time: each thread then reads one sequential stream, prefetched PREFETCH bytes
 * ahead. Computing four rows together (the activations loaded once for all) read 7-25% slower
 * (docs/performance.md). */

/* One call of a one-token kernel: P problems (selected experts), each [N, K] @ x_p. */
typedef struct {
    int bits; /* 4, 8, or 16 (bf16 weights) */
    const void *w;
    const uint16_t *scales, *zeros;
    const int64_t *experts;
    int64_t p_count, n, k, group, row_bytes, groups;
    const Acts *acts;   /* one per problem where the inputs differ, else one */
    const uint16_t *x;  /* bf16 weights: the bf16 inputs */
    int64_t x_stride;   /* elements between the problems' inputs; 0: one shared input */
    void *out;
    int out_bf16;
} Gemv;

/* Rows [begin, end) of problem p. */
static void gemv_rows(const Gemv *g, int64_t p, int64_t begin, int64_t end) {
    const int64_t e = g->experts ? g->experts[p] : 0;
    const Acts *a = g->acts ? &g->acts[g->x_stride ? p : 0] : NULL;
    for (int64_t row = begin; row < end; row++) {
        const int64_t at = e * g->n + row;
        const uint8_t *w = (const uint8_t *)g->w + at * g->row_bytes;
        float y = 0.0f;
        if (g->bits == 4) {
            y = q4_dot(w, g->scales + at * g->groups, g->zeros + at * g->groups, g->k, g->group, a);
        } else if (g->bits == 8) {
            y = bf16_to_float(g->scales[at]) * q8_dot((const int8_t *)w, g->k, a);
        } else {
#ifdef HAVE_BF16_GEMV
            y = bf16_dot((const uint16_t *)w, g->k, g->x + (g->x_stride ? p * g->x_stride : 0));
#endif
        }
        store_out(g->out, g->out_bf16, p * g->n + row, y);
    }
}

static void gemv(const Gemv *g) {
    const int nt = g->p_count * g->n * g->row_bytes >= (1 << 16) ? team() : 1;
#pragma omp parallel num_threads(nt)
    {
        /* each thread its share of every matrix's rows (contiguous runs over all matrices read as fast) */
        const int64_t t = omp_get_thread_num(), count = omp_get_num_threads(), n = g->n;
        for (int64_t p = 0; p < g->p_count; p++) gemv_rows(g, p, n * t / count, n * (t + 1) / count);
    }
}

/* ---- several tokens --------------------------------------------------------------------------------- */

#define DISPATCH(call)       \
    switch (mt) {            \
    case 1: call(1); break;  \
    case 2: call(2); break;  \
    case 3: call(3); break;  \
    default: call(4); break; \
    }

/* out[p] [M, N] = x[p] [M, K] @ W[e_p].T for p < P; x and out float32 or bfloat16 (the flags).
 *
 * w: uint8 codes [E, N, K/2] (int4) or int8 [E, N, K]; scales bf16 [E, N, K/group] (int4) or [E, N]
 * (int8); zeros bf16 like the int4 scales. experts: P indices into the stack (NULL: P = 1, E = 1).
 * x_stride: elements between the problems' inputs (0: one input shared by all). Returns 0, or -1
 * when out of memory. K must be a multiple of 64 and, for int4, of the group size.
 */
static int matmul(int bits, const void *w, const uint16_t *scales, const uint16_t *zeros, const int64_t *experts,
                  int64_t p_count, const void *x, int x_bf16, int64_t x_stride, void *out, int out_bf16,
                  int64_t m_count, int64_t n, int64_t k, int64_t group) {
    int64_t distinct = x_stride ? p_count : 1;
    Acts *acts = calloc((size_t)distinct, sizeof(Acts));
    if (!acts) return -1;
    const int layout = bits == 8 ? PLAIN : m_count == 1 ? ONE_TOKEN_INT4_LAYOUT : PAIRS64;
    int ok = 1;
    for (int64_t i = 0; i < distinct && ok; i++) {
        ok = alloc_acts(&acts[i], m_count, k);
        const void *xi = (const char *)x + i * x_stride * (x_bf16 ? 2 : 4);
        if (ok) quantize_acts(xi, x_bf16, m_count, k, layout, &acts[i]);
    }
    int64_t row_bytes = bits == 4 ? k / 2 : k;
    int64_t groups = bits == 4 ? k / group : 1;
    if (ok && m_count == 1) {
        const Gemv g = {bits, w, scales, zeros, experts, p_count, n, k, group, row_bytes, groups, acts, NULL, x_stride, out, out_bf16};
        gemv(&g);
    } else if (ok) {
        int64_t total = p_count * n;
#pragma omp parallel for schedule(static) num_threads(team())
        for (int64_t i = 0; i < total; i++) {
            int64_t p = i / n, row = i % n;
            int64_t e = experts ? experts[p] : 0;
            const Acts *a = &acts[x_stride ? p : 0];
            void *o = (char *)out + p * m_count * n * (out_bf16 ? 2 : 4);
            int64_t at = e * n + row;
            for (int64_t m0 = 0; m0 < m_count; m0 += MAX_TOKENS) {
                int mt = (int)(m_count - m0 < MAX_TOKENS ? m_count - m0 : MAX_TOKENS);
                if (bits == 4) {
#define Q4(MT) q4_row(wb, scales + at * groups, zeros + at * groups, k, group, a, m0, MT, o, out_bf16, n, row)
                    const uint8_t *wb = (const uint8_t *)w + at * row_bytes;
                    DISPATCH(Q4)
                } else {
#define Q8(MT) q8_row(wb, sc, k, a, m0, MT, o, out_bf16, n, row)
                    const int8_t *wb = (const int8_t *)w + at * row_bytes;
                    const float sc = bf16_to_float(scales[at]);
                    DISPATCH(Q8)
                }
            }
        }
    }
    for (int64_t i = 0; i < distinct; i++) free_acts(&acts[i]);
    free(acts);
    return ok ? 0 : -1;
}

int ernie_q4_matmul(const uint8_t *w, const uint16_t *scales, const uint16_t *zeros, const int64_t *experts,
                    int64_t p_count, const void *x, int x_bf16, int64_t x_stride, void *out, int out_bf16,
                    int64_t m_count, int64_t n, int64_t k, int64_t group) {
    return matmul(4, w, scales, zeros, experts, p_count, x, x_bf16, x_stride, out, out_bf16, m_count, n, k, group);
}

int ernie_q8_matmul(const int8_t *w, const uint16_t *scales, const int64_t *experts, int64_t p_count, const void *x,
                    int x_bf16, int64_t x_stride, void *out, int out_bf16, int64_t m_count, int64_t n, int64_t k) {
    return matmul(8, w, scales, NULL, experts, p_count, x, x_bf16, x_stride, out, out_bf16, m_count, n, k, BLOCK);
}

/* Whether this build has a bf16 GEMV: AVX2 builds always, AVX-512 builds where the CPU and the
 * compiler both support AVX512_BF16. */
int ernie_has_bf16(void) {
#ifdef HAVE_BF16_GEMV
    return 1;
#else
    return 0;
#endif
}

/* One token, bf16 weights: out[p] [N] = W[e_p] [N, K] @ x[p] [K] for p < P, x bf16, out float32 or
 * bf16. Arguments as in matmul; any K. Returns 0, or -1 where the build has no bf16 GEMV. */
int ernie_bf16_gemv(const uint16_t *w, const int64_t *experts, int64_t p_count, const uint16_t *x, int64_t x_stride,
                    void *out, int out_bf16, int64_t n, int64_t k) {
    if (!ernie_has_bf16()) return -1;
    const Gemv g = {16, w, NULL, NULL, experts, p_count, n, k, 0, 2 * k, 0, NULL, x, x_stride, out, out_bf16};
    gemv(&g);
    return 0;
}

/* ---- whole rows to floats, for prefill ------------------------------------------------------------
 *
 * Many tokens at once make a product compute-bound, and there the float matmul (bf16 on AMX tiles
 * through oneDNN, where the CPU has them) beats the integer dot products above several times over.
 * So prefill expands a weight to floats (the ISA's dequant rows), then calls torch. Same arithmetic
 * as formats.dequantize: (q - 8) * s + z (int4) or q * s (int8) in float32, separately rounded (no
 * FMA, hence fp-contract=off there), then to bf16 by round-to-nearest-even where asked. */

/* Expert `expert` of a stack (0 for a plain matrix) -> out [N, K], float32 or bf16. */
void ernie_dequantize(int bits, const void *w, const uint16_t *scales, const uint16_t *zeros, int64_t expert,
                      int64_t n, int64_t k, int64_t group, void *out, int out_bf16) {
    int64_t row_bytes = bits == 4 ? k / 2 : k;
    int64_t groups = bits == 4 ? k / group : 1;
#pragma omp parallel for schedule(static) num_threads(team())
    for (int64_t r = 0; r < n; r++) {
        int64_t at = expert * n + r;
        void *o = (char *)out + r * k * (out_bf16 ? 2 : 4);
        if (bits == 4)
            dequant_row4((const uint8_t *)w + at * row_bytes, scales + at * groups, zeros + at * groups, k, group, o, out_bf16);
        else
            dequant_row8((const int8_t *)w + at * row_bytes, bf16_to_float(scales[at]), k, o, out_bf16);
    }
}

/* ---- one token's small operations: RMSNorm, RoPE with attention, the router ----------------------
 *
 * Why: around the products, a bf16 decode step on the CPU spent about a millisecond a layer in torch
 * calls (dispatch and temporaries for a few thousand numbers each: two norms, RoPE on q and k, the
 * cache write, the attention, the router's softmax and top-k). One call each here. Plain C that the
 * compiler vectorizes, in float32 with double sums where torch sums many terms; bf16 results rounded
 * to nearest even as torch rounds them. */

/* sum_i a[i] * b[i] in float32, b in bf16: a score of the attention, a logit of the router. */
static inline float dot_bf16(const float *a, const uint16_t *b, int64_t n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; i++) sum += a[i] * bf16_to_float(b[i]);
    return sum;
}

/* rows x n bf16 -> out, transformers' order: h = x * rsqrt(mean(x^2) + eps) in float32, rounded to
 * bf16, then times the bf16 weight and rounded again. */
void ernie_rms_norm_bf16(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows, int64_t n, float eps) {
#pragma omp parallel for schedule(static) num_threads(rows > 1 ? team() : 1)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * n;
        double ss = 0.0;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; i++) {
            float h = bf16_to_float(xr[i]);
            ss += (double)(h * h);
        }
        float inv = 1.0f / sqrtf((float)(ss / (double)n) + eps);
        uint16_t *o = out + r * n;
        for (int64_t i = 0; i < n; i++) {
            float h = bf16_to_float(float_to_bf16(bf16_to_float(xr[i]) * inv));
            o[i] = float_to_bf16(bf16_to_float(w[i]) * h);
        }
    }
}

/* Interleaved RoPE of one head of d values: pairs (x0, x1) -> (x0 c - x1 s, x1 c + x0 s), cos/sin
 * given per element, float32 math, the result rounded to bf16 (returned as floats). */
__attribute__((optimize("fp-contract=off"))) static void rope_head(const uint16_t *t, const float *c, const float *s,
                                                                    int64_t d, float *out) {
    for (int64_t i = 0; i < d; i += 2) {
        float x0 = bf16_to_float(t[i]), x1 = bf16_to_float(t[i + 1]);
        out[i] = bf16_to_float(float_to_bf16(x0 * c[i] + -x1 * s[i]));
        out[i + 1] = bf16_to_float(float_to_bf16(x1 * c[i + 1] + x0 * s[i + 1]));
    }
}

/* One new token of one sequence: RoPE on q [H, d] and k [KV, d] (position pos; cos/sin [d], that
 * position's row), k and v written to the caches [KV, capacity, d] at pos, then each query head
 * attends over positions 0..pos of its key/value head (head h reads KV head h / (H / KV)).
 * out [H, d] bf16. Returns 0, or -1 where a score buffer could not be allocated. */
int ernie_decode_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *cache_k,
                                uint16_t *cache_v, int64_t capacity, const float *cos, const float *sin, int64_t pos,
                                int64_t heads, int64_t kv_heads, int64_t d, float scale, uint16_t *out) {
    if (d > 1024) return -1;
    float rot[1024];
    for (int64_t h = 0; h < kv_heads; h++) {
        rope_head(k + h * d, cos, sin, d, rot);
        uint16_t *ck = cache_k + (h * capacity + pos) * d, *cv = cache_v + (h * capacity + pos) * d;
        for (int64_t i = 0; i < d; i++) {
            ck[i] = float_to_bf16(rot[i]);
            cv[i] = v[h * d + i];
        }
    }
    int64_t group = heads / kv_heads, n = pos + 1;
    int failed = 0;
#pragma omp parallel num_threads(heads > 1 ? team() : 1) reduction(| : failed)
    {
        float *scores = malloc((size_t)n * sizeof(float));
        float qh[1024], acc[1024];
        if (!scores) failed = 1;
#pragma omp for schedule(static)
        for (int64_t h = 0; h < heads; h++) {
            if (!scores) continue;
            const uint16_t *keys = cache_k + (h / group) * capacity * d, *values = cache_v + (h / group) * capacity * d;
            rope_head(q + h * d, cos, sin, d, qh);
            float top = -INFINITY;
            for (int64_t j = 0; j < n; j++) {
                scores[j] = dot_bf16(qh, keys + j * d, d) * scale;
                top = scores[j] > top ? scores[j] : top;
            }
            double total = 0.0;
            for (int64_t i = 0; i < d; i++) acc[i] = 0.0f;
            for (int64_t j = 0; j < n; j++) {
                float p = expf(scores[j] - top);
                total += p;
                const uint16_t *vj = values + j * d;
#pragma omp simd
                for (int64_t i = 0; i < d; i++) acc[i] += p * bf16_to_float(vj[i]);
            }
            float inv = (float)(1.0 / total);
            for (int64_t i = 0; i < d; i++) out[h * d + i] = float_to_bf16(acc[i] * inv);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

/* One token through the router: logits = W [E, H] (float32) @ x (bf16), softmax in float32, the
 * top_k experts by probability + bias (ties to the lower id), weighed by their unbiased
 * probabilities over max(their sum, norm_min), rounded to bf16; then `always` ids E, E+1, ... at
 * weight 1. weights_out bf16 [top_k + always], idx_out [top_k + always]. */
void ernie_route_bf16(const uint16_t *x, const float *w, const float *bias, int64_t e_count, int64_t h, int64_t top_k,
                      float norm_min, int64_t always, uint16_t *weights_out, int64_t *idx_out) {
    float probs[1024];
    if (e_count > 1024 || top_k > e_count) return;
    float top = -INFINITY;
    for (int64_t e = 0; e < e_count; e++) {
        probs[e] = dot_bf16(w + e * h, x, h);
        top = probs[e] > top ? probs[e] : top;
    }
    double total = 0.0;
    for (int64_t e = 0; e < e_count; e++) {
        probs[e] = expf(probs[e] - top);
        total += probs[e];
    }
    for (int64_t e = 0; e < e_count; e++) probs[e] = (float)(probs[e] / total);
    unsigned char taken[1024] = {0};
    float chosen = 0.0f;
    for (int64_t s = 0; s < top_k; s++) {
        int64_t best = -1;
        for (int64_t e = 0; e < e_count; e++)
            if (!taken[e] && (best < 0 || probs[e] + bias[e] > probs[best] + bias[best])) best = e;
        taken[best] = 1;
        idx_out[s] = best;
        chosen += probs[best];
    }
    float denom = chosen > norm_min ? chosen : norm_min;
    for (int64_t s = 0; s < top_k; s++) weights_out[s] = float_to_bf16(probs[idx_out[s]] / denom);
    for (int64_t a = 0; a < always; a++) {
        idx_out[top_k + a] = e_count + a;
        weights_out[top_k + a] = float_to_bf16(1.0f);
    }
}

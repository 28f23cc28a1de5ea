/* Matrix-vector products for x86 CPUs with AVX-512: int4/int8 weights by VNNI dot products, bf16
 * weights by AVX512_BF16's VDPBF16PS, reading the disk layout (ernie_cli.quant.formats) as it is.
 *
 * Why: decoding one token reads every active weight once, so a product is as fast as it reads.
 * torch's batch-1 int kernels and oneDNN's M=1 bf16 matmul read at a fraction of the DRAM rate.
 *
 * int8/int4: like llama.cpp's Q4_0 x Q8_0 dot product, the activations are quantized once per call
 * to int8 per block of 64 (one scale per block), so that one VPDPBUSD multiplies and adds 64 weight
 * codes by 64 activation codes; the weights never become floats.
 *
 * int4 (group size a multiple of 64): W = (q - 8) * s + z per group, so
 *     sum_k W_k x_k ~= sum_b s_g d_b (<q, xq>_b - 8 sum(xq_b)) + z_g sum(x_b)
 * over the 64-blocks b of each group g (d_b: the scale of the quantized activations). The offset of
 * the codes is removed with the quantized sum, so that it cancels exactly; the zero multiplies the
 * exact float sum. The disk layout keeps column 2j in the low nibble and 2j+1 in the high one, so a
 * shift and a mask turn 64 bytes (128 columns) into the 64 even and the 64 odd columns; the
 * activations are stored in that order once per call ([64 even | 64 odd] per 128 columns), and no
 * load-time repacking is needed (the weights stay memory-mapped).
 *
 * int8 (one scale per row): VPDPBUSD takes unsigned x signed bytes; the weight is made unsigned by
 * flipping its sign bit (w + 128), and 128 * sum(xq) is taken back out once per row.
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

/* Layout of the quantized activations: as x (int8), [32 even | 32 odd] per 64 columns (int4,
 * several tokens), [64 even | 64 odd] per 128 columns (int4, one token). */
enum { PLAIN = 0, PAIRS64 = 1, PAIRS128 = 2 };

typedef struct {
    int8_t *q;     /* [M, K] activation codes, in one of the layouts above */
    float *d;      /* [M, K/64] block scales */
    float *sum;    /* [M, K/64] float sums of x per block (int4) */
    float *qsum;   /* [M, K/64] sums of xq per block (int4) */
    float *dq;     /* [M, K/64] 128 * d_b * sum(xq_b) */
    float *m8dq;   /* [M, K/64 + 16] -8 * d_b * sum(xq_b), zero past the end (int4, one token) */
    float *corr;   /* [M] 128 * sum_b d_b * sum(xq_b) (int8) */
} Acts;

static inline __m512 load16(const void *x, int bf16, int64_t at) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + at))), 16));
    return _mm512_loadu_ps((const float *)x + at);
}

static int threads = 0; /* 0: OpenMP's default */

void ernie_set_threads(int n) { threads = n; }

static inline int team(void) { return threads > 0 ? threads : omp_get_max_threads(); }

/* x [M, K] float or bfloat16 -> int8 codes per 64-block with one scale each (amax / 127), plus the
 * block's float sum and code sum, the codes placed as `layout` says. */
static void quantize_acts(const void *x, int bf16, int64_t m_count, int64_t k, int layout, Acts *a) {
    const int64_t blocks = k / BLOCK;
    const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
#pragma omp parallel for schedule(static) num_threads(team()) if (m_count * k >= (1 << 16))
    for (int64_t mb = 0; mb < m_count * blocks; mb++) {
        const int64_t m = mb / blocks, b = mb % blocks;
        __m512 v[4];
        for (int i = 0; i < 4; i++) v[i] = load16(x, bf16, m * k + b * BLOCK + 16 * i);
        int64_t at[4]; /* where each 16 of the (permuted) block go */
        if (layout == PLAIN) {
            for (int i = 0; i < 4; i++) at[i] = b * BLOCK + 16 * i;
        } else {
            __m512 e0 = _mm512_permutex2var_ps(v[0], evens, v[1]), e1 = _mm512_permutex2var_ps(v[2], evens, v[3]);
            __m512 o0 = _mm512_permutex2var_ps(v[0], odds, v[1]), o1 = _mm512_permutex2var_ps(v[2], odds, v[3]);
            v[0] = e0, v[1] = e1, v[2] = o0, v[3] = o1;
            /* PAIRS128: block 2c+h of a full chunk c: evens at 128c + 32h, odds 64 further; the
             * last block of an odd count is a chunk of its own, like PAIRS64 */
            const int64_t c = b / 2, h = b % 2, half = (layout == PAIRS128 && (c + 1) * 128 <= k) ? 64 : 32;
            const int64_t even = layout == PAIRS128 ? c * 128 + h * 32 : b * BLOCK;
            at[0] = even, at[1] = even + 16, at[2] = even + half, at[3] = even + half + 16;
        }
        __m512 amax = _mm512_abs_ps(v[0]), sum = v[0];
        for (int i = 1; i < 4; i++) {
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
            sum = _mm512_add_ps(sum, v[i]);
        }
        const float d = _mm512_reduce_max_ps(amax) / 127.0f;
        const __m512 inv = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
        __m512i qsum = _mm512_setzero_si512();
        int8_t *qm = a->q + m * k;
        for (int i = 0; i < 4; i++) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv)); /* round to nearest even */
            q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
            qsum = _mm512_add_epi32(qsum, q);
            _mm_storeu_si128((__m128i *)(qm + at[i]), _mm512_cvtepi32_epi8(q));
        }
        const int32_t qs = _mm512_reduce_add_epi32(qsum);
        a->d[mb] = d;
        a->sum[mb] = _mm512_reduce_add_ps(sum);
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

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* One output element, as float or as bfloat16 (rounded to nearest even). */
static inline void store_out(void *out, int bf16, int64_t at, float v) {
    if (!bf16) {
        ((float *)out)[at] = v;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &v, 4);
    ((uint16_t *)out)[at] = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* bf16 [count] -> float, 16 at a time (masked at the end). */
static inline __m512 load_bf16(const uint16_t *p, int64_t count) {
    __mmask16 mask = count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1);
    __m256i raw = _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

/* ---- one token -------------------------------------------------------------------------------------
 *
 * One output row at a time: each thread then reads one sequential stream, prefetched PREFETCH bytes
 * ahead. Computing four rows together (the activations loaded once for all) read 7-25% slower
 * (docs/performance.md). */

/* A macro: as a static function without side effects GCC deletes its calls. */
#define prefetch_ahead(at) _mm_prefetch((const char *)(at) + PREFETCH, _MM_HINT_T0)

static float q4_dot(const uint8_t *w, const uint16_t *s, const uint16_t *z, int64_t k, int64_t group, const Acts *a) {
    const int64_t blocks = k / BLOCK, per_group = group / BLOCK, full = k / 128;
    float sd[MAX_BLOCKS + 16] __attribute__((aligned(64))); /* s_g * d_b per block */
    float tail_s = 0.0f;
    __m512 acc = _mm512_setzero_ps(), tail = _mm512_setzero_ps();
    /* the scales and zeros are two more streams, 1/16 of the codes' bytes: prefetched too, they took
     * the kernel from about 80% to 95% of the DRAM read rate */
    prefetch_ahead(s), prefetch_ahead(s + 32), prefetch_ahead(z), prefetch_ahead(z + 32);
    /* everything but <q, xq>_b, 16 blocks at a time: sd, and s_g (-8 d_b sum(xq_b)) + z_g sum(x_b) */
    if (per_group == 1) {
        for (int64_t b = 0; b < blocks; b += 16) {
            const __m512 sg = load_bf16(s + b, blocks - b), zg = load_bf16(z + b, blocks - b);
            _mm512_store_ps(&sd[b], _mm512_mul_ps(sg, _mm512_loadu_ps(a->d + b)));
            tail = _mm512_fmadd_ps(zg, _mm512_loadu_ps(a->sum + b), _mm512_fmadd_ps(sg, _mm512_loadu_ps(a->m8dq + b), tail));
        }
    } else {
        for (int64_t b = 0; b < blocks; b++) {
            const float sg = bf16_to_float(s[b / per_group]), zg = bf16_to_float(z[b / per_group]);
            sd[b] = sg * a->d[b];
            tail_s += zg * a->sum[b] + sg * a->m8dq[b];
        }
    }
    /* 64 bytes = 128 columns: the low nibbles are the even columns, the high ones the odd */
    const __m512i low4 = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
    const __m512i pick = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int64_t c = 0; c < full; c++) {
        prefetch_ahead(w + c * 64);
        const __m512i v = _mm512_loadu_si512((const void *)(w + c * 64));
        const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        const __m512i xe = _mm512_load_si512((const void *)(a->q + c * 128));
        const __m512i xo = _mm512_load_si512((const void *)(a->q + c * 128 + 64));
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, xe), hi, xo);
        /* lanes 0-7: the chunk's first block, 8-15: its second */
        const __m512 sdv = _mm512_permutexvar_ps(pick, _mm512_loadu_ps(&sd[2 * c]));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sdv, acc);
    }
    if (k % 128) { /* a last block of 64 columns: 32 bytes, [32 even | 32 odd] activations */
        const __mmask64 half = 0xFFFFFFFFull;
        const __m512i v = _mm512_maskz_loadu_epi8(half, w + full * 64);
        const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        const __m512i xe = _mm512_maskz_loadu_epi8(half, a->q + full * 128);
        const __m512i xo = _mm512_maskz_loadu_epi8(half, a->q + full * 128 + 32);
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, xe), hi, xo);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(sd[2 * full]), acc);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc, tail)) + tail_s;
}

static float q8_dot(const int8_t *w, int64_t k, const Acts *a) {
    const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < k / BLOCK; b++) {
        prefetch_ahead(w + b * BLOCK);
        const __m512i u = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + b * BLOCK)), flip);
        const __m512i xq = _mm512_load_si512((const void *)(a->q + b * BLOCK));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, u, xq)), _mm512_set1_ps(a->d[b]), acc);
    }
    return _mm512_reduce_add_ps(acc) - a->corr[0];
}

#ifdef __AVX512BF16__
/* bf16 weights against a bf16 x: VDPBF16PS multiplies 32 pairs and adds them into 16 float32 sums. */
static float bf16_dot(const uint16_t *w, int64_t k, const uint16_t *x) {
    __m512 acc = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= k; c += 32) {
        prefetch_ahead(w + c); /* 32 bf16: one cache line */
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const void *)(w + c)),
                               (__m512bh)_mm512_loadu_si512((const void *)(x + c)));
    }
    if (c < k) {
        const __mmask32 mask = (__mmask32)((1ull << (k - c)) - 1);
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(mask, w + c), (__m512bh)_mm512_maskz_loadu_epi16(mask, x + c));
    }
    return _mm512_reduce_add_ps(acc);
}
#endif

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
#ifdef __AVX512BF16__
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

/* One row of int4 weights against mt (<= MAX_TOKENS) token vectors; always inlined with a constant
 * mt, so that the accumulators live in registers. Per block b of group g:
 *     s_g d_b (<q, xq>_b - 8 sum(xq_b)) + z_g sum(x_b)
 * The -8 term uses the quantized sum, so that the codes' offset cancels exactly. Everything but
 * <q, xq>_b is computed for the whole row first, 16 blocks at a time. */
static inline __attribute__((always_inline)) void q4_row(const uint8_t *w, const uint16_t *s, const uint16_t *z,
                                                         int64_t k, int64_t group, const Acts *a, int64_t m0,
                                                         const int mt, void *out, int out_bf16, int64_t n,
                                                         int64_t row) {
    const int64_t blocks = k / BLOCK, per_group = group / BLOCK;
    float sd[MAX_TOKENS][MAX_BLOCKS] __attribute__((aligned(64)));
    __m512 tail[MAX_TOKENS], acc[MAX_TOKENS];
    for (int t = 0; t < mt; t++) {
        tail[t] = _mm512_setzero_ps();
        acc[t] = _mm512_setzero_ps();
    }
    if (per_group == 1) {
        for (int64_t b = 0; b < blocks; b += 16) {
            __mmask16 mask = blocks - b >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (blocks - b)) - 1);
            __m512 sg = load_bf16(s + b, blocks - b), zg = load_bf16(z + b, blocks - b);
            for (int t = 0; t < mt; t++) {
                const int64_t mb = (m0 + t) * blocks + b;
                __m512 d = _mm512_maskz_loadu_ps(mask, a->d + mb);
                __m512 v = _mm512_mul_ps(sg, d);
                _mm512_storeu_ps(&sd[t][b], v);
                tail[t] = _mm512_fmadd_ps(zg, _mm512_maskz_loadu_ps(mask, a->sum + mb), tail[t]);
                tail[t] = _mm512_fnmadd_ps(_mm512_mul_ps(v, _mm512_set1_ps(8.0f)),
                                           _mm512_maskz_loadu_ps(mask, a->qsum + mb), tail[t]);
            }
        }
    } else {
        for (int64_t b = 0; b < blocks; b++) {
            const float sg = bf16_to_float(s[b / per_group]), zg = bf16_to_float(z[b / per_group]);
            for (int t = 0; t < mt; t++) {
                const int64_t mb = (m0 + t) * blocks + b;
                sd[t][b] = sg * a->d[mb];
                float part = zg * a->sum[mb] - 8.0f * sd[t][b] * a->qsum[mb];
                tail[t] = _mm512_add_ps(tail[t], _mm512_castps128_ps512(_mm_set_ss(part)));
            }
        }
    }
    /* low half of each lane: shift 0; high half: shift 4 (16-bit lanes; the mask drops the spill) */
    const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int64_t b = 0; b < blocks; b++) {
        if (b % 2 == 0) _mm_prefetch((const char *)(w + b * (BLOCK / 2) + PREFETCH), _MM_HINT_T0);
        __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w + b * (BLOCK / 2))));
        __m512i codes = _mm512_and_si512(_mm512_srlv_epi16(both, shifts), low4);
        for (int t = 0; t < mt; t++) {
            __m512i xq = _mm512_load_si512((const void *)(a->q + (m0 + t) * k + b * BLOCK));
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xq);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(sd[t][b]), acc[t]);
        }
    }
    for (int t = 0; t < mt; t++) store_out(out, out_bf16, (m0 + t) * n + row, _mm512_reduce_add_ps(_mm512_add_ps(acc[t], tail[t])));
}

/* One row of int8 weights (scale s) against mt token vectors; inlined like q4_row. */
static inline __attribute__((always_inline)) void q8_row(const int8_t *w, float s, int64_t k, const Acts *a,
                                                         int64_t m0, const int mt, void *out, int out_bf16,
                                                         int64_t n, int64_t row) {
    const int64_t blocks = k / BLOCK;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc[MAX_TOKENS];
    for (int t = 0; t < mt; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        _mm_prefetch((const char *)(w + b * BLOCK + PREFETCH), _MM_HINT_T0);
        __m512i u = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + b * BLOCK)), flip);
        for (int t = 0; t < mt; t++) {
            __m512i xq = _mm512_load_si512((const void *)(a->q + (m0 + t) * k + b * BLOCK));
            __m512i dot = _mm512_dpbusd_epi32(zero, u, xq);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(a->d[(m0 + t) * blocks + b]), acc[t]);
        }
    }
    for (int t = 0; t < mt; t++) store_out(out, out_bf16, (m0 + t) * n + row, s * (_mm512_reduce_add_ps(acc[t]) - a->corr[m0 + t]));
}

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
    const int layout = bits == 8 ? PLAIN : m_count == 1 ? PAIRS128 : PAIRS64;
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

/* Whether this build has the bf16 kernel (the CPU and the compiler both support AVX512_BF16). */
int ernie_has_bf16(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

/* One token, bf16 weights: out[p] [N] = W[e_p] [N, K] @ x[p] [K] for p < P, x bf16, out float32 or
 * bf16. Arguments as in matmul; any K. Returns 0, or -1 where the build lacks AVX512_BF16. */
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
 * So prefill expands a weight to floats here, then calls torch. Same arithmetic as
 * formats.dequantize: (q - 8) * s + z (int4) or q * s (int8) in float32, separately rounded (no
 * FMA, hence fp-contract=off), then to bf16 by round-to-nearest-even where asked. */

static inline void store16(void *out, int bf16, int64_t at, __m512 v) {
    if (!bf16) {
        _mm512_storeu_ps((float *)out + at, v);
        return;
    }
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    _mm256_storeu_si256((__m256i *)((uint16_t *)out + at), _mm512_cvtepi32_epi16(bits));
}

__attribute__((optimize("fp-contract=off"))) static void dequant_row4(const uint8_t *w, const uint16_t *s,
                                                                      const uint16_t *z, int64_t k, int64_t group,
                                                                      void *out, int out_bf16) {
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m512 mid = _mm512_set1_ps(8.0f);
    for (int64_t c = 0; c < k; c += 32) { /* 16 bytes, 32 columns, inside one group (group % 64 == 0) */
        __m512 sc = _mm512_set1_ps(bf16_to_float(s[c / group])), zc = _mm512_set1_ps(bf16_to_float(z[c / group]));
        __m128i b = _mm_loadu_si128((const __m128i *)(w + c / 2));
        __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
        __m128i pairs[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)}; /* columns in order */
        for (int h = 0; h < 2; h++) {
            __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(pairs[h]));
            store16(out, out_bf16, c + 16 * h, _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(q, mid), sc), zc));
        }
    }
}

static void dequant_row8(const int8_t *w, float s, int64_t k, void *out, int out_bf16) {
    const __m512 sc = _mm512_set1_ps(s);
    for (int64_t c = 0; c < k; c += 16) {
        __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + c))));
        store16(out, out_bf16, c, _mm512_mul_ps(q, sc));
    }
}

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

/* The AVX-512 primitives of int_kernels.c (included by it; see there for the driver and the algebra).
 *
 * int4: VPDPBUSD multiplies 64 unsigned codes by 64 signed activation codes and adds them in fours
 * into 16 int32 sums. One token reads 64 bytes (128 columns) a step: a shift and a mask give the 64
 * even and the 64 odd columns, so the activations are stored [64 even | 64 odd] per 128 columns
 * (PAIRS128).
 *
 * int8 (one scale per row): VPDPBUSD takes unsigned x signed bytes; the weight is made unsigned by
 * flipping its sign bit (w + 128), and 128 * sum(xq) (Acts.corr) is taken back out once per row.
 *
 * bf16: VDPBF16PS multiplies 32 pairs and adds them into 16 float32 sums, where the CPU has
 * AVX512_BF16; without it this build has no bf16 GEMV (oneDNN's runs).
 */

#define ONE_TOKEN_INT4_LAYOUT PAIRS128
/* The weight stream prefetched into L2, not L1: on a Zen 4 the one-token kernels read 2-26% faster
 * so, in every format (docs/performance.md). */
#ifndef PREFETCH_HINT
#define PREFETCH_HINT _MM_HINT_T1
#endif
#ifdef __AVX512BF16__
#define HAVE_BF16_GEMV 1
#endif

static inline __m512 load16(const void *x, int bf16, int64_t at) {
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + at))), 16));
    return _mm512_loadu_ps((const float *)x + at);
}

/* bf16 [count] -> float, 16 at a time (masked at the end). */
static inline __m512 load_bf16(const uint16_t *p, int64_t count) {
    __mmask16 mask = count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1);
    __m256i raw = _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

/* x[at, at + 64), float or bfloat16 -> 64 int8 codes (round to nearest even of x / d, d = amax / 127),
 * [32 even | 32 odd] where `pairs`, else in order; *d, the float sum; returns the codes' sum. */
static inline int32_t quantize_block(const void *x, int bf16, int64_t at, int pairs, int8_t *codes, float *d_out,
                                     float *sum_out) {
    __m512 v[4];
    for (int i = 0; i < 4; i++) v[i] = load16(x, bf16, at + 16 * i);
    if (pairs) {
        const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
        __m512 e0 = _mm512_permutex2var_ps(v[0], evens, v[1]), e1 = _mm512_permutex2var_ps(v[2], evens, v[3]);
        __m512 o0 = _mm512_permutex2var_ps(v[0], odds, v[1]), o1 = _mm512_permutex2var_ps(v[2], odds, v[3]);
        v[0] = e0, v[1] = e1, v[2] = o0, v[3] = o1;
    }
    __m512 amax = _mm512_abs_ps(v[0]), sum = v[0];
    for (int i = 1; i < 4; i++) {
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
        sum = _mm512_add_ps(sum, v[i]);
    }
    const float d = _mm512_reduce_max_ps(amax) / 127.0f;
    const __m512 inv = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    __m512i qsum = _mm512_setzero_si512();
    for (int i = 0; i < 4; i++) {
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv)); /* round to nearest even */
        q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
        qsum = _mm512_add_epi32(qsum, q);
        _mm_storeu_si128((__m128i *)(codes + 16 * i), _mm512_cvtepi32_epi8(q));
    }
    *d_out = d;
    *sum_out = _mm512_reduce_add_ps(sum);
    return _mm512_reduce_add_epi32(qsum);
}

/* ---- one token -------------------------------------------------------------------------------------- */

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

#ifdef HAVE_BF16_GEMV
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

/* ---- whole rows to floats, for prefill -------------------------------------------------------------- */

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

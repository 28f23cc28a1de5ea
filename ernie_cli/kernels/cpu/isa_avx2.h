/* The AVX2 primitives of int_kernels.c (included by it; see there for the driver and the algebra),
 * for x86 CPUs without AVX-512 VNNI. As llama.cpp's AVX2 Q4_0/Q8_0 dot products do:
 *
 * int4: 32 bytes of codes = 64 columns = one activation block; v & 0x0F are its 32 even columns and
 * (v >> 4) & 0x0F its 32 odd ones, so the activations are stored [32 even | 32 odd] per 64 columns
 * (PAIRS64) for any number of tokens. VPMADDUBSW multiplies unsigned by signed bytes and adds pairs
 * into int16: the codes are 0..15 and the activations -127..127, so a pair is at most 2*15*127 and
 * the even and the odd halves' sums may be added in int16 (at most 7620) before VPMADDWD by ones
 * widens them to int32. The offset -8 and the zero stay outside, as the driver's algebra says.
 *
 * int8: VPMADDUBSW needs one unsigned operand; |w| is one, with w's sign moved onto the activation
 * (VPSIGNB), so <|w|, sign(w) xq> = <w, xq> and no correction term is needed (at most 2*128*127 <
 * 32767 a pair, no saturation). q8_dot returns the finished sum like the AVX-512 one.
 *
 * bf16: a bf16 is the high half of a float32, so unpacking with zeros below makes floats of it; the
 * unpack takes the 128-bit lanes' halves (columns 0-3 and 8-11, then 4-7 and 12-15 of 16), and the
 * same unpack of x pairs each weight with its own activation. Products and sums in float32 (FMA).
 *
 * One token: two cache lines of weights a step (int4: four blocks, int8: two, bf16: 64 columns)
 * into two or four independent accumulators, so that the FMA latency does not bound a row; two lines
 * a step read 2-9% faster from DRAM than one. From cache int4 is bound by its three multiplies a
 * block (two VPMADDUBSW, one VPMADDWD); adding four blocks' int16 sums by VPHADDW, to widen them with
 * one VPMADDWD, was no faster on Zen 3: the shuffles cost what the multiplies saved.
 */

#define ONE_TOKEN_INT4_LAYOUT PAIRS64
#ifndef PREFETCH_HINT
#define PREFETCH_HINT _MM_HINT_T0 /* into L1; the AVX-512 build's L2 hint has not been timed on an AVX2 CPU */
#endif
#define HAVE_BF16_GEMV 1

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

static inline int32_t hsum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1))));
}

/* 8 bf16 -> float32: the 16 bits become the high half. */
static inline __m256 bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline __m256 load8(const void *x, int bf16, int64_t at) {
    return bf16 ? bf16x8((const uint16_t *)x + at) : _mm256_loadu_ps((const float *)x + at);
}

/* x[at, at + 64), float or bfloat16 -> 64 int8 codes (round to nearest even of x / d, d = amax / 127),
 * [32 even | 32 odd] where `pairs`, else in order; *d, the float sum; returns the codes' sum. */
static inline int32_t quantize_block(const void *x, int bf16, int64_t at, int pairs, int8_t *codes, float *d_out,
                                     float *sum_out) {
    __m256 v[8];
    for (int i = 0; i < 8; i++) v[i] = load8(x, bf16, at + 8 * i);
    if (pairs) {
        /* of 16 values: the even ones of each lane's four, then the 64-bit pieces put in order */
        __m256 e[4], o[4];
        for (int i = 0; i < 4; i++) {
            e[i] = _mm256_castpd_ps(_mm256_permute4x64_pd(
                _mm256_castps_pd(_mm256_shuffle_ps(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0))), _MM_SHUFFLE(3, 1, 2, 0)));
            o[i] = _mm256_castpd_ps(_mm256_permute4x64_pd(
                _mm256_castps_pd(_mm256_shuffle_ps(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1))), _MM_SHUFFLE(3, 1, 2, 0)));
        }
        for (int i = 0; i < 4; i++) v[i] = e[i], v[4 + i] = o[i];
    }
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 amax = _mm256_andnot_ps(sign, v[0]), sum = v[0];
    for (int i = 1; i < 8; i++) {
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        sum = _mm256_add_ps(sum, v[i]);
    }
    const float d = hmax8(amax) / 127.0f;
    const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    __m256i q[8], qsum = _mm256_setzero_si256();
    for (int i = 0; i < 8; i++) {
        q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)); /* round to nearest even */
        q[i] = _mm256_max_epi32(_mm256_min_epi32(q[i], _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
        qsum = _mm256_add_epi32(qsum, q[i]);
    }
    /* int32 -> int8 by two packs (no saturation: |q| <= 127); the packs work within 128-bit lanes,
     * so each 32 bytes come out as 4-byte pieces of the four vectors, lane by lane: put them back */
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int i = 0; i < 8; i += 4) {
        __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[i], q[i + 1]), _mm256_packs_epi32(q[i + 2], q[i + 3]));
        _mm256_storeu_si256((__m256i *)(codes + 8 * i), _mm256_permutevar8x32_epi32(b, order));
    }
    *d_out = d;
    *sum_out = hsum8(sum);
    return hsum8_epi32(qsum);
}

/* ---- int4 -------------------------------------------------------------------------------------------- */

/* Of one row: sd[b] = s_g d_b per block, and the sum of everything but the codes' dot products,
 *     sum_b z_g sum(x_b) - 8 s_g d_b sum(xq_b)
 * (d, sum, qsum: one token's blocks), as 8 lanes to be summed with the row's accumulators (one
 * horizontal sum a row). Eight blocks at a time where every block has its own group, the two terms
 * in two accumulators so that no chain of dependent FMAs bounds the row's start. */
static inline __m256 q4_setup(const uint16_t *s, const uint16_t *z, int64_t blocks, int64_t per_group, const float *d,
                              const float *sum, const float *qsum, float *sd) {
    __m256 tz = _mm256_setzero_ps(), tq = _mm256_setzero_ps();
    float rest = 0.0f;
    int64_t b = 0;
    if (per_group == 1) {
        for (; b + 8 <= blocks; b += 8) {
            const __m256 sg = bf16x8(s + b), zg = bf16x8(z + b), v = _mm256_mul_ps(sg, _mm256_loadu_ps(d + b));
            _mm256_storeu_ps(sd + b, v);
            tz = _mm256_fmadd_ps(zg, _mm256_loadu_ps(sum + b), tz);
            tq = _mm256_fmadd_ps(v, _mm256_loadu_ps(qsum + b), tq);
        }
    }
    for (; b < blocks; b++) {
        const float sg = bf16_to_float(s[b / per_group]), zg = bf16_to_float(z[b / per_group]);
        sd[b] = sg * d[b];
        rest += zg * sum[b] - 8.0f * sd[b] * qsum[b];
    }
    const __m256 tail = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), tq, tz); /* exact: 8 is a power of two */
    return _mm256_add_ps(tail, _mm256_castps128_ps256(_mm_set_ss(rest)));
}

/* The even and the odd columns' codes of 32 bytes (64 columns). */
static inline void q4_codes(const uint8_t *w, __m256i *lo, __m256i *hi) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), v = _mm256_loadu_si256((const __m256i *)w);
    *lo = _mm256_and_si256(v, low4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
}

/* acc + sd * <q, xq> over one block; xq: [32 even | 32 odd]. */
static inline __m256 q4_block(__m256i lo, __m256i hi, const int8_t *xq, float sd, __m256 acc) {
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)xq)),
                                           _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(xq + 32))));
    const __m256i dot = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(sd), acc);
}

static float q4_dot(const uint8_t *w, const uint16_t *s, const uint16_t *z, int64_t k, int64_t group, const Acts *a) {
    const int64_t blocks = k / BLOCK;
    float sd[MAX_BLOCKS];
    /* the scales and zeros are two more streams, 1/16 of the codes' bytes: prefetched like them */
    prefetch_ahead(s), prefetch_ahead(s + 32), prefetch_ahead(z), prefetch_ahead(z + 32);
    __m256 acc0 = q4_setup(s, z, blocks, group / BLOCK, a->d, a->sum, a->qsum, sd), acc1 = _mm256_setzero_ps();
    __m256i lo, hi;
    int64_t b = 0;
    /* four blocks (two cache lines) a step: 2-7% faster from DRAM than two (2 threads, 128 MB of rows) */
    for (; b + 4 <= blocks; b += 4) {
        prefetch_ahead(w + b * (BLOCK / 2)), prefetch_ahead(w + b * (BLOCK / 2) + 64);
        for (int64_t c = b; c < b + 4; c += 2) {
            q4_codes(w + c * (BLOCK / 2), &lo, &hi);
            acc0 = q4_block(lo, hi, a->q + c * BLOCK, sd[c], acc0);
            q4_codes(w + (c + 1) * (BLOCK / 2), &lo, &hi);
            acc1 = q4_block(lo, hi, a->q + (c + 1) * BLOCK, sd[c + 1], acc1);
        }
    }
    for (; b < blocks; b++) { /* up to three: prefetched by the steps before */
        q4_codes(w + b * (BLOCK / 2), &lo, &hi);
        acc0 = q4_block(lo, hi, a->q + b * BLOCK, sd[b], acc0);
    }
    return hsum8(_mm256_add_ps(acc0, acc1));
}

/* One row of int4 weights against mt (<= MAX_TOKENS) token vectors; always inlined with a constant
 * mt, so that the accumulators live in registers. Each block's codes are expanded once for all. */
static inline __attribute__((always_inline)) void q4_row(const uint8_t *w, const uint16_t *s, const uint16_t *z,
                                                         int64_t k, int64_t group, const Acts *a, int64_t m0,
                                                         const int mt, void *out, int out_bf16, int64_t n,
                                                         int64_t row) {
    const int64_t blocks = k / BLOCK;
    float sd[MAX_TOKENS][MAX_BLOCKS];
    __m256 acc[MAX_TOKENS];
    for (int t = 0; t < mt; t++) {
        const int64_t mb = (m0 + t) * blocks;
        acc[t] = q4_setup(s, z, blocks, group / BLOCK, a->d + mb, a->sum + mb, a->qsum + mb, sd[t]);
    }
    for (int64_t b = 0; b < blocks; b++) {
        if (b % 2 == 0) prefetch_ahead(w + b * (BLOCK / 2));
        __m256i lo, hi;
        q4_codes(w + b * (BLOCK / 2), &lo, &hi);
        for (int t = 0; t < mt; t++) acc[t] = q4_block(lo, hi, a->q + (m0 + t) * k + b * BLOCK, sd[t][b], acc[t]);
    }
    for (int t = 0; t < mt; t++) store_out(out, out_bf16, (m0 + t) * n + row, hsum8(acc[t]));
}

/* ---- int8 -------------------------------------------------------------------------------------------- */

/* <w, xq> of one block as 8 int32 sums, w's magnitude and sign given as |w| (aw) and w. */
static inline __m256i q8_block(const __m256i aw[2], const __m256i wv[2], const int8_t *xq) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i dot = _mm256_setzero_si256();
    for (int h = 0; h < 2; h++) {
        const __m256i sx = _mm256_sign_epi8(_mm256_load_si256((const __m256i *)(xq + 32 * h)), wv[h]);
        dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(aw[h], sx), ones));
    }
    return dot;
}

/* |w| (as unsigned: -128 gives 128) and w of one block. */
static inline void q8_load(const int8_t *w, __m256i aw[2], __m256i wv[2]) {
    for (int h = 0; h < 2; h++) {
        wv[h] = _mm256_loadu_si256((const __m256i *)(w + 32 * h));
        aw[h] = _mm256_abs_epi8(wv[h]);
    }
}

/* acc + d * <w, xq> over one block. */
static inline __m256 q8_step(const int8_t *w, const int8_t *xq, float d, __m256 acc) {
    __m256i aw[2], wv[2];
    q8_load(w, aw, wv);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_block(aw, wv, xq)), _mm256_set1_ps(d), acc);
}

static float q8_dot(const int8_t *w, int64_t k, const Acts *a) {
    const int64_t blocks = k / BLOCK;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
        prefetch_ahead(w + b * BLOCK), prefetch_ahead(w + b * BLOCK + 64);
        acc0 = q8_step(w + b * BLOCK, a->q + b * BLOCK, a->d[b], acc0);
        acc1 = q8_step(w + (b + 1) * BLOCK, a->q + (b + 1) * BLOCK, a->d[b + 1], acc1);
    }
    if (b < blocks) acc0 = q8_step(w + b * BLOCK, a->q + b * BLOCK, a->d[b], acc0);
    return hsum8(_mm256_add_ps(acc0, acc1));
}

/* One row of int8 weights (scale s) against mt token vectors; inlined like q4_row. */
static inline __attribute__((always_inline)) void q8_row(const int8_t *w, float s, int64_t k, const Acts *a,
                                                         int64_t m0, const int mt, void *out, int out_bf16,
                                                         int64_t n, int64_t row) {
    const int64_t blocks = k / BLOCK;
    __m256 acc[MAX_TOKENS];
    for (int t = 0; t < mt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        prefetch_ahead(w + b * BLOCK);
        __m256i aw[2], wv[2];
        q8_load(w + b * BLOCK, aw, wv);
        for (int t = 0; t < mt; t++) {
            const __m256i dot = q8_block(aw, wv, a->q + (m0 + t) * k + b * BLOCK);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(a->d[(m0 + t) * blocks + b]), acc[t]);
        }
    }
    for (int t = 0; t < mt; t++) store_out(out, out_bf16, (m0 + t) * n + row, s * hsum8(acc[t]));
}

/* ---- bf16 -------------------------------------------------------------------------------------------- */

/* lo/hi += 16 weights times their 16 activations (see the top for the order). */
static inline void bf16_fma16(const uint16_t *w, const uint16_t *x, __m256 *lo, __m256 *hi) {
    const __m256i zero = _mm256_setzero_si256();
    const __m256i wv = _mm256_loadu_si256((const __m256i *)w), xv = _mm256_loadu_si256((const __m256i *)x);
    *lo = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, wv)), _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, xv)), *lo);
    *hi = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, wv)), _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, xv)), *hi);
}

/* 64 weights times their activations into the four accumulators. */
static inline void bf16_fma64(const uint16_t *w, const uint16_t *x, __m256 acc[4]) {
    for (int c = 0; c < 64; c += 32) {
        bf16_fma16(w + c, x + c, &acc[0], &acc[1]);
        bf16_fma16(w + c + 16, x + c + 16, &acc[2], &acc[3]);
    }
}

/* Two cache lines a step: 5-9% faster from DRAM than one (2 threads, 128 MB of rows). */
static float bf16_dot(const uint16_t *w, int64_t k, const uint16_t *x) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t c = 0;
    for (; c + 64 <= k; c += 64) {
        prefetch_ahead(w + c), prefetch_ahead(w + c + 32); /* 32 bf16: one cache line */
        bf16_fma64(w + c, x + c, acc);
    }
    if (c < k) { /* the last k - c < 64 columns, zero-padded into one more step: each lane still adds
                  * at most two products more, rather than a scalar chain of up to 63 */
        uint16_t wt[64] = {0}, xt[64] = {0};
        memcpy(wt, w + c, (size_t)(k - c) * 2);
        memcpy(xt, x + c, (size_t)(k - c) * 2);
        bf16_fma64(wt, xt, acc);
    }
    return hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

/* ---- whole rows to floats, for prefill -------------------------------------------------------------- */

static inline void store8(void *out, int bf16, int64_t at, __m256 v) {
    if (!bf16) {
        _mm256_storeu_ps((float *)out + at, v);
        return;
    }
    __m256i bits = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    /* the shifted values fit 16 bits unsigned, so the saturating pack only narrows them */
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
    _mm_storeu_si128((__m128i *)((uint16_t *)out + at), packed);
}

__attribute__((optimize("fp-contract=off"))) static void dequant_row4(const uint8_t *w, const uint16_t *s,
                                                                      const uint16_t *z, int64_t k, int64_t group,
                                                                      void *out, int out_bf16) {
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m256 mid = _mm256_set1_ps(8.0f);
    for (int64_t c = 0; c < k; c += 32) { /* 16 bytes, 32 columns, inside one group (group % 64 == 0) */
        __m256 sc = _mm256_set1_ps(bf16_to_float(s[c / group])), zc = _mm256_set1_ps(bf16_to_float(z[c / group]));
        __m128i b = _mm_loadu_si128((const __m128i *)(w + c / 2));
        __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
        __m128i pairs[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)}; /* columns in order */
        for (int h = 0; h < 4; h++) {
            __m128i eight = h % 2 ? _mm_srli_si128(pairs[h / 2], 8) : pairs[h / 2];
            __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight));
            store8(out, out_bf16, c + 8 * h, _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(q, mid), sc), zc));
        }
    }
}

static void dequant_row8(const int8_t *w, float s, int64_t k, void *out, int out_bf16) {
    const __m256 sc = _mm256_set1_ps(s);
    for (int64_t c = 0; c < k; c += 8) {
        __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + c))));
        store8(out, out_bf16, c, _mm256_mul_ps(q, sc));
    }
}

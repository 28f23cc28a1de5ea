/* DRAM read bandwidth of this machine: a 1 GiB buffer summed with AVX-512 loads (AVX2 loads where
 * the compiler targets no AVX-512), 1 and 2 threads, 3 runs each. The ceiling the CPU decode figures in docs/performance.md are compared with.
 * Build and run: gcc -O3 -march=native -fopenmp benchmarks/cpu_bandwidth.c -o /tmp/bwprobe && /tmp/bwprobe
 * As a library (benchmarks/cpu_decode_kernels.py, to probe in the same process as the kernels):
 * gcc -O3 -march=native -fopenmp -shared -fPIC -DPROBE_LIBRARY ... ; read_rate_median(threads) -> GB/s. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static const size_t n = (size_t)1 << 30, chunk = (size_t)1 << 20;
static uint8_t *buf;
static long long checksum;

/* One pass over `bytes` of the buffer (from `offset`) on `threads` threads: GB/s. */
double read_part(int threads, size_t offset, size_t bytes) {
    if (!buf) { /* the first call allocates (and faults in) the whole buffer */
        buf = aligned_alloc(64, n);
        if (!buf) return -1.0;
        for (size_t i = 0; i < n; i += 64) buf[i] = (uint8_t)i; /* fault every page in */
    }
    double t = omp_get_wtime();
    long long total = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : total)
    for (size_t c = offset; c < offset + bytes; c += chunk) {
#ifdef __AVX512F__
        __m512i acc = _mm512_setzero_si512();
        for (size_t i = c; i < c + chunk; i += 256) {
            /* prefetched 8 KB ahead, as the kernels do: without it one core keeps too few reads in
             * flight and the probe reads less than the kernels */
            for (int l = 0; l < 4; l++) _mm_prefetch((const char *)buf + i + 8192 + 64 * l, _MM_HINT_T0);
            acc = _mm512_add_epi32(acc, _mm512_load_si512(buf + i));
            acc = _mm512_add_epi32(acc, _mm512_load_si512(buf + i + 64));
            acc = _mm512_add_epi32(acc, _mm512_load_si512(buf + i + 128));
            acc = _mm512_add_epi32(acc, _mm512_load_si512(buf + i + 192));
        }
        total += _mm512_reduce_add_epi32(acc);
#else
        __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256(); /* two chains, as two loads a cycle */
        for (size_t i = c; i < c + chunk; i += 256) {
            for (int l = 0; l < 4; l++) _mm_prefetch((const char *)buf + i + 8192 + 64 * l, _MM_HINT_T0);
            for (int l = 0; l < 256; l += 64) {
                a0 = _mm256_add_epi32(a0, _mm256_load_si256((const __m256i *)(buf + i + l)));
                a1 = _mm256_add_epi32(a1, _mm256_load_si256((const __m256i *)(buf + i + l + 32)));
            }
        }
        int32_t lanes[8];
        _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi32(a0, a1));
        for (int l = 0; l < 8; l++) total += lanes[l];
#endif
    }
    t = omp_get_wtime() - t;
    checksum += total;
    return bytes / t / 1e9;
}

/* The whole buffer in one pass. */
double read_rate(int threads) { return read_part(threads, 0, n); }

/* The median of the four quarters, each read in its own pass: a shared machine's pauses hit one
 * pass, not the figure. */
double read_rate_median(int threads) {
    double r[4];
    for (int i = 0; i < 4; i++) r[i] = read_part(threads, i * (n / 4), n / 4);
    for (int i = 0; i < 4; i++)
        for (int j = i + 1; j < 4; j++)
            if (r[j] < r[i]) {
                double x = r[i];
                r[i] = r[j], r[j] = x;
            }
    return (r[1] + r[2]) / 2;
}

void release(void) {
    free(buf);
    buf = NULL;
}

#ifndef PROBE_LIBRARY
int main(void) {
    for (int threads = 1; threads <= 2; threads++)
        for (int rep = 0; rep < 3; rep++) printf("%d thread(s): %.1f GB/s\n", threads, read_rate(threads));
    printf("(checksum %lld)\n", checksum);
    release();
    return 0;
}
#endif

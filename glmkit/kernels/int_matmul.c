/* glmkit's CPU kernels for weight-only INT4/INT8 matmuls: y = x @ W^T with W in the official
 * ChatGLM layout, read in place (no second, kernel-specific copy of the weights).
 *
 * Why native code: PyTorch's CPU int4/int8 weight-only ops convert every weight to a float before
 * the multiply, which on AVX2 makes decoding compute-bound at a fraction of memory bandwidth
 * (measured in bench/results/). Here the activations are quantized to int8 per block of 64 columns
 * (as ggml's q8_0 does per 32) and the products are integer dot products (vpmaddubsw), which keeps
 * the work per weight to a few instructions.
 *
 * INT4: byte j of a row holds column 2j in its high nibble and 2j+1 in its low nibble, both signed.
 * XOR 0x88 turns each signed nibble s into the unsigned s + 8, the operand vpmaddubsw needs; the
 * extra 8 * sum(x) per block is subtracted once per row at the end. One 32-byte load is 64 weights:
 * its high nibbles are the block's even columns and its low nibbles the odd ones, so each activation
 * block is stored as its 32 even columns followed by its 32 odd columns.
 *
 * INT8: signed int8 weights, one scale per row. vpmaddubsw takes |x| as the unsigned operand and
 * the weight with x's sign moved onto it (vpsignb).
 *
 * Built at run time by glmkit/kernels/__init__.py (gcc -O3 -fopenmp, called through ctypes); the
 * AVX2 functions carry their own target attribute, and glmkit_cpu_supported() says whether the
 * running CPU can take them. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64   /* activation quantization block: 32 packed INT4 bytes */
#define ROWS 4     /* weight rows per micro-kernel call: the activation loads are shared */
#define M_CHUNK 16 /* activation rows kept hot in cache while a weight tile is reused */
#ifndef PREFETCH
#define PREFETCH 1024 /* bytes ahead in each weight row: the hardware prefetcher alone left a third of the bandwidth unused */
#endif

int glmkit_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float read_scale(const void *scales, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)scales)[i]) : ((const float *)scales)[i];
}

/* One activation row -> int8 per block of 64, scale = absmax / 127, q = round_half_even(x * (1 / scale)).
 * `deinterleave` stores each block as even columns then odd columns (INT4 order).
 * sum8[b] = 8 * scale * sum(q), the block's share of the INT4 offset. */
__attribute__((target("avx2,fma"))) static void quantize_row(const float *x, int64_t k, int deinterleave, int8_t *q,
                                                             float *scale, float *sum8) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < k / BLOCK; b++) {
        const float *xb = x + b * BLOCK;
        __m256 peak = _mm256_setzero_ps();
        for (int i = 0; i < BLOCK; i += 8) peak = _mm256_max_ps(peak, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
        __m128 p4 = _mm_max_ps(_mm256_castps256_ps128(peak), _mm256_extractf128_ps(peak, 1));
        p4 = _mm_max_ps(p4, _mm_movehl_ps(p4, p4));
        p4 = _mm_max_ss(p4, _mm_movehdup_ps(p4));
        const float d = _mm_cvtss_f32(p4) / 127.0f;
        const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
        int32_t values[BLOCK];
        for (int i = 0; i < BLOCK; i += 8)  /* cvtps rounds half to even under the default MXCSR */
            _mm256_storeu_si256((__m256i *)(values + i), _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i), inv)));
        int32_t total = 0;
        int8_t *qb = q + b * BLOCK;
        for (int i = 0; i < BLOCK; i++) {
            qb[deinterleave ? (i & 1) * (BLOCK / 2) + i / 2 : i] = (int8_t)values[i];
            total += values[i];
        }
        scale[b] = d;
        if (sum8) sum8[b] = 8.0f * d * (float)total;
    }
}

__attribute__((target("avx2,fma"))) static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* out[r] for r < nr weight rows starting at w (row stride k/2 bytes), one activation row.
 * Each weight group is `bpg` blocks; its float partial sum is scaled once by the group's scale. */
__attribute__((target("avx2,fma"), always_inline)) static inline void int4_rows(
    const uint8_t *w, int64_t k, const void *scales, int64_t groups, int scale_bf16, int nr,
    const int8_t *q, const float *xs, const float *corr, int64_t bpg, float *out, int64_t out_stride) {
    const __m256i flip = _mm256_set1_epi8((char)0x88), low4 = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[ROWS];
    for (int r = 0; r < nr; r++) acc[r] = _mm256_setzero_ps();
    const int64_t row_bytes = k / 2;
    for (int64_t g = 0; g < groups; g++) {
        __m256 part[ROWS];
        for (int r = 0; r < nr; r++) part[r] = _mm256_setzero_ps();
        for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) {
            const __m256i even = _mm256_loadu_si256((const __m256i *)(q + b * BLOCK));
            const __m256i odd = _mm256_loadu_si256((const __m256i *)(q + b * BLOCK + 32));
            const __m256 xscale = _mm256_broadcast_ss(xs + b);
            for (int r = 0; r < nr; r++) {
#if PREFETCH > 0
                if ((b & 1) == 0) _mm_prefetch((const char *)(w + r * row_bytes + b * 32 + PREFETCH), _MM_HINT_T0);
#endif
                __m256i v = _mm256_loadu_si256((const __m256i *)(w + r * row_bytes + b * 32));
                v = _mm256_xor_si256(v, flip);
                const __m256i lo = _mm256_and_si256(v, low4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(hi, even), _mm256_maddubs_epi16(lo, odd));
                const __m256 dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                part[r] = _mm256_fmadd_ps(dots, xscale, part[r]);
            }
        }
        for (int r = 0; r < nr; r++)
            acc[r] = _mm256_fmadd_ps(part[r], _mm256_set1_ps(read_scale(scales, r * groups + g, scale_bf16)), acc[r]);
    }
    for (int r = 0; r < nr; r++) {
        float offset = 0.0f;
        for (int64_t g = 0; g < groups; g++) offset += read_scale(scales, r * groups + g, scale_bf16) * corr[g];
        out[r * out_stride] = hsum(acc[r]) - offset;
    }
}

__attribute__((target("avx2,fma"))) static void int4_tile4(
    const uint8_t *w, int64_t k, const void *scales, int64_t groups, int bf16, const int8_t *q, const float *xs,
    const float *corr, int64_t bpg, float *out) {
    int4_rows(w, k, scales, groups, bf16, ROWS, q, xs, corr, bpg, out, 1);
}

__attribute__((target("avx2,fma"))) static void int4_tile1(
    const uint8_t *w, int64_t k, const void *scales, int64_t groups, int bf16, const int8_t *q, const float *xs,
    const float *corr, int64_t bpg, float *out) {
    int4_rows(w, k, scales, groups, bf16, 1, q, xs, corr, bpg, out, 1);
}

/* y[m, n] = sum_k x[m, k] w[n, k]; x float [m, k], w packed [n, k/2], scales [n, k/group] (float or
 * bf16), y float [m, n]. k and group must be multiples of 64 (the caller checks). Returns 1 when
 * the activation buffers cannot be allocated, else 0. */
int glmkit_int4_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, const void *scales,
                        int scale_bf16, int64_t group, float *y, int threads) {
    const int64_t blocks = k / BLOCK, groups = k / group, bpg = group / BLOCK;
    int8_t *q = malloc((size_t)(m * k));
    float *xs = malloc(sizeof(float) * (size_t)(m * blocks));
    float *sum8 = malloc(sizeof(float) * (size_t)(m * blocks));
    float *corr = calloc((size_t)(m * groups), sizeof(float));
    if (!q || !xs || !sum8 || !corr) {
        free(q);
        free(xs);
        free(sum8);
        free(corr);
        return 1;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < m; i++) {
        quantize_row(x + i * k, k, 1, q + i * k, xs + i * blocks, sum8 + i * blocks);
        for (int64_t b = 0; b < blocks; b++) corr[i * groups + b / bpg] += sum8[i * blocks + b];
    }
    const int64_t tiles = (n + ROWS - 1) / ROWS;
    const size_t scale_bytes = scale_bf16 ? 2 : 4;
    for (int64_t m0 = 0; m0 < m; m0 += M_CHUNK) {
        const int64_t m1 = m0 + M_CHUNK < m ? m0 + M_CHUNK : m;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t n0 = t * ROWS;
            const int nr = n - n0 < ROWS ? (int)(n - n0) : ROWS;
            const uint8_t *wt = w + n0 * (k / 2);
            const char *st = (const char *)scales + n0 * groups * scale_bytes;
            for (int64_t i = m0; i < m1; i++) {
                const int8_t *qi = q + i * k;
                const float *xsi = xs + i * blocks, *ci = corr + i * groups;
                float tile[ROWS];
                if (nr == ROWS) {
                    int4_tile4(wt, k, st, groups, scale_bf16, qi, xsi, ci, bpg, tile);
                } else {
                    for (int r = 0; r < nr; r++)
                        int4_tile1(wt + r * (k / 2), k, st + r * groups * scale_bytes, groups, scale_bf16, qi, xsi, ci,
                                   bpg, tile + r);
                }
                for (int r = 0; r < nr; r++) y[i * n + n0 + r] = tile[r];
            }
        }
    }
    free(q);
    free(xs);
    free(sum8);
    free(corr);
    return 0;
}

/* INT8, one scale per row: out[r] for nr rows of w (row stride k), one activation row. */
__attribute__((target("avx2,fma"), always_inline)) static inline void int8_rows(
    const int8_t *w, int64_t k, int nr, const uint8_t *absq, const int8_t *q, const float *xs, float *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[ROWS];
    for (int r = 0; r < nr; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < k / BLOCK; b++) {
        const __m256i a0 = _mm256_loadu_si256((const __m256i *)(absq + b * BLOCK));
        const __m256i a1 = _mm256_loadu_si256((const __m256i *)(absq + b * BLOCK + 32));
        const __m256i s0 = _mm256_loadu_si256((const __m256i *)(q + b * BLOCK));
        const __m256i s1 = _mm256_loadu_si256((const __m256i *)(q + b * BLOCK + 32));
        const __m256 xscale = _mm256_broadcast_ss(xs + b);
        for (int r = 0; r < nr; r++) {
            const int8_t *wb = w + r * k + b * BLOCK;
            const __m256i w0 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)wb), s0);
            const __m256i w1 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(wb + 32)), s1);
            const __m256i dots = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(a0, w0), ones),
                                                  _mm256_madd_epi16(_mm256_maddubs_epi16(a1, w1), ones));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), xscale, acc[r]);
        }
    }
    for (int r = 0; r < nr; r++) out[r] = hsum(acc[r]);
}

__attribute__((target("avx2,fma"))) static void int8_tile4(const int8_t *w, int64_t k, const uint8_t *absq,
                                                           const int8_t *q, const float *xs, float *out) {
    int8_rows(w, k, ROWS, absq, q, xs, out);
}

__attribute__((target("avx2,fma"))) static void int8_tile1(const int8_t *w, int64_t k, const uint8_t *absq,
                                                           const int8_t *q, const float *xs, float *out) {
    int8_rows(w, k, 1, absq, q, xs, out);
}

/* y[m, n] = sum_k x[m, k] w[n, k] scale[n]; w int8 [n, k], scales [n] (float or bf16). */
int glmkit_int8_matmul(const float *x, int64_t m, int64_t k, const int8_t *w, int64_t n, const void *scales,
                        int scale_bf16, float *y, int threads) {
    const int64_t blocks = k / BLOCK;
    int8_t *q = malloc((size_t)(m * k));
    uint8_t *absq = malloc((size_t)(m * k));
    float *xs = malloc(sizeof(float) * (size_t)(m * blocks));
    if (!q || !absq || !xs) {
        free(q);
        free(absq);
        free(xs);
        return 1;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < m; i++) {
        quantize_row(x + i * k, k, 0, q + i * k, xs + i * blocks, NULL);
        for (int64_t j = 0; j < k; j++) absq[i * k + j] = (uint8_t)abs(q[i * k + j]);
    }
    const int64_t tiles = (n + ROWS - 1) / ROWS;
    for (int64_t m0 = 0; m0 < m; m0 += M_CHUNK) {
        const int64_t m1 = m0 + M_CHUNK < m ? m0 + M_CHUNK : m;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t n0 = t * ROWS;
            const int nr = n - n0 < ROWS ? (int)(n - n0) : ROWS;
            for (int64_t i = m0; i < m1; i++) {
                float tile[ROWS];
                if (nr == ROWS) {
                    int8_tile4(w + n0 * k, k, absq + i * k, q + i * k, xs + i * blocks, tile);
                } else {
                    for (int r = 0; r < nr; r++)
                        int8_tile1(w + (n0 + r) * k, k, absq + i * k, q + i * k, xs + i * blocks, tile + r);
                }
                for (int r = 0; r < nr; r++) y[i * n + n0 + r] = tile[r] * read_scale(scales, n0 + r, scale_bf16);
            }
        }
    }
    free(q);
    free(absq);
    free(xs);
    return 0;
}

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
 * That is the AVX2 set; an AVX-512 VNNI set (further down) does the same with vpdpbusd on 64-byte
 * loads, and glmkit_dequantize_bf16 feeds PyTorch's bf16 matmul for prompts on AMX CPUs.
 *
 * Built at run time by glmkit/quant/kernels/__init__.py (gcc -O3 -fopenmp, called through ctypes); each
 * set's functions carry their own target attribute, glmkit_cpu_level() says which sets the running
 * CPU can take, and every entry point takes the set to use (`isa`). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64   /* activation quantization block: 32 packed INT4 bytes */
#define ROWS 4     /* weight rows per micro-kernel call: the activation loads are shared */
#define M_CHUNK 16 /* activation rows kept hot in cache while a weight tile is reused */
/* Software prefetch of the weights: each load also asks for the same place in the next tile, ROWS
 * rows on. Measured with cold weights: the hardware prefetcher alone, or a fixed distance within the
 * row, leave a quarter to a third of the bandwidth unused at the start of every tile. */
#ifndef PREFETCH
#define PREFETCH 1
#endif

/* 0: neither kernel set runs here; 1: AVX2 + FMA; 2: also AVX-512 with VNNI (vpdpbusd). */
int glmkit_cpu_level(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
        return 2;
    return 1;
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

/* One activation row -> int8 per block of 64, scale = absmax / 127, q = round_half_even(x * (1 / scale)),
 * total[b] = sum(q) over the block. `span` 0 keeps the column order; 64 or 128 stores each span of
 * columns as its even columns followed by its odd ones, the order of the INT4 nibbles in one
 * 32-byte (AVX2) or 64-byte (AVX-512) weight load. */
__attribute__((target("avx2,fma"))) static void quantize_row(const float *x, int64_t k, int span, int8_t *q,
                                                             float *scale, int32_t *total) {
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
        int32_t sum = 0;
        for (int i = 0; i < BLOCK; i++) {
            const int64_t column = b * BLOCK + i, start = span ? column - column % span : 0;
            q[span ? start + (column & 1) * (span / 2) + (column - start) / 2 : column] = (int8_t)values[i];
            sum += values[i];
        }
        scale[b] = d;
        total[b] = sum;
    }
}

__attribute__((target("avx2,fma"))) static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One matmul: the weights, and the activations quantized for the chosen kernel set. */
typedef struct {
    const void *w;
    int64_t row_bytes, n, k, m;
    const void *scales;
    int bf16;
    int64_t groups, group, blocks;
    int8_t *q;       /* activations, int8 */
    float *xs;       /* their scale per block */
    int32_t *total;  /* sum(q) per block */
    int32_t *bias;   /* AVX-512: -offset * total, one 16-lane vector per weight load */
    float *corr;     /* AVX2 INT4: 8 * sum(scale * total) per group */
    uint8_t *absq;   /* AVX2 INT8: |q| */
    float *y;
} Job;

typedef void (*TileFn)(const Job *j, int64_t n0, int nr, int64_t i0, int nm);

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
#if PREFETCH
                if ((b & 1) == 0) _mm_prefetch((const char *)(w + (r + ROWS) * row_bytes + b * 32), _MM_HINT_T0);
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

/* ---- AVX-512 VNNI: one 64-byte load is 128 INT4 weights (two activation blocks) or 64 INT8 ones,
 * and vpdpbusd does the u8 x s8 dot product straight into int32. Each weight load is unpacked once
 * and used for up to MR activation rows, which is what makes prompts (many rows) fast. The unsigned
 * offset (+8 for INT4 nibbles, +128 for INT8 after XOR 0x80) is taken off in integers: each dot
 * product starts from a bias vector that holds -offset * sum(q) in the first lane of each block. */
#define AVX512 "avx512f,avx512bw,avx512vnni,avx2,fma"
#define PAIR 128 /* columns per 64-byte INT4 load */
#define MR 4     /* activation rows per AVX-512 micro-kernel */

__attribute__((target(AVX512), always_inline)) static inline void int4_block_512(const Job *j, int64_t n0, int nr,
                                                                                int64_t i0, int nm) {
    const int64_t pairs = j->k / PAIR, ppg = j->groups == 1 ? pairs : j->group / PAIR;
    const int grouped = j->groups > 1;
    const uint8_t *w = (const uint8_t *)j->w + n0 * j->row_bytes;
    const __m512i flip = _mm512_set1_epi8((char)0x88), low4 = _mm512_set1_epi8(0x0F);
    const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc[ROWS][MR], gscale[ROWS];
    for (int r = 0; r < nr; r++) {
        gscale[r] = _mm512_set1_ps(1.0f);
        for (int i = 0; i < nm; i++) acc[r][i] = _mm512_setzero_ps();
    }
    for (int64_t p = 0; p < pairs; p++) {
        if (grouped && p % ppg == 0)
            for (int r = 0; r < nr; r++)
                gscale[r] = _mm512_set1_ps(read_scale(j->scales, (n0 + r) * j->groups + p / ppg, j->bf16));
        __m512 xscale[MR];  /* lanes 0-7: block 2p's scale, lanes 8-15: block 2p+1's */
        for (int i = 0; i < nm; i++)
            xscale[i] = _mm512_permutexvar_ps(halves, _mm512_maskz_loadu_ps(0x3, j->xs + (i0 + i) * j->blocks + 2 * p));
        for (int r = 0; r < nr; r++) {
            const uint8_t *wp = w + r * j->row_bytes + p * 64;
#if PREFETCH
            _mm_prefetch((const char *)(wp + ROWS * j->row_bytes), _MM_HINT_T0);
#endif
            const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(wp), flip);
            const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            for (int i = 0; i < nm; i++) {
                const int8_t *qp = j->q + (i0 + i) * j->k + p * PAIR;
                __m512i dot = _mm512_loadu_si512(j->bias + ((i0 + i) * j->blocks + 2 * p) * 8);
                dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512(qp));
                dot = _mm512_dpbusd_epi32(dot, lo, _mm512_loadu_si512(qp + 64));
                const __m512 scale = grouped ? _mm512_mul_ps(xscale[i], gscale[r]) : xscale[i];
                acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r][i]);
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int i = 0; i < nm; i++) {
            const float v = _mm512_reduce_add_ps(acc[r][i]);
            j->y[(i0 + i) * j->n + n0 + r] = grouped ? v : v * read_scale(j->scales, n0 + r, j->bf16);
        }
}

__attribute__((target(AVX512), always_inline)) static inline void int8_block_512(const Job *j, int64_t n0, int nr,
                                                                                int64_t i0, int nm) {
    const int8_t *w = (const int8_t *)j->w + n0 * j->row_bytes;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[ROWS][MR];
    for (int r = 0; r < nr; r++)
        for (int i = 0; i < nm; i++) acc[r][i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < j->blocks; b++) {
        __m512 xscale[MR];
        for (int i = 0; i < nm; i++) xscale[i] = _mm512_set1_ps(j->xs[(i0 + i) * j->blocks + b]);
        for (int r = 0; r < nr; r++) {
            const int8_t *wb = w + r * j->row_bytes + b * BLOCK;
#if PREFETCH
            _mm_prefetch((const char *)(wb + ROWS * j->row_bytes), _MM_HINT_T0);
#endif
            const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(wb), flip);
            for (int i = 0; i < nm; i++) {
                __m512i dot = _mm512_loadu_si512(j->bias + ((i0 + i) * j->blocks + b) * 16);
                dot = _mm512_dpbusd_epi32(dot, v, _mm512_loadu_si512(j->q + (i0 + i) * j->k + b * BLOCK));
                acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), xscale[i], acc[r][i]);
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int i = 0; i < nm; i++)
            j->y[(i0 + i) * j->n + n0 + r] = _mm512_reduce_add_ps(acc[r][i]) * read_scale(j->scales, n0 + r, j->bf16);
}

/* The AVX-512 tiles: full ROWS x MR blocks where they fit, single rows/columns at the edges, each a
 * separate instantiation so the loops over r and i unroll with constant bounds. */
#define TILE_512(name, block)                                                                                    \
    __attribute__((target(AVX512))) static void name##_full(const Job *j, int64_t n0, int64_t i0) {               \
        block(j, n0, ROWS, i0, MR);                                                                              \
    }                                                                                                            \
    __attribute__((target(AVX512))) static void name##_row(const Job *j, int64_t n0, int64_t i0) {                \
        block(j, n0, ROWS, i0, 1);                                                                               \
    }                                                                                                            \
    __attribute__((target(AVX512))) static void name##_one(const Job *j, int64_t n0, int64_t i0) {                \
        block(j, n0, 1, i0, 1);                                                                                  \
    }                                                                                                            \
    static void name(const Job *j, int64_t n0, int nr, int64_t i0, int nm) {                                      \
        if (nr == ROWS && nm == MR) return name##_full(j, n0, i0);                                               \
        for (int i = 0; i < nm; i++) {                                                                           \
            if (nr == ROWS) name##_row(j, n0, i0 + i);                                                           \
            else for (int r = 0; r < nr; r++) name##_one(j, n0 + r, i0 + i);                                    \
        }                                                                                                        \
    }

TILE_512(int4_tile_512, int4_block_512)
TILE_512(int8_tile_512, int8_block_512)

/* ---- AVX2 tiles: one activation row at a time. */
__attribute__((target("avx2,fma"))) static void int4_tile_avx2(const Job *j, int64_t n0, int nr, int64_t i0, int nm) {
    const int64_t bpg = j->group / BLOCK;
    const char *scales = (const char *)j->scales + n0 * j->groups * (j->bf16 ? 2 : 4);
    const uint8_t *w = (const uint8_t *)j->w + n0 * j->row_bytes;
    for (int64_t i = i0; i < i0 + nm; i++) {
        const int8_t *q = j->q + i * j->k;
        const float *xs = j->xs + i * j->blocks, *corr = j->corr + i * j->groups;
        float *out = j->y + i * j->n + n0;
        if (nr == ROWS) {
            int4_rows(w, j->k, scales, j->groups, j->bf16, ROWS, q, xs, corr, bpg, out, 1);
        } else {
            for (int r = 0; r < nr; r++)
                int4_rows(w + r * j->row_bytes, j->k, scales + r * j->groups * (j->bf16 ? 2 : 4), j->groups, j->bf16,
                          1, q, xs, corr, bpg, out + r, 1);
        }
    }
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
#if PREFETCH
            _mm_prefetch((const char *)(wb + ROWS * k), _MM_HINT_T0);
#endif
            const __m256i w0 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)wb), s0);
            const __m256i w1 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(wb + 32)), s1);
            const __m256i dots = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(a0, w0), ones),
                                                  _mm256_madd_epi16(_mm256_maddubs_epi16(a1, w1), ones));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), xscale, acc[r]);
        }
    }
    for (int r = 0; r < nr; r++) out[r] = hsum(acc[r]);
}

__attribute__((target("avx2,fma"))) static void int8_tile_avx2(const Job *j, int64_t n0, int nr, int64_t i0, int nm) {
    const int8_t *w = (const int8_t *)j->w + n0 * j->row_bytes;
    for (int64_t i = i0; i < i0 + nm; i++) {
        float *out = j->y + i * j->n + n0;
        if (nr == ROWS) {
            int8_rows(w, j->k, ROWS, j->absq + i * j->k, j->q + i * j->k, j->xs + i * j->blocks, out);
        } else {
            for (int r = 0; r < nr; r++)
                int8_rows(w + r * j->k, j->k, 1, j->absq + i * j->k, j->q + i * j->k, j->xs + i * j->blocks, out + r);
        }
        for (int r = 0; r < nr; r++) out[r] *= read_scale(j->scales, n0 + r, j->bf16);
    }
}

/* ---- drivers */

/* Quantize the activations in the layout the chosen tiles read, with their offset corrections. */
static int prepare(Job *j, const float *x, int bits, int wide, int threads) {
    const int64_t m = j->m, k = j->k, blocks = j->blocks;
    j->q = malloc((size_t)(m * k));
    j->xs = malloc(sizeof(float) * (size_t)(m * blocks));
    j->total = malloc(sizeof(int32_t) * (size_t)(m * blocks));
    j->bias = wide ? calloc((size_t)(m * blocks * 16), sizeof(int32_t)) : NULL;
    j->corr = !wide && bits == 4 ? calloc((size_t)(m * j->groups), sizeof(float)) : NULL;
    j->absq = !wide && bits == 8 ? malloc((size_t)(m * k)) : NULL;
    if (!j->q || !j->xs || !j->total || (wide && !j->bias) || (!wide && bits == 4 && !j->corr) ||
        (!wide && bits == 8 && !j->absq))
        return 1;
    const int span = bits == 8 ? 0 : wide ? PAIR : BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < m; i++) {
        quantize_row(x + i * k, k, span, j->q + i * k, j->xs + i * blocks, j->total + i * blocks);
        for (int64_t b = 0; b < blocks; b++) {
            const int32_t total = j->total[i * blocks + b];
            if (wide && bits == 4)  /* block b is lane 0 or lane 8 of its pair's vector */
                j->bias[(i * blocks + b - b % 2) * 8 + (b % 2) * 8] = -8 * total;
            else if (wide)
                j->bias[(i * blocks + b) * 16] = -128 * total;
            else if (bits == 4)
                j->corr[i * j->groups + b / (j->group / BLOCK)] += 8.0f * j->xs[i * blocks + b] * (float)total;
        }
        if (j->absq)
            for (int64_t c = 0; c < k; c++) j->absq[i * k + c] = (uint8_t)abs(j->q[i * k + c]);
    }
    return 0;
}

static void release(Job *j) {
    free(j->q);
    free(j->xs);
    free(j->total);
    free(j->bias);
    free(j->corr);
    free(j->absq);
}

/* Weight tiles of ROWS rows split across threads; activation rows in chunks of M_CHUNK so that a
 * tile's weights stay in cache while they meet every row of the chunk. */
static void run_tiles(const Job *j, TileFn tile, int row_step, int threads) {
    const int64_t tiles = (j->n + ROWS - 1) / ROWS;
    for (int64_t m0 = 0; m0 < j->m; m0 += M_CHUNK) {
        const int64_t m1 = m0 + M_CHUNK < j->m ? m0 + M_CHUNK : j->m;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t n0 = t * ROWS;
            const int nr = j->n - n0 < ROWS ? (int)(j->n - n0) : ROWS;
            for (int64_t i = m0; i < m1; i += row_step) tile(j, n0, nr, i, (int)(m1 - i < row_step ? m1 - i : row_step));
        }
    }
}

static int run(Job *j, const float *x, int bits, int wide, int threads) {
    const int failed = prepare(j, x, bits, wide, threads);
    if (!failed) {
        const TileFn tile = bits == 4 ? (wide ? int4_tile_512 : int4_tile_avx2) : (wide ? int8_tile_512 : int8_tile_avx2);
        run_tiles(j, tile, wide ? MR : 1, threads);
    }
    release(j);
    return failed;
}

/* y[m, n] = sum_k x[m, k] w[n, k]; x float [m, k], w packed [n, k/2], scales [n, k/group] (float or
 * bf16), y float [m, n]. k and group must be multiples of 64 (the caller checks); `isa` is the
 * highest kernel set to use (glmkit_cpu_level's numbering). Returns 1 when the activation buffers
 * cannot be allocated, else 0. */
int glmkit_int4_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, const void *scales,
                        int scale_bf16, int64_t group, float *y, int threads, int isa) {
    Job j = {.w = w, .row_bytes = k / 2, .n = n, .k = k, .m = m, .scales = scales, .bf16 = scale_bf16,
             .groups = k / group, .group = group, .blocks = k / BLOCK, .y = y};
    const int wide = isa >= 2 && k % PAIR == 0 && (j.groups == 1 || group % PAIR == 0);
    return run(&j, x, 4, wide, threads);
}

/* y[m, n] = sum_k x[m, k] w[n, k] scale[n]; w int8 [n, k], scales [n] (float or bf16). */
int glmkit_int8_matmul(const float *x, int64_t m, int64_t k, const int8_t *w, int64_t n, const void *scales,
                        int scale_bf16, float *y, int threads, int isa) {
    Job j = {.w = w, .row_bytes = k, .n = n, .k = k, .m = m, .scales = scales, .bf16 = scale_bf16, .groups = 1,
             .group = k, .blocks = k / BLOCK, .y = y};
    return run(&j, x, 8, isa >= 2, threads);
}

/* ---- Dequantization to bf16, for prompts on CPUs whose bf16 matmul (AMX through oneDNN) outruns
 * the integer kernels: rows [r0, r1) of W become out[r1 - r0, k], rounded to nearest even. */
static inline __attribute__((always_inline)) uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

static inline __attribute__((always_inline)) void dequantize_rows(const void *w, int bits, int64_t r0, int64_t r1,
                                                                  int64_t k, const void *scales, int bf16,
                                                                  int64_t group, uint16_t *out) {
    const int64_t groups = k / group;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t g = 0; g < groups; g++) {
            const float s = read_scale(scales, r * groups + g, bf16);
            uint16_t *dst = out + (r - r0) * k + g * group;
            if (bits == 4) {
                const int8_t *src = (const int8_t *)w + r * (k / 2) + g * (group / 2);
                for (int64_t c = 0; c < group / 2; c++) {
                    dst[2 * c] = float_to_bf16((float)(src[c] >> 4) * s);
                    dst[2 * c + 1] = float_to_bf16((float)((int8_t)(src[c] << 4) >> 4) * s);
                }
            } else {
                const int8_t *src = (const int8_t *)w + r * k + g * group;
                for (int64_t c = 0; c < group; c++) dst[c] = float_to_bf16((float)src[c] * s);
            }
        }
}

__attribute__((target("avx512f,avx512bw,avx2,fma"))) static void dequantize_512(const void *w, int bits, int64_t r0,
                                                                                int64_t r1, int64_t k, const void *scales,
                                                                                int bf16, int64_t group, uint16_t *out) {
    dequantize_rows(w, bits, r0, r1, k, scales, bf16, group, out);
}

__attribute__((target("avx2,fma"))) static void dequantize_avx2(const void *w, int bits, int64_t r0, int64_t r1,
                                                                int64_t k, const void *scales, int bf16, int64_t group,
                                                                uint16_t *out) {
    dequantize_rows(w, bits, r0, r1, k, scales, bf16, group, out);
}

/* out[r1 - r0, k] (bf16 bits) = rows [r0, r1) of an INT4 (official packing) or INT8 weight times
 * its scales [n, k/group]. */
void glmkit_dequantize_bf16(const void *w, int bits, int64_t r0, int64_t r1, int64_t k, const void *scales,
                            int scale_bf16, int64_t group, uint16_t *out, int threads, int isa) {
    const int64_t step = 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = r0; r < r1; r += step) {
        const int64_t end = r + step < r1 ? r + step : r1;
        if (isa >= 2)
            dequantize_512(w, bits, r, end, k, scales, scale_bf16, group, out + (r - r0) * k);
        else
            dequantize_avx2(w, bits, r, end, k, scales, scale_bf16, group, out + (r - r0) * k);
    }
}

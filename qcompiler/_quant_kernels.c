/* Round-to-nearest quantization of float32 weight groups in one pass over memory, multithreaded.
 *
 * The same formulas as qcompiler/quant.py (which is the reference and the fallback): each group is
 * read once, its statistics, scale and codes computed while it is in cache. Results are
 * bit-identical to the torch path (tested): f32 arithmetic in the same order, f16 scales rounded
 * to nearest even, round-half-to-even codes (nearbyintf), and the same level tables for NF4/E2M1.
 * Called through ctypes; the Python module around it exists only so setuptools builds it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>
#include <string.h>

#define EPS FLT_EPSILON
/* One build runs everywhere: an AVX2+FMA clone (vectorized rounding and division) chosen at load
 * time where the CPU has it, the baseline x86-64 code elsewhere. */
#if defined(__x86_64__) && defined(__GNUC__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#define CLONES_FMA __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#define CLONES_FMA
#endif
#define F16_TINY 6.103515625e-05f /* smallest normal f16 */

static inline _Float16 f16_scale(float scale) {
    if (fabsf(scale) < EPS) scale = EPS;
    _Float16 half = (_Float16)scale;
    if ((float)half == 0.0f) half = (_Float16)F16_TINY;
    return half;
}

static inline float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

/* Vector lanes of running minima and maxima, then combined (an OpenMP simd reduction): the same values
 * as one running pair, since min and max do not depend on the order (only a zero's sign might, which
 * no caller reads). */
static inline void min_max(const float *x, int64_t n, float *lo, float *hi) {
    float a = x[0], b = x[0];
#pragma omp simd reduction(min : a) reduction(max : b)
    for (int64_t j = 1; j < n; j++) {
        a = x[j] < a ? x[j] : a;
        b = x[j] > b ? x[j] : b;
    }
    *lo = a;
    *hi = b;
}

/* Round to nearest's f16 scale of a group and its zero point (0 for symmetric): quant.py's formulas,
 * shared by every integer kernel below. A symmetric scale takes the sign of the larger side. */
static inline _Float16 rtn_scale(const float *x, int64_t g, int asym, float levels, float half_range, float *zp) {
    float lo, hi;
    min_max(x, g, &lo, &hi);
    if (asym) {
        lo = lo < 0.0f ? lo : 0.0f;
        hi = hi > 0.0f ? hi : 0.0f;
        _Float16 s16 = f16_scale((hi - lo) / levels);
        *zp = clampf(-nearbyintf(lo / (float)s16), 0.0f, levels);
        return s16;
    }
    float a = fabsf(lo);
    *zp = 0.0f;
    return f16_scale((a >= hi ? a : -hi) / half_range);
}

/* Integer modes: one group's codes, scale and zero point. */
static inline void quantize_int_group(const float *x, int64_t i, int64_t g, int asym, float levels, float half_range,
                                      void *codes, uint16_t *scale, uint8_t *zero_point) {
    float zp;
    const _Float16 s16 = rtn_scale(x, g, asym, levels, half_range, &zp);
    const float s = (float)s16;
    if (asym) {
        zero_point[i] = (uint8_t)zp;
        uint8_t *q = (uint8_t *)codes + i * g;
        for (int64_t j = 0; j < g; j++) q[j] = (uint8_t)clampf(nearbyintf(x[j] / s) + zp, 0.0f, levels);
    } else {
        int8_t *q = (int8_t *)codes + i * g;
        for (int64_t j = 0; j < g; j++) q[j] = (int8_t)clampf(nearbyintf(x[j] / s), -half_range, half_range - 1.0f);
    }
    memcpy(scale + i, &s16, sizeof s16);
}

/* Integer modes. codes: int8 (symmetric) or uint8 (asymmetric) [groups * g]; scale: f16 bits
 * [groups]; zero_point: uint8 [groups] or NULL for symmetric. */
CLONES void quantize_int(const float *w, int64_t groups, int64_t g, int bits, int asym, void *codes,
                  uint16_t *scale, uint8_t *zero_point, int threads) {
    const float levels = (float)((1 << bits) - 1), half_range = (float)(1 << (bits - 1));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < groups; i++)
        quantize_int_group(w + i * g, i, g, asym, levels, half_range, codes, scale, zero_point);
}

/* The same from bf16 (bf16 = 1) or f16 (0) weights: each group is widened to float32 (exactly) into a
 * buffer of the thread's, then quantized as above, so the codes equal those of the float32 copy
 * without one being made (a half-precision checkpoint's weights are read as stored). Returns 0, or -1
 * when a buffer could not be allocated (nothing is then valid). */
CLONES int quantize_int_half(const uint16_t *w, int bf16, int64_t groups, int64_t g, int bits, int asym,
                              void *codes, uint16_t *scale, uint8_t *zero_point, int threads) {
    const float levels = (float)((1 << bits) - 1), half_range = (float)(1 << (bits - 1));
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *x = (float *)malloc((size_t)g * sizeof(float));
        failed = x == NULL;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < groups; i++) {
            if (x == NULL) continue;
            const uint16_t *h = w + i * g;
            if (bf16) {
                for (int64_t j = 0; j < g; j++) {
                    const uint32_t bits32 = (uint32_t)h[j] << 16;
                    memcpy(x + j, &bits32, sizeof bits32);
                }
            } else {
                for (int64_t j = 0; j < g; j++) {
                    _Float16 v;
                    memcpy(&v, h + j, sizeof v);
                    x[j] = (float)v;
                }
            }
            quantize_int_group(x, i, g, asym, levels, half_range, codes, scale, zero_point);
        }
        free(x);
    }
    return failed ? -1 : 0;
}

/* Nearest level of a sorted table through a uniform grid of bins (quant.py's _LevelTable). */
static inline int level_index(float x, float start, float width, int bins, const int64_t *below,
                              const float *threshold) {
    float b = floorf((x - start) / width);
    b = clampf(b, 0.0f, (float)(bins - 1));
    int64_t k = (int64_t)b;
    return (int)below[k] + (x > threshold[k]);
}

/* NF4 (mx = 0: scale f16 = max|W|) and MXFP4 (mx = 1: scale = E8M0 exponent of max|W| / 6).
 * codes uint8 [groups * g]: the level index mapped through code_of (identity for NF4). */
CLONES void quantize_table(const float *w, int64_t groups, int64_t g, int mx, float start, float width, int bins,
                    const int64_t *below, const float *threshold, const uint8_t *code_of, uint8_t *codes,
                    void *scale, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < groups; i++) {
        const float *x = w + i * g;
        float amax = 0.0f;
        for (int64_t j = 0; j < g; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
        float s;
        if (mx) {
            float a = amax / 6.0f;
            if (a < EPS) a = EPS;
            int e;
            float m = frexpf(a, &e); /* a = m * 2^e, m in [0.5, 1): ceil(log2 a) is e, or e - 1 when m == 0.5 */
            int exponent = m == 0.5f ? e - 1 : e;
            exponent = exponent < -127 ? -127 : (exponent > 127 ? 127 : exponent);
            ((uint8_t *)scale)[i] = (uint8_t)(exponent + 127);
            s = ldexpf(1.0f, exponent);
        } else {
            _Float16 s16 = f16_scale(amax);
            memcpy((uint16_t *)scale + i, &s16, sizeof s16);
            s = (float)s16;
        }
        uint8_t *q = codes + i * g;
        for (int64_t j = 0; j < g; j++) q[j] = code_of[level_index(x[j] / s, start, width, bins, below, threshold)];
    }
}

/* max over rows of mean((dequantize(quantize(W)) - W)^2) for per-channel integer modes: the data-free
 * mixed-precision criterion, without materializing codes. */
CLONES double int_error(const float *w, int64_t rows, int64_t k, int bits, int asym, int threads) {
    const float levels = (float)((1 << bits) - 1), half_range = (float)(1 << (bits - 1));
    double worst = 0.0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(max : worst)
    for (int64_t i = 0; i < rows; i++) {
        const float *x = w + i * k;
        float sum = 0.0f, zp;
        const float s = (float)rtn_scale(x, k, asym, levels, half_range, &zp);
        if (asym) {
            for (int64_t j = 0; j < k; j++) {
                float d = (clampf(nearbyintf(x[j] / s) + zp, 0.0f, levels) - zp) * s - x[j];
                sum += d * d;
            }
        } else {
            for (int64_t j = 0; j < k; j++) {
                float d = clampf(nearbyintf(x[j] / s), -half_range, half_range - 1.0f) * s - x[j];
                sum += d * d;
            }
        }
        double mean = (double)sum / (double)k;
        worst = mean > worst ? mean : worst;
    }
    return worst;
}

/* Scale estimation for the integer modes (qcompiler/weight_fit.py's `estimate`, the reference and the
 * fallback, in the same steps): each group row (one output channel's g weights) is refitted start to
 * end while its weights and its g x g Hessian block are in cache, instead of ~100 passes over the whole
 * weight; TILE rows of one group go through the steps together so that the error d^T H d of all of them
 * reads H once (a small matrix product in registers). wg: float32 [G, N, g] (group major); h: [G, g, g];
 * imp: [G, g]; work: 4 * TILE * g floats per thread. Out: scale (f16 bits) and zero point (asymmetric)
 * [G * N]; per group row the error with round to nearest, after, and of d = w (the reference the errors
 * are relative to). Worth it while a Hessian block stays in cache: the caller keeps g <= 256. */
#define TILE 8
typedef float v8f __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));

static inline float hsum8(const float *p) { return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7])); }

/* err[r] += d_r^T H d_r over the TILE rows of d [TILE][g], LANES columns of H d at a time in vectors VT */
#define QUADRATIC_LANES(VT, LANES)                                                                          \
    for (int64_t c = 0; c < g; c += LANES) {                                                                \
        VT acc[TILE];                                                                                       \
        for (int r = 0; r < TILE; r++) acc[r] = (VT){0};                                                    \
        for (int64_t j = 0; j < g; j++) {                                                                   \
            VT hv;                                                                                          \
            memcpy(&hv, h + j * g + c, sizeof hv);                                                          \
            for (int r = 0; r < TILE; r++) acc[r] += d[r * g + j] * hv;                                     \
        }                                                                                                   \
        for (int r = 0; r < TILE; r++) {                                                                    \
            VT dv;                                                                                          \
            memcpy(&dv, d + r * g + c, sizeof dv);                                                          \
            VT prod = acc[r] * dv;                                                                          \
            const float *q = (const float *)&prod;                                                          \
            err[r] += LANES == 16 ? hsum8(q) + hsum8(q + 8) : hsum8(q);                                     \
        }                                                                                                   \
    }

/* err[r] = d_r^T H d_r for the TILE rows of d [TILE][g] */
static inline void quadratic_tile(const float *d, const float *h, int64_t g, float *err) {
    for (int r = 0; r < TILE; r++) err[r] = 0.0f;
    if (g % 8) {
        for (int r = 0; r < TILE; r++)
            for (int64_t i = 0; i < g; i++) {
                float hd = 0.0f;
                for (int64_t j = 0; j < g; j++) hd += h[i * g + j] * d[r * g + j]; /* H symmetric: rows read along */
                err[r] += hd * d[r * g + i];
            }
    } else if (g % 16 == 0) { /* 16 lanes: one AVX-512 register per row (two AVX2 ones elsewhere) */
        QUADRATIC_LANES(v16f, 16)
    } else {
        QUADRATIC_LANES(v8f, 8)
    }
}

static inline void decode_row(const float *w, float s, float zp, int asym, float levels, float half_range, float *v,
                              float *d, int64_t g) {
    if (asym)
        for (int64_t j = 0; j < g; j++) v[j] = clampf(rintf(w[j] / s) + zp, 0.0f, levels) - zp;
    else
        for (int64_t j = 0; j < g; j++) v[j] = clampf(rintf(w[j] / s), -half_range, half_range - 1.0f);
    if (d)
        for (int64_t j = 0; j < g; j++) d[j] = w[j] - v[j] * s;
}

static inline _Float16 candidate_scale(const float *weighted, const float *v, float sign, int64_t g) {
    float sum = 0.0f;
    for (int64_t j = 0; j < g; j++) {
        float a = fabsf(v[j]);
        sum += weighted[j] / (a > 0.001f ? a : 0.001f);
    }
    return f16_scale(sign * (sum > 1e-12f ? sum : 1e-12f));
}

CLONES_FMA void scale_estimate_int(const float *wg, int64_t groups, int64_t rows, int64_t g, const float *h,
                               const float *imp, int bits, int asym, int initial_steps, int scale_steps,
                               uint16_t *scale, uint8_t *zero_point, float *err_rtn, float *err_best,
                               float *err_ref, float *work, int threads) {
    const float levels = (float)((1 << bits) - 1), half_range = (float)(1 << (bits - 1));
    const int64_t tiles_per_group = (rows + TILE - 1) / TILE;
#pragma omp parallel num_threads(threads)
    {
        float *buf = work + (size_t)omp_get_thread_num() * 4 * TILE * g;
        float *v = buf, *v2 = buf + TILE * g, *d = buf + 2 * TILE * g, *weighted = buf + 3 * TILE * g;
#pragma omp for schedule(dynamic, 4)
        for (int64_t t = 0; t < groups * tiles_per_group; t++) {
            const int64_t gi = t / tiles_per_group, n0 = (t % tiles_per_group) * TILE;
            const int live = (int)(rows - n0 < TILE ? rows - n0 : TILE);
            const float *hb = h + gi * g * g, *a = imp + gi * g;
            const int64_t first = gi * rows + n0;  /* index of the tile's first group row */
            float zp[TILE], s_rtn[TILE], sign[TILE], best_err[TILE], e[TILE];
            _Float16 best[TILE], c[TILE];
            memset(d, 0, sizeof(float) * TILE * g);  /* rows past `live` stay zero: their error is 0 */
            for (int r = 0; r < live; r++) {
                const float *w = wg + (first + r) * g;
                best[r] = rtn_scale(w, g, asym, levels, half_range, &zp[r]);
                if (asym) zero_point[first + r] = (uint8_t)zp[r];
                s_rtn[r] = (float)best[r];
                sign[r] = s_rtn[r] > 0.0f ? 1.0f : -1.0f;
                decode_row(w, s_rtn[r], zp[r], asym, levels, half_range, v + r * g, d + r * g, g);
                float total = 0.0f;
                for (int64_t j = 0; j < g; j++) total += v[r * g + j] != 0.0f ? a[j] : 0.0f;
                total = total > 1e-12f ? total : 1e-12f;
                for (int64_t j = 0; j < g; j++)
                    weighted[r * g + j] = (v[r * g + j] != 0.0f ? a[j] : 0.0f) / total * fabsf(w[j]);
            }
            quadratic_tile(d, hb, g, best_err);
            for (int r = 0; r < live; r++) err_rtn[first + r] = best_err[r];
            for (int step = 0; step < initial_steps + scale_steps; step++) {
                for (int r = 0; r < live; r++) {
                    const float *w = wg + (first + r) * g;
                    const float *from = v + r * g;
                    if (step >= initial_steps) {  /* the codes of the RTN scale shrunk by 5% steps */
                        const float shrunk = (float)f16_scale(s_rtn[r] * (float)(1.0 - 0.05 * (step - initial_steps)));
                        decode_row(w, shrunk, zp[r], asym, levels, half_range, v2 + r * g, NULL, g);
                        from = v2 + r * g;
                    }
                    c[r] = candidate_scale(weighted + r * g, from, sign[r], g);
                    decode_row(w, (float)c[r], zp[r], asym, levels, half_range, v2 + r * g, d + r * g, g);
                }
                quadratic_tile(d, hb, g, e);
                for (int r = 0; r < live; r++) {
                    if (e[r] < best_err[r]) best[r] = c[r], best_err[r] = e[r];
                    if (step < initial_steps)  /* the next round starts from the best scale's codes */
                        decode_row(wg + (first + r) * g, (float)best[r], zp[r], asym, levels, half_range, v + r * g,
                                   NULL, g);
                }
            }
            for (int r = 0; r < live; r++) {
                err_best[first + r] = best_err[r];
                memcpy(scale + first + r, &best[r], sizeof best[r]);
                memcpy(d + r * g, wg + (first + r) * g, sizeof(float) * g);
            }
            quadratic_tile(d, hb, g, e);
            for (int r = 0; r < live; r++) err_ref[first + r] = e[r];
        }
    }
}

/* AWQ's search residual W - Q(W * s) / s for the integer modes (quant.py's `awq_residual`, which is the
 * reference): W float32 [rows, k] in groups of g along k, s [k] the per-input-channel scale; each group
 * is scaled, quantized to nearest as `quantize_int` does, decoded and unscaled while in cache. */
CLONES void awq_residual_int(const float *w, const float *s, int64_t rows, int64_t k, int64_t g, int bits, int asym,
                             float *out, float *work, int threads) {
    const float levels = (float)((1 << bits) - 1), half_range = (float)(1 << (bits - 1));
    const int64_t groups = rows * (k / g);
#pragma omp parallel num_threads(threads)
    {
        float *x = work + (size_t)omp_get_thread_num() * g; /* g floats per thread */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < groups; i++) {
            const int64_t c0 = (i % (k / g)) * g;
            const float *wi = w + i * g, *si = s + c0;
            float *o = out + i * g;
            for (int64_t j = 0; j < g; j++) x[j] = wi[j] * si[j];
            float zp;
            const float sc = (float)rtn_scale(x, g, asym, levels, half_range, &zp);
            if (asym) {
                for (int64_t j = 0; j < g; j++)
                    o[j] = wi[j] - ((clampf(rintf(x[j] / sc) + zp, 0.0f, levels) - zp) * sc) / si[j];
            } else {
                for (int64_t j = 0; j < g; j++)
                    o[j] = wi[j] - (clampf(rintf(x[j] / sc), -half_range, half_range - 1.0f) * sc) / si[j];
            }
        }
    }
}

/* 4-bit codes (one per byte, low nibble used) packed two per byte, element 2i in the low nibble: the
 * layout of OpenVINO's u4/i4/nf4/f4e2m1 constants and of the torch backend's packed weights. */
void pack_nibbles(const uint8_t *src, int64_t n, uint8_t *dst, int threads) {
    const int64_t pairs = n / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < pairs; i++) dst[i] = (uint8_t)((src[2 * i] & 0x0F) | (src[2 * i + 1] << 4));
    if (n % 2) dst[pairs] = src[n - 1] & 0x0F;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_quant_kernels", "C kernels, called through ctypes", -1, NULL};

PyMODINIT_FUNC PyInit__quant_kernels(void) { return PyModule_Create(&module); }

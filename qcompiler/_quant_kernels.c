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
#include <string.h>

#define EPS FLT_EPSILON
/* One build runs everywhere: an AVX2+FMA clone (vectorized rounding and division) chosen at load
 * time where the CPU has it, the baseline x86-64 code elsewhere. */
#if defined(__x86_64__) && defined(__GNUC__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif
#define F16_TINY 6.103515625e-05f /* smallest normal f16 */

static inline _Float16 f16_scale(float scale) {
    if (fabsf(scale) < EPS) scale = EPS;
    _Float16 half = (_Float16)scale;
    if ((float)half == 0.0f) half = (_Float16)F16_TINY;
    return half;
}

static inline float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

static inline void min_max(const float *x, int64_t n, float *lo, float *hi) {
    float a = x[0], b = x[0];
    for (int64_t j = 1; j < n; j++) {
        a = x[j] < a ? x[j] : a;
        b = x[j] > b ? x[j] : b;
    }
    *lo = a;
    *hi = b;
}

/* Integer modes. codes: int8 (symmetric) or uint8 (asymmetric) [groups * g]; scale: f16 bits
 * [groups]; zero_point: uint8 [groups] or NULL for symmetric. */
CLONES void quantize_int(const float *w, int64_t groups, int64_t g, int bits, int asym, void *codes,
                  uint16_t *scale, uint8_t *zero_point, int threads) {
    const float levels = (float)((1 << bits) - 1), half_range = (float)(1 << (bits - 1));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < groups; i++) {
        const float *x = w + i * g;
        float lo, hi;
        min_max(x, g, &lo, &hi);
        _Float16 s16;
        if (asym) {
            lo = lo < 0.0f ? lo : 0.0f;
            hi = hi > 0.0f ? hi : 0.0f;
            s16 = f16_scale((hi - lo) / levels);
            float s = (float)s16;
            float zp = clampf(-nearbyintf(lo / s), 0.0f, levels);
            zero_point[i] = (uint8_t)zp;
            uint8_t *q = (uint8_t *)codes + i * g;
            for (int64_t j = 0; j < g; j++) q[j] = (uint8_t)clampf(nearbyintf(x[j] / s) + zp, 0.0f, levels);
        } else {
            float a = fabsf(lo);
            s16 = f16_scale((a >= hi ? a : -hi) / half_range);
            float s = (float)s16;
            int8_t *q = (int8_t *)codes + i * g;
            for (int64_t j = 0; j < g; j++) q[j] = (int8_t)clampf(nearbyintf(x[j] / s), -half_range, half_range - 1.0f);
        }
        memcpy(scale + i, &s16, sizeof s16);
    }
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
        float lo, hi;
        min_max(x, k, &lo, &hi);
        float sum = 0.0f;
        if (asym) {
            lo = lo < 0.0f ? lo : 0.0f;
            hi = hi > 0.0f ? hi : 0.0f;
            float s = (float)f16_scale((hi - lo) / levels);
            float zp = clampf(-nearbyintf(lo / s), 0.0f, levels);
            for (int64_t j = 0; j < k; j++) {
                float d = (clampf(nearbyintf(x[j] / s) + zp, 0.0f, levels) - zp) * s - x[j];
                sum += d * d;
            }
        } else {
            float a = fabsf(lo);
            float s = (float)f16_scale((a >= hi ? a : -hi) / half_range);
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

/* graddoctor's native statistics kernels: every statistic a step needs from one
 * read of each tensor.
 *
 * Why they exist: on a CPU the statistics of `watch` are bound by memory and by
 * arithmetic width. PyTorch has no single op that returns both an L2 norm and a
 * max-abs, so its path reads every gradient twice, cold from memory after
 * backward; these kernels read it once, with the vector width of the machine
 * (compiled there with -march=native; see BENCHMARKS.md for the numbers). Plain C
 * with no PyTorch headers: it compiles in a fraction of a second on first use
 * (graddoctor/core/_native/__init__.py) and is called through ctypes with raw pointers.
 *
 * Six passes, each over a list of contiguous tensors of one dtype:
 *   GD_STATS    sum of squares and max-abs of x                      (gradients)
 *   GD_COPY     y := x, and the sum of squares of x                  (weight snapshot + weight norm)
 *   GD_DIFF     sum of squares of (x - y), the difference in x's type (update norm)
 *   GD_MOMENTS  shifted sum and sum of squares, max-abs, NaN and Inf counts (input batches)
 *   GD_STATS2   GD_STATS of x, and the sum of squares of y in the `sum` column
 *               (a gradient and its weight read side by side: one pass, not two)
 *   GD_SCALE    y *= scale, float32 only (a clipping multiply)
 *
 * Work is split into chunks of GD_CHUNK elements spread over OpenMP threads (the
 * libgomp.so.1 PyTorch has already loaded, so its thread pool is shared). Chunks
 * are combined in a fixed order, so results do not depend on the thread count.
 * Squares are summed in the data's precision over blocks of GD_BLOCK elements and
 * the block sums in double: as fast as a float loop, and about as precise as a
 * pairwise sum (typically ~1e-7 relative on float32 data; the worst case is gamma_GD_BLOCK(u)).
 * `omp simd` lets the compiler put a block's sums in vector lanes without
 * -ffast-math, which would break the NaN handling below.
 *
 * NaN and Inf: a NaN entry makes the sum of squares NaN, an Inf makes it Inf.
 * Max-abs skips NaN (a > m is false for NaN); callers mark it NaN from the sums.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { GD_F32 = 0, GD_F64 = 1, GD_BF16 = 2 };
enum { GD_STATS = 0, GD_COPY = 1, GD_DIFF = 2, GD_MOMENTS = 3, GD_SCALE = 4, GD_STATS2 = 5 };

#define GD_CHUNK 65536          /* elements per work item: large enough to amortize scheduling */
#define GD_BLOCK 512            /* partial sums move into double every GD_BLOCK elements */
#define GD_PARALLEL_MIN 131072  /* below this many elements in all, threads cost more than they save */

/* One chunk's results. `sum`, `nan` and `inf` are filled by GD_MOMENTS only. */
typedef struct { double sumsq, maxabs, sum, nan, inf; } gd_part;

static inline float gd_bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define GD_IDENTITY(v) (v)
#define GD_UNUSED __attribute__((unused)) /* not every (pass, dtype) pair is used */

/* The loop skeleton shared by every pass: blocks of GD_BLOCK, block sums in double.
 * BODY sees `i` (the element index) and updates the block accumulators s, m, t, cn, ci. */
#define GD_BLOCKED(ACC, BODY)                                                   \
    gd_part p = {0.0, 0.0, 0.0, 0.0, 0.0};                                      \
    ACC mx = 0;                                                                 \
    for (int64_t b = 0; b < n; b += GD_BLOCK) {                                 \
        int64_t e = b + GD_BLOCK < n ? b + GD_BLOCK : n;                        \
        ACC s = 0, m = 0, t = 0;                                                \
        int64_t cn = 0, ci = 0;                                                 \
        _Pragma("omp simd reduction(+:s, t, cn, ci) reduction(max:m)")          \
        for (int64_t i = b; i < e; i++) { BODY }                                \
        p.sumsq += (double)s;                                                   \
        p.sum += (double)t;                                                     \
        p.nan += (double)cn;                                                    \
        p.inf += (double)ci;                                                    \
        mx = m > mx ? m : mx;                                                   \
    }                                                                           \
    p.maxabs = (double)mx;                                                      \
    (void)shift;                                                                \
    return p;

#define GD_KERNELS(SUFFIX, TYPE, ACC, LOAD, HUGE)                                                        \
    GD_UNUSED static gd_part gd_stats_##SUFFIX(const TYPE *x, TYPE *y, int64_t n, ACC shift) {                   \
        (void)y;                                                                                        \
        GD_BLOCKED(ACC, ACC v = (ACC)LOAD(x[i]); ACC a = v < 0 ? -v : v; s += v * v; m = a > m ? a : m;) \
    }                                                                                                   \
    GD_UNUSED static gd_part gd_stats2_##SUFFIX(const TYPE *x, TYPE *y, int64_t n, ACC shift) {                  \
        GD_BLOCKED(ACC, ACC v = (ACC)LOAD(x[i]); ACC a = v < 0 ? -v : v; ACC u = (ACC)LOAD(y[i]);        \
                   s += v * v; m = a > m ? a : m; t += u * u;)                                          \
    }                                                                                                   \
    GD_UNUSED static gd_part gd_copy_##SUFFIX(const TYPE *x, TYPE *y, int64_t n, ACC shift) {                    \
        GD_BLOCKED(ACC, y[i] = x[i]; ACC v = (ACC)LOAD(x[i]); s += v * v;)                              \
    }                                                                                                   \
    GD_UNUSED static gd_part gd_diff_##SUFFIX(const TYPE *x, TYPE *y, int64_t n, ACC shift) {                    \
        GD_BLOCKED(ACC, ACC v = (ACC)LOAD(x[i]) - (ACC)LOAD(y[i]); s += v * v;)                         \
    }                                                                                                   \
    GD_UNUSED static gd_part gd_moments_##SUFFIX(const TYPE *x, TYPE *y, int64_t n, ACC shift) {                 \
        (void)y;                                                                                        \
        GD_BLOCKED(ACC, ACC v = (ACC)LOAD(x[i]); ACC a = v < 0 ? -v : v; ACC d = v - shift;             \
                   t += d; s += d * d; m = a > m ? a : m; cn += (v != v); ci += (a == (ACC)HUGE);)      \
    }

GD_KERNELS(f32, float, float, GD_IDENTITY, __builtin_inff())

/* GD_SCALE, float32 only. y[i] * c is one float multiply, as PyTorch's `_foreach_mul_` by a
 * float32 coefficient makes it, so the scaled gradients are the same bit for bit. */
static gd_part gd_scale_f32(float *y, int64_t n, float c) {
    gd_part p = {0.0, 0.0, 0.0, 0.0, 0.0};
    _Pragma("omp simd")
    for (int64_t i = 0; i < n; i++) y[i] *= c;
    return p;
}
GD_KERNELS(f64, double, double, GD_IDENTITY, __builtin_inf())
GD_KERNELS(bf16, uint16_t, float, gd_bf16_to_float, __builtin_inff())

/* The diff of two bfloat16 values is taken in float, then rounded to bfloat16 as PyTorch's
 * `sub` would: the update norm is the norm of the difference tensor PyTorch would have made. */
static gd_part gd_diff_bf16_rounded(const uint16_t *x, uint16_t *y, int64_t n, float shift) {
    (void)shift;
    gd_part p = {0.0, 0.0, 0.0, 0.0, 0.0};
    for (int64_t i = 0; i < n; i++) {
        float v = gd_bf16_to_float(x[i]) - gd_bf16_to_float(y[i]);
        if (v == v) { /* round to nearest even, as PyTorch does; NaN stays NaN */
            uint32_t u;
            memcpy(&u, &v, sizeof u);
            u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
            memcpy(&v, &u, sizeof v);
        }
        p.sumsq += (double)v * (double)v;
    }
    return p;
}

static double gd_shift(const void *x, int32_t dtype, int64_t n) {
    /* The first entry, when finite: subtracting it before summing keeps the variance of an
     * input batch whose mean is far from zero (pixel values, years) from cancelling away. */
    if (n == 0) return 0.0;
    double v = dtype == GD_F32 ? ((const float *)x)[0]
             : dtype == GD_F64 ? ((const double *)x)[0] : gd_bf16_to_float(((const uint16_t *)x)[0]);
    return v - v == 0.0 ? v : 0.0;
}

static gd_part gd_chunk(int32_t pass, int32_t dtype, const void *x, void *y, int64_t start, int64_t n, double shift) {
    switch (dtype) {
    case GD_F32: {
        const float *a = x ? (const float *)x + start : NULL;
        float *b = y ? (float *)y + start : NULL;
        switch (pass) {
        case GD_SCALE: return gd_scale_f32(b, n, (float)shift);
        case GD_STATS2: return gd_stats2_f32(a, b, n, (float)shift);
        case GD_COPY: return gd_copy_f32(a, b, n, (float)shift);
        case GD_DIFF: return gd_diff_f32(a, b, n, (float)shift);
        case GD_MOMENTS: return gd_moments_f32(a, b, n, (float)shift);
        default: return gd_stats_f32(a, b, n, (float)shift);
        }
    }
    case GD_F64: {
        const double *a = (const double *)x + start;
        double *b = y ? (double *)y + start : NULL;
        switch (pass) {
        case GD_COPY: return gd_copy_f64(a, b, n, shift);
        case GD_DIFF: return gd_diff_f64(a, b, n, shift);
        case GD_MOMENTS: return gd_moments_f64(a, b, n, shift);
        case GD_STATS2: return gd_stats2_f64(a, b, n, shift);
        default: return gd_stats_f64(a, b, n, shift);
        }
    }
    default: {
        const uint16_t *a = (const uint16_t *)x + start;
        uint16_t *b = y ? (uint16_t *)y + start : NULL;
        switch (pass) {
        case GD_COPY: return gd_copy_bf16(a, b, n, (float)shift);
        case GD_DIFF: return gd_diff_bf16_rounded(a, b, n, (float)shift);
        case GD_MOMENTS: return gd_moments_bf16(a, b, n, (float)shift);
        case GD_STATS2: return gd_stats2_bf16(a, b, n, (float)shift);
        default: return gd_stats_bf16(a, b, n, (float)shift);
        }
    }
    }
}

/* Run `pass` over `ntensors` contiguous tensors of one dtype.
 *   x[t], y[t]: data pointers (y only for GD_COPY and GD_SCALE, written, and GD_DIFF and
 *               GD_STATS2, read; else NULL; x is NULL for GD_SCALE).
 *   scale: GD_SCALE's coefficient (ignored by the other passes).
 *   out: ntensors rows of 6 doubles: sum of squares, max-abs, sum, NaN count, Inf count, shift.
 *        For GD_MOMENTS the sums are of x - shift, where shift is the tensor's first entry
 *        when finite (else 0); the other passes fill only the first two columns.
 * Returns 0, or -1 if scratch memory could not be allocated (then nothing was written). */
int gd_pass(int32_t pass, int64_t ntensors, const void *const *x, void *const *y, const int64_t *numels,
            int32_t dtype, double scale, double *out, int32_t nthreads) {
    int64_t nitems = 0, total = 0;
    for (int64_t t = 0; t < ntensors; t++) {
        nitems += (numels[t] + GD_CHUNK - 1) / GD_CHUNK;
        total += numels[t];
    }
    size_t room = (size_t)(nitems ? nitems : 1);
    int64_t *owner = malloc(sizeof(int64_t) * room);
    int64_t *start = malloc(sizeof(int64_t) * room);
    gd_part *parts = malloc(sizeof(gd_part) * room);
    double *shift = malloc(sizeof(double) * (size_t)(ntensors ? ntensors : 1));
    if (!owner || !start || !parts || !shift) {
        free(owner); free(start); free(parts); free(shift);
        return -1;
    }
    int64_t j = 0;
    for (int64_t t = 0; t < ntensors; t++) {
        shift[t] = pass == GD_MOMENTS ? gd_shift(x[t], dtype, numels[t]) : pass == GD_SCALE ? scale : 0.0;
        for (int64_t s = 0; s < numels[t]; s += GD_CHUNK) { owner[j] = t; start[j] = s; j++; }
    }
    int threads = nthreads > 0 ? nthreads : 1;

#pragma omp parallel for schedule(static) num_threads(threads) if (total >= GD_PARALLEL_MIN && nitems > 1)
    for (int64_t k = 0; k < nitems; k++) {
        int64_t t = owner[k];
        int64_t n = numels[t] - start[k];
        parts[k] = gd_chunk(pass, dtype, x ? x[t] : NULL, y ? y[t] : NULL, start[k], n < GD_CHUNK ? n : GD_CHUNK, shift[t]);
    }

    for (int64_t t = 0; t < ntensors; t++) {
        double *row = out + 6 * t;
        row[0] = row[1] = row[2] = row[3] = row[4] = 0.0;
    }
    for (int64_t k = 0; k < nitems; k++) { /* in chunk order: the same sums for any thread count */
        double *row = out + 6 * owner[k];
        row[0] += parts[k].sumsq;
        if (parts[k].maxabs > row[1]) row[1] = parts[k].maxabs;
        row[2] += parts[k].sum;
        row[3] += parts[k].nan;
        row[4] += parts[k].inf;
    }
    for (int64_t t = 0; t < ntensors; t++) out[6 * t + 5] = shift[t]; /* so that mean = shift + sum / n */
    free(owner); free(start); free(parts); free(shift);
    return 0;
}

/* The entry points below finish the rows of gd_pass into what `watch` stores, so that
 * Python needs no further tensor ops on them. Inside a training step every op counts: the
 * data of the step has just pushed the interpreter's own memory out of the caches, and a
 * small tensor op that takes 1-3 us in a loop measured tens of us there (BENCHMARKS.md). */

/* Per-tensor L2 norms of x, rounded to float32, for GD_STATS, GD_COPY or GD_DIFF (see gd_pass). */
int gd_norms(int32_t pass, int64_t ntensors, const void *const *x, void *const *y, const int64_t *numels,
             int32_t dtype, double scale, float *norm, int32_t nthreads) {
    double *rows = malloc(sizeof(double) * 6 * (size_t)(ntensors ? ntensors : 1));
    if (!rows || gd_pass(pass, ntensors, x, y, numels, dtype, scale, rows, nthreads) != 0) {
        free(rows);
        return -1;
    }
    for (int64_t t = 0; t < ntensors; t++) norm[t] = (float)__builtin_sqrt(rows[6 * t]);
    free(rows);
    return 0;
}

/* y[t] *= scale for float32 tensors (GD_SCALE): a clipping multiply. Returns 0, or -1 as gd_pass. */
int gd_scale(int64_t ntensors, void *const *y, const int64_t *numels, double scale, int32_t nthreads) {
    double *rows = malloc(sizeof(double) * 6 * (size_t)(ntensors ? ntensors : 1));
    int code = rows ? gd_pass(GD_SCALE, ntensors, NULL, y, numels, GD_F32, scale, rows, nthreads) : -1;
    free(rows);
    return code;
}

/* Clip float32 tensors by their global L2 norm `total[0]` as torch.nn.utils.clip_grad_norm_
 * does, the coefficient included: coef = clamp(max_norm / (total + 1e-6), max=1), in float32
 * and in PyTorch's order of operations (`max_norm / t` on a tensor is `t.reciprocal() * max_norm`;
 * 1e-6 and max_norm are rounded to float32 as PyTorch rounds a Python scalar for a float32
 * tensor). A NaN total gives a NaN coefficient, which NaNs every entry, as in PyTorch. The
 * multiply is skipped when coef is exactly 1 (x * 1 == x for every float). Forming the
 * coefficient here instead of with four 0-d tensor ops saves ~0.1 ms of a training step.
 * Returns 0 if the tensors were multiplied, 1 if coef was 1 (nothing written), -1 as gd_pass
 * (coef written, tensors not). */
int gd_clip_scale(int64_t ntensors, void *const *y, const int64_t *numels, const float *total, double max_norm,
                  float *coef, int32_t nthreads) {
    float reciprocal = 1.0f / (total[0] + (float)1e-6);
    float c = reciprocal * (float)max_norm;
    if (c > 1.0f) c = 1.0f; /* a NaN fails the test and stays NaN, as torch.clamp keeps it */
    coef[0] = c;
    if (c == 1.0f) return 1;
    return gd_scale(ntensors, y, numels, (double)c, nthreads);
}

/* A gradient step's statistics, and with w the L2 norms of the weights (wnorm, float32), read
 * in the same pass (GD_STATS2; w[t] must have as many entries as x[t], in x's dtype):
 *   norm[t]   L2 norm, rounded to float32;
 *   maxabs[t] largest |entry| as float32, NaN where the tensor holds a NaN (its sum of squares is NaN);
 *   count[t]  number of NaN and Inf entries. A finite sum of squares means there are none, so only
 *             tensors whose sum is not finite are read again (GD_MOMENTS) to count them;
 *   total[0]  L2 norm of the float32 norms, as torch.nn.utils.get_total_norm forms it from them.
 * Returns 0, or -1 if scratch memory could not be allocated. */
int gd_grad_stats(int64_t ntensors, const void *const *x, void *const *w, const int64_t *numels, int32_t dtype,
                  float *norm, float *maxabs, int64_t *count, float *total, float *wnorm, int32_t nthreads) {
    double *rows = malloc(sizeof(double) * 6 * (size_t)(ntensors ? ntensors : 1));
    if (!rows || gd_pass(w ? GD_STATS2 : GD_STATS, ntensors, x, w, numels, dtype, 1.0, rows, nthreads) != 0) {
        free(rows);
        return -1;
    }
    double sq = 0.0;
    int failed = 0;
    for (int64_t t = 0; t < ntensors; t++) {
        double s = rows[6 * t];
        norm[t] = (float)__builtin_sqrt(s);
        maxabs[t] = s != s ? (float)s : (float)rows[6 * t + 1];
        count[t] = 0;
        if (s - s != 0.0) { /* NaN or Inf: count the entries */
            double one[6];
            if (gd_pass(GD_MOMENTS, 1, &x[t], NULL, &numels[t], dtype, 1.0, one, nthreads) != 0) failed = 1;
            count[t] = (int64_t)(one[3] + one[4]);
        }
        sq += (double)norm[t] * (double)norm[t];
        if (w) wnorm[t] = (float)__builtin_sqrt(rows[6 * t + 2]);
    }
    total[0] = (float)__builtin_sqrt(sq);
    free(rows);
    return failed ? -1 : 0;
}

/* One input batch's row of watch's INPUT_FIELDS, as float32: max-abs (NaN if the batch holds a
 * NaN), count of NaN and Inf entries, mean, and unbiased standard deviation (NaN for one entry),
 * all from one GD_MOMENTS read. An empty batch gives four NaNs. */
int gd_input_row(const void *x, int64_t n, int32_t dtype, float *row, int32_t nthreads) {
    const double nan = __builtin_nan("");
    double m[6];
    if (n == 0) {
        row[0] = row[1] = row[2] = row[3] = (float)nan;
        return 0;
    }
    if (gd_pass(GD_MOMENTS, 1, &x, NULL, &n, dtype, 1.0, m, nthreads) != 0) return -1;
    double sumsq = m[0], maxabs = m[1], sum = m[2], nans = m[3], infs = m[4], shift = m[5];
    double var = n > 1 ? (sumsq - sum * sum / (double)n) / (double)(n - 1) : nan;
    row[0] = (float)(nans > 0 ? nan : maxabs);
    row[1] = (float)(nans + infs);
    row[2] = (float)(shift + sum / (double)n);
    row[3] = (float)(var != var ? nan : __builtin_sqrt(var > 0.0 ? var : 0.0)); /* rounding can leave var a hair below 0 */
    return 0;
}

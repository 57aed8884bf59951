/* graddoctor's fused statistics kernel: one read of each tensor gives both its
 * sum of squares and its largest absolute entry.
 *
 * Why it exists: on a CPU the statistics pass of `watch` is memory bound. Two
 * PyTorch reductions (`_foreach_norm`, then `aminmax`) read every gradient twice,
 * cold from memory after backward; this kernel reads it once, which halves the
 * cost of the pass (see BENCHMARKS.md). It is plain C with no PyTorch headers,
 * so it compiles in a fraction of a second on first use (graddoctor/_native/__init__.py)
 * and is called through ctypes with raw data pointers.
 *
 * Work is split into chunks of GD_CHUNK elements, spread over OpenMP threads;
 * PyTorch's own OpenMP runtime (libgomp.so.1, already loaded) is the one used.
 * Chunks are combined in a fixed order, so the result does not depend on the
 * number of threads.
 *
 * NaN and Inf: a NaN entry makes the sum of squares NaN; an Inf makes it Inf.
 * The max-abs of a chunk skips NaN (a > m is false for NaN); the caller marks
 * max-abs NaN wherever the norm is NaN, and counts non-finite entries only in
 * tensors whose norm is not finite.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

enum { GD_F32 = 0, GD_F64 = 1, GD_BF16 = 2 };

#define GD_CHUNK 65536 /* elements per work item: large enough to amortize scheduling */
#define GD_BLOCK 512   /* partial sums are moved into double every GD_BLOCK elements */

typedef struct { double sumsq; double maxabs; } gd_part;

/* Squares are summed in ACC precision over blocks of GD_BLOCK elements, and the block
 * sums are added in double: as fast as a float loop, and about as precise as a pairwise
 * sum (relative error ~1e-7 on float32 data, against PyTorch's ~1e-6). `omp simd` lets the
 * compiler reorder the block's sums into vector lanes without -ffast-math (which would
 * break NaN handling elsewhere). */
#define GD_CHUNK_KERNEL(NAME, TYPE, ACC, LOAD)                                  \
    static gd_part NAME(const TYPE *x, int64_t n) {                           \
        double total = 0.0;                                                     \
        ACC mx = 0;                                                             \
        for (int64_t b = 0; b < n; b += GD_BLOCK) {                             \
            int64_t e = b + GD_BLOCK < n ? b + GD_BLOCK : n;                    \
            ACC s = 0, m = 0;                                                   \
            _Pragma("omp simd reduction(+:s) reduction(max:m)")                 \
            for (int64_t i = b; i < e; i++) {                                   \
                ACC v = (ACC)(LOAD(x[i]));                                      \
                ACC a = v < 0 ? -v : v;                                         \
                s += v * v;                                                     \
                m = a > m ? a : m;                                              \
            }                                                                   \
            total += (double)s;                                                 \
            mx = m > mx ? m : mx;                                               \
        }                                                                       \
        gd_part p = {total, (double)mx};                                        \
        return p;                                                               \
    }

static inline float gd_bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define GD_IDENTITY(v) (v)
GD_CHUNK_KERNEL(gd_chunk_f32, float, float, GD_IDENTITY)
GD_CHUNK_KERNEL(gd_chunk_f64, double, double, GD_IDENTITY)
GD_CHUNK_KERNEL(gd_chunk_bf16, uint16_t, float, gd_bf16_to_float)

static gd_part gd_chunk(const void *base, int32_t dtype, int64_t start, int64_t n) {
    switch (dtype) {
    case GD_F32: return gd_chunk_f32((const float *)base + start, n);
    case GD_F64: return gd_chunk_f64((const double *)base + start, n);
    default: return gd_chunk_bf16((const uint16_t *)base + start, n);
    }
}

/* For each of `ntensors` contiguous tensors of one dtype: sumsq[t] and maxabs[t].
 * Returns 0, or -1 if the scratch memory could not be allocated (outputs untouched). */
int gd_fused_stats(int64_t ntensors, const void *const *ptrs, const int64_t *numels, int32_t dtype,
                   double *sumsq, double *maxabs, int32_t nthreads) {
    int64_t nitems = 0;
    for (int64_t t = 0; t < ntensors; t++) nitems += (numels[t] + GD_CHUNK - 1) / GD_CHUNK;
    int64_t *owner = malloc(sizeof(int64_t) * (size_t)(nitems ? nitems : 1));
    int64_t *start = malloc(sizeof(int64_t) * (size_t)(nitems ? nitems : 1));
    gd_part *parts = malloc(sizeof(gd_part) * (size_t)(nitems ? nitems : 1));
    if (!owner || !start || !parts) {
        free(owner); free(start); free(parts);
        return -1;
    }
    int64_t j = 0;
    for (int64_t t = 0; t < ntensors; t++)
        for (int64_t s = 0; s < numels[t]; s += GD_CHUNK) { owner[j] = t; start[j] = s; j++; }

#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1) if (nitems > 1)
    for (int64_t k = 0; k < nitems; k++) {
        int64_t t = owner[k];
        int64_t n = numels[t] - start[k];
        parts[k] = gd_chunk(ptrs[t], dtype, start[k], n < GD_CHUNK ? n : GD_CHUNK);
    }

    for (int64_t t = 0; t < ntensors; t++) { sumsq[t] = 0.0; maxabs[t] = 0.0; }
    for (int64_t k = 0; k < nitems; k++) { /* in chunk order: the same sum for any thread count */
        sumsq[owner[k]] += parts[k].sumsq;
        if (parts[k].maxabs > maxabs[owner[k]]) maxabs[owner[k]] = parts[k].maxabs;
    }
    free(owner); free(start); free(parts);
    return 0;
}

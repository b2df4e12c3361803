// Kernels of the CUDA backend (aggregator/src/backend/cuda.rs), compiled at start-up with
// NVRTC and --fmad=false: every product is rounded before it is added, as on the CPU, so the
// f64 folds give the CPU's bits. No headers: NVRTC ships none by default, so the code uses
// only the language, __syncthreads and shared memory (no atomics, no math library).
//
// Sizes are unsigned long long throughout: a stored matrix (capacity x parameters) passes
// 2^32 values long before it passes the device's memory.

typedef unsigned long long u64;

// Threads per block of every kernel; the reductions assume a power of two.
#define BLOCK 256
// Vectors one batched fold adds (cuda.rs: MAX_BATCH).
#define MAX_BATCH 8

// Finite exactly when neither NaN (every comparison false) nor an infinity: plain IEEE
// comparisons, valid without fast-math and with no intrinsic.
static __device__ bool finite_f32(float x) {
    return x >= -3.402823466e+38f && x <= 3.402823466e+38f;
}

// One block per tile; a tile is a stretch of at most a few thousand values inside one
// segment (a scoped tensor or an unscoped gap), given as (start, end, shift index). Per
// tile, in f64: sum(d), sum(d^2) with d = w - w[shift index], sum((w - r)^2) and the count of
// non-finite values, written to partials[4 * tile ..]. The host adds the tiles up in order,
// so the result does not depend on scheduling.
extern "C" __global__ void measure_tiles(const float* __restrict__ w,
                                         const float* __restrict__ r,
                                         const u64* __restrict__ tiles,
                                         double* __restrict__ partials) {
    __shared__ double sh[4][BLOCK];
    const u64* tile = tiles + 3ull * blockIdx.x;
    const u64 start = tile[0];
    const u64 end = tile[1];
    const double shift = (double)w[tile[2]];
    double s1 = 0.0, s2 = 0.0, d2 = 0.0, bad = 0.0;
    for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float x = w[i];
        if (!finite_f32(x)) {
            bad += 1.0;
        }
        const double d = (double)x - shift;
        s1 += d;
        s2 += d * d;
        const double e = (double)x - (double)r[i];
        d2 += e * e;
    }
    const unsigned int t = threadIdx.x;
    sh[0][t] = s1;
    sh[1][t] = s2;
    sh[2][t] = d2;
    sh[3][t] = bad;
    __syncthreads();
    for (unsigned int half = BLOCK / 2; half > 0; half >>= 1) {
        if (t < half) {
            sh[0][t] += sh[0][t + half];
            sh[1][t] += sh[1][t + half];
            sh[2][t] += sh[2][t + half];
            sh[3][t] += sh[3][t + half];
        }
        __syncthreads();
    }
    if (t < 4) {
        partials[4ull * blockIdx.x + t] = sh[t][0];
    }
}

#define GRID_STRIDE(i, n)                                                  \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n);     \
         i += (u64)gridDim.x * blockDim.x)

// sum += a * w (the mean's fold, and a clipped fold whose factor is 1).
extern "C" __global__ void fold_scaled(double* __restrict__ sum,
                                       const float* __restrict__ w,
                                       double a,
                                       u64 n) {
    GRID_STRIDE(i, n) { sum[i] += a * (double)w[i]; }
}

// sum += a * w + b * r: a clipped step, w pulled toward the reference r.
extern "C" __global__ void fold_pulled(double* __restrict__ sum,
                                       const float* __restrict__ w,
                                       const float* __restrict__ r,
                                       double a,
                                       double b,
                                       u64 n) {
    GRID_STRIDE(i, n) { sum[i] += a * (double)w[i] + b * (double)r[i]; }
}

// Up to MAX_BATCH device-resident vectors and their weights (cuda.rs: BatchArgs, the same
// layout: 8 pointers, 8 doubles, two 32-bit words).
struct Batch {
    const float* w[MAX_BATCH];
    double p[MAX_BATCH];
    unsigned int count;
    unsigned int pad;
};

// sum += p_0 w_0 + ... in order, each product added (and rounded) one after another: the
// bits of `count` single folds, with the sum read and written once.
extern "C" __global__ void fold_batch(double* __restrict__ sum, Batch b, u64 n) {
    GRID_STRIDE(i, n) {
        double s = sum[i];
#pragma unroll
        for (unsigned int j = 0; j < MAX_BATCH; ++j) {
            if (j < b.count) {
                s += b.p[j] * (double)b.w[j][i];
            }
        }
        sum[i] = s;
    }
}

// sum += other (a merged partial sum).
extern "C" __global__ void add_f64(double* __restrict__ sum,
                                   const double* __restrict__ other,
                                   u64 n) {
    GRID_STRIDE(i, n) { sum[i] += other[i]; }
}

// out = sum * inv rounded to f32, inv = 1 / total computed on the host (as ParamSum::finish).
extern "C" __global__ void finish_mean(float* __restrict__ out,
                                       const double* __restrict__ sum,
                                       double inv,
                                       u64 n) {
    GRID_STRIDE(i, n) { out[i] = (float)(sum[i] * inv); }
}

// A recognizable, finite pattern for the resident-bandwidth measurement.
extern "C" __global__ void fill_pattern(float* __restrict__ w, float scale, u64 n) {
    GRID_STRIDE(i, n) { w[i] = scale * (float)(i % 1021ull) * (1.0f / 1021.0f); }
}

static __device__ void insertion_sort(float* v, unsigned int n) {
    for (unsigned int i = 1; i < n; ++i) {
        const float x = v[i];
        unsigned int j = i;
        while (j > 0 && v[j - 1] > x) {
            v[j] = v[j - 1];
            --j;
        }
        v[j] = x;
    }
}

static __device__ void sift_down(float* v, unsigned int root, unsigned int end) {
    for (;;) {
        unsigned int child = 2 * root + 1;
        if (child >= end) {
            return;
        }
        if (child + 1 < end && v[child] < v[child + 1]) {
            ++child;
        }
        if (!(v[root] < v[child])) {
            return;
        }
        const float x = v[root];
        v[root] = v[child];
        v[child] = x;
        root = child;
    }
}

static __device__ void heap_sort(float* v, unsigned int n) {
    if (n < 2) {
        return;
    }
    for (unsigned int start = n / 2; start-- > 0;) {
        sift_down(v, start, n);
    }
    for (unsigned int end = n - 1; end > 0; --end) {
        const float x = v[0];
        v[0] = v[end];
        v[end] = x;
        sift_down(v, 0, end);
    }
}

// The storing rules, one thread per coordinate: gather the coordinate's n stored values
// (rows of `len` values) into a local array of N, sort it, and take the median (the mean of
// the two middle values in f64 for an even n) or the mean of v[k .. n-k] summed in f64 in
// ascending order, as aggregator/src/backend/robust.rs. The local array is the thread's own
// memory, so N is a compile-time bound: one instantiation per size class keeps the local
// memory the driver reserves (N * 4 bytes per resident thread) small for small rounds.
template <unsigned int N>
static __device__ void robust_columns(const float* __restrict__ stored,
                                                      u64 len,
                                                      unsigned int n,
                                                      unsigned int k,
                                                      int median,
                                                      float* __restrict__ out) {
    float v[N];
    GRID_STRIDE(i, len) {
        for (unsigned int j = 0; j < n; ++j) {
            v[j] = stored[(u64)j * len + i];
        }
        if (N <= 64) {
            insertion_sort(v, n);
        } else {
            heap_sort(v, n);
        }
        if (median) {
            if (n % 2 == 1) {
                out[i] = v[n / 2];
            } else {
                out[i] = (float)(((double)v[n / 2 - 1] + (double)v[n / 2]) / 2.0);
            }
        } else {
            // -0.0 is the identity of +, as Rust's f64 Sum starts from it.
            double s = -0.0;
            for (unsigned int j = k; j < n - k; ++j) {
                s += (double)v[j];
            }
            out[i] = (float)(s / (double)(n - 2 * k));
        }
    }
}

#define ROBUST(N)                                                                   \
    extern "C" __global__ void robust_##N(const float* __restrict__ stored, u64 len, \
                                          unsigned int n, unsigned int k, int median, \
                                          float* __restrict__ out) {                 \
        robust_columns<N>(stored, len, n, k, median, out);                         \
    }

ROBUST(16)
ROBUST(64)
ROBUST(256)
ROBUST(1024)

// k-means on the GPU for Squeezed Attention's key clustering: the device
// twin of rust/infinitehip/src/kmeans.rs (k-means++ seeding, Lloyd
// iterations, raw-point means), driven by
// backend/cuda/policies/squeeze_kmeans.rs. Every KV head is clustered at
// once: blockIdx.y = head h.
//
// Same arithmetic as the CPU, operation for operation, so that fixed seeds
// give the same clusters: distances and dots use the CPU's order (8 lane
// accumulators over chunks of 8, then the lanes summed in order, then the
// tail), written with __fmul_rn / __fadd_rn so NVRTC cannot contract them
// into FMAs; sums that the CPU does in f64 in point order are done in f64
// in point order here (k-means++ chunk sums over 1024 points, cluster
// sums over each cluster's members in ascending point order, found with a
// stable counting sort). Only the host draws random numbers (the seeding's
// first centre and one uniform per later centre, uploaded).
//
// Layouts: raw points pts + h * hs + i * d (hs: head stride in elements);
// x (the clustered copy, normalised or not) [hkv][m][d]; centroids
// [hkv][k][d]; labels, dists, members [hkv][m]; sizes [hkv][k]; offsets
// [hkv][k + 1]; per-segment counts [hkv][P][k]. `active[h] == 0` leaves
// head h untouched (its Lloyd iterations ended).

#define KM_CHUNK 1024  // kmeans.rs CHUNK: points per k-means++ chunk sum
#define KM_SEG 2048    // points per counting-sort segment (one warp each)
#define KM_INF (__int_as_float(0x7f800000))

// kmeans.rs sq_dist(a, b).
__device__ __forceinline__ float km_sq_dist(const float* a, const float* b, int d) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    const int chunks = d / 8;
    for (int c = 0; c < chunks; c++) {
#pragma unroll
        for (int l = 0; l < 8; l++) {
            const float t = __fsub_rn(a[c * 8 + l], b[c * 8 + l]);
            acc[l] = __fadd_rn(acc[l], __fmul_rn(t, t));
        }
    }
    float s = 0.f;
    for (int i = chunks * 8; i < d; i++) {
        const float t = __fsub_rn(a[i], b[i]);
        s = __fadd_rn(s, __fmul_rn(t, t));
    }
    float r = acc[0];
#pragma unroll
    for (int l = 1; l < 8; l++) r = __fadd_rn(r, acc[l]);
    return __fadd_rn(r, s);
}

// Serial sum of squares (Rust `iter().map(|v| v * v).sum::<f32>()`).
__device__ __forceinline__ float km_sq_norm(const float* a, int d) {
    float s = 0.f;
    for (int j = 0; j < d; j++) s = __fadd_rn(s, __fmul_rn(a[j], a[j]));
    return s;
}

extern "C" __global__ void km_fill_u32(unsigned* p, long long n, unsigned v) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        p[i] = v;
}

// x = normalised (norm != 0) or plain copy of the raw points; bad[0] = 1
// when any coordinate is not finite. Grid (ceil(m / 256), hkv).
extern "C" __global__ void km_normalize(const float* __restrict__ pts, long long hs, int m, int d,
                                        int norm, float* __restrict__ x, unsigned* bad) {
    const int h = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= m) return;
    const float* p = pts + h * hs + (long long)i * d;
    float* o = x + ((long long)h * m + i) * d;
    bool fin = true;
    for (int j = 0; j < d; j++) fin = fin && isfinite(p[j]);
    if (!fin) atomicOr(bad, 1u);
    const float n = norm ? __fsqrt_rn(km_sq_norm(p, d)) : 0.f;
    for (int j = 0; j < d; j++) o[j] = n > 0.f ? __fdiv_rn(p[j], n) : p[j];
}

// --- k-means++ seeding (kmeans.rs kmeans_pp_init) ---

// d2 = inf, near = 0, chosen = (i == first), centers[h][0] = first.
extern "C" __global__ void km_pp_init(float* d2, unsigned* near, unsigned char* chosen,
                                      unsigned* centers, int m, int k, int first) {
    const int h = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= m) return;
    const long long o = (long long)h * m + i;
    d2[o] = KM_INF;
    near[o] = 0;
    chosen[o] = i == first;
    if (i == 0) centers[(long long)h * k] = first;
}

// cc[h][c] = sq_dist(x[centers[c]], x[centers[j]]) for c < j.
extern "C" __global__ void km_pp_cc(const float* __restrict__ x, int m, int d,
                                    const unsigned* __restrict__ centers, int k, int j,
                                    float* __restrict__ cc) {
    const int h = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= j) return;
    const float* xh = x + (long long)h * m * d;
    const unsigned* ch = centers + (long long)h * k;
    cc[(long long)h * k + c] = km_sq_dist(xh + (long long)ch[c] * d, xh + (long long)ch[j] * d, d);
}

// One seeding pass for the new centre j: nearest-centre distances of the
// block's 1024 points (skipping, as the CPU does, a point whose nearest
// centre n has cc[n] >= 4 d2), then the chunk's f64 sum in point order.
// Grid (ceil(m / 1024), hkv), 256 threads.
extern "C" __global__ void __launch_bounds__(256)
    km_pp_update(const float* __restrict__ x, int m, int d, const unsigned* __restrict__ centers,
                 int k, int j, const float* __restrict__ cc, float* __restrict__ d2,
                 unsigned* __restrict__ near, double* __restrict__ parts, int nchunks) {
    __shared__ float w[KM_CHUNK];
    const int h = blockIdx.y, ci = blockIdx.x;
    const float* xh = x + (long long)h * m * d;
    const float* c = xh + (long long)centers[(long long)h * k + j] * d;
    for (int t = threadIdx.x; t < KM_CHUNK; t += blockDim.x) {
        const int i = ci * KM_CHUNK + t;
        float wi = 0.f;
        if (i < m) {
            const long long o = (long long)h * m + i;
            wi = d2[o];
            if (wi == KM_INF || cc[(long long)h * k + near[o]] < __fmul_rn(4.f, wi)) {
                const float e = km_sq_dist(xh + (long long)i * d, c, d);
                if (e < wi) {
                    wi = e;
                    d2[o] = e;
                    near[o] = j;
                }
            }
        }
        w[t] = wi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const int len = min(KM_CHUNK, m - ci * KM_CHUNK);
        double s = 0.0;
        for (int t = 0; t < len; t++) s = __dadd_rn(s, (double)w[t]);
        parts[(long long)h * nchunks + ci] = s;
    }
}

// Draw centre j + 1 (u[j]: the host's uniform for this step). Grid (1, hkv),
// 1024 threads; the walk is serial, as the CPU's.
extern "C" __global__ void __launch_bounds__(1024)
    km_pp_pick(const float* __restrict__ d2, const double* __restrict__ parts, int nchunks, int m,
               const double* __restrict__ u, int j, unsigned char* __restrict__ chosen,
               unsigned* __restrict__ centers, int k) {
    __shared__ float w[KM_CHUNK];
    __shared__ int s_ci, s_mode;
    __shared__ double s_r;
    const int h = blockIdx.y;
    const double* ph = parts + (long long)h * nchunks;
    const float* dh = d2 + (long long)h * m;
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int c = 0; c < nchunks; c++) total = __dadd_rn(total, ph[c]);
        s_mode = total > 0.0;
        if (total > 0.0) {
            double r = __dmul_rn(u[j], total);
            int ci = 0;
            while (ci + 1 < nchunks && r >= ph[ci]) {
                r = __dsub_rn(r, ph[ci]);
                ci++;
            }
            s_ci = ci;
            s_r = r;
        }
    }
    __syncthreads();
    const int ci = s_ci;
    const int len = s_mode ? min(KM_CHUNK, m - ci * KM_CHUNK) : 0;
    for (int t = threadIdx.x; t < len; t += blockDim.x) w[t] = dh[(long long)ci * KM_CHUNK + t];
    __syncthreads();
    if (threadIdx.x != 0) return;
    long long next = -1;
    if (s_mode) {
        double r = s_r;
        for (int t = 0; t < len; t++) {
            if (w[t] > 0.f) {
                next = (long long)ci * KM_CHUNK + t;
                if (r < (double)w[t]) break;
                r = __dsub_rn(r, (double)w[t]);
            }
        }
        // Rounding left r above the chunk's sum and the chunk had no
        // positive weight: the first positive-weight point overall.
        if (next < 0)
            for (int i = 0; i < m && next < 0; i++)
                if (dh[i] > 0.f) next = i;
    } else {
        // Every point coincides with a centre: the lowest unchosen index.
        for (int i = 0; i < m && next < 0; i++)
            if (!chosen[(long long)h * m + i]) next = i;
    }
    centers[(long long)h * k + j + 1] = (unsigned)next;
    chosen[(long long)h * m + next] = 1;
}

// cent[h][c] = x[h][centers[h][c]]. Grid (k, hkv).
extern "C" __global__ void km_gather_rows(const float* __restrict__ x, int m, int d,
                                          const unsigned* __restrict__ centers, int k,
                                          float* __restrict__ cent) {
    const int h = blockIdx.y, c = blockIdx.x;
    const float* src = x + ((long long)h * m + centers[(long long)h * k + c]) * d;
    float* dst = cent + ((long long)h * k + c) * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) dst[j] = src[j];
}

// --- Lloyd iterations (kmeans.rs assign / cluster_means) ---

// cn[h][c] = |cent[h][c]|^2 (serial). Grid (ceil(k / 256), hkv).
extern "C" __global__ void km_cnorm(const float* __restrict__ cent, int k, int d,
                                    float* __restrict__ cn, const unsigned char* active) {
    const int h = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (!active[h] || c >= k) return;
    cn[(long long)h * k + c] = km_sq_norm(cent + ((long long)h * k + c) * d, d);
}

// Nearest centre of each point: argmin over c of cn[c] - 2 x.c (ties to the
// lower index), dists = sq_dist to it; changed[h] |= 1 when a label moves.
// One thread per point (its row in registers), centroids through shared
// memory in tiles. Grid (ceil(m / 128), hkv), 128 threads.
template <int D>
__device__ __forceinline__ void km_assign_impl(const float* __restrict__ x, int m,
                                               const float* __restrict__ cent,
                                               const float* __restrict__ cn, int k,
                                               unsigned* __restrict__ labels,
                                               float* __restrict__ dists, unsigned* changed,
                                               const unsigned char* active) {
    constexpr int TC = 8192 / D;  // 32 KiB of centroids per tile
    __shared__ __align__(16) float tile[TC * D];
    __shared__ float tcn[TC];
    const int h = blockIdx.y;
    if (!active[h]) return;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const bool ok = i < m;
    float xr[D];
    const float* xp = x + ((long long)h * m + (ok ? i : 0)) * D;
#pragma unroll
    for (int j = 0; j < D; j += 4) {
        const float4 v = *reinterpret_cast<const float4*>(xp + j);
        xr[j] = v.x;
        xr[j + 1] = v.y;
        xr[j + 2] = v.z;
        xr[j + 3] = v.w;
    }
    const float* ch = cent + (long long)h * k * D;
    float bv = KM_INF;
    int best = 0;
    for (int c0 = 0; c0 < k; c0 += TC) {
        const int nt = min(TC, k - c0);
        __syncthreads();
        for (int e = threadIdx.x; e < nt * D; e += blockDim.x) tile[e] = ch[(long long)c0 * D + e];
        for (int e = threadIdx.x; e < nt; e += blockDim.x) tcn[e] = cn[(long long)h * k + c0 + e];
        __syncthreads();
        for (int c = 0; c < nt; c++) {
            const float* cp = tile + c * D;
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int a = 0; a < D / 8; a++) {
#pragma unroll
                for (int l = 0; l < 8; l++)
                    acc[l] = __fadd_rn(acc[l], __fmul_rn(xr[a * 8 + l], cp[a * 8 + l]));
            }
            float dot = acc[0];
#pragma unroll
            for (int l = 1; l < 8; l++) dot = __fadd_rn(dot, acc[l]);
            const float v = __fsub_rn(tcn[c], __fmul_rn(2.f, dot));
            if (v < bv) {
                bv = v;
                best = c0 + c;
            }
        }
    }
    if (!ok) return;
    const float dist = km_sq_dist(xr, ch + (long long)best * D, D);
    const long long o = (long long)h * m + i;
    if (labels[o] != (unsigned)best) atomicOr(&changed[h], 1u);
    labels[o] = best;
    dists[o] = dist;
}

#define KM_ASSIGN(D)                                                                              \
    extern "C" __global__ void __launch_bounds__(128)                                             \
        km_assign_d##D(const float* x, int m, const float* cent, const float* cn, int k,          \
                       unsigned* labels, float* dists, unsigned* changed,                         \
                       const unsigned char* active) {                                             \
        km_assign_impl<D>(x, m, cent, cn, k, labels, dists, changed, active);                     \
    }
KM_ASSIGN(64)
KM_ASSIGN(128)
KM_ASSIGN(256)

// Stable counting sort of the points by label, in three passes over
// segments of KM_SEG points (one warp each, 32 points at a time in order):
// km_seg_count: cnt[h][p][c] = points of segment p labelled c (cnt zeroed).
extern "C" __global__ void km_seg_count(const unsigned* __restrict__ labels, int m, int k, int P,
                                        unsigned* __restrict__ cnt, const unsigned char* active) {
    const int h = blockIdx.y, p = blockIdx.x, lane = threadIdx.x;
    if (!active[h]) return;
    unsigned* cp = cnt + ((long long)h * P + p) * k;
    const int lo = p * KM_SEG, hi = min(m, lo + KM_SEG);
    for (int b = lo; b < hi; b += 32) {
        const int i = b + lane;
        const bool ok = i < hi;
        const unsigned l = ok ? labels[(long long)h * m + i] : 0xffffffffu;
        const unsigned grp = __match_any_sync(0xffffffffu, l);
        if (ok && lane == __ffs(grp) - 1) cp[l] += __popc(grp);
        __syncwarp();
    }
}

// Per cluster: cnt becomes the count in earlier segments (exclusive, in
// place); sizes = the total. Grid (ceil(k / 256), hkv).
extern "C" __global__ void km_seg_base(unsigned* __restrict__ cnt, int k, int P,
                                       unsigned* __restrict__ sizes, const unsigned char* active) {
    const int h = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (!active[h] || c >= k) return;
    unsigned run = 0;
    for (int p = 0; p < P; p++) {
        unsigned* q = cnt + ((long long)h * P + p) * k + c;
        const unsigned t = *q;
        *q = run;
        run += t;
    }
    sizes[(long long)h * k + c] = run;
}

// offs[h][c] = sizes[h][0..c) summed; offs[h][k] = total. Grid (1, hkv),
// 1024 threads.
extern "C" __global__ void __launch_bounds__(1024)
    km_offsets(const unsigned* __restrict__ sizes, int k, unsigned* __restrict__ offs,
               const unsigned char* active) {
    __shared__ unsigned part[1024];
    __shared__ unsigned total;
    const int h = blockIdx.y, t = threadIdx.x;
    if (!active[h]) return;
    const unsigned* sz = sizes + (long long)h * k;
    unsigned* of = offs + (long long)h * (k + 1);
    const int per = (k + 1023) / 1024;
    const int lo = min(k, t * per), hi = min(k, lo + per);
    unsigned s = 0;
    for (int c = lo; c < hi; c++) s += sz[c];
    part[t] = s;
    __syncthreads();
    if (t == 0) {
        unsigned run = 0;
        for (int i = 0; i < 1024; i++) {
            const unsigned v = part[i];
            part[i] = run;
            run += v;
        }
        total = run;
    }
    __syncthreads();
    unsigned run = part[t];
    for (int c = lo; c < hi; c++) {
        of[c] = run;
        run += sz[c];
    }
    if (t == 0) of[k] = total;
}

// members[h][offs[c] + rank] = i, rank = i's place among the points of
// cluster c in point order.
extern "C" __global__ void km_seg_scatter(const unsigned* __restrict__ labels, int m, int k,
                                          int P, unsigned* __restrict__ cnt,
                                          const unsigned* __restrict__ offs,
                                          unsigned* __restrict__ members,
                                          const unsigned char* active) {
    const int h = blockIdx.y, p = blockIdx.x, lane = threadIdx.x;
    if (!active[h]) return;
    unsigned* cp = cnt + ((long long)h * P + p) * k;
    const unsigned* of = offs + (long long)h * (k + 1);
    unsigned* mem = members + (long long)h * m;
    const int lo = p * KM_SEG, hi = min(m, lo + KM_SEG);
    for (int b = lo; b < hi; b += 32) {
        const int i = b + lane;
        const bool ok = i < hi;
        const unsigned l = ok ? labels[(long long)h * m + i] : 0xffffffffu;
        const unsigned grp = __match_any_sync(0xffffffffu, l);
        unsigned base = 0;
        if (ok) {
            base = cp[l];
            mem[of[l] + base + __popc(grp & ((1u << lane) - 1u))] = i;
        }
        __syncwarp();
        if (ok && lane == __ffs(grp) - 1) cp[l] = base + __popc(grp);
        __syncwarp();
    }
}

// cent[h][c] = mean of the rows of cluster c's members (f64 sums in point
// order, then times 1 / size, as the CPU); zero for an empty cluster.
// Grid (k, hkv), threads over the dimensions.
extern "C" __global__ void km_means(const float* __restrict__ pts, long long hs, int m, int d,
                                    int k, const unsigned* __restrict__ offs,
                                    const unsigned* __restrict__ members,
                                    float* __restrict__ cent, const unsigned char* active) {
    const int h = blockIdx.y, c = blockIdx.x;
    if (!active[h]) return;
    const unsigned lo = offs[(long long)h * (k + 1) + c], hi = offs[(long long)h * (k + 1) + c + 1];
    const unsigned* mem = members + (long long)h * m;
    const float* ph = pts + h * hs;
    const double inv = hi > lo ? __ddiv_rn(1.0, (double)(hi - lo)) : 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        double s = 0.0;
        for (unsigned e = lo; e < hi; e++) s = __dadd_rn(s, (double)ph[(long long)mem[e] * d + j]);
        cent[((long long)h * k + c) * d + j] = hi > lo ? __double2float_rn(__dmul_rn(s, inv)) : 0.f;
    }
}

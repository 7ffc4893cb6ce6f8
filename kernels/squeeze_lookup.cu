// Squeezed Attention centroid lookup, one level (policy/squeeze.rs
// `pooled_probs` + `HeadIndex::kept_clusters` with no coarse level, for one
// query position per row: decode).
//
// Block (kv head h, query row r), 8 warps. For each q head j of h's group:
// s_c = scale * q_j . C_c over the non-empty clusters (size > 0), then
// p_jc = exp(s_c - max) / sum_k n_k exp(s_k - max). The pooled probability
// is p_c = max_j p_jc and cluster c is kept when p_c >= thr. Empty clusters
// are never kept (p written as 0). Two passes over the centroids (the
// second recomputes the dots), so any number of clusters fits.
//
// centroids `[hkv][k][d]` f32, sizes `[hkv][k]` u32, queries `[rows][n_q][d]`
// f32; outputs probs `[rows][hkv][k]` f32, keep `[rows][hkv][k]` u8.

__device__ __forceinline__ float warp_sum(float s) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
    return s;
}

extern "C" __global__ void __launch_bounds__(256)
squeeze_lookup(const float* __restrict__ cent, const unsigned* __restrict__ sizes, int k, int d,
               const float* __restrict__ queries, int nq, int hkv, float scale, float thr,
               float* __restrict__ probs, unsigned char* __restrict__ keep) {
    extern __shared__ float sm[];  // [g][d] queries, then [g] max, [g] 1/den, [8][2] partials
    const int h = blockIdx.x, r = blockIdx.y;
    const int g = nq / hkv;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    float* sq = sm;
    float* smax = sq + g * d;
    float* sinv = smax + g;
    float* part = sinv + g;
    const float* qsrc = queries + ((long long)r * nq + (long long)h * g) * d;
    for (int i = threadIdx.x; i < g * d; i += blockDim.x) sq[i] = qsrc[i];
    __syncthreads();
    const float* C = cent + (long long)h * k * d;
    const unsigned* sz = sizes + (long long)h * k;
    for (int j = 0; j < g; j++) {
        // Online (max, size-weighted sum) per warp, then across warps.
        float m = NEG_INF, l = 0.f;
        for (int c = warp; c < k; c += nw) {
            if (sz[c] == 0) continue;
            float s = 0.f;
            for (int i = lane; i < d; i += 32) s = fmaf(sq[j * d + i], C[(long long)c * d + i], s);
            s = scale * warp_sum(s);
            float nm = fmaxf(m, s);
            l = l * expf(m - nm) + (float)sz[c] * expf(s - nm);
            m = nm;
        }
        if (lane == 0) {
            part[2 * warp] = m;
            part[2 * warp + 1] = l;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            float M = NEG_INF;
            for (int w = 0; w < nw; w++) M = fmaxf(M, part[2 * w]);
            float L = 0.f;
            for (int w = 0; w < nw; w++)
                if (part[2 * w + 1] > 0.f) L += part[2 * w + 1] * expf(part[2 * w] - M);
            smax[j] = M;
            sinv[j] = 1.f / L;
        }
        __syncthreads();
    }
    float* po = probs + ((long long)r * hkv + h) * k;
    unsigned char* ko = keep + ((long long)r * hkv + h) * k;
    for (int c = warp; c < k; c += nw) {
        if (sz[c] == 0) {
            if (lane == 0) {
                po[c] = 0.f;
                ko[c] = 0;
            }
            continue;
        }
        float best = 0.f;
        for (int j = 0; j < g; j++) {
            float s = 0.f;
            for (int i = lane; i < d; i += 32) s = fmaf(sq[j * d + i], C[(long long)c * d + i], s);
            s = scale * warp_sum(s);
            best = fmaxf(best, expf(s - smax[j]) * sinv[j]);
        }
        if (lane == 0) {
            po[c] = best;
            ko[c] = best >= thr ? 1 : 0;
        }
    }
}

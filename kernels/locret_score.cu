// Locret retaining-head scoring (policy/locret/weights.rs on the GPU):
// per token x = [q | k | v] (pre-RoPE projections, f32), score =
// fc2(silu(fc1(x))), fc1 `[hidden][in]`, fc2 `[n_kv][hidden]`, f32 weights,
// f32 accumulation.
//
// locret_fc1: tiled GEMM H[n][hidden] = silu(X W1^T). A block computes a
// 64-token x 64-row tile with 256 threads (4 x 4 outputs each), stepping the
// input width in slices of 16 through shared memory. X is gathered on the fly
// from q, k, v; any n, hidden, in (edges are masked).
// locret_fc2: one warp per (token, kv head): dot of H's row with fc2's row.

#define LT_M 64
#define LT_N 64
#define LT_K 16

__device__ __forceinline__ float locret_x(const float* __restrict__ q, const float* __restrict__ k,
                                          const float* __restrict__ v, int qd, int kd, int t, int i) {
    if (i < qd) return q[(long long)t * qd + i];
    i -= qd;
    if (i < kd) return k[(long long)t * kd + i];
    return v[(long long)t * kd + (i - kd)];
}

extern "C" __global__ void __launch_bounds__(256)
locret_fc1(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
           int n, int qd, int kd, const float* __restrict__ w1, int hidden,
           float* __restrict__ h_out) {
    __shared__ float xs[LT_K][LT_M + 4];
    __shared__ float ws[LT_K][LT_N + 4];
    const int in = qd + 2 * kd;
    const int t0 = blockIdx.x * LT_M, r0 = blockIdx.y * LT_N;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
    for (int k0 = 0; k0 < in; k0 += LT_K) {
        // 64 x 16 elements of each operand, 4 per thread.
        for (int e = threadIdx.x; e < LT_M * LT_K; e += 256) {
            int row = e / LT_K, kk = e % LT_K;
            int t = t0 + row, c = k0 + kk;
            xs[kk][row] = (t < n && c < in) ? locret_x(q, k, v, qd, kd, t, c) : 0.f;
            int r = r0 + row;
            ws[kk][row] = (r < hidden && c < in) ? w1[(long long)r * in + c] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < LT_K; kk++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = xs[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = ws[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int t = t0 + ty + 16 * i;
        if (t >= n) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int r = r0 + tx + 16 * j;
            if (r < hidden) {
                float s = acc[i][j];
                h_out[(long long)t * hidden + r] = s / (1.f + expf(-s));
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
locret_fc2(const float* __restrict__ h, int n, int hidden, const float* __restrict__ w2, int nkv,
           float* __restrict__ out) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (warp >= n * nkv) return;
    const int t = warp / nkv, o = warp % nkv;
    const float* hr = h + (long long)t * hidden;
    const float* wr = w2 + (long long)o * hidden;
    float s = 0.f;
    for (int i = lane; i < hidden; i += 32) s = fmaf(hr[i], wr[i], s);
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
    if (lane == 0) out[(long long)t * nkv + o] = s;
}

// LazyLLM token importance (policy/lazy.rs `importance` on the GPU): for the
// last token's query q `[n_q][d]` and a list of tokens of one sequence in the
// paged KV pool, the softmax over those tokens of scale * q_h . k per q head,
// averaged over the q heads. The top-k keep set is taken from the result
// on the device by lazy_topk.cu.
//
// lazy_logits_<dt>: one warp per (token, kv head): the key row is read once
//   and dotted with every q head of the group; logits `[n_q][n]`.
// lazy_softmax: one block per q head: max, sum of exp, in-place probs.
// lazy_mean: one thread per token: mean over the q heads.

template <typename E>
__device__ void lazy_logits(const u16* __restrict__ kp, const int* __restrict__ table_row, int ps,
                            int hkv, long long pst, long long hst, int d, const int* __restrict__ tokens, int n,
                            const float* __restrict__ q, int nq, float scale,
                            float* __restrict__ logits) {
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    const int h = blockIdx.y;
    if (warp >= n) return;
    const int g = nq / hkv;
    const u16* kr = kp + kv_row(table_row, tokens[warp], h, ps, d, pst, hst);
    for (int j = 0; j < g; j++) {
        const float* qh = q + (long long)(h * g + j) * d;
        float s = 0.f;
        for (int i = lane; i < d; i += 32) s = fmaf(qh[i], E::to_f32(kr[i]), s);
#pragma unroll
        for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
        if (lane == 0) logits[(long long)(h * g + j) * n + warp] = scale * s;
    }
}

#define LAZY_LOGITS(tag, E)                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                            \
    lazy_logits_##tag(const u16* kp, const int* table_row, int ps, int hkv, long long pst,     \
                      long long hst, int d,                                                      \
                      const int* tokens, int n, const float* q, int nq, float scale,             \
                      float* logits) {                                                           \
        lazy_logits<E>(kp, table_row, ps, hkv, pst, hst, d, tokens, n, q, nq, scale, logits);              \
    }
LAZY_LOGITS(bf16, Bf16)
LAZY_LOGITS(f16, F16)

extern "C" __global__ void __launch_bounds__(256)
lazy_softmax(float* __restrict__ x, int n) {
    __shared__ float red[32];
    float* row = x + (long long)blockIdx.x * n;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, row[i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) red[warp] = m;
    __syncthreads();
    m = red[0];
    for (int w = 1; w < nw; w++) m = fmaxf(m, red[w]);
    __syncthreads();
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += expf(row[i] - m);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) red[warp] = s;
    __syncthreads();
    s = 0.f;
    for (int w = 0; w < nw; w++) s += red[w];
    const float inv = 1.f / s;
    for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] = expf(row[i] - m) * inv;
}

extern "C" __global__ void __launch_bounds__(256)
lazy_mean(const float* __restrict__ p, int n, int nq, float* __restrict__ out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = 0.f;
    for (int j = 0; j < nq; j++) s += p[(long long)j * n + i];
    out[i] = s / (float)nq;
}

// Helpers of the engine-facing GPU path's policies
// (rust/infinitehip/src/backend/cuda/engine_attn/): the key gather the
// Squeezed Attention clustering reads, selections from token lists (LazyLLM
// keep sets) or full ranges, and the LazyLLM keep-set fix-up after a bad
// top-k.

// Keys 0..n of one request (its table row), every KV head, to f32
// [hkv][n][D] (head-major, the layout of SeqView::from_contiguous).
// grid (x, hkv).
template <typename E>
__device__ void ep_gather(const u16* __restrict__ k, const int* __restrict__ table_row, int ps,
                          long long page_stride, long long head_stride, int D, int n,
                          float* __restrict__ out) {
    const int h = blockIdx.y;
    const long long total = (long long)n * D;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int t = (int)(i / D), c = (int)(i % D);
        const long long off = kv_row(table_row, t, h, ps, D, page_stride, head_stride) + c;
        out[((long long)h * n + t) * D + c] = E::to_f32(k[off]);
    }
}

extern "C" __global__ void __launch_bounds__(256)
    ep_gather_keys_bf16(const u16* k, const int* table_row, int ps, long long page_stride,
                        long long head_stride, int D, int n, float* out) {
    ep_gather<Bf16>(k, table_row, ps, page_stride, head_stride, D, n, out);
}
extern "C" __global__ void __launch_bounds__(256)
    ep_gather_keys_f16(const u16* k, const int* table_row, int ps, long long page_stride,
                       long long head_stride, int D, int n, float* out) {
    ep_gather<F16>(k, table_row, ps, page_stride, head_stride, D, n, out);
}

// Selection rows b * hkv .. b * hkv + hkv - 1 (every KV head the same) of
// request b, one block per request (blockDim a multiple of 32):
//   ns[b] < 0, or bad[slots[b]] != 0 (bad may be NULL): one range
//   0..lens[b];
//   else the runs of consecutive tokens of toks[b][0..ns[b]) (strictly
//   ascending): range i = (first, last + 1) of run i, cum = index of its
//   first token in the list, cnt = runs, tot = ns[b].
// cap must be >= the number of runs (ns[b] bounds it).
extern "C" __global__ void __launch_bounds__(256)
    ep_token_ranges(const long long* __restrict__ toks, const int* __restrict__ ns,
                    const int* __restrict__ lens, const int* __restrict__ slots,
                    const int* __restrict__ bad, int hkv, int cap, int2* __restrict__ ranges,
                    int* __restrict__ cum, int* __restrict__ cnt, int* __restrict__ tot) {
    __shared__ int wsum[32];
    __shared__ int s_base;
    const int b = blockIdx.x;
    const int n = ns[b];
    const bool full = n < 0 || (bad != nullptr && bad[slots[b]] != 0);
    if (full) {
        for (int h = threadIdx.x; h < hkv; h += blockDim.x) {
            const long long r = (long long)b * hkv + h;
            ranges[r * cap] = make_int2(0, lens[b]);
            cum[r * cap] = 0;
            cnt[r] = 1;
            tot[r] = lens[b];
        }
        return;
    }
    const int* t = (const int*)toks[b];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    const unsigned below = (1u << lane) - 1u;
    if (threadIdx.x == 0) s_base = 0;
    __syncthreads();
    for (int i0 = 0; i0 < n; i0 += blockDim.x) {
        const int i = i0 + threadIdx.x;
        const bool in = i < n;
        const int ti = in ? t[i] : 0;
        const bool st = in && (i == 0 || t[i - 1] + 1 != ti);
        const bool en = in && (i == n - 1 || t[i + 1] != ti + 1);
        const unsigned bal = __ballot_sync(0xffffffffu, st);
        if (lane == 0) wsum[warp] = __popc(bal);
        __syncthreads();
        int pre = s_base, all = 0;
        for (int w = 0; w < nw; w++) {
            if (w < warp) pre += wsum[w];
            all += wsum[w];
        }
        // Exclusive count of run starts before i; i's run index.
        const int ex = pre + __popc(bal & below);
        const int run = ex + (st ? 1 : 0) - 1;
        for (int h = 0; h < hkv; h++) {
            const long long r = ((long long)b * hkv + h) * cap;
            if (st) {
                ranges[r + run].x = ti;
                cum[r + run] = i;
            }
            if (en) ranges[r + run].y = ti + 1;
        }
        __syncthreads();
        if (threadIdx.x == 0) s_base += all;
        __syncthreads();
    }
    for (int h = threadIdx.x; h < hkv; h += blockDim.x) {
        cnt[(long long)b * hkv + h] = s_base;
        tot[(long long)b * hkv + h] = n;
    }
}

// After a lazy_topk launch of one request: a bad status (non-finite
// importance, tokens not ascending) leaves the keep output unwritten, so
// write 0..n_out-1 there (valid, ascending token ids: later pruning points
// stay in bounds) and mark the request's slot bad (its selections become
// the full range, so the NaN reaches the output). One block.
extern "C" __global__ void __launch_bounds__(256)
    ep_lazy_fix(const int* __restrict__ status, int* __restrict__ out, int n_out,
                int* __restrict__ bad) {
    if (*status == 0) return;
    for (int i = threadIdx.x; i < n_out; i += blockDim.x) out[i] = i;
    if (threadIdx.x == 0) *bad = 1;
}

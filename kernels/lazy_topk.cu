// LazyLLM keep set on the GPU (policy/lazy/plan.rs `top_k` as used by
// `LazyPlan::prune_top`), for a batch of segments (one per sequence), one
// block per segment.
//
// Segment s: params[5 s ..] = (off, n, k, force, mask_off): tokens
// [off..off + n] (strictly ascending, >= 0) with importance imp[off..off +
// n]; token t is a candidate (a prompt token) when mask_off < 0 or
// prompt[mask_off + t] != 0 (a per-sequence flag array indexed by token id,
// so a later pruning point can run on this one's output as is); force is
// the token always kept if it is a candidate (-1: none). The k best
// candidates are kept (all when k >= candidates), best = larger key
//   (forced, importance by IEEE total order, token)
// which is exactly top_k's order: forced first, then higher importance,
// ties to the later token. Keys are distinct (tokens are), so the k-th
// largest key, found by an 8-pass radix select (8 bits per pass), splits
// the set exactly. Output, in token order (ascending): the kept candidates
// and, with emit_always, every non-candidate too (the next layers' attend
// set), into keep[off..]; counts[s] = how many. status[s]: 0 ok, 1 a
// non-finite importance, 2 tokens not strictly ascending or negative (then counts[s]
// = -1 and keep is not written).

__device__ __forceinline__ unsigned long long lazy_key(float imp, int tok, bool forced) {
    unsigned u = __float_as_uint(imp);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)forced << 63) | ((unsigned long long)u << 31) | (unsigned)tok;
}

extern "C" __global__ void __launch_bounds__(256)
lazy_topk(const int* __restrict__ tokens, const float* __restrict__ imp,
          const unsigned char* __restrict__ prompt, const int* __restrict__ params, int emit_always,
          int* __restrict__ keep, int* __restrict__ counts, int* __restrict__ status) {
    __shared__ int hist[256];
    __shared__ int wsum[32];
    __shared__ int s_bad, s_ncand, s_base, s_bin, s_rank;
    const int s = blockIdx.x;
    const int* pr = params + 5 * s;
    const int off = pr[0], n = pr[1], kreq = pr[2], force = pr[3], mask_off = pr[4];
    const int* tk = tokens + off;
    const float* im = imp + off;
    const unsigned char* cd = mask_off >= 0 ? prompt + mask_off : nullptr;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    if (threadIdx.x == 0) {
        s_bad = 0;
        s_ncand = 0;
        s_base = 0;
    }
    __syncthreads();
    // Pass 0: validate, count candidates.
    int nc = 0, bad = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int t = tk[i];
        if (t < 0 || (i > 0 && t <= tk[i - 1])) bad |= 2;
        const bool c = cd == nullptr || (t >= 0 && cd[t] != 0);
        if ((__float_as_uint(im[i]) & 0x7f800000u) == 0x7f800000u) bad |= 1;  // inf or NaN
        nc += c;
    }
    if (bad) atomicOr(&s_bad, bad);
    atomicAdd(&s_ncand, nc);
    __syncthreads();
    if (s_bad) {
        if (threadIdx.x == 0) {
            status[s] = (s_bad & 2) ? 2 : 1;
            counts[s] = -1;
        }
        return;
    }
    const int ncand = s_ncand;
    const int k = kreq < ncand ? kreq : ncand;
    // Radix select of the k-th largest candidate key (k >= 1, < ncand).
    unsigned long long prefix = 0, mask = 0;
    const bool select = k > 0 && k < ncand;
    int rank = k;  // 1-based rank from the top among keys matching prefix
    for (int sh = 56; select && sh >= 0; sh -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            if (cd != nullptr && cd[tk[i]] == 0) continue;
            const unsigned long long key = lazy_key(im[i], tk[i], tk[i] == force);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> sh) & 0xff], 1);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int above = 0, b = 255;
            for (; b > 0; b--) {
                if (above + hist[b] >= rank) break;
                above += hist[b];
            }
            s_bin = b;
            s_rank = rank - above;
        }
        __syncthreads();
        prefix |= (unsigned long long)s_bin << sh;
        mask |= 0xffull << sh;
        rank = s_rank;
        __syncthreads();
    }
    const unsigned long long kth = prefix;
    // Compaction in token order.
    const unsigned below = (1u << lane) - 1u;
    int* out = keep + off;
    for (int i0 = 0; i0 < n; i0 += blockDim.x) {
        const int i = i0 + threadIdx.x;
        bool e = false;
        if (i < n) {
            const bool c = cd == nullptr || cd[tk[i]] != 0;
            if (!c) e = emit_always != 0;
            else if (k >= ncand) e = true;
            else if (k > 0) e = lazy_key(im[i], tk[i], tk[i] == force) >= kth;
        }
        const unsigned b = __ballot_sync(0xffffffffu, e);
        if (lane == 0) wsum[warp] = __popc(b);
        __syncthreads();
        int pre = s_base, all = 0;
        for (int w = 0; w < nw; w++) {
            if (w < warp) pre += wsum[w];
            all += wsum[w];
        }
        if (e) out[pre + __popc(b & below)] = tk[i];
        __syncthreads();
        if (threadIdx.x == 0) s_base += all;
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        counts[s] = s_base;
        status[s] = 0;
    }
}

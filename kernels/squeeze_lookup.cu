// Squeezed Attention centroid lookup (policy/squeeze.rs `pooled_probs` +
// `HeadIndex::kept_clusters`), one query position per row (decode).
//
// Block (kv head h, query row r), 8 warps. For one level and each q head j
// of h's group: s_c = scale * q_j . C_c over the candidate clusters, then
// p_jc = exp(s_c - max) / sum_k n_k exp(s_k - max), both over candidates
// only. The pooled probability is p_c = max_j p_jc and candidate c is kept
// when p_c >= thr. Non-candidates are never kept (p written as 0). Two
// passes over the centroids (the second recomputes the dots), so any number
// of clusters fits.
//
// squeeze_lookup: one level; candidates = non-empty clusters.
// squeeze_lookup2: two levels in one block. The coarse level runs as above
//   (candidates = non-empty coarse clusters, sizes in keys); a fine cluster
//   is a candidate when it is non-empty and its coarse cluster (of_fine)
//   was kept; the fine level then runs over those candidates only (the
//   denominator counts only them), as the CPU's two-level lookup does.
// squeeze_keys: the selected key set of each (row, head): clustered keys
//   t < ws whose fine cluster is kept, ascending, then ws..len[r] (the
//   observation window and every token after the prefix), into
//   keys[(r * hkv + h) * cap ..], with the count in counts[r * hkv + h].
//
// centroids `[hkv][k][d]` f32, sizes `[hkv][k]` u32, queries `[rows][n_q][d]`
// f32; outputs probs `[rows][hkv][k]` f32, keep `[rows][hkv][k]` u8.

__device__ __forceinline__ float warp_sum(float s) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
    return s;
}

// Candidate = non-empty cluster.
struct NonEmpty {
    const unsigned* sz;
    __device__ bool operator()(int c) const { return sz[c] > 0; }
};

// Candidate = non-empty fine cluster whose coarse cluster was kept (the
// coarse flags were written by this block before a __syncthreads; volatile
// so the read does not go through the non-coherent cache).
struct ViaCoarse {
    const unsigned* sz;
    const unsigned* of_fine;
    const volatile unsigned char* ckeep;
    __device__ bool operator()(int c) const {
        if (sz[c] == 0) return false;
        unsigned cc = of_fine[c];
        return cc != 0xffffffffu && ckeep[cc] != 0;
    }
};

// One level for the block's (h, r): sq = the group's queries `[g][d]` in
// shared memory, red = shared scratch of 2 g + 2 * nwarps floats.
template <typename Cand>
__device__ void level_lookup(const float* __restrict__ C, const unsigned* __restrict__ sz, int k,
                             int d, const float* sq, int g, float scale, float thr, Cand cand,
                             float* red, float* __restrict__ po, unsigned char* __restrict__ ko) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    float* smax = red;
    float* sinv = smax + g;
    float* part = sinv + g;
    for (int j = 0; j < g; j++) {
        // Online (max, size-weighted sum) per warp, then across warps.
        float m = NEG_INF, l = 0.f;
        for (int c = warp; c < k; c += nw) {
            if (!cand(c)) continue;
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
    for (int c = warp; c < k; c += nw) {
        if (!cand(c)) {
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

// The group's queries of row r, head h into shared memory.
__device__ __forceinline__ void load_group_queries(float* sq, const float* __restrict__ queries,
                                                   int r, int h, int nq, int g, int d) {
    const float* qsrc = queries + ((long long)r * nq + (long long)h * g) * d;
    for (int i = threadIdx.x; i < g * d; i += blockDim.x) sq[i] = qsrc[i];
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(256)
squeeze_lookup(const float* __restrict__ cent, const unsigned* __restrict__ sizes, int k, int d,
               const float* __restrict__ queries, int nq, int hkv, float scale, float thr,
               float* __restrict__ probs, unsigned char* __restrict__ keep) {
    extern __shared__ float sm[];  // [g][d] queries, then [g] max, [g] 1/den, [8][2] partials
    const int h = blockIdx.x, r = blockIdx.y;
    const int g = nq / hkv;
    load_group_queries(sm, queries, r, h, nq, g, d);
    const unsigned* sz = sizes + (long long)h * k;
    const long long o = ((long long)r * hkv + h) * k;
    level_lookup(cent + (long long)h * k * d, sz, k, d, sm, g, scale, thr, NonEmpty{sz}, sm + g * d,
                 probs + o, keep + o);
}

// Two levels: coarse centroids ccent `[hkv][k1][d]`, csizes `[hkv][k1]`,
// of_fine `[hkv][k]` (coarse cluster of each fine one, 0xffffffff for an
// empty one); coarse probs / flags `[rows][hkv][k1]` (cprobs, ckeep), fine
// ones as squeeze_lookup.
extern "C" __global__ void __launch_bounds__(256)
squeeze_lookup2(const float* __restrict__ ccent, const unsigned* __restrict__ csizes, int k1,
                const float* __restrict__ cent, const unsigned* __restrict__ sizes,
                const unsigned* __restrict__ of_fine, int k, int d,
                const float* __restrict__ queries, int nq, int hkv, float scale, float thr_coarse,
                float thr_fine, float* cprobs, unsigned char* ckeep, float* __restrict__ probs,
                unsigned char* __restrict__ keep) {
    extern __shared__ float sm[];
    const int h = blockIdx.x, r = blockIdx.y;
    const int g = nq / hkv;
    load_group_queries(sm, queries, r, h, nq, g, d);
    const unsigned* csz = csizes + (long long)h * k1;
    const long long oc = ((long long)r * hkv + h) * k1;
    level_lookup(ccent + (long long)h * k1 * d, csz, k1, d, sm, g, scale, thr_coarse,
                 NonEmpty{csz}, sm + g * d, cprobs + oc, ckeep + oc);
    __syncthreads();  // the coarse flags are read by every warp below
    const unsigned* sz = sizes + (long long)h * k;
    const long long o = ((long long)r * hkv + h) * k;
    level_lookup(cent + (long long)h * k * d, sz, k, d, sm, g, scale, thr_fine,
                 ViaCoarse{sz, of_fine + (long long)h * k, ckeep + oc}, sm + g * d, probs + o,
                 keep + o);
}

// labels `[hkv][ws]` u32 (fine cluster of each clustered key), keep as
// above, lens `[rows / hkv]` i32 (tokens each row's sequence holds, >= ws).
// Output in dispatch.rs DeviceSelection form, one row per (row, kv head):
// ranges `[rows][hkv][cap][2]` i32 (start, end), cum `[..][cap]` (selected
// tokens before each range), cnt (ranges), tot (selected tokens).
// A range starts at t when t is selected and t - 1 is not, and ends at t
// when t - 1 is selected and t is not; the i-th start pairs with the i-th
// end. The tail ws..len is selected; it extends a run ending at ws - 1.
__device__ __forceinline__ bool key_sel(const unsigned* lab, const unsigned char* kp, int t) {
    return kp[lab[t]] != 0;
}

extern "C" __global__ void __launch_bounds__(256)
squeeze_ranges(const unsigned* __restrict__ labels, int ws, const unsigned char* __restrict__ keep,
               int k, const int* __restrict__ lens, int hkv, int cap, int* __restrict__ ranges,
               int* __restrict__ cum, int* __restrict__ cnt, int* __restrict__ tot) {
    __shared__ int wsum[3][32];
    __shared__ int base[3];  // starts, ends, selected tokens so far
    const int h = blockIdx.x, r = blockIdx.y;
    const int row = r * hkv + h;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    const unsigned* lab = labels + (long long)h * ws;
    const unsigned char* kp = keep + (long long)row * k;
    int* rg = ranges + (long long)row * cap * 2;
    int* cm = cum + (long long)row * cap;
    if (threadIdx.x < 3) base[threadIdx.x] = 0;
    __syncthreads();
    const unsigned below = (1u << lane) - 1u;
    for (int t0 = 0; t0 < ws; t0 += blockDim.x) {
        const int t = t0 + threadIdx.x;
        const bool sel = t < ws && key_sel(lab, kp, t);
        const bool prev = t > 0 && t <= ws && key_sel(lab, kp, t - 1);
        const bool st = sel && !prev, en = prev && !sel && t < ws;
        const unsigned bs = __ballot_sync(0xffffffffu, st);
        const unsigned be = __ballot_sync(0xffffffffu, en);
        const unsigned bt = __ballot_sync(0xffffffffu, sel);
        if (lane == 0) {
            wsum[0][warp] = __popc(bs);
            wsum[1][warp] = __popc(be);
            wsum[2][warp] = __popc(bt);
        }
        __syncthreads();
        int pre[3] = {base[0], base[1], base[2]}, all[3] = {0, 0, 0};
        for (int w = 0; w < nw; w++)
            for (int x = 0; x < 3; x++) {
                if (w < warp) pre[x] += wsum[x][w];
                all[x] += wsum[x][w];
            }
        if (st) {
            const int i = pre[0] + __popc(bs & below);
            rg[2 * i] = t;
            cm[i] = pre[2] + __popc(bt & below);
        }
        if (en) rg[2 * (pre[1] + __popc(be & below)) + 1] = t;
        __syncthreads();
        if (threadIdx.x < 3) base[threadIdx.x] += all[threadIdx.x];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        int ns = base[0], ne = base[1], nt = base[2];
        const int len = lens[r];
        const bool open = ns > ne;  // a run reaching ws - 1
        if (len > ws) {
            if (!open) {
                rg[2 * ns] = ws;
                cm[ns] = nt;
                ns++;
            }
            rg[2 * (ns - 1) + 1] = len;
            nt += len - ws;
        } else if (open) {
            rg[2 * (ns - 1) + 1] = ws;
        }
        cnt[row] = ns;
        tot[row] = nt;
    }
}

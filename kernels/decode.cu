// Block-sparse flash decode over a paged KV, split-K over the selected
// tokens. One CTA per (split, kv head, sequence) computes an online-softmax
// partial for all G q heads of the GQA group, so each K/V row is read once.
//
// Selection per (sequence, kv head) `bh`: cnt[bh] ranges at
// ranges[bh*cap ..], each (start, end) of token positions, with cum[bh*cap+i]
// the number of selected tokens before range i and tot[bh] the total.
// Partials (log2 domain): pm/pl [B][Hq][n_splits], pacc [B][Hq][n_splits][D].

// With DEC_SLOT defined (module "decode_slot", backend/cuda/offload.rs) the
// K/V pointers are a slot arena of [slot][page_size][D] head blocks and the
// table holds one slot per (logical page, kv head): table[page * hkv + h].
// Entry points are then prefixed `slot_`.
#ifdef DEC_SLOT
#define DEC_NAME(x) slot_##x
#else
#define DEC_NAME(x) x
#endif

#define DEC_WARPS 4
#define DEC_TILE 128
#define DEC_U 4

template <typename E, int D, int G>
__device__ void decode_partial(const u16* __restrict__ kp, const u16* __restrict__ vp,
                               const int* __restrict__ table, int table_stride, int ps, int hkv,
                               long long page_stride, long long head_stride,
                               const float* __restrict__ q, float scale_log2,
                               const int2* __restrict__ ranges, const int* __restrict__ cum,
                               const int* __restrict__ cnt, const int* __restrict__ tot, int cap,
                               int split_tokens, int n_splits, float* __restrict__ pm,
                               float* __restrict__ pl, float* __restrict__ pacc, int q_block,
                               const int* __restrict__ q_seq, const int* __restrict__ q_pos) {
    constexpr int L = D / 8;          // lanes per token row (16-byte loads)
    constexpr int TPW = 32 / L;       // tokens per warp pass
    constexpr int NG = DEC_WARPS * TPW;  // lane groups per CTA
    // Grid (rows * n_splits, hkv): rows along x, which holds 2^31 - 1 CTAs
    // (z, 65,535, held them before and failed on long prefills);
    // backend/launch_grid.rs computes it and pins this arithmetic.
    const long long bx = blockIdx.x;
    const int split = (int)(bx % n_splits), b = (int)(bx / n_splits), h = blockIdx.y;
    // Query row b reads selection row (b / q_block, h) of sequence q_seq[b]
    // and, in prefill, only tokens at or before its position q_pos[b].
    const int bh = (b / q_block) * hkv + h;
    const int hq = hkv * G;
    const int limit = q_pos ? q_pos[b] : 0x7fffffff;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane % L, grp = warp * TPW + lane / L;

    __shared__ int s_pos[DEC_TILE];
    __shared__ int s_long[DEC_TILE];
    __shared__ int s_nlong;
    __shared__ float s_m[NG][G], s_l[NG][G];
    __shared__ float s_acc[NG][G][D];

    float qr[G][8];
#pragma unroll
    for (int j = 0; j < G; j++)
#pragma unroll
        for (int i = 0; i < 8; i++)
            qr[j][i] = q[((long long)b * hq + h * G + j) * D + sub * 8 + i] * scale_log2;

    float m[G], l[G], acc[G][8];
#pragma unroll
    for (int j = 0; j < G; j++) {
        m[j] = NEG_INF;
        l[j] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[j][i] = 0.f;
    }

    const int total = tot[bh];
    const int t0 = split * split_tokens;
    const int t1 = min(total, t0 + split_tokens);
    const int* trow = table + (long long)(q_seq ? q_seq[b] : b) * table_stride;
    const int nr = cnt[bh];
    const int2* rg = ranges + (long long)bh * cap;
    const int* cm = cum + (long long)bh * cap;

    for (int base = t0; base < t1; base += DEC_TILE) {
        __syncthreads();
        // Token positions of this tile: each thread takes some ranges and
        // writes their overlap with [base, base + TILE); long overlaps are
        // written by the whole CTA afterwards.
        if (threadIdx.x == 0) s_nlong = 0;
        for (int i = threadIdx.x; i < DEC_TILE; i += blockDim.x) s_pos[i] = -1;
        __syncthreads();
        const int tend = min(t1, base + DEC_TILE);
        for (int ri = threadIdx.x; ri < nr; ri += blockDim.x) {
            const int c0 = cm[ri];
            const int2 rr = rg[ri];
            const int lo = max(c0, base), hi = min(c0 + (rr.y - rr.x), tend);
            if (hi - lo > 8) {
                s_long[atomicAdd(&s_nlong, 1)] = ri;
            } else {
                for (int idx = lo; idx < hi; idx++) {
                    int p = rr.x + (idx - c0);
                    s_pos[idx - base] = p <= limit ? p : -1;
                }
            }
        }
        __syncthreads();
        for (int k = 0; k < s_nlong; k++) {
            const int ri = s_long[k];
            const int c0 = cm[ri];
            const int2 rr = rg[ri];
            const int lo = max(c0, base), hi = min(c0 + (rr.y - rr.x), tend);
            for (int idx = lo + threadIdx.x; idx < hi; idx += blockDim.x) {
                int p = rr.x + (idx - c0);
                s_pos[idx - base] = p <= limit ? p : -1;
            }
        }
        __syncthreads();
        const int tn = tend - base;
        for (int it0 = 0; it0 < tn; it0 += NG * DEC_U) {
            float kf[DEC_U][8], vf[DEC_U][8];
            int pos[DEC_U];
#pragma unroll
            for (int u = 0; u < DEC_U; u++) {
                int ti = it0 + grp + u * NG;
                pos[u] = ti < tn ? s_pos[ti] : -1;
                if (pos[u] >= 0) {
#ifdef DEC_SLOT
                    long long off = ((long long)trow[(pos[u] / ps) * hkv + h] * ps + pos[u] % ps) * (long long)D + sub * 8;
#else
                    long long off = kv_row(trow, pos[u], h, ps, D, page_stride, head_stride) + sub * 8;
#endif
                    load8<E>(kp + off, kf[u]);
                    load8<E>(vp + off, vf[u]);
                }
            }
            float s[DEC_U][G];
#pragma unroll
            for (int u = 0; u < DEC_U; u++)
#pragma unroll
                for (int j = 0; j < G; j++) {
                    float a = 0.f;
                    if (pos[u] >= 0) {
#pragma unroll
                        for (int i = 0; i < 8; i++) a = fmaf(qr[j][i], kf[u][i], a);
                    }
#pragma unroll
                    for (int o = L / 2; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffff, a, o);
                    s[u][j] = pos[u] >= 0 ? a : NEG_INF;
                }
#pragma unroll
            for (int j = 0; j < G; j++) {
                float mx = m[j];
#pragma unroll
                for (int u = 0; u < DEC_U; u++) mx = fmaxf(mx, s[u][j]);
                if (mx == NEG_INF) continue;
                float corr = exp2f(m[j] - mx);
                l[j] *= corr;
#pragma unroll
                for (int i = 0; i < 8; i++) acc[j][i] *= corr;
#pragma unroll
                for (int u = 0; u < DEC_U; u++) {
                    if (pos[u] < 0) continue;
                    float p = exp2f(s[u][j] - mx);
                    l[j] += p;
#pragma unroll
                    for (int i = 0; i < 8; i++) acc[j][i] = fmaf(p, vf[u][i], acc[j][i]);
                }
                m[j] = mx;
            }
        }
    }
    // Merge the lane groups.
    if (sub == 0) {
#pragma unroll
        for (int j = 0; j < G; j++) { s_m[grp][j] = m[j]; s_l[grp][j] = l[j]; }
    }
#pragma unroll
    for (int j = 0; j < G; j++)
#pragma unroll
        for (int i = 0; i < 8; i++) s_acc[grp][j][sub * 8 + i] = acc[j][i];
    __syncthreads();
    for (int e = threadIdx.x; e < G * D; e += blockDim.x) {
        int j = e / D, dd = e % D;
        float M = NEG_INF;
        for (int g2 = 0; g2 < NG; g2++) M = fmaxf(M, s_m[g2][j]);
        float Ls = 0.f, A = 0.f;
        if (M != NEG_INF) {
            for (int g2 = 0; g2 < NG; g2++) {
                float w = exp2f(s_m[g2][j] - M);
                Ls += s_l[g2][j] * w;
                A += s_acc[g2][j][dd] * w;
            }
        }
        long long row = ((long long)b * hq + h * G + j) * n_splits + split;
        pacc[row * D + dd] = A;
        if (dd == 0) { pm[row] = M; pl[row] = Ls; }
    }
}

__device__ __forceinline__ float block_reduce(float v, bool is_max, float* s_red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float y = __shfl_xor_sync(0xffffffff, v, o);
        v = is_max ? fmaxf(v, y) : v + y;
    }
    __syncthreads();
    if (lane == 0) s_red[warp] = v;
    __syncthreads();
    float r = s_red[0];
    for (int w = 1; w < nw; w++) r = is_max ? fmaxf(r, s_red[w]) : r + s_red[w];
    return r;
}

// Merge the splits of each (query row, q head). Row r = b * hq + head goes
// to out + b * out_stride + head * D (elements) as f32 (out_dtype 0), f16
// (1) or bf16 (2): the plugin's [rows][Hq][D] f32 is out_stride = hq * D.
template <int D>
__device__ void decode_combine(const float* __restrict__ pm, const float* __restrict__ pl,
                               const float* __restrict__ pacc, int n_splits, void* __restrict__ out,
                               int hq, long long out_stride, int out_dtype) {
    __shared__ float s_red[32];
    const long long row = blockIdx.x;
    const float* m = pm + row * n_splits;
    float mx = NEG_INF;
    for (int s = threadIdx.x; s < n_splits; s += blockDim.x) mx = fmaxf(mx, m[s]);
    const float M = block_reduce(mx, true, s_red);
    float ls = 0.f;
    if (M != NEG_INF)
        for (int s = threadIdx.x; s < n_splits; s += blockDim.x) ls += pl[row * n_splits + s] * exp2f(m[s] - M);
    const float Ls = block_reduce(ls, false, s_red);
    for (int dd = threadIdx.x; dd < D; dd += blockDim.x) {
        float A = 0.f;
        if (M != NEG_INF) {
#pragma unroll 4
            for (int s = 0; s < n_splits; s++) A += pacc[(row * n_splits + s) * D + dd] * exp2f(m[s] - M);
        }
        const float o = Ls > 0.f ? A / Ls : 0.f;
        const long long at = (row / hq) * out_stride + (row % hq) * D + dd;
        if (out_dtype == 0) ((float*)out)[at] = o;
        else if (out_dtype == 1) ((u16*)out)[at] = f32_to_f16(o);
        else ((u16*)out)[at] = f32_to_bf16(o);
    }
}

#define DECODE_INST(NAME, E, D, G)                                                               \
    extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32)                                 \
        DEC_NAME(NAME)(const u16* kp, const u16* vp, const int* table, int table_stride, int ps, int hkv,   \
             long long page_stride, long long head_stride, const float* q, float scale_log2, const int2* ranges, const int* cum,               \
             const int* cnt, const int* tot, int cap, int split_tokens, int n_splits, float* pm, float* pl, \
             float* pacc, int q_block, const int* q_seq, const int* q_pos) {                     \
        decode_partial<E, D, G>(kp, vp, table, table_stride, ps, hkv, page_stride, head_stride, q, scale_log2, ranges, cum, \
                                cnt, tot, cap, split_tokens, n_splits, pm, pl, pacc, q_block, q_seq, q_pos); \
    }

#define DECODE_G(E, TN, D)                        \
    DECODE_INST(decode_##TN##_d##D##_g1, E, D, 1) \
    DECODE_INST(decode_##TN##_d##D##_g2, E, D, 2) \
    DECODE_INST(decode_##TN##_d##D##_g4, E, D, 4) \
    DECODE_INST(decode_##TN##_d##D##_g8, E, D, 8)

DECODE_G(Bf16, bf16, 64)
DECODE_G(Bf16, bf16, 128)
DECODE_G(Bf16, bf16, 256)
DECODE_G(F16, f16, 64)
DECODE_G(F16, f16, 128)
DECODE_G(F16, f16, 256)

#define COMBINE_INST(D)                                                                       \
    extern "C" __global__ void DEC_NAME(combine_d##D)(const float* pm, const float* pl, const float* pacc, \
                                            int n_splits, void* out, int hq, long long out_stride, \
                                            int out_dtype) {                                  \
        decode_combine<D>(pm, pl, pacc, n_splits, out, hq, out_stride, out_dtype);            \
    }
COMBINE_INST(64)
COMBINE_INST(128)
COMBINE_INST(256)

#ifndef DEC_SLOT
// Engine queries to the kernels' f32 [rows][Hq * D]: row r of `n_rows`
// reads `hqd` elements at src + r * src_stride (elements) of dtype
// src_dtype (0 f32, 1 f16, 2 bf16), multiplied by `mul`.
extern "C" __global__ void __launch_bounds__(256)
    q_to_f32(const void* __restrict__ src, int src_dtype, long long src_stride, int n_rows, int hqd,
             float mul, float* __restrict__ dst) {
    const long long n = (long long)n_rows * hqd;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / hqd, c = i % hqd, at = r * src_stride + c;
        float x;
        if (src_dtype == 0) x = ((const float*)src)[at];
        else if (src_dtype == 1) x = F16::to_f32(((const u16*)src)[at]);
        else x = Bf16::to_f32(((const u16*)src)[at]);
        dst[i] = x * mul;
    }
}
#endif

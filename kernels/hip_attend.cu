// hip decode attention in one launch (HipGpuDecoder::step / step_device):
// decode.cu's split-K partials over the assembled selection, with two
// changes that cut its latency chain at batch 1 (profiled there at 25 us
// partial + 7 us combine for 3,264 tokens, tests/gpu/logs/hipstep/run1):
// - each CTA copies its row's ranges and cumulative counts into shared
//   memory once and finds a token's range by binary search there, instead
//   of every thread scanning the ranges per tile from global memory;
// - the last CTA of each (sequence, kv head) to finish merges the splits
//   (as decode_dense_v2.cu), so no combine launch; it leaves its counter at
//   zero for the next launch (counters zeroed once at allocation).
// Selection row bh = b * hkv + h: cnt[bh] ranges at ranges[bh * cap..] with
// cum[bh * cap + i] the selected tokens before range i, tot[bh] in all
// (hip_assemble's output); cap <= HA_MAXR. Output f32 [B][Hq][D].

#define HA_WARPS 4
#define HA_U 4
#define HA_MAXR 1024

template <typename E, int D, int G>
__device__ void hip_attend(const u16* __restrict__ kp, const u16* __restrict__ vp,
                           const int* __restrict__ table, int table_stride, int ps, int hkv,
                           long long page_stride, long long head_stride, const float* __restrict__ q,
                           float scale_log2, const int2* __restrict__ ranges, const int* __restrict__ cum,
                           const int* __restrict__ cnt, const int* __restrict__ tot, int cap,
                           int split_tokens, int n_splits, float* __restrict__ pm, float* __restrict__ pl,
                           float* __restrict__ pacc, int* __restrict__ counters, float* __restrict__ out) {
    constexpr int L = D / 8;             // lanes per token row (16-byte loads)
    constexpr int TPW = 32 / L;          // tokens per warp pass
    constexpr int NG = HA_WARPS * TPW;   // lane groups per CTA
    const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int bh = b * hkv + h;
    const int hq = hkv * G;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane % L, grp = warp * TPW + lane / L;

    __shared__ int s_cum[HA_MAXR];
    __shared__ int s_start[HA_MAXR];
    __shared__ float s_m[NG][G], s_l[NG][G];
    __shared__ float s_acc[NG][G][D];
    __shared__ int s_last;

    const int total = tot[bh];
    const int nr = min(cnt[bh], HA_MAXR);
    const int t0 = split * split_tokens;
    const int t1 = min(total, t0 + split_tokens);
    if (t0 < t1) {
        for (int i = threadIdx.x; i < nr; i += blockDim.x) {
            s_cum[i] = cum[(long long)bh * cap + i];
            s_start[i] = ranges[(long long)bh * cap + i].x;
        }
    }
    float qr[G][8];
#pragma unroll
    for (int j = 0; j < G; j++)
#pragma unroll
        for (int i = 0; i < 8; i++) qr[j][i] = q[((long long)b * hq + h * G + j) * D + sub * 8 + i] * scale_log2;
    float m[G], l[G], acc[G][8];
#pragma unroll
    for (int j = 0; j < G; j++) {
        m[j] = NEG_INF;
        l[j] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[j][i] = 0.f;
    }
    __syncthreads();
    const int* trow = table + (long long)b * table_stride;
    for (int it0 = t0; it0 < t1; it0 += NG * HA_U) {
        float kf[HA_U][8], vf[HA_U][8];
        bool ok[HA_U];
#pragma unroll
        for (int u = 0; u < HA_U; u++) {
            const int ti = it0 + grp + u * NG;
            ok[u] = ti < t1;
            if (ok[u]) {
                // Last range starting at or before selected token ti.
                int lo = 0, hi = nr - 1;
                while (lo < hi) {
                    const int mid = (lo + hi + 1) >> 1;
                    if (s_cum[mid] <= ti) lo = mid;
                    else hi = mid - 1;
                }
                const int p = s_start[lo] + (ti - s_cum[lo]);
                const long long off = kv_row(trow, p, h, ps, D, page_stride, head_stride) + sub * 8;
                load8<E>(kp + off, kf[u]);
                load8<E>(vp + off, vf[u]);
            }
        }
        float s[HA_U][G];
#pragma unroll
        for (int u = 0; u < HA_U; u++)
#pragma unroll
            for (int j = 0; j < G; j++) {
                float a = 0.f;
                if (ok[u]) {
#pragma unroll
                    for (int i = 0; i < 8; i++) a = fmaf(qr[j][i], kf[u][i], a);
                }
#pragma unroll
                for (int o = L / 2; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffff, a, o);
                s[u][j] = ok[u] ? a : NEG_INF;
            }
#pragma unroll
        for (int j = 0; j < G; j++) {
            float mx = m[j];
#pragma unroll
            for (int u = 0; u < HA_U; u++) mx = fmaxf(mx, s[u][j]);
            if (mx == NEG_INF) continue;
            const float corr = exp2f(m[j] - mx);
            l[j] *= corr;
#pragma unroll
            for (int i = 0; i < 8; i++) acc[j][i] *= corr;
#pragma unroll
            for (int u = 0; u < HA_U; u++) {
                if (!ok[u]) continue;
                const float p = exp2f(s[u][j] - mx);
                l[j] += p;
#pragma unroll
                for (int i = 0; i < 8; i++) acc[j][i] = fmaf(p, vf[u][i], acc[j][i]);
            }
            m[j] = mx;
        }
    }
    // Merge the lane groups into this split's partial.
    if (sub == 0) {
#pragma unroll
        for (int j = 0; j < G; j++) {
            s_m[grp][j] = m[j];
            s_l[grp][j] = l[j];
        }
    }
#pragma unroll
    for (int j = 0; j < G; j++)
#pragma unroll
        for (int i = 0; i < 8; i++) s_acc[grp][j][sub * 8 + i] = acc[j][i];
    __syncthreads();
    for (int e = threadIdx.x; e < G * D; e += blockDim.x) {
        const int j = e / D, dd = e % D;
        float M = NEG_INF;
        for (int g2 = 0; g2 < NG; g2++) M = fmaxf(M, s_m[g2][j]);
        float Ls = 0.f, A = 0.f;
        if (M != NEG_INF) {
            for (int g2 = 0; g2 < NG; g2++) {
                const float w = exp2f(s_m[g2][j] - M);
                Ls += s_l[g2][j] * w;
                A += s_acc[g2][j][dd] * w;
            }
        }
        const long long row = ((long long)b * hq + h * G + j) * n_splits + split;
        pacc[row * D + dd] = A;
        if (dd == 0) {
            pm[row] = M;
            pl[row] = Ls;
        }
    }
    // The last CTA of (sequence, kv head) merges the splits.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) s_last = atomicAdd(&counters[bh], 1) == n_splits - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    for (int j = warp; j < G; j += HA_WARPS) {
        const long long rb = ((long long)b * hq + h * G + j) * n_splits;
        float M = NEG_INF;
        for (int s2 = lane; s2 < n_splits; s2 += 32) M = fmaxf(M, __ldcg(pm + rb + s2));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffff, M, o));
        float Ls = 0.f;
        if (M != NEG_INF)
            for (int s2 = lane; s2 < n_splits; s2 += 32) Ls += __ldcg(pl + rb + s2) * exp2f(__ldcg(pm + rb + s2) - M);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) Ls += __shfl_xor_sync(0xffffffff, Ls, o);
        if (lane == 0) {
            s_m[0][j] = M;
            s_l[0][j] = Ls;
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < G * D; e += blockDim.x) {
        const int j = e / D, dd = e % D;
        const float M = s_m[0][j], Ls = s_l[0][j];
        const long long rb = ((long long)b * hq + h * G + j) * n_splits;
        float A = 0.f;
        if (M != NEG_INF) {
#pragma unroll 4
            for (int s2 = 0; s2 < n_splits; s2++) A += __ldcg(pacc + (rb + s2) * D + dd) * exp2f(__ldcg(pm + rb + s2) - M);
        }
        out[((long long)b * hq + h * G + j) * D + dd] = Ls > 0.f ? A / Ls : 0.f;
    }
    if (threadIdx.x == 0) counters[bh] = 0;
}

#define HA_INST(NAME, E, D, G)                                                                        \
    extern "C" __global__ void __launch_bounds__(HA_WARPS * 32)                                       \
        NAME(const u16* kp, const u16* vp, const int* table, int table_stride, int ps, int hkv,       \
             long long page_stride, long long head_stride, const float* q, float scale_log2,          \
             const int2* ranges, const int* cum, const int* cnt, const int* tot, int cap,             \
             int split_tokens, int n_splits, float* pm, float* pl, float* pacc, int* counters,        \
             float* out) {                                                                            \
        hip_attend<E, D, G>(kp, vp, table, table_stride, ps, hkv, page_stride, head_stride, q,       \
                            scale_log2, ranges, cum, cnt, tot, cap, split_tokens, n_splits, pm, pl,   \
                            pacc, counters, out);                                                     \
    }
#define HA_G(E, TN, D)                              \
    HA_INST(hip_attend_##TN##_d##D##_g1, E, D, 1)   \
    HA_INST(hip_attend_##TN##_d##D##_g2, E, D, 2)   \
    HA_INST(hip_attend_##TN##_d##D##_g4, E, D, 4)   \
    HA_INST(hip_attend_##TN##_d##D##_g8, E, D, 8)
HA_G(Bf16, bf16, 64)
HA_G(Bf16, bf16, 128)
HA_G(Bf16, bf16, 256)
HA_G(F16, f16, 64)
HA_G(F16, f16, 128)
HA_G(F16, f16, 256)

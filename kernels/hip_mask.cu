// InfiniteHiP hierarchical mask estimation (policy/hip.rs on the GPU).
//
// Rows r = seq_row * hkv + kv_head. A stage takes per row a sorted list of
// candidate ranges, cuts each into sub-chunks of `c` tokens (slot
// i*E + e is sub-chunk e of range i; empty slots are invalid), scores each
// sub-chunk by the centre-of-half binary search, and keeps the top `k`
// (ties: earlier chunk). Scores are bit-identical to the CPU's dot_f32
// (8 partial sums, no fused multiply-add, same order), so the selection
// equals the CPU policy's exactly.

// Order-preserving key of a score; NaN scores as -inf; 0 marks invalid slots.
__device__ __forceinline__ u32 score_key(float f) {
    if (f != f) f = NEG_INF;
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Score of key t: the max over this lane's queries of q . k, each dot in
// the CPU's order (8 partial sums, no fused multiply-add). With LPS > 1,
// LPS consecutive lanes share a sub-chunk: lane jl takes query tiles
// jl*NQ, jl*NQ + NQ*LPS, ... and the group's max is exchanged among them
// (max does not depend on the order). Queries sit in shared memory at row
// stride QS floats.
template <typename E, int D, int NQ, int LPS, int QS>
__device__ __forceinline__ float probe(const u16* __restrict__ kp, const int* trow, int t, int h,
                                       int hkv, int ps, long long pst, long long hst, const float* sq, int nq,
                                       int jl, unsigned gmask) {
#ifdef HIP_EST_HOST
    const u16* kr = est_key_row<D>(kp, trow, t, h, hkv, ps);  // kp: EstCache (hip_est_host.cuh)
#else
    const u16* kr = kp + kv_row(trow, t, h, ps, D, pst, hst);
#endif
    float best = NEG_INF;
    for (int j0 = jl * NQ; j0 < nq; j0 += NQ * LPS) {
        float a[NQ][8];
#pragma unroll
        for (int j = 0; j < NQ; j++)
#pragma unroll
            for (int i = 0; i < 8; i++) a[j][i] = 0.f;
#ifdef HIP_EST_PRELOAD
        // Module hip_mask_host_pl, multi-lane scorers (hip_score4: the small
        // later stages, latency-bound): the row's 16-byte vectors loaded PL
        // at a time, all in flight before the first use (a host-tier row
        // sits in the row cache's arena, the miss staging or mapped host
        // memory; the loop below waits on a load every other vector), then
        // scored in exactly that loop's order (same bits). One-lane scorers
        // (stage 0, bus-bound, where occupancy counts: 158 -> 214 registers
        // with it) keep the loop.
        constexpr int NV = D / 8;
        constexpr int PL = LPS == 1 ? 1 : NV < 16 ? NV : 16;
        const uint4* kv4 = reinterpret_cast<const uint4*>(kr);
#pragma unroll(LPS == 1 ? 2 : 1)
        for (int c0 = 0; c0 < NV; c0 += PL) {
            uint4 raw[PL];
#pragma unroll
            for (int u = 0; u < PL; u++) raw[u] = kv4[c0 + u];
#pragma unroll
            for (int u = 0; u < PL; u++) {
                const u32 w[4] = {raw[u].x, raw[u].y, raw[u].z, raw[u].w};
                float k8[8];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    k8[2 * i] = E::to_f32((u16)(w[i] & 0xffff));
                    k8[2 * i + 1] = E::to_f32((u16)(w[i] >> 16));
                }
#pragma unroll
                for (int j = 0; j < NQ; j++) {
                    const float* qj = sq + (j0 + j) * QS + (c0 + u) * 8;
#pragma unroll
                    for (int i = 0; i < 8; i++) a[j][i] = __fadd_rn(a[j][i], __fmul_rn(qj[i], k8[i]));
                }
            }
        }
#else
#pragma unroll 2
        for (int c = 0; c < D / 8; c++) {
            float k8[8];
            load8<E>(kr + c * 8, k8);
#pragma unroll
            for (int j = 0; j < NQ; j++) {
                const float* qj = sq + (j0 + j) * QS + c * 8;
#pragma unroll
                for (int i = 0; i < 8; i++) a[j][i] = __fadd_rn(a[j][i], __fmul_rn(qj[i], k8[i]));
            }
        }
#endif
#pragma unroll
        for (int j = 0; j < NQ; j++) {
            if (j0 + j < nq) {
                float s = a[j][0];
#pragma unroll
                for (int i = 1; i < 8; i++) s = __fadd_rn(s, a[j][i]);
                best = fmaxf(best, s);
            }
        }
    }
#pragma unroll
    for (int o = LPS / 2; o > 0; o >>= 1) best = fmaxf(best, __shfl_xor_sync(gmask, best, o, LPS));
    return best;
}

template <typename E, int D, int NQ, int LPS>
__device__ void hip_score(const u16* __restrict__ kp, const int* __restrict__ table, int table_stride,
                          int ps, int hkv, long long pst, long long hst, const int* __restrict__ row_seq,
                          const float* __restrict__ qs, const int* __restrict__ nq_arr, int nq_max,
                          const int2* __restrict__ in_ranges, const int* __restrict__ in_cnt,
                          int cap_in, int E_, int c, u32* __restrict__ keys, const int* __restrict__ gate,
                          int stage) {
    // Padded query rows (LPS > 1): the group's lanes read distinct rows
    // in one shared-memory access without bank conflicts.
    constexpr int QS = LPS > 1 ? D + 4 : D;
    extern __shared__ float sq[];
    // Device refresh decision (hip_step_meta): skip a stage this step does not refresh.
    if (gate && gate[1] > stage) return;
    const int r = blockIdx.y;
    const int rb = r / hkv, h = r % hkv;
    const int nq = nq_arr[rb];
    const float* qsrc = qs + ((long long)r * nq_max) * D;
    // Queries padded with zeros to a multiple of NQ * LPS (padding is never scored).
    const int nq_pad = (nq + NQ * LPS - 1) / (NQ * LPS) * (NQ * LPS);
    for (int i = threadIdx.x; i < nq_pad * D; i += blockDim.x)
        sq[(i / D) * QS + i % D] = i < nq * D ? qsrc[i] : 0.f;
    __syncthreads();
    const int n_sub = cap_in * E_;
    const int j = (blockIdx.x * blockDim.x + threadIdx.x) / LPS;
    const int jl = threadIdx.x % LPS;
    const unsigned gmask = LPS == 32 ? 0xffffffffu : ((1u << LPS) - 1u) << ((threadIdx.x & 31) & ~(LPS - 1));
    if (j >= n_sub) return;  // whole groups (blockDim is a multiple of LPS)
    const int ri = j / E_, e = j % E_;
    u32 key = 0;
    if (ri < in_cnt[r]) {
        int2 rg = in_ranges[(long long)r * cap_in + ri];
        int l = rg.x + e * c;
        if (l < rg.y) {
            int rr = min(l + c, rg.y);
            const int* trow = table + (long long)row_seq[rb] * table_stride;
            float best;
            if (rr - l == 1) {
                best = probe<E, D, NQ, LPS, QS>(kp, trow, l, h, hkv, ps, pst, hst, sq, nq, jl, gmask);
            } else {
                best = NEG_INF;
#ifdef HIP_EST_HOST
                // Host-tier module: the right probe of a 2-token range after
                // the first level is the row the previous level chose (the
                // centre of the half it kept), so with EST_REUSE_RIGHT its
                // score is reused instead of reading the row again (over the
                // bus when it missed). The lanes of a group share l, rr and
                // the level, so they branch together.
                const u32 fl = reinterpret_cast<const EstCache*>(kp)->flags;
                int level = 0;
#endif
                while (rr - l > 1) {
                    int m = (l + rr) / 2;
                    float sl = probe<E, D, NQ, LPS, QS>(kp, trow, (l + m) / 2, h, hkv, ps, pst, hst, sq, nq, jl, gmask);
                    float sr;
#ifdef HIP_EST_HOST
                    if (level > 0 && ((fl & EST_REUSE_UNSOUND) || ((fl & EST_REUSE_RIGHT) && rr - l == 2)))
                        sr = best;
                    else
#endif
                    sr = probe<E, D, NQ, LPS, QS>(kp, trow, (m + rr) / 2, h, hkv, ps, pst, hst, sq, nq, jl, gmask);
                    if (sl >= sr) { rr = m; best = sl; } else { l = m; best = sr; }
#ifdef HIP_EST_HOST
                    level++;
#endif
                }
            }
            key = score_key(best);
        }
    }
    if (jl == 0) keys[(long long)r * n_sub + j] = key;
}

// hip_score_<dtype>_d<D>_q<NQ>: one thread per sub-chunk, NQ queries per
// pass; hip_score4_...: four lanes per sub-chunk, each NQ queries per pass
// (4x the threads and a quarter of the chain per thread: the small later
// stages, where a few thousand sub-chunks leave the SMs mostly idle).
#define SCORE_INST(PFX, LPS, E, TN, D, NQ)                                                        \
    extern "C" __global__ void __launch_bounds__(128)                                             \
        PFX##_##TN##_d##D##_q##NQ(const u16* kp, const int* table, int table_stride, int ps,      \
                                      int hkv, long long pst, long long hst, const int* row_seq, const float* qs, const int* nq, \
                                      int nq_max, const int2* in_ranges, const int* in_cnt,       \
                                      int cap_in, int E_, int c, u32* keys, const int* gate,      \
                                      int stage) {                                                \
        IHIP_PDL_ENTRY();                                                                         \
        hip_score<E, D, NQ, LPS>(kp, table, table_stride, ps, hkv, pst, hst, row_seq, qs, nq, nq_max, in_ranges, \
                            in_cnt, cap_in, E_, c, keys, gate, stage);                            \
    }
#define SCORE_Q(E, TN, D) SCORE_INST(hip_score, 1, E, TN, D, 1) SCORE_INST(hip_score, 1, E, TN, D, 2) \
    SCORE_INST(hip_score, 1, E, TN, D, 4) SCORE_INST(hip_score, 1, E, TN, D, 8)                     \
    SCORE_INST(hip_score4, 4, E, TN, D, 1) SCORE_INST(hip_score4, 4, E, TN, D, 2)
SCORE_Q(Bf16, bf16, 64)
SCORE_Q(Bf16, bf16, 128)
SCORE_Q(Bf16, bf16, 256)
SCORE_Q(F16, f16, 64)
SCORE_Q(F16, f16, 128)
SCORE_Q(F16, f16, 256)

#ifndef HIP_EST_HOST
// hip_scorew: the same scores as hip_score, bit for bit, with the key rows
// of a level fetched together. A warp scores SPW = 32 / LPS sub-chunks
// (LPS lanes each, queries split among them as in hip_score4) level by
// level: each sub-chunk's (up to) two probe rows of the level are copied
// into the warp's shared memory by coalesced 16-byte cp.async (D / 8 lanes
// per row, every row of the level in flight at once), then each lane takes
// its dot products from shared memory in the CPU's order (probe() above).
// hip_score instead loads each row 16 bytes per thread, two loads in
// flight, so a level costs 16 dependent round trips to memory. The right
// probe of a 2-token range after the first level is the row the previous
// level chose (centre of the half it kept), so its score is reused, not
// reloaded. Rows sit in shared memory at a stride of D / 8 + 1 16-byte
// units (odd: the 8 lanes of a 16-byte shared access hit distinct banks).
// Dynamic shared memory: the queries (rounded as in hip_score), then per
// warp 2 * SPW row offsets (8 bytes) and 2 * SPW rows.
__device__ __forceinline__ u32 hsw_smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

template <typename E, int D, int NQ, int LPS, int QS>
__device__ __forceinline__ float probe_smem(const u16* kr, const float* sq, int nq, int jl) {
    float best = NEG_INF;
    for (int j0 = jl * NQ; j0 < nq; j0 += NQ * LPS) {
        float a[NQ][8];
#pragma unroll
        for (int j = 0; j < NQ; j++)
#pragma unroll
            for (int i = 0; i < 8; i++) a[j][i] = 0.f;
#pragma unroll 4
        for (int c = 0; c < D / 8; c++) {
            float k8[8];
            load8<E>(kr + c * 8, k8);
#pragma unroll
            for (int j = 0; j < NQ; j++) {
                const float* qj = sq + (j0 + j) * QS + c * 8;
#pragma unroll
                for (int i = 0; i < 8; i++) a[j][i] = __fadd_rn(a[j][i], __fmul_rn(qj[i], k8[i]));
            }
        }
#pragma unroll
        for (int j = 0; j < NQ; j++) {
            if (j0 + j < nq) {
                float s = a[j][0];
#pragma unroll
                for (int i = 1; i < 8; i++) s = __fadd_rn(s, a[j][i]);
                best = fmaxf(best, s);
            }
        }
    }
    return best;
}

// Shared-memory bytes per warp of hip_scorew (the host mirrors it).
#define HSW_WARP_BYTES(D, LPS) (2 * (32 / (LPS)) * (((D) / 8 + 1) * 16 + 8))

template <typename E, int D, int NQ, int LPS>
__device__ void hip_scorew(const u16* __restrict__ kp, const int* __restrict__ table, int table_stride,
                           int ps, int hkv, long long pst, long long hst, const int* __restrict__ row_seq,
                           const float* __restrict__ qs, const int* __restrict__ nq_arr, int nq_max,
                           const int2* __restrict__ in_ranges, const int* __restrict__ in_cnt,
                           int cap_in, int E_, int c, u32* __restrict__ keys, const int* __restrict__ gate,
                           int stage) {
    constexpr int QS = LPS > 1 ? D + 4 : D;
    constexpr int SPW = 32 / LPS;                 // sub-chunks per warp
    constexpr int RU = D / 8 + 1;                 // row stride, 16-byte units
    constexpr int RL = D / 8 < 32 ? D / 8 : 32;   // lanes per row in one copy
    constexpr int RPI = 32 / RL;                  // rows per copy instruction
    constexpr int VPL = D / 8 / RL;               // 16-byte vectors per lane per row
    constexpr int NR = 2 * SPW;                   // rows per warp per level
    extern __shared__ float sq[];
    if (gate && gate[1] > stage) return;  // as hip_score (uniform over the block)
    const int r = blockIdx.y;
    const int rb = r / hkv, h = r % hkv;
    const int nq = nq_arr[rb];
    const float* qsrc = qs + ((long long)r * nq_max) * D;
    const int nq_pad = (nq + NQ * LPS - 1) / (NQ * LPS) * (NQ * LPS);
    for (int i = threadIdx.x; i < nq_pad * D; i += blockDim.x)
        sq[(i / D) * QS + i % D] = i < nq * D ? qsrc[i] : 0.f;
    __syncthreads();
    const int q_floats = (nq_max + NQ * LPS - 1) / (NQ * LPS) * (NQ * LPS) * QS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    char* wbase = reinterpret_cast<char*>(sq + q_floats) + warp * HSW_WARP_BYTES(D, LPS);
    long long* saddr = reinterpret_cast<long long*>(wbase);
    const u16* srow = reinterpret_cast<const u16*>(wbase + NR * 8);
    const u32 srow_s = hsw_smem_u32(wbase + NR * 8);
    const int n_sub = cap_in * E_;
    const int j = (blockIdx.x * blockDim.x + threadIdx.x) / LPS;
    const int jl = lane % LPS, s = lane / LPS;
    int l = 0, rr = 0;
    bool active = false, valid = false;
    float best = NEG_INF;
    const int* trow = table + (long long)row_seq[rb] * table_stride;
    if (j < n_sub) {
        const int ri = j / E_, e = j % E_;
        if (ri < in_cnt[r]) {
            int2 rg = in_ranges[(long long)r * cap_in + ri];
            l = rg.x + e * c;
            if (l < rg.y) {
                rr = min(l + c, rg.y);
                valid = active = true;
            }
        }
    }
    int cpi = -1, cpg = 0;  // cached page-table entry (index, page)
    int level = 0;
    while (__any_sync(0xffffffffu, active)) {
        int ta = -1, tb = -1;
        bool reuse = false;
        if (active) {
            if (rr - l == 1) {
                ta = l;  // one token: one probe
            } else {
                const int m = (l + rr) / 2;
                ta = (l + m) / 2;
                reuse = rr - l == 2 && level > 0;
                if (!reuse) tb = (m + rr) / 2;
            }
        }
        if (jl == 0) {
            long long oa = -1, ob = -1;
            if (ta >= 0) {
                const int pi = ta / ps;
                if (pi != cpi) { cpi = pi; cpg = trow[pi]; }
                oa = (long long)cpg * pst + (long long)h * hst + (long long)(ta % ps) * D;
            }
            if (tb >= 0) {
                const int pi = tb / ps;
                if (pi != cpi) { cpi = pi; cpg = trow[pi]; }
                ob = (long long)cpg * pst + (long long)h * hst + (long long)(tb % ps) * D;
            }
            saddr[s] = oa;
            saddr[SPW + s] = ob;
        }
        __syncwarp();
#pragma unroll 4
        for (int it = 0; it < NR / RPI; it++) {
            const int k = it * RPI + lane / RL;
            const long long a = saddr[k];
            if (a >= 0) {
#pragma unroll
                for (int v = 0; v < VPL; v++) {
                    const int u = (lane % RL) * VPL + v;
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(srow_s + (u32)((k * RU + u) * 16)),
                                 "l"(kp + a + u * 8));
                }
            }
        }
        asm volatile("cp.async.wait_all;" ::: "memory");
        __syncwarp();
        float sa = NEG_INF, sb = NEG_INF;
        if (active) {
            sa = probe_smem<E, D, NQ, LPS, QS>(srow + s * RU * 8, sq, nq, jl);
            if (tb >= 0) sb = probe_smem<E, D, NQ, LPS, QS>(srow + (SPW + s) * RU * 8, sq, nq, jl);
        }
#pragma unroll
        for (int o = LPS / 2; o > 0; o >>= 1) {
            sa = fmaxf(sa, __shfl_xor_sync(0xffffffffu, sa, o, LPS));
            sb = fmaxf(sb, __shfl_xor_sync(0xffffffffu, sb, o, LPS));
        }
        if (active) {
            if (rr - l == 1) {
                best = sa;
                active = false;
            } else {
                if (reuse) sb = best;
                const int m = (l + rr) / 2;
                if (sa >= sb) { rr = m; best = sa; } else { l = m; best = sb; }
                if (rr - l <= 1) active = false;
            }
        }
        level++;
        __syncwarp();  // every lane's reads of this level's rows and offsets are done
    }
    if (jl == 0 && j < n_sub) keys[(long long)r * n_sub + j] = valid ? score_key(best) : 0u;
}

#define SCOREW_INST(PFX, LPS, E, TN, D, NQ)                                                       \
    extern "C" __global__ void __launch_bounds__(128)                                             \
        PFX##_##TN##_d##D##_q##NQ(const u16* kp, const int* table, int table_stride, int ps,      \
                                      int hkv, long long pst, long long hst, const int* row_seq, const float* qs, const int* nq, \
                                      int nq_max, const int2* in_ranges, const int* in_cnt,       \
                                      int cap_in, int E_, int c, u32* keys, const int* gate,      \
                                      int stage) {                                                \
        IHIP_PDL_ENTRY();                                                                         \
        hip_scorew<E, D, NQ, LPS>(kp, table, table_stride, ps, hkv, pst, hst, row_seq, qs, nq, nq_max, in_ranges, \
                            in_cnt, cap_in, E_, c, keys, gate, stage);                            \
    }
#define SCOREW_Q(E, TN, D) SCOREW_INST(hip_scorew, 1, E, TN, D, 1) SCOREW_INST(hip_scorew, 1, E, TN, D, 2) \
    SCOREW_INST(hip_scorew, 1, E, TN, D, 4) SCOREW_INST(hip_scorew, 1, E, TN, D, 8)                     \
    SCOREW_INST(hip_scorew4, 4, E, TN, D, 1) SCOREW_INST(hip_scorew4, 4, E, TN, D, 2)
SCOREW_Q(Bf16, bf16, 64)
SCOREW_Q(Bf16, bf16, 128)
SCOREW_Q(Bf16, bf16, 256)
SCOREW_Q(F16, f16, 64)
SCOREW_Q(F16, f16, 128)
SCOREW_Q(F16, f16, 256)

// hip_scorewp: hip_scorew's keys, bit for bit (one lane per sub-chunk
// case, LPS = 1), with the memory of one level overlapped with the
// arithmetic of another. hip_scorew's warps all load a level, wait, then
// score it: the copy of a level and the dot products (~60 us and ~90 us of
// stage 0 at 1M tokens) run one after the other. Here a warp scores 32
// sub-chunks as two groups of 16, two lanes per sub-chunk (lane 2s + p:
// probe p of sub-chunk s, p = 0 the left probe, 1 the right one; each
// lane the whole probe over all queries, probe_smem with LPS 1, so the
// same bits), each group its own 32 shared-memory rows (one per lane, the
// shared memory of hip_scorew's warp): while a group's level is scored,
// the other group's level is in flight (cp.async groups, wait_group 1).
// Same shared memory per warp (HSW_WARP_BYTES(D, 1)), same grid (128
// sub-chunks per 128-thread CTA).
template <typename E, int D, int NQ>
__device__ void hip_scorewp(const u16* __restrict__ kp, const int* __restrict__ table, int table_stride,
                            int ps, int hkv, long long pst, long long hst, const int* __restrict__ row_seq,
                            const float* __restrict__ qs, const int* __restrict__ nq_arr, int nq_max,
                            const int2* __restrict__ in_ranges, const int* __restrict__ in_cnt,
                            int cap_in, int E_, int c, u32* __restrict__ keys, const int* __restrict__ gate,
                            int stage) {
    constexpr int QS = D;
    constexpr int RU = D / 8 + 1;                // row stride, 16-byte units
    constexpr int RL = D / 8 < 32 ? D / 8 : 32;  // lanes per row in one copy
    constexpr int RPI = 32 / RL;                 // rows per copy instruction
    constexpr int VPL = D / 8 / RL;              // 16-byte vectors per lane per row
    constexpr int NR = 32;                       // rows per group per level (one per lane)
    extern __shared__ float sq[];
    if (gate && gate[1] > stage) return;  // as hip_score (uniform over the block)
    const int r = blockIdx.y;
    const int rb = r / hkv, h = r % hkv;
    const int nq = nq_arr[rb];
    const float* qsrc = qs + ((long long)r * nq_max) * D;
    const int nq_pad = (nq + NQ - 1) / NQ * NQ;
    for (int i = threadIdx.x; i < nq_pad * D; i += blockDim.x)
        sq[(i / D) * QS + i % D] = i < nq * D ? qsrc[i] : 0.f;
    __syncthreads();
    const int q_floats = (nq_max + NQ - 1) / NQ * NQ * QS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    char* wbase = reinterpret_cast<char*>(sq + q_floats) + warp * HSW_WARP_BYTES(D, 1);
    // Per group g: NR row offsets at wbase + g * NR * 8, NR rows after all offsets.
    long long* saddr = reinterpret_cast<long long*>(wbase);
    const u16* srow = reinterpret_cast<const u16*>(wbase + 2 * NR * 8);
    const u32 srow_s = hsw_smem_u32(wbase + 2 * NR * 8);
    const int n_sub = cap_in * E_;
    const int p = lane & 1, s = lane >> 1;
    const int wj = blockIdx.x * blockDim.x + (threadIdx.x & ~31);  // the warp's first sub-chunk
    const int* trow = table + (long long)row_seq[rb] * table_stride;
    int l[2] = {0, 0}, rr[2] = {0, 0};
    bool active[2] = {false, false}, valid[2] = {false, false};
    float best[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int g = 0; g < 2; g++) {
        const int j = wj + g * 16 + s;
        if (j < n_sub) {
            const int ri = j / E_, e = j % E_;
            if (ri < in_cnt[r]) {
                int2 rg = in_ranges[(long long)r * cap_in + ri];
                l[g] = rg.x + e * c;
                if (l[g] < rg.y) {
                    rr[g] = min(l[g] + c, rg.y);
                    valid[g] = active[g] = true;
                }
            }
        }
    }
    int cpi = -1, cpg = 0;  // cached page-table entry (index, page)
    // This lane's probe of group g at `level`: the token (-1: none).
    auto my_token = [&](int g, int level) -> int {
        if (!active[g]) return -1;
        if (rr[g] - l[g] == 1) return p == 0 ? l[g] : -1;
        const int m = (l[g] + rr[g]) / 2;
        if (p == 0) return (l[g] + m) / 2;
        const bool reuse = rr[g] - l[g] == 2 && level > 0;
        return reuse ? -1 : (m + rr[g]) / 2;
    };
    // Copy group g's rows of `level` (offset -1: no row) and commit them as one cp.async group.
    auto issue = [&](int g, int level) {
        const int t = my_token(g, level);
        long long o = -1;
        if (t >= 0) {
            const int pi = t / ps;
            if (pi != cpi) { cpi = pi; cpg = trow[pi]; }
            o = (long long)cpg * pst + (long long)h * hst + (long long)(t % ps) * D;
        }
        saddr[g * NR + lane] = o;
        __syncwarp();
#pragma unroll 4
        for (int it = 0; it < NR / RPI; it++) {
            const int k = it * RPI + lane / RL;
            const long long a = saddr[g * NR + k];
            if (a >= 0) {
#pragma unroll
                for (int v = 0; v < VPL; v++) {
                    const int u = (lane % RL) * VPL + v;
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(
                                     srow_s + (u32)(((g * NR + k) * RU + u) * 16)),
                                 "l"(kp + a + u * 8));
                }
            }
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    // Score group g's level (its rows landed) and advance its search.
    auto score = [&](int g, int level) {
        const int t = my_token(g, level);
        float sc = NEG_INF;
        if (t >= 0) sc = probe_smem<E, D, NQ, 1, QS>(srow + (g * NR + lane) * RU * 8, sq, nq, 0);
        float sa = __shfl_sync(0xffffffffu, sc, lane & ~1);
        float sb = __shfl_sync(0xffffffffu, sc, lane | 1);
        if (active[g]) {
            if (rr[g] - l[g] == 1) {
                best[g] = sa;
                active[g] = false;
            } else {
                if (rr[g] - l[g] == 2 && level > 0) sb = best[g];
                const int m = (l[g] + rr[g]) / 2;
                if (sa >= sb) { rr[g] = m; best[g] = sa; } else { l[g] = m; best[g] = sb; }
                if (rr[g] - l[g] <= 1) active[g] = false;
            }
        }
    };
    issue(0, 0);
    issue(1, 0);
    int level = 0;
    while (__any_sync(0xffffffffu, active[0] || active[1])) {
        asm volatile("cp.async.wait_group 1;" ::: "memory");
        __syncwarp();
        score(0, level);
        __syncwarp();  // group 0's rows and offsets read by every lane
        issue(0, level + 1);
        asm volatile("cp.async.wait_group 1;" ::: "memory");
        __syncwarp();
        score(1, level);
        __syncwarp();
        issue(1, level + 1);
        level++;
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
#pragma unroll
    for (int g = 0; g < 2; g++) {
        const int j = wj + g * 16 + s;
        if (p == 0 && j < n_sub) keys[(long long)r * n_sub + j] = valid[g] ? score_key(best[g]) : 0u;
    }
}

#define SCOREWP_INST(E, TN, D, NQ)                                                                \
    extern "C" __global__ void __launch_bounds__(128)                                             \
        hip_scorewp_##TN##_d##D##_q##NQ(const u16* kp, const int* table, int table_stride, int ps, \
                                      int hkv, long long pst, long long hst, const int* row_seq, const float* qs, const int* nq, \
                                      int nq_max, const int2* in_ranges, const int* in_cnt,       \
                                      int cap_in, int E_, int c, u32* keys, const int* gate,      \
                                      int stage) {                                                \
        IHIP_PDL_ENTRY();                                                                         \
        hip_scorewp<E, D, NQ>(kp, table, table_stride, ps, hkv, pst, hst, row_seq, qs, nq, nq_max, in_ranges, \
                            in_cnt, cap_in, E_, c, keys, gate, stage);                            \
    }
#define SCOREWP_Q(E, TN, D) SCOREWP_INST(E, TN, D, 1) SCOREWP_INST(E, TN, D, 2) \
    SCOREWP_INST(E, TN, D, 4) SCOREWP_INST(E, TN, D, 8)
SCOREWP_Q(Bf16, bf16, 64)
SCOREWP_Q(Bf16, bf16, 128)
SCOREWP_Q(Bf16, bf16, 256)
SCOREWP_Q(F16, f16, 64)
SCOREWP_Q(F16, f16, 128)
SCOREWP_Q(F16, f16, 256)

// hip_scorea: hip_score's keys, bit for bit, for sub-chunks of at most 32
// tokens (the later stages: 16 and 8 tokens at the defaults). The
// centre-of-half search of a c-token sub-chunk is log2(c) dependent levels,
// each a round trip to memory (hip_scorew's warp waits on every level's
// rows). Here each token of a sub-chunk has a lane (CP lanes per sub-chunk,
// CP = c rounded up to a power of two): the warp copies its 32 lanes' key
// rows into shared memory at once (hip_scorew's coalesced cp.async), each
// lane scores its row against all the queries (probe_smem: the same
// bits), and the group's lanes replay the search over those scores by
// shuffles (a probe of a token is its lane's score). c rows read per
// sub-chunk instead of about 2 log2(c), in one round trip instead of
// log2(c). The loads that need no query (counts, ranges, the sequence's
// table row) are issued before the queries' barrier. Shared memory: the
// queries (padded to NQ), then per warp HSW_WARP_BYTES(D, 2) (32 row
// offsets and 32 rows).
template <typename E, int D, int NQ>
__device__ void hip_scorea(const u16* __restrict__ kp, const int* __restrict__ table, int table_stride,
                           int ps, int hkv, long long pst, long long hst, const int* __restrict__ row_seq,
                           const float* __restrict__ qs, const int* __restrict__ nq_arr, int nq_max,
                           const int2* __restrict__ in_ranges, const int* __restrict__ in_cnt,
                           int cap_in, int E_, int c, u32* __restrict__ keys, const int* __restrict__ gate,
                           int stage) {
    constexpr int QS = D;
    constexpr int RU = D / 8 + 1;                // row stride, 16-byte units
    constexpr int RL = D / 8 < 32 ? D / 8 : 32;  // lanes per row in one copy
    constexpr int RPI = 32 / RL;                 // rows per copy instruction
    constexpr int VPL = D / 8 / RL;              // 16-byte vectors per lane per row
    extern __shared__ float sq[];
    if (gate && gate[1] > stage) return;  // as hip_score (uniform over the block)
    const int r = blockIdx.y;
    const int rb = r / hkv, h = r % hkv;
    int cp = 1;
    while (cp < c) cp <<= 1;
    const int n_sub = cap_in * E_;
    const int gt = blockIdx.x * blockDim.x + threadIdx.x;
    const int j = gt / cp, t = gt % cp;  // sub-chunk slot, token of it
    const int ri = j / E_, e = j % E_;
    // Independent loads first: the range (read speculatively: ri < cap_in
    // for every slot of the grid), the count, the query count, the row.
    const bool in_grid = j < n_sub;
    const int2 rg = in_grid ? in_ranges[(long long)r * cap_in + ri] : make_int2(0, 0);
    const int cnt = in_cnt[r];
    const int seq = row_seq[rb];
    const int nq = nq_arr[rb];
    const float* qsrc = qs + ((long long)r * nq_max) * D;
    const int nq_pad = (nq + NQ - 1) / NQ * NQ;
    for (int i = threadIdx.x; i < nq_pad * D; i += blockDim.x)
        sq[(i / D) * QS + i % D] = i < nq * D ? qsrc[i] : 0.f;
    const int l = rg.x + e * c;
    const bool valid = in_grid && ri < cnt && l < rg.y;
    const int rr = valid ? min(l + c, rg.y) : l;
    const int tok = l + t;
    long long off = -1;
    if (tok < rr) off = kv_row(table + (long long)seq * table_stride, tok, h, ps, D, pst, hst);
    const int q_floats = (nq_max + NQ - 1) / NQ * NQ * QS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    char* wbase = reinterpret_cast<char*>(sq + q_floats) + warp * HSW_WARP_BYTES(D, 2);
    long long* saddr = reinterpret_cast<long long*>(wbase);
    const u16* srow = reinterpret_cast<const u16*>(wbase + 32 * 8);
    const u32 srow_s = hsw_smem_u32(wbase + 32 * 8);
    saddr[lane] = off;
    __syncwarp();
#pragma unroll 4
    for (int it = 0; it < 32 / RPI; it++) {
        const int k = it * RPI + lane / RL;
        const long long a = saddr[k];
        if (a >= 0) {
#pragma unroll
            for (int v = 0; v < VPL; v++) {
                const int u = (lane % RL) * VPL + v;
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(srow_s + (u32)((k * RU + u) * 16)),
                             "l"(kp + a + u * 8));
            }
        }
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();  // the queries and every lane's row
    const float sc = off >= 0 ? probe_smem<E, D, NQ, 1, QS>(srow + lane * RU * 8, sq, nq, 0) : NEG_INF;
    // The search (hip_score's loop), every lane of the group in step: a
    // range of n <= CP tokens ends within log2(CP) halvings.
    const int base = lane & ~(cp - 1);
    float best = __shfl_sync(0xffffffffu, sc, base);  // a one-token sub-chunk: its token
    int a0 = l, b0 = rr;
    for (int w = cp; w > 1; w >>= 1) {
        const bool go = b0 - a0 > 1;
        const int m = (a0 + b0) / 2;
        const float sa = __shfl_sync(0xffffffffu, sc, base + (go ? (a0 + m) / 2 - l : 0));
        const float sb = __shfl_sync(0xffffffffu, sc, base + (go ? (m + b0) / 2 - l : 0));
        if (go) {
            if (sa >= sb) { b0 = m; best = sa; } else { a0 = m; best = sb; }
        }
    }
    if (t == 0 && in_grid) keys[(long long)r * n_sub + j] = valid ? score_key(best) : 0u;
}

#define SCOREA_INST(E, TN, D, NQ)                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                             \
        hip_scorea_##TN##_d##D##_q##NQ(const u16* kp, const int* table, int table_stride, int ps,  \
                                      int hkv, long long pst, long long hst, const int* row_seq, const float* qs, const int* nq, \
                                      int nq_max, const int2* in_ranges, const int* in_cnt,       \
                                      int cap_in, int E_, int c, u32* keys, const int* gate,      \
                                      int stage) {                                                \
        IHIP_PDL_ENTRY();                                                                         \
        hip_scorea<E, D, NQ>(kp, table, table_stride, ps, hkv, pst, hst, row_seq, qs, nq, nq_max, in_ranges, \
                            in_cnt, cap_in, E_, c, keys, gate, stage);                            \
    }
#define SCOREA_Q(E, TN, D) SCOREA_INST(E, TN, D, 1) SCOREA_INST(E, TN, D, 2) \
    SCOREA_INST(E, TN, D, 4) SCOREA_INST(E, TN, D, 8)
SCOREA_Q(Bf16, bf16, 64)
SCOREA_Q(Bf16, bf16, 128)
SCOREA_Q(Bf16, bf16, 256)
SCOREA_Q(F16, f16, 64)
SCOREA_Q(F16, f16, 128)
SCOREA_Q(F16, f16, 256)
#endif  // HIP_EST_HOST

#define TOPK_THREADS 1024

// Exclusive scan of `v` over the block; returns the prefix and sets *total.
__device__ __forceinline__ int block_scan(int v, int* total, int* s_warp) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffff, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) s_warp[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int w = lane < (int)(blockDim.x >> 5) ? s_warp[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(0xffffffff, w, o);
            if (lane >= o) w += y;
        }
        s_warp[lane] = w;  // inclusive warp prefixes
    }
    __syncthreads();
    int before = warp > 0 ? s_warp[warp - 1] : 0;
    *total = s_warp[(blockDim.x >> 5) - 1];
    return before + x - v;
}

// Sum of `v` over the block (every thread gets it).
__device__ __forceinline__ int block_sum(int v, int* s_warp) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    __syncthreads();
    if (lane == 0) s_warp[warp] = v;
    __syncthreads();
    int t = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) t += s_warp[w];
    return t;
}

// Keys a top-k CTA first copies into shared memory (16 KB): the radix
// select reads every key once per pass (up to 4) and once more to emit, and
// from L2 each read is a round trip of its own between barriers.
#define TOPK_STAGE 4096
template <typename Src>
__device__ __forceinline__ bool topk_stage(Src src, int n, u32* s_keys) {
    if (n > TOPK_STAGE) return false;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s_keys[i] = src(i);
    __syncthreads();
    return true;
}

// Radix-select threshold of the best k of n keys key_at(0..n) (passes of
// 8 bits from the top): keep key & mask > prefix and
// the first krem keys with key & mask == prefix (krem == neq: all of
// them). Every valid key kept when at most k are valid (prefix 1, full
// mask, krem = neq = 0). Uniform over the block; shared scratch passed in.
struct TopkThr {
    u32 prefix, mask;
    int krem, neq;
};
template <typename KeyAt>
__device__ __forceinline__ TopkThr topk_threshold(KeyAt key_at, int n, int k, int* hist, int* s_warp,
                                                  u32* s_prefix, int* s_krem, int* s_neq) {
    const int lane = threadIdx.x & 31;
    u32 prefix = 0, mask = 0;
    int krem = k, neq = 0;
    bool all = false;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        int zeros = 0;
        for (int i0 = 0; i0 < n; i0 += blockDim.x) {  // uniform over the warp
            const int i = i0 + threadIdx.x;
            const u32 key = i < n ? key_at(i) : 0;
            const bool in = i < n && (key & mask) == prefix;
            zeros += i < n && key == 0;
            const u32 bin = (key >> shift) & 255u;
            const u32 peers = __match_any_sync(0xffffffff, in ? bin : 0xffffffffu);
            if (in && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
        }
        if (shift == 24) {
            const int n_valid = n - block_sum(zeros, s_warp);
            if (n_valid <= k) {
                all = true;
                break;
            }
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            int cnt[8], sum = 0;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                cnt[j] = hist[255 - 8 * lane - j];
                sum += cnt[j];
            }
            int incl = sum;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                int y = __shfl_up_sync(0xffffffff, incl, o);
                if (lane >= o) incl += y;
            }
            int cum = incl - sum;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                if (cum < krem && cum + cnt[j] >= krem) {
                    *s_prefix = prefix | ((u32)(255 - 8 * lane - j) << shift);
                    *s_krem = krem - cum;
                    *s_neq = cnt[j];
                }
                cum += cnt[j];
            }
        }
        __syncthreads();
        prefix = *s_prefix;
        krem = *s_krem;
        neq = *s_neq;
        mask |= 255u << shift;
        if (krem == neq) break;
    }
    __syncthreads();  // every thread read the shared threshold before a later reuse
    if (all) return TopkThr{1u, 0xffffffffu, 0, 0};
    return TopkThr{prefix, mask, krem, neq};
}

// Visit the kept keys of `t` in index order: emit(i, pos), pos the rank
// among the kept (block-uniform loop). Returns how many were kept.
template <typename KeyAt, typename Emit>
__device__ __forceinline__ int topk_emit(KeyAt key_at, int n, TopkThr t, int* s_warp, Emit emit) {
    const bool simple = t.krem == t.neq;
    int base_out = 0, eq_seen = 0;
    for (int t0 = 0; t0 < n; t0 += blockDim.x) {
        const int i = t0 + threadIdx.x;
        const u32 key = i < n ? key_at(i) & t.mask : 0;
        int sel;
        if (simple) {
            sel = i < n && key >= t.prefix;
        } else {
            int is_eq = i < n && key == t.prefix ? 1 : 0;
            int eq_tot;
            int eq_rank = eq_seen + block_scan(is_eq, &eq_tot, s_warp);
            sel = (i < n && key > t.prefix) || (is_eq && eq_rank < t.krem);
            eq_seen += eq_tot;
        }
        int sel_tot;
        int pos = base_out + block_scan(sel, &sel_tot, s_warp);
        if (sel) emit(i, pos);
        base_out += sel_tot;
    }
    return base_out;
}

// One CTA per row (blockDim: a multiple of 32, up to TOPK_THREADS; the
// host sizes it to n_sub): exact top-k of the sub-chunk keys by a radix
// select over the 4 key bytes, then the kept sub-chunks written in
// position order. Ties at the threshold keep the earlier slots. Each pass
// builds a 256-bin histogram with one shared atomic per distinct bin per
// warp (keys cluster in a few bins, so per-thread atomics serialise); one
// warp finds the threshold bin by a suffix scan; the passes stop early
// once every key of the threshold bin is kept.
// hip_topk's work for row r (every thread of the block); each kept
// sub-chunk's range also goes to also(pos, range) for pos < out_cap.
// Returns the count written, min(kept, out_cap).
template <typename Also>
__device__ __forceinline__ int topk_row(int r, const u32* __restrict__ keys, int n_sub, int k,
                                        const int2* __restrict__ in_ranges, int cap_in, int E_, int c,
                                        int2* __restrict__ out, int* __restrict__ out_cnt, int out_cap, Also also) {
    const u32* kr = keys + (long long)r * n_sub;
    __shared__ int hist[256];
    __shared__ int s_warp[32];
    __shared__ u32 s_prefix;
    __shared__ int s_krem, s_neq;
    __shared__ u32 s_keys[TOPK_STAGE];
    const bool staged = topk_stage([&](int i) { return kr[i]; }, n_sub, s_keys);
    auto key_at = [&](int i) { return staged ? s_keys[i] : kr[i]; };
    const TopkThr t = topk_threshold(key_at, n_sub, k, hist, s_warp, &s_prefix, &s_krem, &s_neq);
    const int kept = topk_emit(key_at, n_sub, t, s_warp, [&](int i, int pos) {
        if (pos < out_cap) {
            const int ri = i / E_, e = i % E_;
            const int2 rg = in_ranges[(long long)r * cap_in + ri];
            const int l = rg.x + e * c;
            const int2 v = make_int2(l, min(l + c, rg.y));
            out[(long long)r * out_cap + pos] = v;
            also(pos, v);
        }
    });
    const int n = min(kept, out_cap);
    if (threadIdx.x == 0) out_cnt[r] = n;
    return n;
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    hip_topk(const u32* __restrict__ keys, int n_sub, int k, const int2* __restrict__ in_ranges,
             const int* __restrict__ in_cnt, int cap_in, int E_, int c, int2* __restrict__ out,
             int* __restrict__ out_cnt, int out_cap, const int* __restrict__ gate, int stage) {
    IHIP_PDL_ENTRY();
    if (gate && gate[1] > stage) return;  // as hip_score
    topk_row(blockIdx.x, keys, n_sub, k, in_ranges, cap_in, E_, c, out, out_cnt, out_cap, [](int, int2) {});
}

// hip_topk_mc: hip_topk's result (the same kept slots, in the same order)
// from gridDim.x CTAs per row instead of one. CTA x keeps the best k of
// its segment [x * seg, (x + 1) * seg) of the row's keys (ties: earlier
// slot) as candidates (key, slot) in scratch; the row's best k (key
// descending, then slot ascending: a strict order) are all among those
// candidates, since a key that fewer than k keys of the row beat has fewer
// than k beating it in its segment. The last CTA of the row to finish
// (arrival counter, reset by it for the next launch) selects the best k
// of the candidates, laid out segment after segment in slot order (unused
// candidate places read as invalid keys, 0), with the same select, and
// writes the output ranges as hip_topk. Scratch: `cnt` i32 [rows]
// counters (zero before the first launch), `seg_cnt` i32 [rows][gridDim.x],
// `cand` int2 [rows][gridDim.x * k] (key bits, slot).
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    hip_topk_mc(const u32* __restrict__ keys, int n_sub, int k, int seg, const int2* __restrict__ in_ranges,
                const int* __restrict__ in_cnt, int cap_in, int E_, int c, int2* __restrict__ out,
                int* __restrict__ out_cnt, int out_cap, const int* __restrict__ gate, int stage,
                int* __restrict__ arrive, int* __restrict__ seg_cnt, int2* __restrict__ cand) {
    IHIP_PDL_ENTRY();
    if (gate && gate[1] > stage) return;  // as hip_score
    const int r = blockIdx.y, x = blockIdx.x, S = gridDim.x;
    __shared__ int hist[256];
    __shared__ int s_warp[32];
    __shared__ u32 s_prefix;
    __shared__ int s_krem, s_neq;
    __shared__ int s_last;
    __shared__ u32 s_keys[TOPK_STAGE];
    const int base = x * seg;
    const int n = min(seg, n_sub - base);
    const u32* kr = keys + (long long)r * n_sub + base;
    int2* cr = cand + (long long)r * S * k;
    {
        const bool staged = topk_stage([&](int i) { return kr[i]; }, n, s_keys);
        auto key_at = [&](int i) { return staged ? s_keys[i] : kr[i]; };
        const TopkThr t = topk_threshold(key_at, n, k, hist, s_warp, &s_prefix, &s_krem, &s_neq);
        int2* co = cr + (long long)x * k;
        const int kept = topk_emit(key_at, n, t, s_warp, [&](int i, int pos) {
            if (pos < k) co[pos] = make_int2((int)kr[i], base + i);
        });
        if (threadIdx.x == 0) seg_cnt[r * S + x] = min(kept, k);
    }
    // Publish this CTA's candidates, then count it in.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) s_last = atomicAdd(&arrive[r], 1) == S - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();  // every other CTA's candidates, published before its arrival, are visible
    const int* sc = seg_cnt + r * S;
    auto cand_src = [&](int i) -> u32 {
        const int sg = i / k;
        return i - sg * k < __ldcg(sc + sg) ? (u32)__ldcg(&cr[i].x) : 0u;
    };
    const int nc = S * k;
    __syncthreads();  // this CTA's segment phase is done with s_keys
    const bool staged = topk_stage(cand_src, nc, s_keys);
    auto cand_at = [&](int i) -> u32 { return staged ? s_keys[i] : cand_src(i); };
    const TopkThr t = topk_threshold(cand_at, nc, k, hist, s_warp, &s_prefix, &s_krem, &s_neq);
    const int kept = topk_emit(cand_at, nc, t, s_warp, [&](int i, int pos) {
        if (pos < out_cap) {
            const int slot = __ldcg(&cr[i].y);
            const int ri = slot / E_, e = slot % E_;
            int2 rg = in_ranges[(long long)r * cap_in + ri];
            int l = rg.x + e * c;
            out[(long long)r * out_cap + pos] = make_int2(l, min(l + c, rg.y));
        }
    });
    if (threadIdx.x == 0) {
        out_cnt[r] = min(kept, out_cap);
        arrive[r] = 0;  // ready for the next launch (ordered by the kernel boundary)
    }
}

// Attention selection per row: sink, the last stage's chunks, the tokens
// that slid out of the window since stage 1 ran, and the window (disjoint
// and ascending). extra[rb] = {sink, slid, window} as (start, end).
// One CTA per row; item i < nc is chunk i (chunk_at(i)), then
// sink/slid/window.
template <typename ChunkAt>
__device__ __forceinline__ void assemble_row(int r, ChunkAt chunk_at, int nc, const int2* __restrict__ extra,
                                             int hkv, int2* __restrict__ ranges, int* __restrict__ cum,
                                             int* __restrict__ cnt, int* __restrict__ tot, int cap,
                                             int* __restrict__ tab, int tab_cap, int* __restrict__ ntab,
                                             int* __restrict__ tab_sink) {
    __shared__ int s_warp[32];
    const int rb = r / hkv;
    int2* o = ranges + (long long)r * cap;
    int* cm = cum + (long long)r * cap;
    const int2 sink = extra[rb * 3], slid = extra[rb * 3 + 1], win = extra[rb * 3 + 2];
    const int s_n = sink.y > sink.x ? 1 : 0;
    const int s_len = sink.y - sink.x;
    // Chunks: positions s_n + (index among non-empty chunks).
    int base_n = s_n, base_t = s_n ? s_len : 0;
    for (int t0 = 0; t0 < nc; t0 += blockDim.x) {
        int i = t0 + threadIdx.x;
        int2 c2 = i < nc ? chunk_at(i) : make_int2(0, 0);
        int len = c2.y > c2.x ? c2.y - c2.x : 0;
        int ne = len > 0, tn, tt;
        int pn = block_scan(ne, &tn, s_warp);
        int pt = block_scan(len, &tt, s_warp);
        if (ne) { o[base_n + pn] = c2; cm[base_n + pn] = base_t + pt; }
        if (tab && ne)
            for (int p = c2.x; p < c2.y && base_t + pt + (p - c2.x) < tab_cap; p++)
                tab[(long long)r * tab_cap + base_t + pt + (p - c2.x)] = p;
        base_n += tn;
        base_t += tt;
    }
    if (tab) {
        for (int i = threadIdx.x; i < s_len && i < tab_cap; i += blockDim.x)
            tab[(long long)r * tab_cap + i] = sink.x + i;
        if (threadIdx.x == 0) {
            ntab[r] = min(base_t, tab_cap);
            if (tab_sink) tab_sink[r] = sink.y;
        }
    }
    if (threadIdx.x == 0) {
        int n = base_n, acc = base_t;
        if (s_n) { o[0] = sink; cm[0] = 0; }
        if (slid.y > slid.x) { o[n] = slid; cm[n] = acc; acc += slid.y - slid.x; n++; }
        if (win.y > win.x) { o[n] = win; cm[n] = acc; acc += win.y - win.x; n++; }
        cnt[r] = n;
        tot[r] = acc;
    }
}

// Lean device step (gate non-null): no stage refreshed and the sink as
// when the table was built, so the table is current; the ranges keep the
// last build's slid and window (the sparse attention reads the tail from
// `extra`, which hip_step_meta updates every step).
__device__ __forceinline__ bool assemble_current(int r, const int2* extra, int hkv, const int* gate,
                                                 int n_stages, const int* tab_sink) {
    return gate && gate[1] >= n_stages && tab_sink[r] == extra[(r / hkv) * 3].y;
}

extern "C" __global__ void __launch_bounds__(256)
    hip_assemble(const int2* __restrict__ chunks, const int* __restrict__ ccnt, int ccap,
                 const int2* __restrict__ extra, int hkv, int n_rows, int2* __restrict__ ranges,
                 int* __restrict__ cum, int* __restrict__ cnt, int* __restrict__ tot, int cap,
                 int* __restrict__ tab, int tab_cap, int* __restrict__ ntab,
                 const int* __restrict__ gate, int n_stages, int* __restrict__ tab_sink) {
    IHIP_PDL_ENTRY();
    const int r = blockIdx.x;
    if (assemble_current(r, extra, hkv, gate, n_stages, tab_sink)) return;
    const int nc = chunks ? ccnt[r] : 0;
    assemble_row(r, [&](int i) { return chunks[(long long)r * ccap + i]; }, nc, extra, hkv, ranges, cum, cnt, tot,
                 cap, tab, tab_cap, ntab, tab_sink);
}

// hip_topk_asm: the last stage's hip_topk and then hip_assemble of its
// output in one launch (one CTA per row; the kept ranges handed over in
// shared memory): the same writes as the two launches, one launch and one
// round trip fewer on every refresh step. `gate` gates the top-k as
// hip_topk's, `asm_gate` the assembly as hip_assemble's `gate`; a row whose
// top-k is gated off assembles the stored chunks. out_cap <= TOPK_ASM_CAP.
#define TOPK_ASM_CAP 2048
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    hip_topk_asm(const u32* __restrict__ keys, int n_sub, int k, const int2* __restrict__ in_ranges,
                 const int* __restrict__ in_cnt, int cap_in, int E_, int c, int2* __restrict__ out,
                 int* __restrict__ out_cnt, int out_cap, const int* __restrict__ gate, int stage,
                 const int2* __restrict__ extra, int hkv, int2* __restrict__ ranges, int* __restrict__ cum,
                 int* __restrict__ cnt, int* __restrict__ tot, int cap, int* __restrict__ tab, int tab_cap,
                 int* __restrict__ ntab, const int* __restrict__ asm_gate, int n_stages,
                 int* __restrict__ tab_sink) {
    IHIP_PDL_ENTRY();
    __shared__ int2 s_out[TOPK_ASM_CAP];
    const int r = blockIdx.x;
    const bool fresh = !(gate && gate[1] > stage);
    int nc = 0;
    if (fresh) {
        nc = topk_row(r, keys, n_sub, k, in_ranges, cap_in, E_, c, out, out_cnt, out_cap,
                      [&](int pos, int2 v) { s_out[pos] = v; });
        __syncthreads();
    }
    if (assemble_current(r, extra, hkv, asm_gate, n_stages, tab_sink)) return;
    if (!fresh) nc = out_cnt[r];
    assemble_row(r, [&](int i) { return fresh ? s_out[i] : out[(long long)r * out_cap + i]; }, nc, extra, hkv,
                 ranges, cum, cnt, tot, cap, tab, tab_cap, ntab, tab_sink);
}

// Per-step metadata of a graph-capturable hip decode step (HipGpuDecoder::
// step_device), computed on the device from the device lengths so that no
// step uploads or reads anything on the host. One CTA, one thread per
// sequence (batch <= blockDim.x). state[0]: step counter; state[1]: the
// stage this step refreshes from (n_stages: none), which hip_score /
// hip_topk read as their gate. As dispatch.rs `regions` and
// HipGpuDecoder::select: step 0 refreshes all stages, else the first stage
// whose interval divides the step. A sequence whose slid range (tokens
// that left the window since stage 0 ran) would exceed slid_cap forces a
// full refresh, which keeps the selected total under the fixed bound the
// attention launch is sized for (one token per step never reaches it).
extern "C" __global__ void __launch_bounds__(1024)
    hip_step_meta(const int* __restrict__ lens, int batch, int hkv, int sink, int window,
                  const int* __restrict__ intervals, int n_stages, int slid_cap, int* __restrict__ state,
                  int* __restrict__ mid_end, int2* __restrict__ stage0_in, int2* __restrict__ extra) {
    IHIP_PDL_ENTRY();
    const int b = threadIdx.x;
    const int step = state[0];
    int from = n_stages;
    if (step == 0) {
        from = 0;
    } else {
        for (int i = n_stages - 1; i >= 0; i--)
            if (step % intervals[i] == 0) from = i;
    }
    int sink_end = 0, win_start = 0, end = 0;
    bool force = false;
    if (b < batch) {
        end = lens[b];
        sink_end = min(sink, end);
        win_start = max(max(end - window, 0), sink_end);
        force = from != 0 && win_start - max(mid_end[b], sink_end) > slid_cap;
    }
    if (__syncthreads_or(force)) from = 0;
    if (b < batch) {
        if (from == 0) mid_end[b] = win_start;
        for (int h = 0; h < hkv; h++) stage0_in[b * hkv + h] = make_int2(sink_end, win_start);
        extra[b * 3] = make_int2(0, sink_end);
        extra[b * 3 + 1] = make_int2(max(mid_end[b], sink_end), win_start);
        extra[b * 3 + 2] = make_int2(win_start, end);
    }
    if (b == 0) {
        state[1] = from;
        state[0] = step + 1;
    }
}

#ifndef HIP_EST_HOST
// hip_score_mean: stage 0 of a decode refresh by cached chunk means
// (hip.decode_stage0 = mean_key; CPU twin HipPolicy::stage0_mean_key).
// One thread per sub-chunk e of row r's one range [x, y) (cap_in 1): chunk
// tokens x + e*c .. + c, all stored (validation asks window >= c). Its
// mean key (f32 sums in token order over c, rounded once to bf16, as
// hip_fast's representatives) is computed on the first refresh that needs
// it and kept in means[r][e][D] with tags[r][e] = *gen (the decoder bumps
// gen when its rows change sequence); later refreshes read one row per
// chunk where the search reads ~2 log2(c). Score: the max over the row's
// queries of q . mean in dot_f32's order (8 partial sums, no fused
// multiply-add), so the keys equal the CPU twin's bit for bit.
template <typename E, int D, int NQ>
__device__ void hip_score_mean(const u16* __restrict__ kp, const int* __restrict__ table, int table_stride,
                               int ps, int hkv, long long pst, long long hst, const int* __restrict__ row_seq,
                               const float* __restrict__ qs, const int* __restrict__ nq_arr, int nq_max,
                               const int2* __restrict__ in_ranges, const int* __restrict__ in_cnt, int E_,
                               int c, u32* __restrict__ keys, const int* __restrict__ gate, int stage,
                               u16* __restrict__ means, int* __restrict__ tags, const int* __restrict__ gen,
                               int mcap) {
    extern __shared__ float sq[];
    if (gate && gate[1] > stage) return;
    const int r = blockIdx.y;
    const int rb = r / hkv, h = r % hkv;
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    // Every load that does not depend on another is issued here, in one
    // round: the row's counts and range, the cache tag and generation, and
    // the cached mean row itself (speculatively: reloaded below when this
    // refresh builds it). Before, these were ~5 dependent round trips plus
    // 8 more for the row, 2 loads at a time (H100: 33 us a launch at 1M).
    constexpr int PRE = D <= 128 ? D / 8 : 16;  // 16-byte loads of the row held at once
    const bool live = e < E_ && e < mcap;
    const int nq = nq_arr[rb];
    const int cnt = in_cnt[r];
    const int2 rg = in_ranges[r];
    u16* mrow = means + ((long long)r * mcap + (live ? e : 0)) * D;
    int* tag = tags + (long long)r * mcap + (live ? e : 0);
    const int tg = live ? *tag : 0;
    const int g = *gen;
    uint4 mv[PRE];
    if (live) {
#pragma unroll
        for (int k = 0; k < PRE; k++) mv[k] = *reinterpret_cast<const uint4*>(mrow + 8 * k);
    }
    const float* qsrc = qs + ((long long)r * nq_max) * D;
    const int nq_pad = (nq + NQ - 1) / NQ * NQ;
    for (int i = threadIdx.x; i < nq_pad * D; i += blockDim.x) sq[i] = i < nq * D ? qsrc[i] : 0.f;
    __syncthreads();
    if (e >= E_) return;
    u32 key = 0;
    if (cnt > 0 && e < mcap) {
        const int l = rg.x + e * c;
        if (l < rg.y) {
            if (tg != g) {
                const int* trow = table + (long long)row_seq[rb] * table_stride;
                const float cntf = (float)c;
                for (int c8 = 0; c8 < D / 8; c8++) {
                    float s[8];
#pragma unroll
                    for (int i = 0; i < 8; i++) s[i] = 0.f;
#pragma unroll 4
                    for (int t = l; t < l + c; t++) {
                        float k8[8];
                        load8<E>(kp + kv_row(trow, t, h, ps, D, pst, hst) + c8 * 8, k8);
#pragma unroll
                        for (int i = 0; i < 8; i++) s[i] = __fadd_rn(s[i], k8[i]);
                    }
                    u32 w[4];
#pragma unroll
                    for (int i = 0; i < 4; i++)
                        w[i] = (u32)f32_to_bf16(__fdiv_rn(s[2 * i], cntf)) |
                               ((u32)f32_to_bf16(__fdiv_rn(s[2 * i + 1], cntf)) << 16);
                    *reinterpret_cast<uint4*>(mrow + c8 * 8) = make_uint4(w[0], w[1], w[2], w[3]);
                }
                *tag = g;
#pragma unroll
                for (int k = 0; k < PRE; k++) mv[k] = *reinterpret_cast<const uint4*>(mrow + 8 * k);
            }
            float best = NEG_INF;
            for (int j0 = 0; j0 < nq; j0 += NQ) {
                float a[NQ][8];
#pragma unroll
                for (int j = 0; j < NQ; j++)
#pragma unroll
                    for (int i = 0; i < 8; i++) a[j][i] = 0.f;
                // The row in groups of PRE loads (one group at head_dim <= 128);
                // later groups and passes reread it from cache. Same sum order.
                for (int c0 = 0; c0 < D / 8; c0 += PRE) {
                    if (c0 > 0 || j0 > 0) {
#pragma unroll
                        for (int k = 0; k < PRE; k++)
                            mv[k] = *reinterpret_cast<const uint4*>(mrow + 8 * (c0 + k));
                    }
#pragma unroll
                    for (int k = 0; k < PRE; k++) {
                        const u32 w4[4] = {mv[k].x, mv[k].y, mv[k].z, mv[k].w};
                        float k8[8];
#pragma unroll
                        for (int i = 0; i < 4; i++) {
                            k8[2 * i] = Bf16::to_f32((u16)(w4[i] & 0xffff));
                            k8[2 * i + 1] = Bf16::to_f32((u16)(w4[i] >> 16));
                        }
#pragma unroll
                        for (int j = 0; j < NQ; j++) {
                            const float* qj = sq + (j0 + j) * D + (c0 + k) * 8;
#pragma unroll
                            for (int i = 0; i < 8; i++) a[j][i] = __fadd_rn(a[j][i], __fmul_rn(qj[i], k8[i]));
                        }
                    }
                }
#pragma unroll
                for (int j = 0; j < NQ; j++) {
                    if (j0 + j < nq) {
                        float sc = a[j][0];
#pragma unroll
                        for (int i = 1; i < 8; i++) sc = __fadd_rn(sc, a[j][i]);
                        best = fmaxf(best, sc);
                    }
                }
            }
            key = score_key(best);
        }
    }
    keys[(long long)r * E_ + e] = key;
}

#define SCORE_MEAN_INST(E, TN, D, NQ)                                                                  \
    extern "C" __global__ void __launch_bounds__(128) hip_score_mean_##TN##_d##D##_q##NQ(             \
        const u16* kp, const int* table, int table_stride, int ps, int hkv, long long pst,             \
        long long hst, const int* row_seq, const float* qs, const int* nq, int nq_max,                 \
        const int2* in_ranges, const int* in_cnt, int E_, int c, u32* keys, const int* gate,           \
        int stage, u16* means, int* tags, const int* gen, int mcap) {                                  \
        IHIP_PDL_ENTRY();                                                                              \
        hip_score_mean<E, D, NQ>(kp, table, table_stride, ps, hkv, pst, hst, row_seq, qs, nq, nq_max, \
                                 in_ranges, in_cnt, E_, c, keys, gate, stage, means, tags, gen, mcap); \
    }
#define SCORE_MEAN_Q(E, TN, D)                                                          \
    SCORE_MEAN_INST(E, TN, D, 1) SCORE_MEAN_INST(E, TN, D, 2) SCORE_MEAN_INST(E, TN, D, 4) \
    SCORE_MEAN_INST(E, TN, D, 8)
SCORE_MEAN_Q(Bf16, bf16, 64)
SCORE_MEAN_Q(Bf16, bf16, 128)
SCORE_MEAN_Q(Bf16, bf16, 256)
SCORE_MEAN_Q(F16, f16, 64)
SCORE_MEAN_Q(F16, f16, 128)
SCORE_MEAN_Q(F16, f16, 256)

// hip_score_meanw: hip_score_mean's keys and cache writes, bit for bit,
// with the warp's 32 mean rows (consecutive chunks of one row: 32 x D
// contiguous bf16) copied into shared memory by coalesced cp.async, issued
// with the other independent loads; each lane then scores its row from
// there (probe_smem over the means, the same products and order). In
// hip_score_mean every thread loads its own 256-byte row, so each 16-byte
// load of a warp touches 32 rows. A lane whose chunk's mean is not cached
// builds it (as hip_score_mean) and writes it to its shared row too.
// Shared memory: the queries, then per warp 32 rows at a stride of
// D / 8 + 1 16-byte units.
template <typename E, int D, int NQ>
__device__ void hip_score_meanw(const u16* __restrict__ kp, const int* __restrict__ table, int table_stride,
                                int ps, int hkv, long long pst, long long hst, const int* __restrict__ row_seq,
                                const float* __restrict__ qs, const int* __restrict__ nq_arr, int nq_max,
                                const int2* __restrict__ in_ranges, const int* __restrict__ in_cnt, int E_,
                                int c, u32* __restrict__ keys, const int* __restrict__ gate, int stage,
                                u16* __restrict__ means, int* __restrict__ tags, const int* __restrict__ gen,
                                int mcap) {
    constexpr int RU = D / 8 + 1;  // row stride, 16-byte units
    extern __shared__ float sq[];
    if (gate && gate[1] > stage) return;
    const int r = blockIdx.y;
    const int rb = r / hkv, h = r % hkv;
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int e0 = e - lane;  // the warp's first chunk
    const bool live = e < E_ && e < mcap;
    const int nq = nq_arr[rb];
    const int cnt = in_cnt[r];
    const int2 rg = in_ranges[r];
    u16* mrow = means + ((long long)r * mcap + (live ? e : 0)) * D;
    int* tag = tags + (long long)r * mcap + (live ? e : 0);
    const int tg = live ? *tag : 0;
    const int g = *gen;
    const int q_floats = (nq_max + NQ - 1) / NQ * NQ * D;
    u16* srow = reinterpret_cast<u16*>(sq + q_floats) + warp * 32 * RU * 8;
    const u32 srow_s = hsw_smem_u32(srow);
    // The warp's cached rows, speculatively (rows past E_ / mcap skipped):
    // 16-byte unit u of row k is element (e0 + k) * D + u * 8.
    const int nrows = max(0, min(32, min(E_, mcap) - e0));
    const u16* mbase = means + ((long long)r * mcap + e0) * D;
#pragma unroll 4
    for (int i = lane; i < 32 * (D / 8); i += 32) {
        const int k = i / (D / 8), u = i % (D / 8);
        if (k < nrows)
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(srow_s + (u32)((k * RU + u) * 16)),
                         "l"(mbase + (long long)k * D + u * 8));
    }
    const float* qsrc = qs + ((long long)r * nq_max) * D;
    const int nq_pad = (nq + NQ - 1) / NQ * NQ;
    for (int i = threadIdx.x; i < nq_pad * D; i += blockDim.x) sq[i] = i < nq * D ? qsrc[i] : 0.f;
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();  // the queries and the warp's rows
    if (e >= E_) return;
    u32 key = 0;
    if (cnt > 0 && e < mcap) {
        const int l = rg.x + e * c;
        if (l < rg.y) {
            u16* my = srow + lane * RU * 8;
            if (tg != g) {
                const int* trow = table + (long long)row_seq[rb] * table_stride;
                const float cntf = (float)c;
                for (int c8 = 0; c8 < D / 8; c8++) {
                    float s[8];
#pragma unroll
                    for (int i = 0; i < 8; i++) s[i] = 0.f;
#pragma unroll 4
                    for (int t = l; t < l + c; t++) {
                        float k8[8];
                        load8<E>(kp + kv_row(trow, t, h, ps, D, pst, hst) + c8 * 8, k8);
#pragma unroll
                        for (int i = 0; i < 8; i++) s[i] = __fadd_rn(s[i], k8[i]);
                    }
                    u32 w[4];
#pragma unroll
                    for (int i = 0; i < 4; i++)
                        w[i] = (u32)f32_to_bf16(__fdiv_rn(s[2 * i], cntf)) |
                               ((u32)f32_to_bf16(__fdiv_rn(s[2 * i + 1], cntf)) << 16);
                    const uint4 v = make_uint4(w[0], w[1], w[2], w[3]);
                    *reinterpret_cast<uint4*>(mrow + c8 * 8) = v;
                    *reinterpret_cast<uint4*>(my + c8 * 8) = v;
                }
                *tag = g;
            }
            key = score_key(probe_smem<Bf16, D, NQ, 1, D>(my, sq, nq, 0));
        }
    }
    keys[(long long)r * E_ + e] = key;
}

#define SCORE_MEANW_INST(E, TN, D, NQ)                                                                  \
    extern "C" __global__ void __launch_bounds__(128) hip_score_meanw_##TN##_d##D##_q##NQ(             \
        const u16* kp, const int* table, int table_stride, int ps, int hkv, long long pst,              \
        long long hst, const int* row_seq, const float* qs, const int* nq, int nq_max,                  \
        const int2* in_ranges, const int* in_cnt, int E_, int c, u32* keys, const int* gate,            \
        int stage, u16* means, int* tags, const int* gen, int mcap) {                                   \
        IHIP_PDL_ENTRY();                                                                               \
        hip_score_meanw<E, D, NQ>(kp, table, table_stride, ps, hkv, pst, hst, row_seq, qs, nq, nq_max, \
                                  in_ranges, in_cnt, E_, c, keys, gate, stage, means, tags, gen, mcap); \
    }
#define SCORE_MEANW_Q(E, TN, D)                                                               \
    SCORE_MEANW_INST(E, TN, D, 1) SCORE_MEANW_INST(E, TN, D, 2) SCORE_MEANW_INST(E, TN, D, 4) \
    SCORE_MEANW_INST(E, TN, D, 8)
SCORE_MEANW_Q(Bf16, bf16, 64)
SCORE_MEANW_Q(Bf16, bf16, 128)
SCORE_MEANW_Q(Bf16, bf16, 256)
SCORE_MEANW_Q(F16, f16, 64)
SCORE_MEANW_Q(F16, f16, 128)
SCORE_MEANW_Q(F16, f16, 256)
#endif

// Prefill scoring queries: for row (block b, kv head h) gather every
// `stride`-th query of the block plus its last, all G heads of the group,
// into qs[r][j][D] (as HipPolicy::group_queries), and nq[b] = count * G.
extern "C" __global__ void hip_gather_q(const float* __restrict__ q, int n, int q_block, int stride,
                                        int hkv, int G, int D, int nq_max, float* __restrict__ qs,
                                        int* __restrict__ nq) {
    const int r = blockIdx.x;
    const int b = r / hkv, h = r % hkv;
    const int lo = b * q_block, hi = min(lo + q_block, n);
    const int m = (hi - lo + stride - 1) / stride;
    const int extra = (lo + (m - 1) * stride != hi - 1) ? 1 : 0;
    const int cnt = (m + extra) * G;
    if (threadIdx.x == 0 && h == 0) nq[b] = cnt;
    const int hq = hkv * G;
    for (int e = threadIdx.x; e < cnt * D; e += blockDim.x) {
        int j = e / D, dd = e % D;
        int k = j / G, gi = j % G;
        int qi = k < m ? lo + k * stride : hi - 1;
        qs[((long long)r * nq_max + j) * D + dd] = q[((long long)qi * hq + h * G + gi) * D + dd];
    }
}

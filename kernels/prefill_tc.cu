// Block-sparse causal prefill on tensor cores (FlashAttention-2 style).
// The CUDA-core twin is decode.cu's decode_partial + combine, which computes
// the same function one query row at a time.
//
// One CTA (4 warps) per (query tile, kv head h). A tile is TC_BM = 64 "M
// rows": TC_BQ = 64 / G consecutive query rows x the G q heads of h's GQA
// group (M row m = query row m / G, q head h * G + m % G), so each K/V tile
// is read once for the whole group. Each warp owns 16 M rows; S = Q K^T and
// O += P V run on mma.sync m16n8k16 (bf16 or f16 operands, f32
// accumulators) with an online softmax in f32 (log2 domain).
//
// Inputs are decode.cu's: query row r reads selection row
// (r / q_block) * hkv + h (ranges / cum / cnt / tot, cap per row), the page
// table row q_seq[r] (q_seq NULL: row r) and only tokens at or before
// q_pos[r] (q_pos NULL: no limit). K/V rows are addressed through kv_row
// (paged pool or caller tensors with strides). q is f32
// [n_rows][hkv * G][D], multiplied by scale_log2 after the product.
//
// Rows of a tile are processed in segments of rows that share their keys:
// - prefix == 0: rows with equal (table row, selection row). Within one
//   query block (q_block a multiple of TC_BQ) a tile is one segment.
// - prefix == 1 (engine dense causal prefill): every row's selection must be
//   one range [0, end) (or none); rows with equal table rows share the keys
//   of the longest and each stops at its own end - 1. A row whose selection
//   is not of that form is written as NaN (a caller contract violation must
//   not pass silently).
// Ranges must be ascending and disjoint (the Selection invariant; hip_assemble
// writes them so): keys past the segment's last limit are cut by a binary
// search. Keys of a segment are gathered TC_BN at a time (positions by binary
// search over the ranges' cumulative counts), copied to shared memory with
// cp.async (two stages), and masked per row by position.
//
// Output row r, head hq goes to out + r * out_stride + hq * D (elements), as
// f32 (out_dtype 0), f16 (1) or bf16 (2). Rows with no key: 0.

#define TC_BM 64
#define TC_BN 64
// Keys per tile: 64, or 32 for head_dim 128 with two m16 tiles per warp
// (register budget: O alone is 128 f32 there).
#define TC_BN_OF(D, MT) ((MT) == 2 && (D) > 64 ? 32 : TC_BN)
#define TC_THREADS 128
#define TC_RG 512

// 2^x (ex2.approx: about 2 ulp; 2^-inf = 0).
__device__ __forceinline__ float tc_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

template <typename E>
struct Tc;
template <>
struct Tc<Bf16> {
    static __device__ __forceinline__ u32 pack(float lo, float hi) {
        u32 r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
    static __device__ __forceinline__ void mma(float* c, const u32* a, u32 b0, u32 b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <>
struct Tc<F16> {
    static __device__ __forceinline__ u32 pack(float lo, float hi) {
        u32 r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
    static __device__ __forceinline__ void mma(float* c, const u32* a, u32 b0, u32 b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
// 16 bytes global -> shared; src_bytes 0 writes zeros.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// Element offset of (row, 8-element chunk c) in a [rows][D] tile whose
// chunks are XOR-swizzled by row (conflict-free ldmatrix).
template <int D>
__device__ __forceinline__ int swz(int row, int c) {
    return row * D + ((c ^ (row & 7)) << 3);
}

template <typename E, int D, int G, int MT>
__device__ void prefill_tc(const u16* __restrict__ kp, const u16* __restrict__ vp,
                           const int* __restrict__ table, int table_stride, int ps, int hkv,
                           long long page_stride, long long head_stride,
                           const float* __restrict__ q, float scale_log2,
                           const int2* __restrict__ ranges, const int* __restrict__ cum,
                           const int* __restrict__ cnt, const int* __restrict__ tot, int cap,
                           int n_rows, int q_block, const int* __restrict__ q_seq,
                           const int* __restrict__ q_pos, int prefix, void* __restrict__ out,
                           long long out_stride, int out_dtype) {
    constexpr int BM = TC_BM * MT;  // M rows per tile (16 * MT per warp)
    constexpr int BN = TC_BN_OF(D, MT);  // keys per tile
    constexpr int BQ = BM / G;      // query rows per tile
    constexpr int CH = D / 8;      // 16-byte chunks per row
    constexpr int NT = BN / 8;  // n-tiles of S per warp
    constexpr int DT = D / 8;      // n-tiles of O per warp
    constexpr int KS = D / 16;     // k-steps of Q K^T
    extern __shared__ uint4 tc_smem[];
    u16* sK = reinterpret_cast<u16*>(tc_smem);  // [2][BN][D]
    u16* sV = sK + 2 * BN * D;               // [2][BN][D]
    // MT 1: Q is read once into registers and borrows K stage 1; MT 2: Q
    // stays in shared memory (after V) and is re-read every k-step.
    u16* sQ = MT == 1 ? sK + BN * D : sV + 2 * BN * D;
    __shared__ int s_pos[2][TC_BN];
    __shared__ long long s_off[2][TC_BN];
    __shared__ int s_seq[BQ], s_srow[BQ], s_lim[BQ], s_end[BQ], s_cur[BQ];
    __shared__ unsigned char s_done[BQ], s_bad[BQ];
    __shared__ int s_leader, s_keyrow, s_neff, s_tseq;
    __shared__ int2 s_rg[TC_RG];
    __shared__ int s_cm[TC_RG];

    const int n_tiles_q = gridDim.x;
    const int tile = n_tiles_q - 1 - blockIdx.x;  // longest (latest) tiles first
    const int h = blockIdx.y;
    const int row0 = tile * BQ;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int hq = hkv * G;

    // Per query row: table row, selection row, limit, prefix end.
    if (tid < BQ) {
        const int r = row0 + tid;
        const bool valid = r < n_rows;
        int seq = 0, srow = 0, lim = -1, end = 0;
        bool bad = false;
        if (valid) {
            seq = q_seq ? q_seq[r] : r;
            srow = (r / q_block) * hkv + h;
            lim = q_pos ? q_pos[r] : 0x7fffffff;
            if (prefix) {
                const int n = cnt[srow];
                if (n == 1 && ranges[(long long)srow * cap].x == 0) {
                    end = ranges[(long long)srow * cap].y;
                } else if (n != 0) {
                    bad = true;
                }
                lim = min(lim, end - 1);
            }
        }
        s_seq[tid] = seq;
        s_srow[tid] = srow;
        s_lim[tid] = lim;
        s_end[tid] = end;
        s_done[tid] = !valid;
        s_bad[tid] = bad;
    }

    // Q tile (M row m = query row m / G, head h * G + m % G) to shared
    // memory as E, then to A fragments.
    for (int i = tid; i < BM * CH; i += TC_THREADS) {
        const int m = i / CH, c = i % CH;
        const int r = row0 + m / G;
        u32 w[4] = {0u, 0u, 0u, 0u};
        if (r < n_rows) {
            const float4* src =
                reinterpret_cast<const float4*>(q + ((long long)r * hq + h * G + m % G) * D + c * 8);
            const float4 a = src[0], b = src[1];
            w[0] = Tc<E>::pack(a.x, a.y);
            w[1] = Tc<E>::pack(a.z, a.w);
            w[2] = Tc<E>::pack(b.x, b.y);
            w[3] = Tc<E>::pack(b.z, b.w);
        }
        *reinterpret_cast<uint4*>(sQ + swz<D>(m, c)) = make_uint4(w[0], w[1], w[2], w[3]);
    }
    __syncthreads();
    const int m0 = warp * 16 * MT;
    constexpr int QK = MT == 1 ? KS : 1;  // Q fragments kept in registers
    u32 qf[QK][4];
    if (MT == 1) {
#pragma unroll
        for (int kk = 0; kk < QK; kk++)
            ldsm_x4(smem_u32(sQ + swz<D>(m0 + (lane & 15), kk * 2 + (lane >> 4))), qf[kk][0],
                    qf[kk][1], qf[kk][2], qf[kk][3]);
    }

    // This thread's M rows: m0 + 16 * mt + lane/4 (+ 8).
    float o[MT][DT][4];
    float mx[MT][2], ls[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int i = 0; i < DT; i++) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
        mx[mt][0] = mx[mt][1] = NEG_INF;
        ls[mt][0] = ls[mt][1] = 0.f;
    }

    for (;;) {
        __syncthreads();  // Q fragments loaded / previous segment done
        if (tid == 0) {
            int leader = -1;
            for (int i = 0; i < BQ; i++)
                if (!s_done[i]) { leader = i; break; }
            s_leader = leader;
        }
        __syncthreads();
        const int leader = s_leader;
        if (leader < 0) break;
        if (tid < BQ) {
            const bool in = !s_done[tid] && s_seq[tid] == s_seq[leader] &&
                            (prefix || s_srow[tid] == s_srow[leader]);
            s_cur[tid] = in ? s_lim[tid] : -1;
            if (in) s_done[tid] = 1;
        }
        __syncthreads();
        if (tid == 0) {
            // Key row: the leader's selection, or (prefix) the member with
            // the longest range; keys beyond every member's limit are cut.
            int keyrow = s_srow[leader], best = -1, maxlim = -1;
            for (int i = 0; i < BQ; i++) {
                if (s_cur[i] < 0) continue;
                maxlim = max(maxlim, s_cur[i]);
                if (prefix && s_cur[i] >= 0 && s_end[i] > best) { best = s_end[i]; keyrow = s_srow[i]; }
            }
            int neff = 0;
            const int n = cnt[keyrow];
            const int2* rg = ranges + (long long)keyrow * cap;
            const int* cm = cum + (long long)keyrow * cap;
            if (maxlim >= 0 && n > 0) {
                // Last range starting at or before maxlim.
                int lo = 0, hi = n - 1, at = -1;
                while (lo <= hi) {
                    const int mid = (lo + hi) >> 1;
                    if (rg[mid].x <= maxlim) { at = mid; lo = mid + 1; } else hi = mid - 1;
                }
                if (at >= 0) {
                    const int len = rg[at].y - rg[at].x, span = maxlim - rg[at].x;  // span >= 0
                    neff = cm[at] + (span >= len ? len : span + 1);
                }
            }
            s_keyrow = keyrow;
            s_neff = neff;
            s_tseq = s_seq[leader];
        }
        __syncthreads();
        const int keyrow = s_keyrow, neff = s_neff;
        const int nkt = (neff + BN - 1) / BN;
        const int* trow = table + (long long)s_tseq * table_stride;
        int lim[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            lim[mt][0] = s_cur[(m0 + 16 * mt + (lane >> 2)) / G];
            lim[mt][1] = s_cur[(m0 + 16 * mt + (lane >> 2) + 8) / G];
        }
        const int n_rg = cnt[keyrow];
        const int2* rg = ranges + (long long)keyrow * cap;
        const int* cm = cum + (long long)keyrow * cap;
        // The key row's ranges in shared memory when they fit (the per-tile
        // binary search then stays on chip).
        if (n_rg <= TC_RG && nkt > 0) {
            for (int i = tid; i < n_rg; i += TC_THREADS) {
                s_rg[i] = rg[i];
                s_cm[i] = cm[i];
            }
            rg = s_rg;
            cm = s_cm;
            __syncthreads();
        }

        // Positions and row offsets of key tile `it` into stage `bf`.
        auto fill_pos = [&](int it, int bf) {
            if (tid < BN) {
                const int idx = it * BN + tid;
                int pos = -1;
                long long off = 0;
                if (idx < neff) {
                    int lo = 0, hi = n_rg - 1, at = 0;
                    while (lo <= hi) {
                        const int mid = (lo + hi) >> 1;
                        if (cm[mid] <= idx) { at = mid; lo = mid + 1; } else hi = mid - 1;
                    }
                    pos = rg[at].x + (idx - cm[at]);
                    off = kv_row(trow, pos, h, ps, D, page_stride, head_stride);
                }
                s_pos[bf][tid] = pos;
                s_off[bf][tid] = off;
            }
        };
        auto issue = [&](int bf) {
            u16* dk = sK + bf * BN * D;
            u16* dv = sV + bf * BN * D;
#pragma unroll 4
            for (int i = tid; i < BN * CH; i += TC_THREADS) {
                const int row = i / CH, c = i % CH;
                const bool ok = s_pos[bf][row] >= 0;
                const long long off = ok ? s_off[bf][row] + c * 8 : 0;
                cp_async16(smem_u32(dk + swz<D>(row, c)), kp + off, ok ? 16 : 0);
                cp_async16(smem_u32(dv + swz<D>(row, c)), vp + off, ok ? 16 : 0);
            }
            cp_async_commit();
        };

        if (nkt > 0) {
            fill_pos(0, 0);
            __syncthreads();
            issue(0);
        }
        for (int it = 0; it < nkt; it++) {
            const int bf = it & 1;
            if (it + 1 < nkt) {
                fill_pos(it + 1, bf ^ 1);
                __syncthreads();
                issue(bf ^ 1);
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
            const u16* tk = sK + bf * BN * D;
            const u16* tv = sV + bf * BN * D;

            // S = Q K^T (16 MT x BN per warp).
            float sc[MT][NT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int i = 0; i < NT; i++) sc[mt][i][0] = sc[mt][i][1] = sc[mt][i][2] = sc[mt][i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                u32 qa[MT][4];
                if (MT == 1) {
#pragma unroll
                    for (int i = 0; i < 4; i++) qa[0][i] = qf[MT == 1 ? kk : 0][i];
                } else {
#pragma unroll
                    for (int mt = 0; mt < MT; mt++)
                        ldsm_x4(smem_u32(sQ + swz<D>(m0 + 16 * mt + (lane & 15), kk * 2 + (lane >> 4))),
                                qa[mt][0], qa[mt][1], qa[mt][2], qa[mt][3]);
                }
#pragma unroll
                for (int np = 0; np < NT / 2; np++) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4(smem_u32(tk + swz<D>(np * 16 + ((lane >> 4) << 3) + (lane & 7),
                                                 kk * 2 + ((lane >> 3) & 1))),
                            b0, b1, b2, b3);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        Tc<E>::mma(sc[mt][2 * np], qa[mt], b0, b1);
                        Tc<E>::mma(sc[mt][2 * np + 1], qa[mt], b2, b3);
                    }
                }
            }
            // Mask, scale, online softmax.
            u32 pa[MT][BN / 16][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                float (*s)[4] = sc[mt];
                float tmax[2] = {NEG_INF, NEG_INF};
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
#pragma unroll
                    for (int c = 0; c < 4; c++) {
                        const int pos = s_pos[bf][nt * 8 + ((lane & 3) << 1) + (c & 1)];
                        const int lm = lim[mt][c >> 1];
                        const float v = (pos >= 0 && pos <= lm) ? s[nt][c] * scale_log2 : NEG_INF;
                        s[nt][c] = v;
                        tmax[c >> 1] = fmaxf(tmax[c >> 1], v);
                    }
                }
                float base[2], corr[2];
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    tmax[j] = fmaxf(tmax[j], __shfl_xor_sync(0xffffffff, tmax[j], 1));
                    tmax[j] = fmaxf(tmax[j], __shfl_xor_sync(0xffffffff, tmax[j], 2));
                    const float mn = fmaxf(mx[mt][j], tmax[j]);
                    base[j] = mn == NEG_INF ? 0.f : mn;
                    corr[j] = tc_exp2(mx[mt][j] - base[j]);
                    mx[mt][j] = mn;
                    ls[mt][j] *= corr[j];
                }
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
#pragma unroll
                    for (int c = 0; c < 4; c++) {
                        const float p = tc_exp2(s[nt][c] - base[c >> 1]);
                        s[nt][c] = p;
                        ls[mt][c >> 1] += p;
                    }
                }
#pragma unroll
                for (int dt = 0; dt < DT; dt++) {
                    o[mt][dt][0] *= corr[0];
                    o[mt][dt][1] *= corr[0];
                    o[mt][dt][2] *= corr[1];
                    o[mt][dt][3] *= corr[1];
                }
#pragma unroll
                for (int k2 = 0; k2 < BN / 16; k2++) {
                    pa[mt][k2][0] = Tc<E>::pack(s[2 * k2][0], s[2 * k2][1]);
                    pa[mt][k2][1] = Tc<E>::pack(s[2 * k2][2], s[2 * k2][3]);
                    pa[mt][k2][2] = Tc<E>::pack(s[2 * k2 + 1][0], s[2 * k2 + 1][1]);
                    pa[mt][k2][3] = Tc<E>::pack(s[2 * k2 + 1][2], s[2 * k2 + 1][3]);
                }
            }
            // O += P V.
#pragma unroll
            for (int k2 = 0; k2 < BN / 16; k2++) {
#pragma unroll
                for (int dp = 0; dp < DT / 2; dp++) {
                    u32 b0, b1, b2, b3;
                    ldsm_x4_t(smem_u32(tv + swz<D>(k2 * 16 + (((lane >> 3) & 1) << 3) + (lane & 7),
                                                   dp * 2 + (lane >> 4))),
                              b0, b1, b2, b3);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        Tc<E>::mma(o[mt][2 * dp], pa[mt][k2], b0, b1);
                        Tc<E>::mma(o[mt][2 * dp + 1], pa[mt][k2], b2, b3);
                    }
                }
            }
            __syncthreads();  // stage bf is refilled two iterations on
        }
    }

    // Normalise and write.
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int j = 0; j < 2; j++) {
            float l = ls[mt][j];
            l += __shfl_xor_sync(0xffffffff, l, 1);
            l += __shfl_xor_sync(0xffffffff, l, 2);
            const int mr = m0 + 16 * mt + (lane >> 2) + 8 * j;
            const int r = row0 + mr / G;
            if (r >= n_rows) continue;
            const bool bad = s_bad[mr / G];
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const long long at0 =
                (long long)r * out_stride + (long long)(h * G + mr % G) * D + ((lane & 3) << 1);
#pragma unroll
            for (int dt = 0; dt < DT; dt++) {
                float x = o[mt][dt][2 * j] * inv, y = o[mt][dt][2 * j + 1] * inv;
                if (bad) x = y = __int_as_float(0x7fc00000);
                const long long at = at0 + dt * 8;
                if (out_dtype == 0) {
                    *reinterpret_cast<float2*>((float*)out + at) = make_float2(x, y);
                } else if (out_dtype == 1) {
                    *reinterpret_cast<u32*>((u16*)out + at) =
                        (u32)f32_to_f16(x) | ((u32)f32_to_f16(y) << 16);
                } else {
                    *reinterpret_cast<u32*>((u16*)out + at) =
                        (u32)f32_to_bf16(x) | ((u32)f32_to_bf16(y) << 16);
                }
            }
        }
    }
}

#define PREFILL_TC_INST(NAME, E, D, G, MT)                                                         \
    extern "C" __global__ void __launch_bounds__(TC_THREADS)                                        \
        NAME(const u16* kp, const u16* vp, const int* table, int table_stride, int ps, int hkv,    \
             long long page_stride, long long head_stride, const float* q, float scale_log2,       \
             const int2* ranges, const int* cum, const int* cnt, const int* tot, int cap,          \
             int n_rows, int q_block, const int* q_seq, const int* q_pos, int prefix, void* out,   \
             long long out_stride, int out_dtype) {                                                \
        prefill_tc<E, D, G, MT>(kp, vp, table, table_stride, ps, hkv, page_stride, head_stride, q,     \
                            scale_log2, ranges, cum, cnt, tot, cap, n_rows, q_block, q_seq, q_pos, \
                            prefix, out, out_stride, out_dtype);                                   \
    }

// Entry points prefill_tc{,2}_<dtype>_d<D>_g<G>: "prefill_tc" has one
// m16 tile per warp (64 M rows per CTA), "prefill_tc2" two (128 M rows: each
// K/V fragment feeds two MMAs; Q re-read from shared memory).
#define PREFILL_TC_G(E, TN, D)                                   \
    PREFILL_TC_INST(prefill_tc_##TN##_d##D##_g1, E, D, 1, 1)     \
    PREFILL_TC_INST(prefill_tc_##TN##_d##D##_g2, E, D, 2, 1)     \
    PREFILL_TC_INST(prefill_tc_##TN##_d##D##_g4, E, D, 4, 1)     \
    PREFILL_TC_INST(prefill_tc_##TN##_d##D##_g8, E, D, 8, 1)     \
    PREFILL_TC_INST(prefill_tc2_##TN##_d##D##_g1, E, D, 1, 2)    \
    PREFILL_TC_INST(prefill_tc2_##TN##_d##D##_g2, E, D, 2, 2)    \
    PREFILL_TC_INST(prefill_tc2_##TN##_d##D##_g4, E, D, 4, 2)    \
    PREFILL_TC_INST(prefill_tc2_##TN##_d##D##_g8, E, D, 8, 2)

PREFILL_TC_G(Bf16, bf16, 64)
PREFILL_TC_G(Bf16, bf16, 128)
PREFILL_TC_G(F16, f16, 64)
PREFILL_TC_G(F16, f16, 128)

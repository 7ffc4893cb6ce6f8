// Fast InfiniteHiP prefill mask estimation on tensor cores (the twin of
// hip_mask.cu's exact f32 scoring, which stays the reference).
//
// Stage 0 scores each chunk of `c0` keys by ONE representative key, the
// mean of the chunk's keys, computed once per chunk (hipf_reps) and reused
// by every later query block. Later stages score every token of the chunks
// stage 0 kept, once (hipf_score_tok), and rank their sub-chunks by the best
// token inside (hipf_subkeys), instead of a binary search of probes per
// sub-chunk. Scores are max over the block's scoring queries of q . k with
// bf16 operands and f32 accumulation (mma.sync m16n8k16); selection reuses
// hip_mask.cu's radix top-k and assembly (same tie rules).
//
// Query tiles: per row r = (block, kv head), the gathered queries as bf16
// [MP][D] (MP = 16 * mt; rows past the real count repeat query 0, so they
// never change a max).

#define HF_THREADS 128
#define HF_BN 64  // keys per tile: 16 per warp (two n8 tiles)

__device__ __forceinline__ u32 hf_key(float f) {
    if (f != f) f = NEG_INF;
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ void hf_mma(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ u32 hf_smem(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void hf_ldsm4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
// Element offset of (row, 8-element chunk c) in a [rows][D] tile, chunks
// XOR-swizzled by row so that ldmatrix reads are conflict-free.
template <int D>
__device__ __forceinline__ int hf_swz(int row, int c) {
    return row * D + ((c ^ (row & 7)) << 3);
}

// 8 elements of type E as 8 bf16 (one uint4).
template <typename E>
__device__ __forceinline__ uint4 hf_to_bf16x8(uint4 v);
template <>
__device__ __forceinline__ uint4 hf_to_bf16x8<Bf16>(uint4 v) { return v; }
template <>
__device__ __forceinline__ uint4 hf_to_bf16x8<F16>(uint4 v) {
    u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        u16 lo = f32_to_bf16(F16::to_f32((u16)(w[i] & 0xffff)));
        u16 hi = f32_to_bf16(F16::to_f32((u16)(w[i] >> 16)));
        w[i] = (u32)lo | ((u32)hi << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Key sources: pointer to key u's D elements (type E) for row r, or null.
// Stage 0: chunk j of the row's middle -> representative (bf16).
struct RepSrc {
    const u16* reps;  // [hkv][rep_cap][D] bf16
    const int2* in;   // [rows] the middle (one range per row)
    const int* in_cnt;
    int rep_cap, base, c, hkv, D;
    __device__ __forceinline__ int count(int r) const {
        if (in_cnt[r] < 1) return 0;
        int2 m = in[r];
        return m.y > m.x ? (m.y - m.x + c - 1) / c : 0;
    }
    __device__ __forceinline__ const u16* key(int r, int u, int n) const {
        if (u >= n) return nullptr;
        const int a = (in[r].x - base) / c + u;
        return reps + ((long long)(r % hkv) * rep_cap + a) * D;
    }
};
// Later stages: token o of stage-0 range i (u = i * c0 + o) from the KV.
struct TokSrc {
    const u16* kp;
    const int* table;
    const int* row_seq;
    const int2* rg;  // [rows][cap0] stage-0 kept ranges (ascending)
    const int* cnt;
    int table_stride, ps, hkv, cap0, c0, D;
    long long pst, hst;
    int tok_cap;  // stage-0 ranges per row of the token-score buffer
    __device__ __forceinline__ int count(int r) const { return min(min(cnt[r], cap0), tok_cap) * c0; }
    __device__ __forceinline__ const u16* key(int r, int u, int n) const {
        if (u >= n) return nullptr;
        const int2 g = rg[(long long)r * cap0 + u / c0];
        const int t = g.x + u % c0;
        if (t >= g.y) return nullptr;
        const int* trow = table + (long long)row_seq[r / hkv] * table_stride;
        return kp + kv_row(trow, t, r % hkv, ps, D, pst, hst);
    }
};

// Best score of every key of the row's source against its query tile.
// grid (x, rows): CTA x takes key tiles x, x + gridDim.x, ...; out[r][u].
template <typename E, int D, typename Src>
__device__ void hf_score(const Src& src, const u16* __restrict__ qt, int mt, float* __restrict__ out,
                         long long out_stride) {
    extern __shared__ __align__(16) u16 smem[];
    const int r = blockIdx.y;
    const int n = src.count(r);
    const int ntiles = (n + HF_BN - 1) / HF_BN;
    if ((int)blockIdx.x >= ntiles) return;
    const int MP = mt * 16;
    u16* sQ = smem;
    u16* sK = smem + MP * D;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    constexpr int CH = D / 8;  // 16-byte chunks per row
    const uint4* qsrc = reinterpret_cast<const uint4*>(qt + (long long)r * MP * D);
    for (int i = tid; i < MP * CH; i += HF_THREADS) {
        const int row = i / CH, c = i % CH;
        *reinterpret_cast<uint4*>(sQ + hf_swz<D>(row, c)) = qsrc[i];
    }
    constexpr int KS = D / 16;
    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        __syncthreads();  // sK free (and sQ written, first time)
        for (int i = tid; i < HF_BN * CH; i += HF_THREADS) {
            const int row = i / CH, c = i % CH;
            const u16* p = src.key(r, tile * HF_BN + row, n);
            uint4 v = make_uint4(0, 0, 0, 0);
            if (p) v = hf_to_bf16x8<E>(reinterpret_cast<const uint4*>(p)[c]);
            *reinterpret_cast<uint4*>(sK + hf_swz<D>(row, c)) = v;
        }
        __syncthreads();
        // This warp's 16 keys: B fragments of both n8 tiles for all of D.
        u32 b[KS][4];
#pragma unroll
        for (int kk = 0; kk < KS; kk++)
            hf_ldsm4(hf_smem(sK + hf_swz<D>(warp * 16 + ((lane >> 4) << 3) + (lane & 7),
                                            kk * 2 + ((lane >> 3) & 1))),
                     b[kk][0], b[kk][1], b[kk][2], b[kk][3]);
        float mx[4] = {NEG_INF, NEG_INF, NEG_INF, NEG_INF};
        for (int m = 0; m < mt; m++) {
            float c0[4] = {0.f, 0.f, 0.f, 0.f}, c1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                u32 a[4];
                hf_ldsm4(hf_smem(sQ + hf_swz<D>(m * 16 + (lane & 15), kk * 2 + (lane >> 4))), a[0], a[1],
                         a[2], a[3]);
                hf_mma(c0, a, b[kk][0], b[kk][1]);
                hf_mma(c1, a, b[kk][2], b[kk][3]);
            }
            mx[0] = fmaxf(mx[0], fmaxf(c0[0], c0[2]));
            mx[1] = fmaxf(mx[1], fmaxf(c0[1], c0[3]));
            mx[2] = fmaxf(mx[2], fmaxf(c1[0], c1[2]));
            mx[3] = fmaxf(mx[3], fmaxf(c1[1], c1[3]));
        }
        // Max over the 8 row groups (lanes with the same lane % 4).
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int o = 4; o < 32; o <<= 1) mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], o));
        if (lane < 4) {
            const int k0 = tile * HF_BN + warp * 16 + 2 * lane;
            float* o = out + (long long)r * out_stride;
            const int ks[4] = {k0, k0 + 1, k0 + 8, k0 + 9};
#pragma unroll
            for (int i = 0; i < 4; i++)
                if (ks[i] < n) o[ks[i]] = mx[i];
        }
    }
}

#define HF_INST(E, TN, D)                                                                                  \
    extern "C" __global__ void __launch_bounds__(HF_THREADS)                                               \
        hipf_score_rep_##TN##_d##D(const u16* reps, const int2* in, const int* in_cnt, int rep_cap,        \
                                   int base, int c, int hkv, const u16* qt, int mt, float* out,            \
                                   int out_stride) {                                                       \
        RepSrc s{reps, in, in_cnt, rep_cap, base, c, hkv, D};                                              \
        hf_score<Bf16, D, RepSrc>(s, qt, mt, out, out_stride);                                             \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(HF_THREADS)                                               \
        hipf_score_tok_##TN##_d##D(const u16* kp, const int* table, int table_stride, int ps, int hkv,    \
                                   long long pst, long long hst, const int* row_seq, const int2* rg,       \
                                   const int* cnt, int cap0, int c0, int tok_cap, const u16* qt, int mt,   \
                                   float* out) {                                                           \
        TokSrc s{kp, table, row_seq, rg, cnt, table_stride, ps, hkv, cap0, c0, D, pst, hst, tok_cap};      \
        hf_score<E, D, TokSrc>(s, qt, mt, out, (long long)tok_cap * c0);                                   \
    }
HF_INST(Bf16, bf16, 64)
HF_INST(Bf16, bf16, 128)
HF_INST(Bf16, bf16, 256)
HF_INST(F16, f16, 64)
HF_INST(F16, f16, 128)
HF_INST(F16, f16, 256)

// Stage-0 scores (f32, written by hipf_score_rep into `sc` [rows][n_sub])
// to hip_topk keys: empty slots 0, NaN as -inf.
extern "C" __global__ void hipf_stage0_keys(const float* __restrict__ sc, const int2* __restrict__ in,
                                            const int* __restrict__ in_cnt, int c, int n_sub,
                                            u32* __restrict__ keys) {
    const int r = blockIdx.y;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n_sub) return;
    int n = 0;
    if (in_cnt[r] > 0) {
        int2 m = in[r];
        n = m.y > m.x ? (m.y - m.x + c - 1) / c : 0;
    }
    keys[(long long)r * n_sub + j] = j < n ? hf_key(sc[(long long)r * n_sub + j]) : 0u;
}

// Later stage: slot i * E + e is sub-chunk e (of `c` tokens) of input range
// i; its key is the best token score inside, tokens found in the stage-0
// range that holds them (binary search: stage-0 ranges are ascending and
// every later range lies inside one of them).
extern "C" __global__ void hipf_subkeys(const float* __restrict__ tok, const int2* __restrict__ rg0,
                                        const int* __restrict__ cnt0, int cap0, int c0, int tok_cap,
                                        const int2* __restrict__ in_ranges, const int* __restrict__ in_cnt,
                                        int cap_in, int E_, int c, u32* __restrict__ keys) {
    const int r = blockIdx.y;
    const int n_sub = cap_in * E_;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n_sub) return;
    const int ri = j / E_, e = j % E_;
    u32 key = 0;
    if (ri < in_cnt[r]) {
        const int2 g = in_ranges[(long long)r * cap_in + ri];
        const int l = g.x + e * c;
        if (l < g.y) {
            const int rr = min(l + c, g.y);
            const int2* z = rg0 + (long long)r * cap0;
            int lo = 0, hi = min(min(cnt0[r], cap0), tok_cap) - 1;
            while (lo < hi) {  // last range starting at or before l
                const int mid = (lo + hi + 1) / 2;
                if (z[mid].x <= l) lo = mid; else hi = mid - 1;
            }
            const float* ts = tok + (long long)r * tok_cap * c0 + (long long)lo * c0 + (l - z[lo].x);
            float best = NEG_INF;
            for (int t = 0; t < rr - l; t++) best = fmaxf(best, ts[t]);
            key = hf_key(best);
        }
    }
    keys[(long long)r * n_sub + j] = key;
}

// Representative of chunk a (tokens base + a*c .. min(+c, len)) of KV head
// h: the mean key, f32 sums rounded once to bf16. grid (chunks, hkv),
// chunks a0 .. a0 + gridDim.x.
template <typename E, int D>
__device__ void hf_reps(const u16* __restrict__ kp, const int* __restrict__ trow, int ps, long long pst,
                        long long hst, int base, int c, int len, int a0, int rep_cap, u16* __restrict__ reps) {
    const int a = a0 + blockIdx.x, h = blockIdx.y;
    const int lo = base + a * c, hi = min(lo + c, len);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float s = 0.f;
        for (int t = lo; t < hi; t++) {
            const u16* k = kp + kv_row(trow, t, h, ps, D, pst, hst);
            s += E::to_f32(k[d]);
        }
        reps[((long long)h * rep_cap + a) * D + d] = f32_to_bf16(hi > lo ? s / (float)(hi - lo) : 0.f);
    }
}
#define HF_REPS(E, TN, D)                                                                               \
    extern "C" __global__ void hipf_reps_##TN##_d##D(const u16* kp, const int* table, int table_stride,  \
                                                     int seq_row, int ps, long long pst, long long hst,   \
                                                     int base, int c, int len, int a0, int rep_cap,       \
                                                     u16* reps) {                                         \
        hf_reps<E, D>(kp, table + (long long)seq_row * table_stride, ps, pst, hst, base, c, len, a0,     \
                      rep_cap, reps);                                                                     \
    }
HF_REPS(Bf16, bf16, 64)
HF_REPS(Bf16, bf16, 128)
HF_REPS(Bf16, bf16, 256)
HF_REPS(F16, f16, 64)
HF_REPS(F16, f16, 128)
HF_REPS(F16, f16, 256)

// Scoring queries as bf16 tiles: row r = (block b, kv head h) gets every
// `stride`-th query of the block plus its last, all G heads of the group
// (the order of hip_gather_q), padded to MP rows by repeating row 0.
extern "C" __global__ void hipf_gather_q(const float* __restrict__ q, int n, int q_block, int stride, int hkv,
                                         int G, int D, int MP, u16* __restrict__ qt) {
    const int r = blockIdx.x;
    const int b = r / hkv, h = r % hkv;
    const int lo = b * q_block, hi = min(lo + q_block, n);
    const int m = (hi - lo + stride - 1) / stride;
    const int extra = (lo + (m - 1) * stride != hi - 1) ? 1 : 0;
    const int cnt = (m + extra) * G;
    const int hq = hkv * G;
    for (int e = threadIdx.x; e < MP * D; e += blockDim.x) {
        int j = e / D, dd = e % D;
        if (j >= cnt) j = 0;
        const int k = j / G, gi = j % G;
        const int qi = k < m ? lo + k * stride : hi - 1;
        qt[(long long)r * MP * D + e] = f32_to_bf16(q[((long long)qi * hq + h * G + gi) * D + dd]);
    }
}

// InfiniteHiP's RoPE modes on the GPU hip decode (HipGpuDecoder; DESIGN 3.1):
// stored keys are rotated at their original positions and are re-rotated on
// the fly, as the CPU policy does (policy/hip.rs ScoreRope,
// attention/cpu.rs streaming).
//
// Rotation: rope.rs's Rope::rotate, halves (NEOX) layout: element i pairs
// with i + D/2 (`inter` 0); or llama.cpp's NORM (interleaved) layout:
// element 2i pairs with 2i + 1 (`inter` 1, llama.cpp's CUDA route: pair i
// has the same frequency inv_freq[i] in both layouts, so a key permuted
// between them rotates to the same values, permuted). Angle =
// pos * inv_freq[i] in f64, sin and cos in f64 rounded to f32, then
// x0*c - x1*s and x1*c + x0*s in f32 without fused multiply-adds. The f64 sin/cos here (CUDA libdevice, within 2 ulp) and the
// host's (libm) round to the same f32 except when a value lies within a few
// f64 ulp of an f32 rounding boundary, so the rotated vectors are
// bit-identical to the CPU's in all but very rare elements.
//
// Module hip_rope (loaded on first use: kernels::LAZY_MODULES):
// - hip_rope_q: the scoring queries moved by a per-sequence shift.
// - hip_score_rope_<dt>_d<D>: hip_score (hip_mask.cu) with every probed key
//   rotated before its dot products (chunk_indexed: key t to t / c;
//   relative: t to t * scale), scores in the CPU's order.
// - hip_stream_gather_<dt>_d<D>: streaming attention's compact buffer: the
//   selected tokens of every (sequence, KV head) row, each key re-rotated by
//   its position delta, V copied, for the unchanged hip sparse attention.

__device__ __noinline__ void rope_rot(float& x0, float& x1, double pos, float inv_freq) {
    const double a = pos * (double)inv_freq;
    double sd, cd;
    sincos(a, &sd, &cd);
    const float s = (float)sd, c = (float)cd;
    const float y0 = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    const float y1 = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
    x0 = y0;
    x1 = y1;
}

// The two elements of rotation pair i of a D-wide head (rope_rot's x0, x1).
__device__ __forceinline__ int pair_lo(int i, int half, int inter) { return inter ? 2 * i : i; }
__device__ __forceinline__ int pair_hi(int i, int half, int inter) { return inter ? 2 * i + 1 : i + half; }

// out[b][j][D] = q[b][j][D] rotated by shift[b] (NaN: copied unchanged).
// Grid: batch * n_q rows; block: any.
extern "C" __global__ void hip_rope_q(const float* __restrict__ q, float* __restrict__ out, int n_q, int D,
                                      const double* __restrict__ shift, const float* __restrict__ inv_freq,
                                      int inter) {
    const int row = blockIdx.x;
    const double s = shift[row / n_q];
    const float* x = q + (long long)row * D;
    float* y = out + (long long)row * D;
    const int half = D / 2;
#pragma unroll 1
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const int i0 = pair_lo(i, half, inter), i1 = pair_hi(i, half, inter);
        float x0 = x[i0], x1 = x[i1];
        if (s == s) rope_rot(x0, x1, s, inv_freq[i]);
        y[i0] = x0;
        y[i1] = x1;
    }
}

// Score of key t against the block's queries (shared memory, [nq][D]):
// the key rotated to its scoring position first. mode 1 (chunk_indexed):
// by (t / c) - t; mode 2 (relative): by t * m1 (m1 = scale - 1); mode 0 or
// NaN m1: as stored.
template <typename E, int D>
__device__ __forceinline__ float probe_rope(const u16* __restrict__ kp, const int* trow, int t, int h, int ps,
                                            long long pst, long long hst, const float* sq, int nq, int mode, int c,
                                            double m1, const float* __restrict__ inv_freq, int inter) {
    const u16* kr = kp + kv_row(trow, t, h, ps, D, pst, hst);
    float k[D];
#pragma unroll
    for (int cc = 0; cc < D / 8; cc++) load8<E>(kr + cc * 8, k + cc * 8);
    if (mode == 1 || (mode == 2 && m1 == m1)) {
        const double pos = mode == 1 ? (double)(t / c) - (double)t : (double)t * m1;
        if (inter) {
#pragma unroll 1
            for (int i = 0; i < D / 2; i++) rope_rot(k[2 * i], k[2 * i + 1], pos, __ldg(inv_freq + i));
        } else {
#pragma unroll 1
            for (int i = 0; i < D / 2; i++) rope_rot(k[i], k[i + D / 2], pos, __ldg(inv_freq + i));
        }
    }
    float best = NEG_INF;
    for (int j = 0; j < nq; j++) {
        float a[8];
#pragma unroll
        for (int i = 0; i < 8; i++) a[i] = 0.f;
#pragma unroll
        for (int cc = 0; cc < D / 8; cc++) {
            const float* qj = sq + j * D + cc * 8;
#pragma unroll
            for (int i = 0; i < 8; i++) a[i] = __fadd_rn(a[i], __fmul_rn(qj[i], k[cc * 8 + i]));
        }
        float s = a[0];
#pragma unroll
        for (int i = 1; i < 8; i++) s = __fadd_rn(s, a[i]);
        best = fmaxf(best, s);
    }
    return best;
}

// hip_score (hip_mask.cu) with rotated probes: one thread per sub-chunk,
// the same slots, search and keys; the queries (already moved by
// hip_rope_q) in shared memory.
template <typename E, int D>
__device__ void hip_score_rope(const u16* __restrict__ kp, const int* __restrict__ table, int table_stride, int ps,
                               int hkv, long long pst, long long hst, const int* __restrict__ row_seq,
                               const float* __restrict__ qs, const int* __restrict__ nq_arr, int nq_max,
                               const int2* __restrict__ in_ranges, const int* __restrict__ in_cnt, int cap_in,
                               int E_, int c, u32* __restrict__ keys, int mode, const float* __restrict__ inv_freq,
                               const double* __restrict__ rel_m1, int inter) {
    extern __shared__ float sq[];
    const int r = blockIdx.y;
    const int rb = r / hkv, h = r % hkv;
    const int nq = nq_arr[rb];
    const float* qsrc = qs + ((long long)r * nq_max) * D;
    for (int i = threadIdx.x; i < nq * D; i += blockDim.x) sq[i] = qsrc[i];
    __syncthreads();
    const int n_sub = cap_in * E_;
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n_sub) return;
    const double m1 = mode == 2 ? rel_m1[rb] : 0.0;
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
                best = probe_rope<E, D>(kp, trow, l, h, ps, pst, hst, sq, nq, mode, c, m1, inv_freq, inter);
            } else {
                best = NEG_INF;
                while (rr - l > 1) {
                    int m = (l + rr) / 2;
                    float sl = probe_rope<E, D>(kp, trow, (l + m) / 2, h, ps, pst, hst, sq, nq, mode, c, m1, inv_freq, inter);
                    float sr = probe_rope<E, D>(kp, trow, (m + rr) / 2, h, ps, pst, hst, sq, nq, mode, c, m1, inv_freq, inter);
                    if (sl >= sr) { rr = m; best = sl; } else { l = m; best = sr; }
                }
            }
            // score_key (hip_mask.cu): NaN as -inf, order-preserving.
            float f = best;
            if (f != f) f = NEG_INF;
            u32 u = __float_as_uint(f);
            key = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
        }
    }
    keys[(long long)r * n_sub + j] = key;
}

#define SCORE_ROPE_INST(E, TN, D)                                                                          \
    extern "C" __global__ void __launch_bounds__(128) hip_score_rope_##TN##_d##D(                         \
        const u16* kp, const int* table, int table_stride, int ps, int hkv, long long pst, long long hst,  \
        const int* row_seq, const float* qs, const int* nq, int nq_max, const int2* in_ranges,             \
        const int* in_cnt, int cap_in, int E_, int c, u32* keys, int mode, const float* inv_freq,          \
        const double* rel_m1, int inter) {                                                                 \
        hip_score_rope<E, D>(kp, table, table_stride, ps, hkv, pst, hst, row_seq, qs, nq, nq_max, in_ranges, \
                             in_cnt, cap_in, E_, c, keys, mode, inv_freq, rel_m1, inter);                  \
    }
SCORE_ROPE_INST(Bf16, bf16, 64)
SCORE_ROPE_INST(Bf16, bf16, 128)
SCORE_ROPE_INST(Bf16, bf16, 256)
SCORE_ROPE_INST(F16, f16, 64)
SCORE_ROPE_INST(F16, f16, 128)
SCORE_ROPE_INST(F16, f16, 256)

// Streaming attention's compact buffer. Row r = b * hkv + h selects
// n = ntab[r] tokens of tab (sink + chunks, ascending) then the tail
// extra[3b+1] (slid) .. extra[3b+2] (window) as the hip sparse attention
// reads them; token i of the row (its rank) at original position p is
// written at compact slot i of the row, its key rotated by
// (p_q - (n - 1)) - (p - i) (p_q = the window's end - 1, the query's
// position): with the query as stored (at p_q) the score is the one at
// streaming positions (key at i, query at n - 1). V is copied. The rotated
// key is rounded to the cache's dtype (bf16/f16). Compact layout: row r at
// (r * P + i) * D; ntab2[r] = n. Sequence b's K/V is row seq_row[b] of the
// table (GpuAttention: the request's table row), or row b when seq_row is
// NULL (HipGpuDecoder). Grid: (ceil(P * D / 2 / 128), rows), block 128: one
// thread per (slot, rotation pair).
template <int F16OUT>
__device__ __forceinline__ u16 to_elem(float f) {
    return F16OUT ? f32_to_f16(f) : f32_to_bf16(f);
}

template <typename E, int IS_F16, int D>
__device__ void stream_gather(const u16* __restrict__ kp, const u16* __restrict__ vp, const int* __restrict__ table,
                              int table_stride, int ps, int hkv, long long pst, long long hst,
                              const int* __restrict__ tab, int tab_stride, const int* __restrict__ ntab,
                              const int2* __restrict__ extra, const float* __restrict__ inv_freq, int P,
                              u16* __restrict__ k2, u16* __restrict__ v2, int* __restrict__ ntab2,
                              const int* __restrict__ seq_row, int inter) {
    const int r = blockIdx.y;
    const int b = r / hkv, h = r % hkv;
    const int nt = ntab[r];
    const int2 sl = extra[3 * b + 1], wn = extra[3 * b + 2];
    const int tail0 = sl.y > sl.x ? sl.x : wn.x;
    const int n = nt + max(wn.y - tail0, 0);
    if (blockIdx.x == 0 && threadIdx.x == 0) ntab2[r] = min(n, P);
    constexpr int HALF = D / 2;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int i = (int)(idx / HALF), e = (int)(idx % HALF);
    if (i >= n || i >= P) return;
    const int p = i < nt ? tab[(long long)r * tab_stride + i] : tail0 + (i - nt);
    const int p_q = wn.y - 1;
    const double pos = (double)((long long)(p_q - (n - 1)) - (long long)(p - i));
    const int seq = seq_row != nullptr ? seq_row[b] : b;
    const int* trow = table + (long long)seq * table_stride;
    const long long src = kv_row(trow, p, h, ps, D, pst, hst);
    const int e0 = pair_lo(e, HALF, inter), e1 = pair_hi(e, HALF, inter);
    float x0 = E::to_f32(kp[src + e0]), x1 = E::to_f32(kp[src + e1]);
    rope_rot(x0, x1, pos, inv_freq[e]);
    const long long dst = ((long long)r * P + i) * D;
    k2[dst + e0] = to_elem<IS_F16>(x0);
    k2[dst + e1] = to_elem<IS_F16>(x1);
    v2[dst + e0] = vp[src + e0];
    v2[dst + e1] = vp[src + e1];
}

#define GATHER_INST(E, IS_F16, TN, D)                                                                        \
    extern "C" __global__ void __launch_bounds__(128) hip_stream_gather_##TN##_d##D(                        \
        const u16* kp, const u16* vp, const int* table, int table_stride, int ps, int hkv, long long pst,    \
        long long hst, const int* tab, int tab_stride, const int* ntab, const int2* extra,                   \
        const float* inv_freq, int P, u16* k2, u16* v2, int* ntab2, const int* seq_row, int inter) {         \
        stream_gather<E, IS_F16, D>(kp, vp, table, table_stride, ps, hkv, pst, hst, tab, tab_stride, ntab,   \
                                    extra, inv_freq, P, k2, v2, ntab2, seq_row, inter);                      \
    }
GATHER_INST(Bf16, 0, bf16, 64)
GATHER_INST(Bf16, 0, bf16, 128)
GATHER_INST(Bf16, 0, bf16, 256)
GATHER_INST(F16, 1, f16, 64)
GATHER_INST(F16, 1, f16, 128)
GATHER_INST(F16, 1, f16, 256)

// ---------------------------------------------------------------------------
// Streaming attention of the hip sparse PREFILL (HipGpuPrefill, issue 12),
// as attention/cpu.rs prefill_with runs it: query j of a query block, KV
// head h, sees the tokens of its block's selection row r = block * hkv + h
// at positions <= p_j, renumbered 0..n_j - 1 in order, and sits at n_j - 1.
// The selection rows are ascending and disjoint (hip_assemble: sink, chunks,
// slid, window; cum = tokens before each range), so the tokens a query sees
// are a prefix of its row: a key's streaming position is its rank in the
// row whatever the query. Hence two passes and the unchanged attention:
// - hip_pf_stream_gather_<dt>_d<D>: row r's token of rank i (position p)
//   written at compact slot (block * P + i), its key rotated by i - p (to its
//   rank; rounded to the cache dtype), V copied; one KV head per launch
//   (the compact buffer holds that head's rows: [block][P][D]);
// - hip_pf_stream_q: query j's q head rotated by (n_j - 1) - p_j into
//   qout[h][j][g][D] (f32), with qpos2[h][j] = n_j - 1 (the causal clip in
//   compact slots) and qseq2[h][j] = j / q_block (its compact page);
// then per KV head (gather, attention) the prefill attention over the
// compact buffer (one page of P slots per block), rows [h][j], the
// selection of every block [0, P) clipped at qpos2 (rust:
// HipGpuPrefill::attend_streaming).

// Grid: (ceil(P * D / 2 / 128), blocks); block 128: one thread per (slot,
// rotation pair). KV head `head` only: row r = blockIdx.y * hkv + head is
// written at compact row blockIdx.y (the buffer holds one head's rows at a
// time). The prefill's K/V is page-table row `table_row`.
template <typename E, int IS_F16, int D>
__device__ void pf_stream_gather(const u16* __restrict__ kp, const u16* __restrict__ vp,
                                 const int* __restrict__ table, int table_stride, int table_row, int ps, int hkv,
                                 int head, long long pst, long long hst, const int2* __restrict__ ranges,
                                 const int* __restrict__ cum, const int* __restrict__ cnt,
                                 const int* __restrict__ tot, int cap, const float* __restrict__ inv_freq, int P,
                                 u16* __restrict__ k2, u16* __restrict__ v2, int inter) {
    const int r = blockIdx.y * hkv + head;
    const int h = head;
    const int n = min(tot[r], P);
    constexpr int HALF = D / 2;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int i = (int)(idx / HALF), e = (int)(idx % HALF);
    if (i >= n) return;
    // The range holding rank i: the last k with cum[k] <= i.
    const int* cm = cum + (long long)r * cap;
    int lo = 0, hi = cnt[r] - 1;
    while (lo < hi) {
        const int m = (lo + hi + 1) / 2;
        if (cm[m] <= i) lo = m; else hi = m - 1;
    }
    const int p = ranges[(long long)r * cap + lo].x + (i - cm[lo]);
    const double pos = (double)(i - p);
    const int* trow = table + (long long)table_row * table_stride;
    const long long src = kv_row(trow, p, h, ps, D, pst, hst);
    const int e0 = pair_lo(e, HALF, inter), e1 = pair_hi(e, HALF, inter);
    float x0 = E::to_f32(kp[src + e0]), x1 = E::to_f32(kp[src + e1]);
    rope_rot(x0, x1, pos, inv_freq[e]);
    const long long dst = ((long long)blockIdx.y * P + i) * D;
    k2[dst + e0] = to_elem<IS_F16>(x0);
    k2[dst + e1] = to_elem<IS_F16>(x1);
    v2[dst + e0] = vp[src + e0];
    v2[dst + e1] = vp[src + e1];
}

#define PF_GATHER_INST(E, IS_F16, TN, D)                                                                       \
    extern "C" __global__ void __launch_bounds__(128) hip_pf_stream_gather_##TN##_d##D(                       \
        const u16* kp, const u16* vp, const int* table, int table_stride, int table_row, int ps, int hkv,       \
        int head, long long pst, long long hst, const int2* ranges, const int* cum, const int* cnt,           \
        const int* tot, int cap, const float* inv_freq, int P, u16* k2, u16* v2, int inter) {                  \
        pf_stream_gather<E, IS_F16, D>(kp, vp, table, table_stride, table_row, ps, hkv, head, pst, hst, ranges, \
                                       cum, cnt, tot, cap, inv_freq, P, k2, v2, inter);                         \
    }
PF_GATHER_INST(Bf16, 0, bf16, 64)
PF_GATHER_INST(Bf16, 0, bf16, 128)
PF_GATHER_INST(Bf16, 0, bf16, 256)
PF_GATHER_INST(F16, 1, f16, 64)
PF_GATHER_INST(F16, 1, f16, 128)
PF_GATHER_INST(F16, 1, f16, 256)

// Grid: n * hkv * G rows (query j, q head hq = h * G + g); block: any. q is
// the chunk's [n][hkv * G][D] f32 queries (as stored, at q_start + j).
extern "C" __global__ void hip_pf_stream_q(const float* __restrict__ q, int n, int q_start, int q_block, int hkv,
                                           int G, int D, const int2* __restrict__ ranges,
                                           const int* __restrict__ cnt, int cap,
                                           const float* __restrict__ inv_freq, float* __restrict__ qout,
                                           int* __restrict__ qpos2, int* __restrict__ qseq2, int inter) {
    const int row = blockIdx.x;
    const int nqh = hkv * G;
    const int j = row / nqh, hq = row % nqh;
    const int h = hq / G, gi = hq % G;
    const int r = (j / q_block) * hkv + h;
    const int pos = q_start + j;
    // Tokens of row r at positions <= pos (every thread counts them).
    int nv = 0;
    const int nc = cnt[r];
    for (int k = 0; k < nc; k++) {
        const int2 rg = ranges[(long long)r * cap + k];
        const int e = min(rg.y, pos + 1);
        if (e > rg.x) nv += e - rg.x;
    }
    const double s = (double)((long long)(nv - 1) - (long long)pos);
    const float* x = q + (long long)row * D;
    float* y = qout + (((long long)h * n + j) * G + gi) * D;
    const int half = D / 2;
#pragma unroll 1
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const int i0 = pair_lo(i, half, inter), i1 = pair_hi(i, half, inter);
        float x0 = x[i0], x1 = x[i1];
        rope_rot(x0, x1, s, inv_freq[i]);
        y[i0] = x0;
        y[i1] = x1;
    }
    if (threadIdx.x == 0 && gi == 0) {
        qpos2[(long long)h * n + j] = nv - 1;
        qseq2[(long long)h * n + j] = j / q_block;
    }
}

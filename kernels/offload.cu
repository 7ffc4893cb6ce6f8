// Host tier -> device slot arena (backend/cuda/offload.rs). The host K/V are
// pinned, device-mapped memory laid out [page][kv_head][page_size][D], so
// head block `hb = page * hkv + head` is `block_vec` 16-byte vectors at
// hb * block_vec. One CTA per miss copies its K and V block into the slot
// (reading host memory over the bus); CTA n_fill applies the step's slot
// table updates. The lists themselves sit in mapped pinned memory.
extern "C" __global__ void offload_gather(const uint4* __restrict__ hk, const uint4* __restrict__ hv,
                                          uint4* __restrict__ sk, uint4* __restrict__ sv,
                                          const int* __restrict__ fills, int n_fill, int block_vec,
                                          int* __restrict__ table, const int* __restrict__ upd,
                                          int n_upd) {
    const int i = blockIdx.x;
    if (i < n_fill) {
        const long long src = (long long)fills[2 * i] * block_vec;
        const long long dst = (long long)fills[2 * i + 1] * block_vec;
        for (int e = threadIdx.x; e < block_vec; e += blockDim.x) {
            uint4 a = hk[src + e];
            uint4 b = hv[src + e];
            sk[dst + e] = a;
            sv[dst + e] = b;
        }
    } else {
        for (int e = threadIdx.x; e < n_upd; e += blockDim.x) table[upd[2 * e]] = upd[2 * e + 1];
    }
}

// Appended tokens' rows written through to resident slots: pairs
// (host row, slot row), a row = row_vec 16-byte vectors; host row = (page *
// hkv + head) * page_size + offset, slot row = slot * page_size + offset.
extern "C" __global__ void offload_rows(const uint4* __restrict__ hk, const uint4* __restrict__ hv,
                                        uint4* __restrict__ sk, uint4* __restrict__ sv,
                                        const int* __restrict__ pairs, int n, int row_vec) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < (long long)n * row_vec;
         e += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(e / row_vec), c = (int)(e % row_vec);
        const long long src = (long long)pairs[2 * i] * row_vec + c;
        const long long dst = (long long)pairs[2 * i + 1] * row_vec + c;
        sk[dst] = hk[src];
        sv[dst] = hv[src];
    }
}

// Estimation row cache admission (backend/cuda/est_cache.rs): copy key rows
// host -> arena for pairs (host row, slot), then-or-meanwhile write the
// host's changed buckets of the row -> slot table (bucket, entry). Nothing
// reads the arena or the table while this runs (stream order / events).
extern "C" __global__ void est_admit(const uint4* __restrict__ hk, uint4* __restrict__ arena,
                                     const unsigned* __restrict__ pairs, int n, int row_vec,
                                     unsigned long long* __restrict__ map,
                                     const unsigned long long* __restrict__ upd, int n_upd) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long t0 = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    // `hk` is the host tier (pairs: host row, slot) or the device staging of
    // the step's missed rows (pairs: miss-list position, slot).
    for (long long e = t0; e < (long long)n * row_vec; e += stride) {
        const int i = (int)(e / row_vec), c = (int)(e % row_vec);
        arena[(long long)pairs[2 * i + 1] * row_vec + c] = hk[(long long)pairs[2 * i] * row_vec + c];
    }
    for (long long e = t0; e < n_upd; e += stride) map[upd[2 * e]] = upd[2 * e + 1];
}

// ---- Estimation row cache, device-side admission (est_cache.rs, Admission::Device).
// The row -> slot table is owned by the device: the host only picks victim
// slots (CLOCK over reference bits it reads a window at a time) and lists
// (row, slot, staged index) triples; est_admit_dev removes each slot's old
// row (tombstone), inserts the new one (lock-free linear probing, CAS on
// empty buckets only) and copies the row. Tombstones are never reused;
// est_map_clear + est_map_rebuild re-insert the live rows from `holder`
// when they pile up. Lookups (hip_est_host.cuh) stop at empty buckets and
// pass tombstones (their key never equals a row id).
#define EST_EMPTY 0xffffffffu
#define EST_TOMB 0xfffffffeu

__device__ __forceinline__ unsigned long long est_ld(const unsigned long long* p) {
    return *reinterpret_cast<const volatile unsigned long long*>(p);
}

// 1: inserted, 0: the row was already there.
__device__ __forceinline__ int est_map_insert(unsigned long long* map, unsigned mask, unsigned shift,
                                              unsigned row, unsigned slot) {
    const unsigned long long want = ((unsigned long long)row << 32) | slot;
    unsigned b = (row * 2654435761u) >> shift;
    for (;;) {
        unsigned long long e = est_ld(map + b);
        if ((unsigned)(e >> 32) == row) return 0;
        if ((unsigned)(e >> 32) == EST_EMPTY) {
            const unsigned long long prev = atomicCAS(map + b, e, want);
            if (prev == e) return 1;
            if ((unsigned)(prev >> 32) == row) return 0;
        }
        b = (b + 1) & mask;
    }
}

__device__ __forceinline__ void est_map_remove(unsigned long long* map, unsigned mask, unsigned shift,
                                               unsigned row, unsigned slot) {
    const unsigned long long have = ((unsigned long long)row << 32) | slot;
    unsigned b = (row * 2654435761u) >> shift;
    for (;;) {
        const unsigned long long e = est_ld(map + b);
        if (e == have) {
            atomicExch(map + b, (unsigned long long)EST_TOMB << 32);
            return;
        }
        if ((unsigned)(e >> 32) == EST_EMPTY) return;
        b = (b + 1) & mask;
    }
}

// One warp per triple (row, slot, staged index or EST_EMPTY = read the host
// tier). Each slot appears at most once per launch (ClockBits::take).
extern "C" __global__ void est_admit_dev(const uint4* __restrict__ staged, const uint4* __restrict__ hk,
                                         uint4* __restrict__ arena, const unsigned* __restrict__ tri, int n,
                                         int row_vec, unsigned* __restrict__ holder,
                                         unsigned long long* __restrict__ map, unsigned mask, unsigned shift) {
    const int lane = threadIdx.x & 31;
    const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; i < n; i += nwarps) {
        const unsigned row = tri[3 * i], slot = tri[3 * i + 1], si = tri[3 * i + 2];
        int ok = 0;
        if (lane == 0) {
            const unsigned old = holder[slot];
            if (old != EST_EMPTY) est_map_remove(map, mask, shift, old, slot);
            ok = est_map_insert(map, mask, shift, row, slot);
            holder[slot] = ok ? row : EST_EMPTY;
        }
        ok = __shfl_sync(0xffffffffu, ok, 0);
        if (!ok) continue;
        const uint4* src = si != EST_EMPTY ? staged + (long long)si * row_vec : hk + (long long)row * row_vec;
        for (int c = lane; c < row_vec; c += 32) arena[(long long)slot * row_vec + c] = src[c];
    }
}

extern "C" __global__ void est_map_clear(unsigned long long* __restrict__ map, long long n) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x)
        map[e] = ~0ull;
}

extern "C" __global__ void est_map_rebuild(const unsigned* __restrict__ holder, int cap,
                                           unsigned long long* __restrict__ map, unsigned mask,
                                           unsigned shift) {
    for (long long s = blockIdx.x * (long long)blockDim.x + threadIdx.x; s < cap;
         s += (long long)gridDim.x * blockDim.x) {
        const unsigned r = holder[s];
        if (r != EST_EMPTY) est_map_insert(map, mask, shift, r, (unsigned)s);
    }
}

// Reference bytes (one per slot, 64 a word, the buffer padded to whole
// words) -> packed bits for words w0, w0+1, .. (cyclic over n_words),
// written to `out` (mapped pinned memory); the bytes are cleared.
extern "C" __global__ void est_ref_pack(uint4* __restrict__ ref, int w0, int nw, int n_words,
                                        unsigned long long* __restrict__ out) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < nw; i += gridDim.x * blockDim.x) {
        const int w = (w0 + i) % n_words;
        uint4* p = ref + (long long)w * 4;
        unsigned long long bits = 0;
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const uint4 v = p[q];
            const unsigned x[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int k = 0; k < 4; k++)
#pragma unroll
                for (int j = 0; j < 4; j++)
                    if ((x[k] >> (8 * j)) & 0xffu) bits |= 1ull << (q * 16 + k * 4 + j);
        }
        if (bits) {
#pragma unroll
            for (int q = 0; q < 4; q++) p[q] = make_uint4(0, 0, 0, 0);
        }
        out[i] = bits;
    }
}

// ---- Shared: exclusive prefix sum of `v` over the CTA (blockDim.x a
// multiple of 32, at most 1024; every thread calls it); *total = the sum.
__device__ __forceinline__ int cta_excl_scan(int v, int* total) {
    __shared__ int ws[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) ws[w] = x;
    __syncthreads();
    if (w == 0) {
        int s = lane < nw ? ws[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        ws[lane] = s;
    }
    __syncthreads();
    const int excl = x - v + (w > 0 ? ws[w - 1] : 0);
    *total = ws[nw - 1];
    __syncthreads();
    return excl;
}

// Copy one head block (K and V, `bv` 16-byte vectors each) host -> slot.
// unrolled: four iterations' loads (8 vectors per thread) in flight before
// the first store, instead of two (the plain loop). Same bits either way.
__device__ __forceinline__ void copy_block(const uint4* __restrict__ hk, const uint4* __restrict__ hv,
                                           uint4* __restrict__ sk, uint4* __restrict__ sv, long long src,
                                           long long dst, int bv, bool unrolled) {
    if (!unrolled) {
        for (int e = threadIdx.x; e < bv; e += blockDim.x) {
            const uint4 a = hk[src + e];
            const uint4 b = hv[src + e];
            sk[dst + e] = a;
            sv[dst + e] = b;
        }
        return;
    }
    for (int e0 = threadIdx.x; e0 < bv; e0 += 4 * blockDim.x) {
        uint4 a[4], b[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int e = e0 + u * blockDim.x;
            if (e < bv) {
                a[u] = hk[src + e];
                b[u] = hv[src + e];
            }
        }
#pragma unroll
        for (int u = 0; u < 4; u++) {
            const int e = e0 + u * blockDim.x;
            if (e < bv) {
                sk[dst + e] = a[u];
                sv[dst + e] = b[u];
            }
        }
    }
}

// ---- Device page cache (offload.rs, PagePolicy::Device). The policy runs
// on the device from the device selection (no read-back): pc_walk(mode 0)
// marks the step's head blocks (dedup by a per-block step stamp), hits set
// their slot's step and CLOCK reference byte, misses are listed; pc_clock
// (one CTA) sorts the misses by block id, picks victims by CLOCK (at most two
// turns; slots used this step are never taken) and updates the block <->
// slot maps; pc_walk(mode 1) writes the step's slot-table entries and, in
// its extra CTAs, copies the filled blocks host -> slot. CPU twin:
// kv::PageClock (same choices, tested against these kernels on the GPU).
// ctr: [0] hits this step, [1] misses listed, [2] hand, [3] fills, [4] error.
// stats (mapped pinned, cumulative): [0] hits, [1] misses, [2] evictions,
// [3] failed steps, [4] steps.
extern "C" __global__ void pc_walk(int mode, const int* __restrict__ ranges, const int* __restrict__ cnt,
                                   int cap, int rows, int hkv, int ps, const int* __restrict__ ptable,
                                   int pstride, const int* __restrict__ pins, int n_pins, unsigned step,
                                   unsigned* __restrict__ stamp, int* __restrict__ block_slot,
                                   unsigned* __restrict__ slot_step, unsigned char* __restrict__ slot_ref,
                                   int* __restrict__ miss, int miss_cap, unsigned* __restrict__ ctr,
                                   int* __restrict__ table, int tstride, const uint4* __restrict__ hk,
                                   const uint4* __restrict__ hv, uint4* __restrict__ sk, uint4* __restrict__ sv,
                                   const int* __restrict__ victim, int block_vec) {
    const int r = blockIdx.x;
    const int n_walk = rows + n_pins * hkv;
    if (r >= n_walk) {
        // mode 1, copy CTAs: the step's fills (miss[i] -> victim[i]).
        const int nf = (int)ctr[3];
        for (int i = r - n_walk; i < nf; i += gridDim.x - n_walk)
            copy_block(hk, hv, sk, sv, (long long)miss[i] * block_vec, (long long)victim[i] * block_vec,
                       block_vec, true);
        return;
    }
    int b, h, n;
    const int* rg;
    if (r < rows) {
        b = r / hkv;
        h = r % hkv;
        n = cnt[r];
        rg = ranges + 2LL * r * cap;
    } else {
        const int j = (r - rows) / hkv;
        b = pins[3 * j];
        h = (r - rows) % hkv;
        n = 1;
        rg = pins + 3 * j + 1;
    }
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int s0 = rg[2 * i], s1 = rg[2 * i + 1];
        for (int p = s0 / ps; s1 > s0 && p < (s1 + ps - 1) / ps; p++) {
            const int hb = ptable[(long long)b * pstride + p] * hkv + h;
            if (mode == 0) {
                if (atomicExch(stamp + hb, step) == step) continue;
                const int s = block_slot[hb];
                if (s >= 0) {
                    slot_step[s] = step;
                    slot_ref[s] = 1;
                    atomicAdd(ctr + 0, 1u);
                } else {
                    const unsigned k = atomicAdd(ctr + 1, 1u);
                    if (k < (unsigned)miss_cap) miss[k] = hb;
                }
            } else {
                // A block left unresolved (error flag set) reads slot 0, never
                // out of bounds; the host reports the error.
                table[(long long)b * tstride + p * hkv + h] = max(block_slot[hb], 0);
            }
        }
    }
}

// Bitonic sort of a[0..P) ascending (P a power of two) by one CTA.
__device__ void cta_bitonic(int* a, int P) {
    for (int k = 2; k <= P; k <<= 1)
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < P; i += blockDim.x) {
                const int l = i ^ j;
                if (l > i) {
                    const int x = a[i], y = a[l];
                    if ((x > y) == ((i & k) == 0)) {
                        a[i] = y;
                        a[l] = x;
                    }
                }
            }
            __syncthreads();
        }
}

// One CTA. `scratch`: next power of two >= miss_cap ints.
extern "C" __global__ void pc_clock(int n_slots, unsigned step, int* __restrict__ miss, int miss_cap,
                                    int* __restrict__ scratch, int* __restrict__ block_slot,
                                    int* __restrict__ slot_block, unsigned* __restrict__ slot_step,
                                    unsigned char* __restrict__ slot_ref, int* __restrict__ victim,
                                    unsigned* __restrict__ ctr, unsigned long long* __restrict__ stats) {
    __shared__ int s_cut, s_evict;
    __shared__ int sh[4096];
    const unsigned listed = ctr[1];
    const int n = (int)min(listed, (unsigned)miss_cap);
    int P = 1;
    while (P < n) P <<= 1;
    int* a = P <= 4096 ? sh : scratch;
    for (int i = threadIdx.x; i < P; i += blockDim.x) a[i] = i < n ? miss[i] : 0x7fffffff;
    if (threadIdx.x == 0) s_evict = 0;
    __syncthreads();
    cta_bitonic(a, P);
    for (int i = threadIdx.x; i < n; i += blockDim.x) miss[i] = a[i];
    __syncthreads();
    const int hand = (int)ctr[2];
    const long long limit = 2LL * n_slots;
    const int chunk = min(n_slots, (int)blockDim.x);
    int taken = 0;
    long long pos = 0;
    while (taken < n && pos < limit) {
        const int j = threadIdx.x;
        const bool in = j < chunk && pos + j < limit;
        int s = 0, elig = 0;
        if (in) {
            s = (int)((hand + pos + j) % n_slots);
            elig = slot_step[s] != step && (slot_block[s] < 0 || slot_ref[s] == 0);
        }
        int tot;
        const int rk = cta_excl_scan(elig, &tot);
        const int need = n - taken;
        int cut;
        if (tot >= need) {
            if (elig && rk == need - 1) s_cut = j + 1;
            __syncthreads();
            cut = s_cut;
        } else {
            cut = (int)min((long long)chunk, limit - pos);
        }
        if (in && j < cut) {
            if (elig) {
                victim[taken + rk] = s;
                slot_step[s] = step;
            } else {
                slot_ref[s] = 0;
            }
        }
        taken += min(tot, need);
        pos += cut;
        __syncthreads();
    }
    for (int i = threadIdx.x; i < taken; i += blockDim.x) {
        const int s = victim[i], hb = miss[i];
        const int old = slot_block[s];
        if (old >= 0) {
            block_slot[old] = -1;
            atomicAdd(&s_evict, 1);
        }
        slot_block[s] = hb;
        block_slot[hb] = s;
        slot_ref[s] = 1;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const bool fail = taken < n || listed > (unsigned)miss_cap;
        ctr[2] = (unsigned)((hand + pos) % n_slots);
        ctr[3] = (unsigned)taken;
        if (fail) ctr[4] = 1;
        stats[0] += ctr[0];
        stats[1] += listed;
        stats[2] += (unsigned long long)s_evict;
        stats[3] += fail ? 1 : 0;
        stats[4] += 1;
        ctr[0] = 0;
        ctr[1] = 0;
    }
}

// Appended tokens written through to resident slots: triples (host row,
// head block, offset in the block); the slot comes from the device map.
extern "C" __global__ void pc_rows(const uint4* __restrict__ hk, const uint4* __restrict__ hv,
                                   uint4* __restrict__ sk, uint4* __restrict__ sv, const int* __restrict__ tri,
                                   int n, int row_vec, int ps, const int* __restrict__ block_slot) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < (long long)n * row_vec;
         e += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(e / row_vec), c = (int)(e % row_vec);
        const int s = block_slot[tri[3 * i + 1]];
        if (s < 0) continue;
        const long long src = (long long)tri[3 * i] * row_vec + c;
        const long long dst = ((long long)s * ps + tri[3 * i + 2]) * row_vec + c;
        sk[dst] = hk[src];
        sv[dst] = hv[src];
    }
}

// ---- Estimation row cache, admission wholly on the device (est_cache.rs,
// Admission::Device). Same choices as the host-side path (kv::dedup_rows
// over the reversed miss list, then kv::ClockBits over the reference
// bytes; CPU twin kv::device_admission_twin): ea_mark records each row's
// last list position; ea_count counts, per CTA piece, the reversed list's
// first occurrences (dedup) and, per chunk of slots from the hand, the
// unreferenced slots (CLOCK); ea_scatter lists the unique rows in order and
// (its last CTA) scans the chunk counts to find how far the hand goes;
// ea_take lists the victims and clears the passed reference bytes;
// ea_admit updates the table and copies rows (est_admit_dev's body);
// ea_clear / ea_rebuild rebuild the table when tombstones pile up, and the
// last CTA of ea_rebuild finalizes the step (hand, counters, stats).
// adm: [0] unique rows, [1] taken, [2] hand, [3] full turn, [4] evictions
// this step, [5] tombstones, [6] new hand, [7] CTAs done.
// stats (mapped pinned, cumulative): [0] hits, [1] misses, [2] unlogged,
// [3] admitted, [4] evictions, [5] rebuilds, [6] steps.
__device__ __forceinline__ int ea_logged(const unsigned* counters, int miss_cap) {
    return (int)min(counters[2], (unsigned)miss_cap);
}

extern "C" __global__ void ea_mark(const unsigned* __restrict__ list, const unsigned* __restrict__ counters,
                                   int miss_cap, unsigned* __restrict__ last) {
    const int L = ea_logged(counters, miss_cap);
    for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < L; p += gridDim.x * blockDim.x)
        atomicMax(last + list[p], (unsigned)p + 1);
}

// Piece of CTA g (of G) over the reversed list positions q in [q0, q1).
__device__ __forceinline__ void ea_piece(int L, int G, int g, int* q0, int* q1) {
    const int per = (L + G - 1) / G;
    *q0 = min(L, g * per);
    *q1 = min(L, *q0 + per);
}

extern "C" __global__ void ea_count(const unsigned* __restrict__ list, const unsigned* __restrict__ counters,
                                    int miss_cap, const unsigned* __restrict__ last, int G,
                                    int* __restrict__ dcnt, const unsigned char* __restrict__ refb, int cap,
                                    const unsigned* __restrict__ adm, int C, int* __restrict__ ccnt) {
    int c = 0, tot;
    if ((int)blockIdx.x < G) {
        const int L = ea_logged(counters, miss_cap);
        int q0, q1;
        ea_piece(L, G, blockIdx.x, &q0, &q1);
        for (int q = q0 + threadIdx.x; q < q1; q += blockDim.x) {
            const int p = L - 1 - q;
            c += last[list[p]] == (unsigned)p + 1;
        }
        cta_excl_scan(c, &tot);
        if (threadIdx.x == 0) dcnt[blockIdx.x] = tot;
    } else {
        const int k = blockIdx.x - G;
        const long long hand = adm[2];
        const int j0 = k * C, j1 = min(cap, j0 + C);
        for (int j = j0 + threadIdx.x; j < j1; j += blockDim.x) c += refb[(hand + j) % cap] == 0;
        cta_excl_scan(c, &tot);
        if (threadIdx.x == 0) ccnt[k] = tot;
    }
}

extern "C" __global__ void ea_scatter(const unsigned* __restrict__ list, const unsigned* __restrict__ counters,
                                      int miss_cap, const unsigned* __restrict__ last, int G,
                                      const int* __restrict__ dcnt, int max_admit, unsigned* __restrict__ urow,
                                      unsigned* __restrict__ upos, const int* __restrict__ ccnt, int nchunks,
                                      int* __restrict__ cpre, unsigned* __restrict__ adm) {
    int tot;
    if ((int)blockIdx.x < G) {
        const int L = ea_logged(counters, miss_cap);
        int pre = 0;
        for (int g = threadIdx.x; g < (int)blockIdx.x; g += blockDim.x) pre += dcnt[g];
        cta_excl_scan(pre, &tot);
        int base = tot;
        int q0, q1;
        ea_piece(L, G, blockIdx.x, &q0, &q1);
        for (int qb = q0; qb < q1 && base < max_admit; qb += blockDim.x) {
            const int q = qb + threadIdx.x;
            const int p = L - 1 - q;
            const unsigned row = q < q1 ? list[p] : 0u;
            const int f = q < q1 && last[row] == (unsigned)p + 1;
            const int rk = cta_excl_scan(f, &tot);
            if (f && base + rk < max_admit) {
                urow[base + rk] = row;
                upos[base + rk] = (unsigned)p;
            }
            base += tot;
        }
        return;
    }
    // The extra CTA: how far the CLOCK hand goes.
    int nu = 0;
    for (int g = threadIdx.x; g < G; g += blockDim.x) nu += dcnt[g];
    cta_excl_scan(nu, &nu);
    const int n = min(nu, max_admit);
    int run = 0;
    for (int k0 = 0; k0 < nchunks; k0 += blockDim.x) {
        const int k = k0 + threadIdx.x;
        const int v = k < nchunks ? ccnt[k] : 0;
        const int ex = cta_excl_scan(v, &tot);
        if (k < nchunks) cpre[k] = run + ex;
        run += tot;
    }
    if (threadIdx.x == 0) {
        adm[0] = (unsigned)nu;
        adm[1] = (unsigned)min(n, run);
        adm[3] = run < n ? 1u : 0u;
    }
}

extern "C" __global__ void ea_take(unsigned char* __restrict__ refb, int cap, int C,
                                   const int* __restrict__ cpre, unsigned* __restrict__ adm,
                                   unsigned* __restrict__ victim) {
    const int k = blockIdx.x;
    const int take = (int)adm[1];
    const bool full = adm[3] != 0;
    if (!full && cpre[k] >= take) return;
    const long long hand = adm[2];
    const int j0 = k * C, j1 = min(cap, j0 + C);
    int base = cpre[k], tot;
    for (int jb = j0; jb < j1; jb += blockDim.x) {
        const int j = jb + threadIdx.x;
        const int s = (int)((hand + j) % cap);
        const int f = j < j1 && refb[s] == 0;
        const int rk = base + cta_excl_scan(f, &tot);
        if (j < j1) {
            if (f && rk < take) {
                victim[rk] = (unsigned)s;
                if (rk == take - 1 && !full) adm[6] = (unsigned)((hand + j + 1) % cap);
            } else if (!f && (full || rk < take)) {
                refb[s] = 0;
            }
        }
        base += tot;
    }
}

extern "C" __global__ void ea_admit(const uint4* __restrict__ staged, const uint4* __restrict__ hk,
                                    uint4* __restrict__ arena, const unsigned* __restrict__ urow,
                                    const unsigned* __restrict__ upos, const unsigned* __restrict__ victim,
                                    unsigned* __restrict__ adm, int stage_cap, int row_vec,
                                    unsigned* __restrict__ holder, unsigned long long* __restrict__ map,
                                    unsigned mask, unsigned shift, const unsigned* __restrict__ list,
                                    const unsigned* __restrict__ counters, int miss_cap,
                                    unsigned* __restrict__ last) {
    const int lane = threadIdx.x & 31;
    const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    const int take = (int)adm[1];
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; i < take; i += nwarps) {
        const unsigned row = urow[i], slot = victim[i], pos = upos[i];
        int ok = 0;
        if (lane == 0) {
            const unsigned old = holder[slot];
            if (old != EST_EMPTY) {
                est_map_remove(map, mask, shift, old, slot);
                atomicAdd(adm + 4, 1u);
            }
            ok = est_map_insert(map, mask, shift, row, slot);
            holder[slot] = ok ? row : EST_EMPTY;
        }
        ok = __shfl_sync(0xffffffffu, ok, 0);
        if (!ok) continue;
        const uint4* src = staged && (int)pos < stage_cap ? staged + (long long)pos * row_vec
                                                          : hk + (long long)row * row_vec;
        for (int c = lane; c < row_vec; c += 32) arena[(long long)slot * row_vec + c] = src[c];
    }
    const int L = ea_logged(counters, miss_cap);
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < L;
         p += (long long)gridDim.x * blockDim.x)
        last[list[p]] = 0;
}

__device__ __forceinline__ bool ea_rebuild_now(const unsigned* adm, unsigned lim) {
    return adm[5] + adm[4] > lim;
}

extern "C" __global__ void ea_clear(unsigned long long* __restrict__ map, long long n,
                                    const unsigned* __restrict__ adm, unsigned lim) {
    if (!ea_rebuild_now(adm, lim)) return;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x)
        map[e] = ~0ull;
}

extern "C" __global__ void ea_rebuild(const unsigned* __restrict__ holder, int cap,
                                      unsigned long long* __restrict__ map, unsigned mask, unsigned shift,
                                      unsigned* __restrict__ adm, unsigned lim, unsigned* __restrict__ counters,
                                      int miss_cap, unsigned long long* __restrict__ stats) {
    const bool now = ea_rebuild_now(adm, lim);
    if (now) {
        for (long long s = blockIdx.x * (long long)blockDim.x + threadIdx.x; s < cap;
             s += (long long)gridDim.x * blockDim.x) {
            const unsigned r = holder[s];
            if (r != EST_EMPTY) est_map_insert(map, mask, shift, r, (unsigned)s);
        }
    }
    // The last CTA to finish closes the step.
    __threadfence();
    __syncthreads();
    __shared__ unsigned s_last;
    if (threadIdx.x == 0) s_last = atomicAdd(adm + 7, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!s_last || threadIdx.x != 0) return;
    __threadfence();
    const unsigned listed = counters[2];
    const unsigned ev = adm[4], take = adm[1];
    stats[0] += counters[0];
    stats[1] += counters[1];
    stats[2] += listed > (unsigned)miss_cap ? listed - (unsigned)miss_cap : 0u;
    stats[3] += take;
    stats[4] += ev;
    stats[5] += now ? 1 : 0;
    stats[6] += 1;
    adm[5] = now ? 0u : adm[5] + ev;
    if (take > 0 && adm[3] == 0) adm[2] = adm[6];
    adm[4] = 0;
    adm[7] = 0;
    counters[0] = 0;
    counters[1] = 0;
    counters[2] = 0;
}

// ---- Bus probes (bench-gpu-offload --bus): the copy patterns above on
// their own, timed against a DMA copy (cuMemcpyHtoDAsync) of the same bytes.
// bus_rows: gather n host rows (row ids `rows`, row_vec 16-byte vectors)
// into dst[i]. warp 0: one thread per row, 8 vectors in flight
// (est_stage_row's pattern); warp 1: row_vec lanes per row side by side, 16
// loads in flight per lane (est_fetch_warp's pattern).
extern "C" __global__ void bus_rows(const uint4* __restrict__ host, uint4* __restrict__ dst,
                                    const unsigned* __restrict__ rows, int n, int row_vec, int warp) {
    if (!warp) {
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
             i += (long long)gridDim.x * blockDim.x) {
            const uint4* s = host + (long long)rows[i] * row_vec;
            uint4* d = dst + i * row_vec;
            for (int c0 = 0; c0 < row_vec; c0 += 8) {
                uint4 b[8];
#pragma unroll
                for (int k = 0; k < 8; k++)
                    if (c0 + k < row_vec) b[k] = s[c0 + k];
#pragma unroll
                for (int k = 0; k < 8; k++)
                    if (c0 + k < row_vec) d[c0 + k] = b[k];
            }
        }
        return;
    }
    const int lane = threadIdx.x & 31;
    const int R = row_vec >= 32 ? 1 : 32 / row_vec;
    const int c = lane % row_vec, r0 = lane / row_vec;
    const long long nw = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long w0 = ((blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5) * 32; w0 < n; w0 += nw * 32) {
        const int nm = (int)min(32LL, n - w0);
        uint4 b[16];
#pragma unroll
        for (int k = 0; k < 16; k++) {
            const int m = r0 + k * R;
            if (m < nm && m < 32) b[k] = host[(long long)rows[w0 + m] * row_vec + c];
        }
#pragma unroll
        for (int k = 0; k < 16; k++) {
            const int m = r0 + k * R;
            if (m < nm && m < 32) dst[(w0 + m) * row_vec + c] = b[k];
        }
    }
}

// bus_blocks: copy n head blocks (K and V) host -> slots as pc_walk's copy
// CTAs do: list[i] -> slot i, plain or unrolled loop.
extern "C" __global__ void bus_blocks(const uint4* __restrict__ hk, const uint4* __restrict__ hv,
                                      uint4* __restrict__ sk, uint4* __restrict__ sv,
                                      const int* __restrict__ list, int n, int bv, int unrolled) {
    for (int i = blockIdx.x; i < n; i += gridDim.x)
        copy_block(hk, hv, sk, sv, (long long)list[i] * bv, (long long)i * bv, bv, unrolled != 0);
}

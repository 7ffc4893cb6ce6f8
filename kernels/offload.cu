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

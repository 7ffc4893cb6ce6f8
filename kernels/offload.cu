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

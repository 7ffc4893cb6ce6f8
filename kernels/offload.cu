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

// Shared helpers for every kernel. No CUDA headers: NVRTC compiles these
// sources alone, so bf16/f16 conversions are written out here.
typedef unsigned short u16;
typedef unsigned int u32;

#define NEG_INF (__int_as_float(0xff800000))

struct Bf16 {
    static __device__ __forceinline__ float to_f32(u16 x) { return __uint_as_float(((u32)x) << 16); }
};
struct F16 {
    static __device__ __forceinline__ float to_f32(u16 x) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
        return f;
    }
};

// Eight consecutive elements (16 bytes) to f32.
template <typename E>
__device__ __forceinline__ void load8(const u16* p, float* out) {
    uint4 r = *reinterpret_cast<const uint4*>(p);
    u32 w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = E::to_f32((u16)(w[i] & 0xffff));
        out[2 * i + 1] = E::to_f32((u16)(w[i] >> 16));
    }
}

// Address of token `t`'s row of KV head `h` in a paged pool laid out
// [page][kv_head][page_size][D] (the core crate's KvPool page layout).
__device__ __forceinline__ long long kv_row(const int* table_row, int t, int h, int hkv, int ps, int D) {
    int page = table_row[t / ps];
    return (((long long)page * hkv + h) * ps + (t % ps)) * (long long)D;
}

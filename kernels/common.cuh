// Shared helpers for every kernel. No CUDA headers: NVRTC compiles these
// sources alone, so bf16/f16 conversions are written out here.
typedef unsigned short u16;
typedef unsigned int u32;

#define NEG_INF (__int_as_float(0xff800000))

// Programmatic dependent launch (Hopper+; backend/cuda/mod.rs `Launch`):
// kernels that the host may launch with the programmatic-serialization
// attribute start with this, before any other statement. The trigger lets
// the next such kernel in the stream (or the graph) be launched and its
// CTAs made resident while this one still runs (its launch latency hidden);
// the wait then blocks every thread until the previous kernel has completed
// and its memory is visible, so the kernel reads nothing early: the same
// ordering as a plain launch. Without the attribute both are no-ops.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define IHIP_PDL_ENTRY() asm volatile("griddepcontrol.launch_dependents;\n\tgriddepcontrol.wait;" ::: "memory")
// The two halves, for a kernel that loads what no earlier kernel can still
// be writing before it waits (decode_dense_v2.cu's early loads), and lets
// the next kernel launch only after its own wait.
#define IHIP_PDL_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#define IHIP_PDL_TRIGGER() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#else
#define IHIP_PDL_ENTRY() \
    do {                 \
    } while (0)
#define IHIP_PDL_WAIT() \
    do {                \
    } while (0)
#define IHIP_PDL_TRIGGER() \
    do {                   \
    } while (0)
#endif

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

// Address (in elements) of token `t`'s row of KV head `h` in a paged K or V
// buffer: page = table_row[t / ps], then
//   page * page_stride + h * head_stride + (t % ps) * D.
// The core crate's KvPool page layout [page][kv_head][page_size][D] is
// page_stride = hkv * ps * D, head_stride = ps * D. An engine's token-major
// pool (SGLang k_buffer[layer] = [slots][kv_heads][D], llama.cpp's
// [D, n_head_kv, n_kv] view) is ps = 1, table = the request's slot row,
// page_stride = the tensor's slot stride, head_stride = its head stride.
// Strides are element counts (64-bit); rows must be 16-byte aligned.
__device__ __forceinline__ long long kv_row(const int* table_row, int t, int h, int ps, int D,
                                            long long page_stride, long long head_stride) {
    int page = table_row[t / ps];
    return (long long)page * page_stride + (long long)h * head_stride + (long long)(t % ps) * D;
}

// f32 to bf16 (round to nearest even; NaN stays NaN) and to f16.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

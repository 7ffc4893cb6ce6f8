// Mask estimation over keys in the host tier (backend/cuda/est_cache.rs).
// Prepended to hip_mask.cu with HIP_EST_HOST defined (module
// "hip_mask_host"): the scoring kernels' key pointer `kp` then points at an
// EstCache in device memory, and every probed key row is looked up in a
// device row cache: an open-addressing table (row id -> arena slot, linear
// probing, Fibonacci hash; a mirror of kv/row_cache.rs `RowSlotMap`, kept
// by the host). A hit reads the row from the device arena and marks its
// CLOCK reference bit; a miss reads it straight from the mapped pinned host
// memory (bit-identical) and appends the row id to the miss list, which the
// host admits after the step. Counters are warp-aggregated. With
// `miss_rows` set, a missed row is first copied whole into its miss-list
// position in device memory (all loads in flight at once) and scored from
// there; admission then copies device -> device.
struct EstCache {
    const u16* host_k;              // mapped pinned host K [page][hkv][ps][D]
    const u16* arena;               // [slot][D]
    const unsigned long long* map;  // (row << 32) | slot; empty = all ones; key 0xfffffffe = tombstone
    u32 map_mask;
    u32 map_shift;                  // 32 - log2(table size)
    u32* counters;                  // [0] hits, [1] misses, [2] miss list length
    u32* miss_list;
    u32 miss_cap;
    u32 stage_cap;                  // staged rows: the first stage_cap misses
    unsigned char* ref;             // per slot: read since the host's last sweep
    u16* miss_rows;                 // [miss_cap][D] staged copies of missed rows, or null
    u32 fetch_warp;                 // 1: a full warp stages its missed rows together (coalesced)
    // Bit 0: the search's 2-token ranges after the first level take their
    // right probe's score from the previous level (its chosen probe is that
    // row), as hip_scorew does: one row fewer read per search, same bits.
    // Bit 1 (mutation checks only): reuse the previous level's score at
    // EVERY later level, which is wrong and must change selections.
    u32 flags;
    // Pinned region (HostEstimation::set_pinned): the rows at page offsets
    // `pin_mask` (stage 0's upper search levels) of every host page whose
    // pin_valid byte is set, copied when the page was complete; they are
    // hits without a table lookup and never evicted (CLOCK runs over the
    // arena's slots only). pin_mask 0: no pinned region.
    const u16* pin_arena;           // [host page][hkv][pin_n][D]
    const unsigned char* pin_valid; // [host page]
    unsigned long long pin_mask;
    u32 pin_n;                      // popcount(pin_mask)
    u32 pad2_;
};
#define EST_REUSE_RIGHT 1u
#define EST_REUSE_UNSOUND 2u

// The warp's staged misses fetched together (fetch_warp, full warps only):
// NV = D/8 lanes read one row's 16-byte vectors side by side, so each load
// instruction moves 32 / NV whole rows (512 contiguous bytes per two rows at
// D = 128) instead of 32 scattered 16-byte pieces, and all of the warp's
// loads are in flight before the first store. `need`: lanes whose miss is
// staged at staging index `si` from host row `row`. Bits equal the
// per-thread copy's (same source row, same destination).
template <int D>
__device__ __forceinline__ void est_fetch_warp(const uint4* __restrict__ host, uint4* __restrict__ stage,
                                               u32 row, u32 si, unsigned need, int lane) {
    constexpr int NV = D / 8;
    constexpr int R = NV >= 32 ? 1 : 32 / NV;  // rows per warp-wide load
    constexpr int K = 32 / R;                  // loads per lane for 32 rows
    const int nm = __popc(need);
    // Lane L learns the host row and staging index of the warp's L-th miss.
    unsigned x = need;
    for (int t = 0; t < lane && x; t++) x &= x - 1u;
    const int src = x ? __ffs(x) - 1 : 0;
    const u32 row_l = __shfl_sync(0xffffffffu, row, src);
    const u32 si_l = __shfl_sync(0xffffffffu, si, src);
    const int c = lane % NV, r0 = lane / NV;
    constexpr int G = K < 16 ? K : 16;  // loads in flight per lane (registers: 4 G)
#pragma unroll 1
    for (int k0 = 0; k0 < K && k0 * R < nm; k0 += G) {
        uint4 b[G];
#pragma unroll
        for (int k = 0; k < G; k++) {
            const int m = r0 + (k0 + k) * R;
            const u32 rr = __shfl_sync(0xffffffffu, row_l, m & 31);
            if (m < nm) b[k] = host[(long long)rr * NV + c];
        }
#pragma unroll
        for (int k = 0; k < G; k++) {
            const int m = r0 + (k0 + k) * R;
            const u32 ss = __shfl_sync(0xffffffffu, si_l, m & 31);
            if (m < nm) stage[(long long)ss * NV + c] = b[k];
        }
    }
    __syncwarp();
}

// Copy one row host -> device staging with all of its 16-byte loads in
// flight together (chunks of 8 vectors), instead of the scoring loop's few
// dependent round trips over the bus.
__device__ __forceinline__ void est_stage_row(const uint4* __restrict__ src, uint4* __restrict__ dst,
                                              int nvec) {
    for (int c0 = 0; c0 < nvec; c0 += 8) {
        uint4 b[8];
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (c0 + i < nvec) b[i] = src[c0 + i];
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (c0 + i < nvec) dst[c0 + i] = b[i];
    }
}

template <int D>
__device__ __forceinline__ const u16* est_key_row(const u16* kp, const int* trow, int t, int h,
                                                  int hkv, int ps) {
    const EstCache* ec = reinterpret_cast<const EstCache*>(kp);
    const u32 pg = (u32)trow[t / ps];
    const u32 row = (pg * (u32)hkv + (u32)h) * (u32)ps + (u32)(t % ps);
    const u16* pinned = nullptr;
    if (ec->pin_mask) {
        const int o = t % ps;
        if (((ec->pin_mask >> o) & 1ull) && ec->pin_valid[pg])
            pinned = ec->pin_arena +
                     ((long long)(pg * (u32)hkv + (u32)h) * ec->pin_n + __popcll(ec->pin_mask & ((1ull << o) - 1ull))) * D;
    }
    u32 b = (row * 2654435761u) >> ec->map_shift;
    int slot = -1;
    for (; !pinned;) {
        const unsigned long long e = ec->map[b];
        const u32 key = (u32)(e >> 32);
        if (key == row) {
            slot = (int)(u32)e;
            break;
        }
        if (key == 0xffffffffu) break;
        b = (b + 1) & ec->map_mask;
    }
    const unsigned mask = __activemask();
    const int lane = threadIdx.x & 31;
    const int leader = __ffs(mask) - 1;
    const unsigned hm = __ballot_sync(mask, slot >= 0 || pinned != nullptr);
    const unsigned mm = mask & ~hm;
    u32 base = 0;
    if (lane == leader) {
        if (hm) atomicAdd(&ec->counters[0], (u32)__popc(hm));
        if (mm) {
            atomicAdd(&ec->counters[1], (u32)__popc(mm));
            base = atomicAdd(&ec->counters[2], (u32)__popc(mm));
        }
    }
    base = __shfl_sync(mask, base, leader);
    if (slot >= 0) ec->ref[slot] = 1;
    const u32 i = base + (u32)__popc(mm & ((1u << lane) - 1u));
    const u16* src = ec->host_k + (long long)row * D;
    // Past the list's end, the part after the staged prefix is a ring: a
    // step whose misses overflow the list keeps its LAST misses (the later
    // stages', re-read at every refresh of their stage) and overwrites the
    // middle ones. Only the first stage_cap misses are staged.
    u32 p = i;
    if (i >= ec->miss_cap && ec->miss_cap > ec->stage_cap)
        p = ec->stage_cap + (i - ec->stage_cap) % (ec->miss_cap - ec->stage_cap);
    const bool logged = slot < 0 && !pinned && p < ec->miss_cap;
    if (logged) ec->miss_list[p] = row;
    const bool staged = logged && ec->miss_rows && i < ec->stage_cap;
    if (ec->fetch_warp && mask == 0xffffffffu) {
        const unsigned need = __ballot_sync(mask, staged);
        if (need)
            est_fetch_warp<D>(reinterpret_cast<const uint4*>(ec->host_k), reinterpret_cast<uint4*>(ec->miss_rows),
                              row, i, need, lane);
        if (staged) return ec->miss_rows + (long long)i * D;
    } else if (staged) {
        u16* dst = ec->miss_rows + (long long)i * D;
        est_stage_row(reinterpret_cast<const uint4*>(src), reinterpret_cast<uint4*>(dst), D / 8);
        return dst;
    }
    if (pinned) return pinned;
    if (slot >= 0) return ec->arena + (long long)slot * D;
    return src;
}

// Graph-capturable engine decode (engine_attn/graph.rs): per-step metadata
// computed on the device from the engine's own device tensors (SGLang's
// req_pool_indices / seq_lens), so a captured step uploads nothing and
// never waits on the host.
//
// hip state lives per TABLE ROW (one request per row at a time, as
// SGLang's req_to_token), in `row_state` i32 [n_rows][4] = {decode steps
// since the request's reset, length at its last decode, its first page id,
// end of its middle when stage 0 last ran}, and per stage in
// [n_rows][hkv][cap] ranges + [n_rows][hkv] counts. The step works on
// positional scratch (position b of the batch, rows b * hkv + h).

// rows/lens of position b from int32 or int64 device arrays.
__device__ __forceinline__ int gs_load(const void* p, int is64, int b) {
    return is64 ? (int)((const long long*)p)[b] : ((const int*)p)[b];
}

// One CTA, one thread per position (bs <= blockDim.x <= 1024). Writes the
// i32 rows/lens every launch reads (clamped into the table: rows to
// 0..n_rows-1, lengths to 1..cap_tokens). hkv == 0: a dense layer, nothing else.
// For a hip layer, as the host path (engine_attn hip_select + HipLayer::
// refresh_from): a request's first decode (a new request in the row: its
// length is not the last one + 1, or its first page changed; or a prefill
// reset the row) refreshes every stage, later steps from the first stage
// whose interval divides the step; a slid range over slid_cap forces a full
// refresh (it keeps the selection under the fixed attention bound; one
// token per step never reaches it). gate[1] = the smallest refresh stage
// of the batch (hip_score / hip_topk skip later-only stages); positions
// whose own stage is later get their old stage output back (gs_stage_copy).
// Only the first position of a row ("owner") writes the row's state
// (padding positions repeat a row). CTAs 1.. (if any) meanwhile convert the
// engine's queries to the kernels' f32 (as decode.cu q_to_f32: row r of bs
// reads hqd elements at q_src + r * q_stride of dtype q_dtype (0 f32, 1 f16,
// 2 bf16) times q_mul), one launch fewer per layer and step.
extern "C" __global__ void __launch_bounds__(1024)
    gs_meta(const void* rows_in, int rows64, const void* lens_in, int lens64, int bs, int n_rows, int cap_tokens,
            const int* __restrict__ table,
            long long table_stride, int* __restrict__ rows_out, int* __restrict__ lens_out, int hkv, int sink,
            int window, const int* __restrict__ intervals, int n_stages, int slid_cap, int* __restrict__ row_state,
            int* __restrict__ pos_from, int* __restrict__ owner, int* __restrict__ gate, int2* __restrict__ stage0_in,
            int2* __restrict__ extra, const void* __restrict__ q_src, int q_dtype, long long q_stride, int hqd,
            float q_mul, float* __restrict__ q_dst) {
    IHIP_PDL_ENTRY();
    if (blockIdx.x > 0) {
        const long long n = (long long)bs * hqd;
        for (long long i = (long long)(blockIdx.x - 1) * blockDim.x + threadIdx.x; i < n;
             i += (long long)(gridDim.x - 1) * blockDim.x) {
            const long long r = i / hqd, c = i % hqd, at = r * q_stride + c;
            float x;
            if (q_dtype == 0) x = ((const float*)q_src)[at];
            else if (q_dtype == 1) x = F16::to_f32(((const u16*)q_src)[at]);
            else x = Bf16::to_f32(((const u16*)q_src)[at]);
            q_dst[i] = x * q_mul;
        }
        return;
    }
    __shared__ int s_min;
    const int b = threadIdx.x;
    if (b == 0) s_min = n_stages;
    __syncthreads();
    int row = 0, len = 1;
    if (b < bs) {
        row = min(max(gs_load(rows_in, rows64, b), 0), n_rows - 1);
        len = min(max(gs_load(lens_in, lens64, b), 1), cap_tokens);
        rows_out[b] = row;
        lens_out[b] = len;
    }
    __syncthreads();  // rows_out is read across positions below
    if (hkv == 0) return;
    int own = 0, step = 0, first = 0, mid_end = 0;
    int* st = row_state + (long long)row * 4;
    if (b < bs) {
        own = 1;
        for (int j = 0; j < b; j++)
            if (rows_out[j] == row) own = 0;
        step = st[0];
        first = table[(long long)row * table_stride];
        if (st[1] + 1 != len || st[2] != first) step = 0;
        int from = n_stages;
        if (step == 0) {
            from = 0;
        } else {
            for (int i = n_stages - 1; i >= 0; i--)
                if (step % intervals[i] == 0) from = i;
        }
        const int end = len;
        const int sink_end = min(sink, end);
        const int win_start = max(max(end - window, 0), sink_end);
        mid_end = st[3];
        if (from != 0 && win_start - max(mid_end, sink_end) > slid_cap) from = 0;
        if (from == 0) mid_end = win_start;
        for (int h = 0; h < hkv; h++) stage0_in[b * hkv + h] = make_int2(sink_end, win_start);
        extra[b * 3] = make_int2(0, sink_end);
        extra[b * 3 + 1] = make_int2(max(mid_end, sink_end), win_start);
        extra[b * 3 + 2] = make_int2(win_start, end);
        pos_from[b] = from;
        owner[b] = own;
        atomicMin(&s_min, from);
    }
    // Every position has read its row (and s_min is final) before any owner writes.
    __syncthreads();
    if (own) {
        st[0] = step + 1;
        st[1] = len;
        st[2] = first;
        st[3] = mid_end;
    }
    if (b == 0) {
        gate[0] = 0;
        gate[1] = s_min;
    }
}

// Stage `stage`'s output of position b: mode 0 (restore) copies the row's
// stored output into the scratch for positions that do not refresh this
// stage this step; mode 1 (store) copies the scratch into the row's store
// for owner positions that did. Row r = (position, kv head) of the CTA.
__device__ __forceinline__ void gs_copy(int mode, int stage, int r, const int* __restrict__ rows,
                                        const int* __restrict__ pos_from, const int* __restrict__ owner, int hkv,
                                        int cap, int2* __restrict__ row_out, int* __restrict__ row_cnt,
                                        int2* __restrict__ pos_out, int* __restrict__ pos_cnt) {
    const int b = r / hkv, h = r % hkv;
    const bool refreshed = pos_from[b] <= stage;
    const long long rr = (long long)rows[b] * hkv + h;
    if (mode == 0) {
        if (refreshed) return;
        const int n = row_cnt[rr];
        for (int i = threadIdx.x; i < n; i += blockDim.x) pos_out[(long long)r * cap + i] = row_out[rr * cap + i];
        if (threadIdx.x == 0) pos_cnt[r] = n;
    } else {
        if (!refreshed || !owner[b]) return;
        const int n = pos_cnt[r];
        for (int i = threadIdx.x; i < n; i += blockDim.x) row_out[rr * cap + i] = pos_out[(long long)r * cap + i];
        if (threadIdx.x == 0) row_cnt[rr] = n;
    }
}

// One CTA per (position, kv head).
extern "C" __global__ void __launch_bounds__(128)
    gs_stage_copy(int mode, int stage, const int* __restrict__ rows, const int* __restrict__ pos_from,
                  const int* __restrict__ owner, int hkv, int cap, int2* __restrict__ row_out,
                  int* __restrict__ row_cnt, int2* __restrict__ pos_out, int* __restrict__ pos_cnt) {
    IHIP_PDL_ENTRY();
    gs_copy(mode, stage, blockIdx.x, rows, pos_from, owner, hkv, cap, row_out, row_cnt, pos_out, pos_cnt);
}

// Mode 1 (store) of every stage in one launch: stage blockIdx.y, its
// buffers in desc[stage] = {row_out, row_cnt, pos_out, pos_cnt, cap} (i64,
// engine_attn/graph.rs RowStore::desc). The stages' buffers are disjoint.
extern "C" __global__ void __launch_bounds__(128)
    gs_store_stages(const int* __restrict__ rows, const int* __restrict__ pos_from, const int* __restrict__ owner,
                    int hkv, const long long* __restrict__ desc) {
    IHIP_PDL_ENTRY();
    const long long* d = desc + 5 * blockIdx.y;
    gs_copy(1, blockIdx.y, blockIdx.x, rows, pos_from, owner, hkv, (int)d[4], (int2*)d[0], (int*)d[1],
            (int2*)d[2], (int*)d[3]);
}

// A prefill resets rows: their next decode refreshes every stage (every hip
// layer's state, `n_layers` blocks of n_rows x 4 ints, `layer_stride` ints apart).
extern "C" __global__ void gs_reset_rows(const int* __restrict__ rows, int n, int* __restrict__ row_state,
                                         long long layer_stride, int n_layers) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * n_layers) return;
    const int l = i / n, j = i % n;
    row_state[l * layer_stride + (long long)rows[j] * 4 + 1] = -2;
}

/* infinitehip C ABI (libinfinitehip.so).
 *
 * Sparse long-context attention and KV management behind one policy config
 * (JSON; see the project README). The engine keeps, per layer, a paged KV
 * pool and that layer's policy (dense, hip, ...); callers register sequences,
 * append K/V as their model produces it and ask for attention.
 *
 * Conventions:
 *  - Functions returning int give IHIP_OK (0) or a negative IHIP_ERR_* code;
 *    the message is then in ihip_last_error() (thread-local, valid until the
 *    next failing call on the same thread).
 *  - No Rust panic crosses this boundary. A call that hit an internal panic
 *    returns IHIP_ERR_PANIC and poisons its handle (engine or GPU attention):
 *    later calls on it fail with IHIP_ERR_PANIC, and freeing it is the only
 *    thing left to do. (The C++ bridge of the llama.cpp plugin follows the
 *    same policy.)
 *  - Check ihip_abi_version() == IHIP_ABI_VERSION before any other call: a
 *    library of another ABI version has other signatures.
 *  - Caller indices (layers, table rows, lengths, counts) are checked on the
 *    host before any kernel sees them: a bad one is IHIP_ERR_ARG.
 *  - This header is kept in sync with src/*.rs by hand (a test checks that
 *    it declares exactly the exported functions and these constants).
 *  - Strings returned as char* are owned by the caller: free them with
 *    ihip_string_free. const char* results are owned by the library.
 *  - Arrays are contiguous, row-major, in host memory. Queries and outputs
 *    are float32; K/V may be float32, float16 or bfloat16 (IHIP_DTYPE_*).
 *  - One engine may be shared between threads; its calls are serialised.
 */
#ifndef INFINITEHIP_H
#define INFINITEHIP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ABI version this header describes (ihip_abi_version()). 2: table_n_rows
 * in ihip_gpu_decode / ihip_gpu_prefill / ihip_gpu_prefill_proj; codes -5..-7.
 * 3: ihip_read, ihip_evict. */
#define IHIP_ABI_VERSION 3

/* Error codes (stable values; new ones are only added). */
#define IHIP_OK 0
#define IHIP_ERR_ARG (-1)    /* invalid argument: NULL, shape, dtype, alignment, overflow, index out of range */
#define IHIP_ERR_ENGINE (-2) /* refused by the engine (unknown/duplicate sequence, bad config field, weights) */
#define IHIP_ERR_PANIC (-3)  /* internal bug caught; the handle is poisoned: free it */
#define IHIP_ERR_NO_GPU (-4) /* GPU call: built without CUDA, no driver, or device unusable */
#define IHIP_ERR_UNSUPPORTED (-5) /* valid request this build/route/kernels do not run (dtype, head_dim, method) */
#define IHIP_ERR_OOM (-6)    /* out of memory: KV pool full or device allocation failed */
#define IHIP_ERR_DEVICE (-7) /* device fault (CUDA error other than out-of-memory) */

#define IHIP_DTYPE_F32 0
#define IHIP_DTYPE_F16 1
#define IHIP_DTYPE_BF16 2

#define IHIP_PHASE_PREFILL 0
#define IHIP_PHASE_DECODE 1

typedef struct IhipEngine IhipEngine;

/* Library version ("0.1.0"). */
const char *ihip_version(void);

/* C ABI version of the loaded library; compare with IHIP_ABI_VERSION. */
uint32_t ihip_abi_version(void);

/* Last error message of the calling thread ("" if none). */
const char *ihip_last_error(void);

/* Free a string returned by this library (NULL is a no-op). */
void ihip_string_free(char *s);

/* Default policy config (Llama-3.1-8B shape) as JSON. NULL on failure. */
char *ihip_default_config_json(void);

/* Validate a config; the error message names the bad field. */
int ihip_config_check(const char *config_json);

/* Build an engine from a config JSON document; NULL on error. */
IhipEngine *ihip_engine_new(const char *config_json);

/* Destroy an engine (NULL is a no-op). */
void ihip_engine_free(IhipEngine *e);

/* Model shape of the engine; any out pointer may be NULL. */
int ihip_engine_shape(const IhipEngine *e, size_t *n_layers, size_t *n_q_heads,
                      size_t *n_kv_heads, size_t *head_dim);

/* Effective config (defaults filled in) as JSON; NULL on error. */
char *ihip_engine_config_json(const IhipEngine *e);

/* Sequences: ids are the caller's. fork: child shares parent's KV pages
 * (copy-on-write). free: releases KV and policy state in every layer. */
int ihip_add_sequence(const IhipEngine *e, uint64_t seq);
int ihip_fork_sequence(const IhipEngine *e, uint64_t parent, uint64_t child);
int ihip_free_sequence(const IhipEngine *e, uint64_t seq);

/* Tokens held for seq in layer (fewer than appended after eviction). */
int ihip_seq_len(const IhipEngine *e, size_t layer, uint64_t seq, size_t *out);

/* Copy entries [start, end) of seq in layer out as float32
 * [end - start][n_kv_heads][head_dim] into k_out and v_out (separate
 * buffers). After Locret's per-head eviction entry i of head h is head h's
 * i-th held unit, in original-position order. */
int ihip_read(const IhipEngine *e, size_t layer, uint64_t seq, size_t start, size_t end,
              float *k_out, float *v_out);

/* Run the eviction layer's policy owes for seq now (Locret: a finished
 * prompt's eviction, otherwise run at the next append). */
int ihip_evict(const IhipEngine *e, size_t layer, uint64_t seq);

/* Append K/V of n_tokens new tokens to one layer of seq.
 * k, v: [n_tokens][n_kv_heads][head_dim] of dtype, post-RoPE (may be NULL
 * when n_tokens is 0). proj_q/proj_k/proj_v: all NULL, or the tokens' pre-RoPE
 * float32 projections ([n][n_q_heads][d], [n][n_kv_heads][d] twice) for
 * policies that score at insertion. prompt_done: non-zero when these are the
 * last prompt tokens. */
int ihip_append(const IhipEngine *e, size_t layer, uint64_t seq, const void *k,
                const void *v, int dtype, size_t n_tokens, size_t n_kv_heads,
                size_t head_dim, int phase, int prompt_done, const float *proj_q,
                const float *proj_k, const float *proj_v);

/* Causal attention of the last n_tokens tokens of seq (K/V already
 * appended). q, out: float32 [n_tokens][n_q_heads][head_dim], post-RoPE,
 * non-overlapping. Softmax scale 1/sqrt(head_dim). */
int ihip_attend_prefill(const IhipEngine *e, size_t layer, uint64_t seq,
                        const float *q, size_t n_tokens, size_t n_q_heads,
                        size_t head_dim, float *out);

/* Decode attention for a batch: one query per sequence.
 * seqs: n_seqs ids; q, out: float32 [n_seqs][n_q_heads][head_dim]. */
int ihip_attend_decode(const IhipEngine *e, size_t layer, const uint64_t *seqs,
                       size_t n_seqs, const float *q, size_t n_q_heads,
                       size_t head_dim, float *out);

/* Per-layer stats as JSON {"layers":[{"layer","method","pages_in_use",
 * "pages_free","host_bytes","sequences","device_bytes","cache":{...},
 * "last_step":{...}}]}; NULL on error. */
char *ihip_stats_json(const IhipEngine *e);

/* ---- GPU: attention over the caller's own K/V device tensors ------------
 * Built with the cargo feature `cuda` (dynamic loading: no CUDA at build
 * time). Otherwise ihip_gpu_attn_new returns NULL with a message and the
 * other GPU calls return IHIP_ERR_NO_GPU; the same happens at run time
 * without an NVIDIA driver.
 * Every launch and copy goes to the caller's `stream` (a CUstream of the
 * device's primary context, e.g. torch.cuda.current_stream().cuda_stream;
 * 0 = the legacy default stream) and nothing waits on the host: the caller's
 * earlier writes on that stream are seen, the output is ready for its later
 * work. One handle must not be used from two streams at once. Device
 * pointers are passed as uint64_t; they must stay valid until the stream has
 * run the work. CUDA-graph capture is not supported (the small per-step
 * host arrays are copied at call time). */
typedef struct IhipGpuAttn IhipGpuAttn;

/* 1 when built with the `cuda` feature, else 0. */
int ihip_gpu_built(void);

/* GPU attention for the model and per-layer policies of config_json on CUDA
 * device `device`. NULL on error (reason in ihip_last_error), e.g. a
 * head_dim, GQA group or method the GPU kernels do not run. */
IhipGpuAttn *ihip_gpu_attn_new(int device, const char *config_json);

/* Free (NULL is a no-op); synchronise the stream first. */
void ihip_gpu_attn_free(IhipGpuAttn *a);

/* Decode, one query per request (batch of mixed lengths, one attention
 * launch). Host arrays of `batch` elements: req_ids (key of the hip
 * mask-refresh state), table_rows (the request's row of `table`), lens
 * (cached tokens including the one decoded; the query sits at lens-1).
 * Device: q [batch][n_q_heads*head_dim] with q_row_stride elements per row,
 * dtype IHIP_DTYPE_*; out likewise (out_dtype, out_row_stride).
 * K/V (bf16 or f16): token t of KV head h of request b is at element
 *   table[table_rows[b]*table_stride + t/page_size] * page_stride
 *   + h*head_stride + (t % page_size)*head_dim
 * (16-byte aligned rows; table is int32 [table_n_rows][table_stride]).
 * Checked before any launch (IHIP_ERR_ARG): 0 <= table_rows[b] <
 * table_n_rows, 1 <= lens[b] <= table_stride*page_size, every count and
 * stride within int32. Page ids inside `table` are not checked. SGLang's k_buffer[layer]
 * [slots][kv_heads][head_dim] with req_to_token: page_size 1, page_stride
 * k.stride(0), head_stride k.stride(1). sm_scale 0: 1/sqrt(head_dim). */
int ihip_gpu_decode(const IhipGpuAttn *a, uint64_t stream, size_t layer,
                    size_t batch, const uint64_t *req_ids,
                    const int64_t *table_rows, const int64_t *lens, uint64_t q,
                    int q_dtype, int64_t q_row_stride, uint64_t k, uint64_t v,
                    int kv_dtype, uint64_t table, int64_t table_stride,
                    int64_t table_n_rows, int64_t page_size, int64_t page_stride,
                    int64_t head_stride, uint64_t out, int out_dtype,
                    int64_t out_row_stride, float sm_scale);

/* Dense causal attention of new tokens (prefill / extend): request b owns
 * n_new[b] consecutive query rows (request order) at positions
 * lens[b]-n_new[b] .. lens[b]-1 (0 <= n_new[b] <= lens[b]), whose K/V are already in the cache. Resets
 * the requests' hip state. Other arguments as ihip_gpu_decode. */
int ihip_gpu_prefill(const IhipGpuAttn *a, uint64_t stream, size_t layer,
                     size_t batch, const uint64_t *req_ids,
                     const int64_t *table_rows, const int64_t *lens,
                     const int64_t *n_new, uint64_t q, int q_dtype,
                     int64_t q_row_stride, uint64_t k, uint64_t v, int kv_dtype,
                     uint64_t table, int64_t table_stride, int64_t table_n_rows, int64_t page_size,
                     int64_t page_stride, int64_t head_stride, uint64_t out,
                     int out_dtype, int64_t out_row_stride, float sm_scale);

/* ihip_gpu_prefill plus the new tokens' pre-RoPE projections for locret
 * layers (ignored by other layers): proj_q [rows][n_q*D], proj_k / proj_v
 * [rows][n_kv*D] (rows as q), dtype proj_dtype, row strides in elements;
 * prompt_done: NULL (all 0) or batch bytes 0/1 (the call ends the request's
 * prompt, as the engine's append). A locret layer reads its scores back
 * once per call (host sync on stream). Eviction is a retained index set
 * per (request, layer, KV head) that attention reads: the caller's pool
 * memory is not freed. */
int ihip_gpu_prefill_proj(const IhipGpuAttn *a, uint64_t stream, size_t layer,
                          size_t batch, const uint64_t *req_ids,
                          const int64_t *table_rows, const int64_t *lens,
                          const int64_t *n_new, uint64_t q, int q_dtype,
                          int64_t q_row_stride, uint64_t k, uint64_t v,
                          int kv_dtype, uint64_t table, int64_t table_stride,
                          int64_t table_n_rows, int64_t page_size, int64_t page_stride,
                          int64_t head_stride, uint64_t out, int out_dtype,
                          int64_t out_row_stride, float sm_scale,
                          uint64_t proj_q, uint64_t proj_k, uint64_t proj_v,
                          int proj_dtype, int64_t proj_q_stride,
                          int64_t proj_kv_stride, const uint8_t *prompt_done);

/* Forget one request's hip state (end of request) / every request's. */
int ihip_gpu_end_request(const IhipGpuAttn *a, uint64_t req_id);
int ihip_gpu_reset(const IhipGpuAttn *a);

/* {"layers":["dense","hip",...],"requests":N,"locret":[{"layer","syncs","tokens",
 * "sync_ms","evictions"} per locret layer]}; free with ihip_string_free. */
char *ihip_gpu_info_json(const IhipGpuAttn *a);

#ifdef __cplusplus
}
#endif

#endif /* INFINITEHIP_H */

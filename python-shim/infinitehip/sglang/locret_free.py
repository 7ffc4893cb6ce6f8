"""Locret's evicted KV slots handed back to SGLang's allocator (issue 17).

After a Locret prompt of N tokens each locret layer holds, per KV head, the
same number M of retained units (M = the budget), but which tokens differ per
(layer, head). SGLang's `req_to_token` maps one slot per token for every
layer and head, so the retained tokens cannot keep their own slots. The
request is compacted instead: unit i of layer l, KV head h (the engine's
cache order, original-position order) is written into slot
`req_to_token[row, i]` of layer l's buffers, head h: the first M slots are
keyed by retained rank, not by token. Slots `req_to_token[row, M:N]` go back
to the allocator (`allocator.free`) and SGLang's view of the request shrinks
to M tokens (`seq_lens`, `kv_committed_len`, `kv_allocated_len`): the free
slot count rises by N - M per request (one MHA pool slot covers every layer
and head, the one group SGLang counts for a dense model).

Positions: SGLang derives a decode token's position from `seq_lens`, which
is now short by N - M. The backend keeps that offset per row and adds it to
`forward_batch.positions` in `init_forward_metadata`, before the model
applies RoPE, so new tokens sit at their true positions. The compacted K
were rotated at their original positions when written. After compaction the
backend attends densely over the row's slots (retained units + decoded
tokens): Locret never evicts decoded tokens, so this is the set the
retained-set path attends.

On the CUDA path (`GpuAttention`, no engine copy) the same happens on the
device: the library runs each layer's owed eviction and hands back the
retained positions per KV head (`GpuAttention.locret_retained`, C ABI
`ihip_gpu_locret_retained`), `compact_per_head` moves those units' K/V
inside SGLang's buffers (a gather then a scatter on the GPU, no host
copy of K/V), the slots past M are freed, the library forgets the
request's retained sets, and the row's decodes go to a dense twin
`GpuAttention` (every layer dense) over its slots, with the same position
offset.

Where: a BEFORE hook on `ScheduleBatch.prepare_for_decode`, registered with
SGLang's plugin `HookRegistry` (no SGLang file is patched): the prompt's
forward has run, the decode step has not yet allocated its slot. Only rows
that ended a prefill are compacted, once per request.

When not (the request then keeps the retained-set path, said once in the
log): radix cache on (the tree would key compacted slots by tokens they no
longer hold), page size > 1, speculative decoding, overlap scheduling, a
layer that is not locret, layers holding different counts.
`INFINITEHIP_LOCRET_FREE=0` turns it off. `INFINITEHIP_LOCRET_STATS=<path>`
appends one JSON line per compaction (tokens, kept, freed, allocator free
count before and after).
"""

import json
import logging
import os
import weakref

import torch

logger = logging.getLogger("infinitehip.sglang")

FREE_ENV = "INFINITEHIP_LOCRET_FREE"
STATS_ENV = "INFINITEHIP_LOCRET_STATS"
HOOK_TARGET = "sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_decode"

_backends = weakref.WeakSet()
_said = set()


def enabled():
    return os.environ.get(FREE_ENV, "1") != "0"


def add_backend(backend):
    _backends.add(backend)


def _say_once(key, msg, *args):
    if key not in _said:
        _said.add(key)
        logger.warning(msg, *args)


def install_hook():
    """Register the prepare_for_decode hook (applied by SGLang's
    load_plugins after every plugin's register())."""
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    except ImportError as e:  # older SGLang
        logger.info("no SGLang HookRegistry (%s): Locret keeps SGLang's slots (retained-set path)", e)
        return False
    HookRegistry.register(HOOK_TARGET, before_prepare_for_decode, HookType.BEFORE)
    return True


def _backend_for(batch):
    for b in list(_backends):
        if b.req_to_token_pool is batch.req_to_token_pool:
            return b
    return None


def _why_not(batch, backend):
    """Why this batch's requests cannot be compacted, or None."""
    if not enabled():
        return f"{FREE_ENV}=0"
    spec = getattr(batch, "spec_algorithm", None)
    if spec is not None and not spec.is_none():
        return "speculative decoding"
    if getattr(batch, "enable_overlap", False):
        return "overlap scheduling (pass disable_overlap_schedule=True)"
    tc = batch.tree_cache
    if tc is not None and not getattr(tc, "disable", False):
        return "the radix cache is on (pass --disable-radix-cache)"
    alloc = batch.token_to_kv_pool_allocator
    if alloc is None or getattr(alloc, "page_size", 1) != 1:
        return "page size > 1"
    return backend.locret_free_blocker()


def before_prepare_for_decode(batch, *args, **kwargs):
    """Compact every request of `batch` that just ended its Locret prompt
    and shrink SGLang's view of it. Returns None (arguments unchanged)."""
    backend = _backend_for(batch)
    if backend is None or not batch.reqs or not backend.locret_rows_pending():
        return None
    why = _why_not(batch, backend)
    if why is not None:
        _say_once(why, "infinitehip locret: evicted slots stay allocated (%s); attention reads the retained set", why)
        backend.locret_rows_pending(clear=True)
        return None
    alloc = batch.token_to_kv_pool_allocator
    lens = batch.seq_lens_cpu.clone()
    changed = False
    for i, req in enumerate(batch.reqs):
        n = int(lens[i])
        if req.kv.kv_committed_len != n or req.kv.kv_allocated_len != n or req.kv.req_pool_idx is None:
            continue  # not a plain just-prefilled row
        before = alloc.available_size()
        freed = backend.locret_compact(int(req.kv.req_pool_idx), n, alloc)
        if not freed:
            continue
        lens[i] = n - freed
        req.kv.kv_committed_len -= freed
        req.kv.kv_allocated_len -= freed
        changed = True
        _stats({"rid": str(req.rid), "row": int(req.kv.req_pool_idx), "tokens": n, "kept": n - freed,
                "freed": freed, "available_before": int(before), "available_after": int(alloc.available_size())})
    if changed:
        batch.seq_lens_cpu = lens
        batch.seq_lens = lens.to(device=batch.seq_lens.device, dtype=batch.seq_lens.dtype)
        if getattr(batch, "orig_seq_lens", None) is not None:
            batch.orig_seq_lens = lens.to(device=batch.orig_seq_lens.device, dtype=batch.orig_seq_lens.dtype)
        batch.seq_lens_sum = None
    return None


def _stats(rec):
    path = os.environ.get(STATS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def dense_decode(q, row_slots, kb, vb, scale):
    """One decode query `q` [H, d] (float32) over the slots `row_slots` of
    one layer's buffers `kb`/`vb` [slots, Hk, d]: softmax(q.K * scale).V,
    query head h reading KV head h // (H / Hk). Returns [H, d] float32."""
    k = kb.index_select(0, row_slots).float()
    v = vb.index_select(0, row_slots).float()
    g = q.shape[0] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    p = torch.softmax(torch.einsum("hd,lhd->hl", q, k) * scale, dim=-1)
    return torch.einsum("hl,lhd->hd", p, v)


def compact_per_head(kb, vb, slots, pos):
    """Move retained units into a request's first M slots, in place on the
    buffers' device: `kb`/`vb` one layer's `[slots, Hk, d]` buffers,
    `slots` the request's slots `[N]` (long, on that device), `pos`
    `[Hk, M]` (long) the retained token positions per KV head, sorted. Unit
    i of head h (token pos[h, i]) lands in slot slots[i], head h. The
    source rows are gathered into a new tensor before the scatter, so
    overlapping sources and destinations are safe."""
    hk, m = pos.shape
    heads = torch.arange(hk, device=kb.device)[:, None]
    src = slots[pos]
    dst = slots[:m][None, :].expand(hk, m)
    kb[dst, heads] = kb[src, heads]
    vb[dst, heads] = vb[src, heads]


def gpu_compact(backend, row, seq_len, allocator):
    """The CUDA path's compaction of `row` (a just-prefilled Locret request
    of `seq_len` tokens; request id = row). Returns the slots freed."""
    gpu = backend.gpu
    hk = gpu.n_kv_heads
    held = [gpu.locret_retained(li, row) for li in range(backend.n_layers)]
    ms = {m for m, _ in held}
    if len(ms) != 1:
        # The owed eviction ran early; the retained-set path continues as
        # its first decode would have left it.
        logger.warning("infinitehip locret: row %d holds %s tokens per layer: not compacted", row, sorted(ms))
        return 0
    m = ms.pop()
    if m >= seq_len:
        return 0
    rt = backend.req_to_token_pool.req_to_token
    slots = rt[row, :seq_len].long()
    pos = [torch.frombuffer(buf, dtype=torch.int32)[: hk * m].view(hk, m) for _, buf in held]
    if any(int(p.max()) >= seq_len for p in pos):
        logger.warning("infinitehip locret: row %d retains positions past its %d tokens: not compacted", row, seq_len)
        return 0
    for li, p in enumerate(pos):
        lid = li + backend.start_layer
        kb = backend.token_to_kv_pool.get_key_buffer(lid)
        vb = backend.token_to_kv_pool.get_value_buffer(lid)
        compact_per_head(kb, vb, slots.to(kb.device), p.to(device=kb.device, dtype=torch.long))
    allocator.free(rt[row, m:seq_len].to(torch.int64).clone())
    gpu.end_request(row)
    backend._gpu_compact[row] = seq_len - m
    return seq_len - m


def dense_twin(backend):
    """A `GpuAttention` with every layer dense (built once): decodes of
    compacted rows attend over all of the row's slots."""
    if backend._gpu_dense is None:
        import infinitehip.gpu as ig

        cfg = {"model": dict(backend._cfg["model"]), "kv": dict(backend._cfg.get("kv", {})),
               "dense_layers": backend.n_layers, "default": {"method": "dense"}}
        backend._gpu_dense = ig.GpuAttention(cfg, device=backend.gpu.device)
    return backend._gpu_dense


def gpu_decode_split(backend, li, q2, kb, vb, rt, rows, lens, out, sm_scale):
    """A decode batch with compacted rows (dense twin) and others (the
    locret layers' retained sets), each group in one call."""
    comp = backend._gpu_compact
    groups = ([i for i, r in enumerate(rows) if r in comp], [i for i, r in enumerate(rows) if r not in comp])
    for att, idx in ((dense_twin(backend), groups[0]), (backend.gpu, groups[1])):
        if not idx:
            continue
        rs, ls = [rows[i] for i in idx], [lens[i] for i in idx]
        if len(idx) == len(rows):
            att.decode(li, q2, kb, vb, rt, rs, ls, rs, out=out, sm_scale=sm_scale)
        else:
            sel = torch.tensor(idx, device=q2.device)
            o = att.decode(li, q2.index_select(0, sel), kb, vb, rt, rs, ls, rs, sm_scale=sm_scale)
            out.index_copy_(0, sel, o)
    return out

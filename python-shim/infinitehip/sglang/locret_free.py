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

"""LazyLLM rows actually dropped between layers in SGLang's prefill (issue 18).

SGLang offers plugins no layer-loop hook, but its plugin `HookRegistry`
can wrap any function: an AROUND hook on
`sglang.srt.models.llama.LlamaModel.forward` (the Llama family: Llama,
SmolLM, Mistral-style configs that load as LlamaForCausalLM) runs the
decoder layers itself when a prompt can be pruned, and calls SGLang's own
forward otherwise. No SGLang file is patched.

What the hook does (one request's whole prompt in one extend, the paper's
setting): the same per-layer math as SGLang's layer (input norm with the
residual add, attention through the attention backend, post-attention
norm, MLP), and after each pruning layer p (the config's lazy `points`)
the attention backend reports the importance of the active rows (the
prompt's last row's softmax at p, mean over q heads); the top
`keep_count(keep, N)` rows (the last row always) go on: hidden states,
residual, positions and SGLang's `out_cache_loc` are gathered, so every
later layer projects, attends and runs its MLP over fewer rows. Later
layers attend causally over the kept rows only: in this prefill the rows'
own q/k/v through torch's SDPA (the prompt starts at position 0, so the
extend holds every key it needs), and the backend's engine copy of those
layers gets just the kept rows' K/V, which decode reads. Every layer after
the first pruning point must be lazy. The final hidden state of the kept rows
is scattered back into a full-size tensor (pruned rows zero) for SGLang's
logits processor, which reads the last row.

Pruned tokens are not revived: in decode, a layer after a token's pruning
point attends to the tokens that reached it (the engine copy of that layer
never held the pruned ones, so they are never read); SGLang's pool slots of
pruned tokens at those layers are never written. Revival (the paper's aux
cache) would need a decode forward with extra rows at earlier positions,
which SGLang's ForwardBatch (extend = the last n tokens of a request) has
no form for; llama.cpp's patch 0010 revives instead.

When not (SGLang's forward runs, said once in the log): the GPU path, more
than one request in the batch, a prefix already cached (radix hit or a
later chunk of a chunked prefill: set --chunked-prefill-size >= the
prompt), logprobs requested, pipeline/tensor parallelism, input
embeddings, captured aux hidden states. `INFINITEHIP_LAZY_ROWS=0` keeps the
older route (every row computed, lazy layers' key sets narrowed).
`INFINITEHIP_LAZY_ROWS_STATS=<path>` appends one JSON line per pruned
prefill (prompt tokens, rows per layer, the pruning points);
`INFINITEHIP_LAZY_ROWS_SKIPS=<path>` one per prefill extend that computed
every row instead (its tokens and why), so a caller can tell "pruned
nothing" from "never ran" (the quality suite fails a lazy row on either).
With `INFINITEHIP_LAZY_ROWS_STATS_KEPT=1` a stats line also carries the
prompt positions kept after each pruning point ("kept": {layer: [rows]}).
"""

import copy
import json
import logging
import math
import os
import weakref

import torch

logger = logging.getLogger("infinitehip.sglang")

ROWS_ENV = "INFINITEHIP_LAZY_ROWS"
STATS_ENV = "INFINITEHIP_LAZY_ROWS_STATS"
SKIPS_ENV = "INFINITEHIP_LAZY_ROWS_SKIPS"
KEPT_ENV = "INFINITEHIP_LAZY_ROWS_STATS_KEPT"
HOOK_TARGET = "sglang.srt.models.llama.LlamaModel.forward"

_backends = weakref.WeakSet()
_said = set()


def enabled():
    return os.environ.get(ROWS_ENV, "1") != "0"


def add_backend(backend):
    _backends.add(backend)


def install_hook():
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    except ImportError as e:  # older SGLang
        logger.info("no SGLang HookRegistry (%s): lazy layers compute every row", e)
        return False
    HookRegistry.register(HOOK_TARGET, around_forward, HookType.AROUND)
    return True


def _say_once(key, msg, *args):
    if key not in _said:
        _said.add(key)
        logger.warning(msg, *args)


def keep_count(keep, n):
    """Rows kept of an n-token prompt (the core's `lazy::keep_count`)."""
    if n == 0:
        return 0
    return min(max(math.ceil(keep * n - 1e-6), 1), n)


def top_rows(importance, k):
    """Indices (ascending) of the k most important rows; the last row is
    always kept; ties keep the later row (the core's `lazy::top_k`)."""
    n = importance.shape[0]
    if k >= n:
        return torch.arange(n)
    imp = importance.double().clone()
    imp[-1] = float("inf")
    # Stable descending sort of the reversed rows: equal scores favour later rows.
    order = torch.sort(imp.flip(0), descending=True, stable=True).indices[:k]
    return torch.sort(n - 1 - order).values


def _backend():
    for b in list(_backends):
        if b.lazy_points():
            return b
    return None


def _why_not(model, forward_batch, input_embeds, pp_proxy_tensors, backend):
    if backend is None:
        return "no host-path infinitehip backend with lazy layers"
    mode = forward_batch.forward_mode
    if not mode.is_extend() or mode.is_decode():
        return "not an extend"
    if forward_batch.batch_size != 1:
        return "several requests in one extend"
    pre = getattr(forward_batch, "extend_prefix_lens_cpu", None)
    if pre is None or list(pre) != [0]:
        return "the extend continues a cached prefix (radix hit or a later prefill chunk)"
    if getattr(forward_batch, "return_logprob", False):
        return "logprobs requested"
    if input_embeds is not None or pp_proxy_tensors is not None:
        return "input embeddings or pipeline parallelism"
    pp = getattr(model, "pp_group", None)
    if pp is not None and getattr(pp, "world_size", 1) != 1:
        return "pipeline parallelism"
    if getattr(model, "layers_to_capture", None):
        return "aux hidden states captured"
    return backend.lazy_rows_blocker()


def around_forward(original, model, input_ids, positions, forward_batch, input_embeds=None,
                   pp_proxy_tensors=None, **kwargs):
    if not enabled():
        return original(model, input_ids, positions, forward_batch, input_embeds,
                        pp_proxy_tensors=pp_proxy_tensors, **kwargs)
    backend = _backend()
    why = _why_not(model, forward_batch, input_embeds, pp_proxy_tensors, backend)
    if why is not None:
        if backend is not None and forward_batch.forward_mode.is_extend() and not forward_batch.forward_mode.is_decode():
            _say_once(why, "infinitehip lazy: this prefill computes every row (%s)", why)
            _stats({"tokens": None if input_ids is None else int(input_ids.shape[0]), "why": why}, SKIPS_ENV)
        return original(model, input_ids, positions, forward_batch, input_embeds,
                        pp_proxy_tensors=pp_proxy_tensors, **kwargs)
    return forward_rows(model, backend, input_ids, positions, forward_batch)


def forward_rows(model, backend, input_ids, positions, forward_batch):
    """The decoder layers with rows dropped after each pruning point."""
    points = backend.lazy_points()
    h = model.embed_tokens(input_ids)
    n = h.shape[0]
    rows = torch.arange(n, device=h.device)
    loc = forward_batch.out_cache_loc
    forward_batch.ihip_rows_route = True  # the backend's attention: kept rows, causal
    fb, pos, residual = forward_batch, positions, None
    per_layer, kept_after = [], {}
    for i in range(model.start_layer, model.end_layer):
        layer = model.layers[i]
        if residual is None:
            residual = h
            x = layer.input_layernorm(h)
        else:
            x, residual = layer.input_layernorm(h, residual)
        li = i - model.start_layer
        afb = fb
        if li in points:
            afb = copy.copy(fb)
            afb.ihip_lazy = {"imp": None}
        x = layer.self_attn(positions=pos, hidden_states=x, forward_batch=afb)
        x, residual = layer.post_attention_layernorm(x, residual)
        h = layer.mlp(x, forward_batch=fb)
        per_layer.append(int(rows.shape[0]))
        if li in points:
            imp = afb.ihip_lazy["imp"]
            if imp is None or imp.shape[0] != rows.shape[0]:
                raise RuntimeError(f"infinitehip lazy: layer {li} reported no importance for its rows")
            keep = top_rows(imp, keep_count(points[li], n))
            if keep.shape[0] < rows.shape[0]:
                keep = keep.to(h.device)
                h, residual, pos, rows = h[keep], residual[keep], pos[keep], rows[keep]
                fb = copy.copy(forward_batch)
                fb.out_cache_loc = loc[rows.to(loc.device)]
                fb.ihip_rows = int(rows.shape[0])
            kept_after[str(li)] = rows
    out, _ = model.norm(h, residual)
    if rows.shape[0] == n:
        full = out
    else:
        full = torch.zeros((n, out.shape[-1]), dtype=out.dtype, device=out.device)
        full[rows] = out
    rec = {"prompt": n, "rows": per_layer, "kept_last": int(rows.shape[0]),
           "points": {str(k): v for k, v in sorted(points.items())}}
    if os.environ.get(KEPT_ENV) == "1":
        rec["kept"] = {k: [int(x) for x in r.tolist()] for k, r in kept_after.items()}
    _stats(rec)
    return full


def _stats(rec, env=STATS_ENV):
    path = os.environ.get(env)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def last_row_importance(q_last, k, scale):
    """Importance of each row: softmax over the rows of `scale * q_last . k`
    per q head (query head h reads KV head h // (H / Hk)), mean over the q
    heads. `q_last` [H, d], `k` [n, Hk, d] (float32)."""
    g = q_last.shape[0] // k.shape[1]
    kk = k.float().repeat_interleave(g, dim=1)
    p = torch.softmax(torch.einsum("hd,nhd->hn", q_last.float(), kk) * scale, dim=-1)
    return p.mean(0)


def causal_attention(q, k, v, layer):
    """Dense causal attention of one request's rows over themselves (the
    rows route's lazy layers: an extend from position 0 holds every key it
    needs): q `[n, H * d]`, k/v `[n, Hk, d]` -> `[n, H * d]` (float32)."""
    h, d = layer.tp_q_head_num, layer.qk_head_dim
    n = q.shape[0]
    qq = q.reshape(n, h, d).transpose(0, 1).float()
    kk = k.reshape(n, -1, d).transpose(0, 1).float()
    vv = v.reshape(n, -1, d).transpose(0, 1).float()
    o = torch.nn.functional.scaled_dot_product_attention(
        qq[None], kk[None], vv[None], is_causal=True, scale=float(layer.scaling), enable_gqa=True
    )
    return o[0].transpose(0, 1).reshape(n, h * d)

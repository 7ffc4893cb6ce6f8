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

Revival (the paper's aux cache, `INFINITEHIP_LAZY_REVIVE`, default "1"):
a row dropped after pruning point p leaves its hidden state and residual
after layer p in a per-request aux cache (`done[token] = p`: its K/V exist
in layers 0..p). Each decode step of that request (one request per batch)
runs the layer loop here too: layers up to the first pruning point, and
later layers where the decode token is the only row and no selection
happens, are the backend's own decode (the engine copy of a layer holds
exactly the tokens with K/V there); at pruning point p the decode token's attention
(softmax of its q over every token with K/V at p, mean over q heads)
selects the top `keep_count(keep_p, seq_len)` tokens (the decode token
always), the paper's progressive selection with the new token as the last
token; a selected token whose K/V stop at p resumes from its aux entry at
layer p + 1 as an extra row of this decode forward (at its own position),
is computed up to the end or until a later point drops it again (its
hidden state then goes back to the aux cache at that point), so each
(token, layer) is computed at most once. The rows' K/V go into SGLang's
pool slots of those tokens and into the backend's engine copy of each
layer; every row attends causally over the tokens with K/V at that layer
(torch, in the backend). The decode token attends to every token with K/V
at a layer, as without revival. "all" instead revives every aux token at
the first decode step (a deferred completion, not the paper's selection);
"0" keeps the older behaviour (pruned tokens never revived: a layer after
a token's pruning point attends to the tokens that reached it, and the
pool slots of pruned tokens at those layers are never written).
`INFINITEHIP_LAZY_REVIVE_STATS=<path>` appends one JSON line per decode
step that revived rows (position, rows revived per point, (token, layer)
rows computed). A decode batch of several requests, one of them with aux
entries, runs SGLang's forward (no revival that step, said once).

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
REVIVE_ENV = "INFINITEHIP_LAZY_REVIVE"
REVIVE_STATS_ENV = "INFINITEHIP_LAZY_REVIVE_STATS"
HOOK_TARGET = "sglang.srt.models.llama.LlamaModel.forward"

_backends = weakref.WeakSet()
_said = set()
# Aux cache per request row (req_pool_index): {"n": prompt tokens, "done":
# LongTensor[n] (last layer with K/V), "h"/"r": hidden/residual [n, D] after
# layer done[t] for tokens not done (done < last layer), "gen": generation}.
_aux = {}
_reqs = [0]  # pruned prefills so far (a revival stats line names its request)


def revive_mode():
    m = os.environ.get(REVIVE_ENV, "1")
    if m not in ("0", "1", "all"):
        raise ValueError(f"{REVIVE_ENV}={m!r}: use 1 (progressive, the paper's), all (deferred) or 0 (off)")
    return m


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
    mode = forward_batch.forward_mode
    if _aux and backend is not None and mode.is_decode():
        st = _revive_state(backend, forward_batch, input_embeds, pp_proxy_tensors)
        if st is not None:
            try:
                return forward_revive(model, backend, input_ids, positions, forward_batch, st)
            except BaseException:
                # A step that failed partway may have written revived rows into
                # the backend's engine copies that st["done"] does not record; a
                # later step would revive them again (duplicate keys). End the
                # request's revival instead: its copies keep valid K/V only.
                _aux.pop(st["row"], None)
                raise
        return original(model, input_ids, positions, forward_batch, input_embeds,
                        pp_proxy_tensors=pp_proxy_tensors, **kwargs)
    if _aux and mode.is_extend() and forward_batch.req_pool_indices is not None:
        # A new prompt (or more than one new token) on a row ends its aux
        # entry; a mixed batch's decode rows (one token after a prefix) keep
        # theirs (no revival in that step: the decode token attends to the
        # tokens with K/V, as without revival).
        pre = getattr(forward_batch, "extend_prefix_lens_cpu", None)
        ext = getattr(forward_batch, "extend_seq_lens_cpu", None)
        for j, row in enumerate(forward_batch.req_pool_indices.tolist()):
            if pre is None or ext is None or int(pre[j]) == 0 or int(ext[j]) != 1:
                _aux.pop(int(row), None)
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
    n_layers = model.end_layer - model.start_layer
    aux = None
    if revive_mode() != "0" and model.start_layer == 0:
        aux = {"n": n, "done": torch.full((n,), n_layers - 1, dtype=torch.long), "h": None, "r": None,
               "gen": backend._generation(int(forward_batch.req_pool_indices[0])), "req": _reqs[0]}
        _reqs[0] += 1
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
                if aux is not None:  # the aux cache: dropped rows' state after layer li
                    gone = torch.ones(rows.shape[0], dtype=torch.bool, device=h.device)
                    gone[keep] = False
                    if aux["h"] is None:
                        aux["h"] = torch.zeros((n, h.shape[-1]), dtype=h.dtype, device=h.device)
                        aux["r"] = torch.zeros((n, residual.shape[-1]), dtype=residual.dtype, device=h.device)
                    t = rows[gone]
                    aux["h"][t], aux["r"][t] = h[gone], residual[gone]
                    aux["done"][t.cpu()] = li
                h, residual, pos, rows = h[keep], residual[keep], pos[keep], rows[keep]
                fb = copy.copy(forward_batch)
                fb.out_cache_loc = loc[rows.to(loc.device)]
                fb.ihip_rows = int(rows.shape[0])
            kept_after[str(li)] = rows
    row0 = int(forward_batch.req_pool_indices[0])
    _aux.pop(row0, None)
    if aux is not None and aux["h"] is not None:
        _aux[row0] = aux
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


def _revive_state(backend, fb, input_embeds, pp_proxy_tensors):
    """The aux entry of this decode batch's request when revival applies."""
    rows = [int(r) for r in fb.req_pool_indices.tolist()]
    mine = [r for r in rows if r in _aux]
    for r in mine:
        if _aux[r]["gen"] != backend._generation(r):
            _aux.pop(r)
    mine = [r for r in rows if r in _aux]
    if not mine:
        return None
    if len(rows) != 1 or input_embeds is not None or pp_proxy_tensors is not None or revive_mode() == "0":
        _say_once("revive-batch", "infinitehip lazy: a decode batch of %d requests (or embeddings): "
                  "pruned tokens are not revived in it", len(rows))
        return None
    st = _aux[mine[0]]
    seq_len = int(fb.seq_lens_cpu[0]) if fb.seq_lens_cpu is not None else int(fb.seq_lens[0])
    if seq_len <= st["n"]:
        _aux.pop(mine[0])
        return None
    st["row"], st["seq_len"] = mine[0], seq_len
    return st


def _select(imp, key_tok, keep, seq_len, mode):
    """Tokens (sequence indices) that go on past a pruning point in decode:
    the top keep_count(keep, seq_len) of the tokens with K/V there (the
    decode token, the last key, always); "all": every one."""
    if mode == "all":
        return key_tok
    k = keep_count(keep, seq_len)
    return key_tok[top_rows(imp, k).to(key_tok.device)]


def forward_revive(model, backend, input_ids, positions, forward_batch, st):
    """One decode step with the aux cache: the decode token plus the aux
    tokens its attention selects at each pruning point (module docstring)."""
    points = backend.lazy_points()
    first = min(points)
    mode = revive_mode()
    n, seq_len, row = st["n"], st["seq_len"], st["row"]
    last = model.end_layer - model.start_layer - 1
    locs_all = backend.req_to_token_pool.req_to_token[row, :seq_len].to(forward_batch.out_cache_loc.device).long()
    # done over the whole sequence: earlier decode tokens have every layer,
    # the decode token (last) none yet.
    done = torch.full((seq_len,), last, dtype=torch.long)
    done[:n] = st["done"]
    done[seq_len - 1] = -1
    tok = torch.tensor([seq_len - 1])  # sequence indices of this forward's rows (ascending)
    h = model.embed_tokens(input_ids)
    residual = None
    revived, computed = {}, 0
    fb = forward_batch
    for i in range(model.start_layer, model.end_layer):
        li = i - model.start_layer
        layer = model.layers[i]
        if residual is None:
            residual = h
            x = layer.input_layernorm(h)
        else:
            x, residual = layer.input_layernorm(h, residual)
        if li < first or (tok.shape[0] == 1 and li not in points):
            # The decode token alone, no selection here: the backend's own
            # decode (its engine copy of this layer holds exactly the tokens
            # with K/V here: kept rows, revived rows, decoded tokens).
            afb = fb
        else:
            is_row = torch.zeros(seq_len, dtype=torch.bool)
            is_row[tok] = True
            key_tok = torch.nonzero((done >= li) | is_row).flatten()
            afb = copy.copy(fb)
            afb.out_cache_loc = locs_all[tok.to(locs_all.device)]
            afb.ihip_rows = int(tok.shape[0])
            afb.ihip_revive = {"key_loc": locs_all[key_tok.to(locs_all.device)], "key_pos": key_tok,
                               "q_pos": tok, "imp": None}
            pos = tok.to(device=positions.device, dtype=positions.dtype)
        x = layer.self_attn(positions=positions if afb is fb else pos, hidden_states=x, forward_batch=afb)
        done[tok] = li
        computed += int(tok.shape[0]) - 1
        if li == last:
            x, residual = x[-1:], residual[-1:]  # the rows' K/V are written; only the decode row goes on
        x, residual = layer.post_attention_layernorm(x, residual)
        h = layer.mlp(x, forward_batch=fb)
        if li in points and li < last:
            imp = afb.ihip_revive["imp"]
            if imp is None or imp.shape[0] != key_tok.shape[0]:
                raise RuntimeError(f"infinitehip lazy: layer {li} reported no decode importance")
            is_row = torch.zeros(seq_len, dtype=torch.bool)
            is_row[tok] = True
            sel = torch.zeros(seq_len, dtype=torch.bool)
            sel[_select(imp, key_tok, points[li], seq_len, mode)] = True
            stay = sel[tok]
            drop = tok[~stay]
            if drop.numel():  # rows of this step not selected: back to the aux cache at li
                dd = drop.to(h.device)
                st["h"][dd], st["r"][dd] = h[~stay.to(h.device)], residual[~stay.to(h.device)]
            come = torch.nonzero(sel & (done == li) & ~is_row).flatten()
            come = come[come < n]
            revived[str(li)] = int(come.numel())
            if come.numel() or drop.numel():
                cd = come.to(h.device)
                keep_rows = stay.to(h.device)
                h = torch.cat([h[keep_rows], st["h"][cd]])
                residual = torch.cat([residual[keep_rows], st["r"][cd]])
                tok = torch.cat([tok[stay], come])
                order = torch.argsort(tok)
                tok, h, residual = tok[order], h[order.to(h.device)], residual[order.to(h.device)]
    st["done"] = done[:n].clone()
    if bool((st["done"] >= last).all()):
        _aux.pop(row, None)
    if computed:
        _stats({"req": st["req"], "prompt": n, "row": row, "pos": seq_len - 1, "revived": revived,
                "computed": computed}, REVIVE_STATS_ENV)
    out, _ = model.norm(h, residual)
    return out


def revive_attention(q, layer, kb, vb, rv):
    """Attention of a revival decode step's rows (`q` `[r, H * d]`, ascending
    positions `rv["q_pos"]`, the decode token last) over the tokens with K/V
    at this layer (pool slots `rv["key_loc"]`, positions `rv["key_pos"]`,
    ascending, the rows' own included), causal by position. Sets
    `rv["imp"]`: the last row's softmax mean over q heads (importance)."""
    h, d = layer.tp_q_head_num, layer.qk_head_dim
    r = q.shape[0]
    k = kb[rv["key_loc"]].reshape(-1, kb.shape[-2], d).float()
    v = vb[rv["key_loc"]].reshape(-1, vb.shape[-2], d).float()
    g = h // k.shape[1]
    qq = q.reshape(r, h, d).float().transpose(0, 1)  # [H, r, d]
    kk = k.repeat_interleave(g, dim=1).transpose(0, 1)  # [H, m, d]
    vv = v.repeat_interleave(g, dim=1).transpose(0, 1)
    qp = rv["q_pos"].to(q.device)
    kp = rv["key_pos"].to(q.device)
    out = torch.empty((h, r, d), dtype=torch.float32, device=q.device)
    for a in range(0, r, 256):  # bounded [H, 256, m] score blocks
        b = min(a + 256, r)
        s = torch.matmul(qq[:, a:b], kk.transpose(1, 2)) * float(layer.scaling)  # [H, rows, m]
        s = s.masked_fill((kp[None, :] > qp[a:b, None])[None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[:, a:b] = torch.matmul(p, vv)
    rv["imp"] = p[:, -1, :].mean(0).cpu()
    return out.transpose(0, 1).reshape(r, h * d)


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

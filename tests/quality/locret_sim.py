"""Offline twin of the quality suite's Locret rows (issue 17): SmolLM2-135M
(the suite's Q4_1 GGUF dequantized to f32, the same file the exactness check
uses) run by a small torch forward with per-(layer, KV head) key masks, on the
suite's own sequence (probes.copy_sequence, same corpus, same offsets), with
llama.cpp's Locret schedule emulated: the prompt goes through ubatches of
`--ubatch` tokens, before each ubatch the held prompt tokens are evicted down
to the budget (the rule of cpp-bridge/src/llama_locret.rs choose_evictions:
the last `stabilizer` held units and, at the first decode, the last
`keep_last` prompt tokens protected; ties: older first), and every token after
the prompt is one causal chunk (teacher forced: the same math as llama.cpp's
single-token decode steps; decoded tokens are never evicted).

What it compares at the same budget (ctx/8 - ctx/32 by score + ctx/32 window):
- `token:z_max` / `token:rank_max`: one retained token set shared by every
  layer and KV head (llama.cpp's cells), from the token's 90 per-(layer, KV
  head) retaining-head scores (llama_locret_score.rs's rules);
- `head`: each (layer, KV head) keeps its own top scores (upstream Locret,
  our core policy): the attention mask differs per (layer, head); the cells
  llama.cpp could free are only those no (layer, head) keeps (`union`);
- `MODE@once`: one eviction at the prompt's end (prefill dense, as the SGLang
  CPU route), instead of one per ubatch;
- `oracle-head` / `oracle-token` / `oracle-token-sum`: the same budget chosen
  by the attention mass the decode-scored queries give each prompt key in the
  dense run (future knowledge: a bound for query-agnostic eviction), per
  (layer, KV head), or per token by its max / sum over the 90 columns, one
  eviction at the prompt's end; `oracle-logit:RULE`: the heads' exact
  training target (the max pre-softmax logit the decode-scored queries give a
  key, max over the GQA group) in place of their predictions, pooled by RULE;
- `obs:RULE` / `obsp:RULE` (one eviction at the prompt's end): SnapKV's
  signal instead of the heads, the max pre-softmax logit (obs) or the summed
  attention weight (obsp) the last keep_last prompt queries give each key (no
  future knowledge), pooled by RULE (`raw_sum`: offline only); `hybp:RULE`:
  the heads' 90 columns and obsp's 90 side by side, pooled by RULE;
- `token:cal_RULE` / `token:aff_RULE` / `head-cal` (with `--calib`, from
  locret_calib.py fit): the heads' scores calibrated per column (a x score
  + a bias by log2 distance to the ubatch evicted for; aff_: a x score + c).

`--decode 512` matches the suite's `--decode 512` rows (511 decode-scored).

Reports decode-scored NLL / perplexity paired with dense on the same tokens
(+- 2 standard errors), copy-probe accuracy, the dense run's attention mass
(decode-scored queries) that each retained set keeps, and the union of the
retained sets (the cells llama.cpp could free). Prints JSON lines.

    ~/.cache/infinitehip-ci/venv-sglang-0.5.23/bin/python tests/quality/locret_sim.py \
        --ctx 2048 --modes dense,token:z_max,head,oracle-head
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import probes  # noqa: E402

CACHE = os.path.expanduser("~/.cache/infinitehip/quality")
GGUF = os.path.join(CACHE, "models", "SmolLM2-135M-Instruct.Q4_1.f32.gguf")
HEADS = os.path.join(REPO, "python-shim", "infinitehip", "heads", "smollm2-135m-instruct.h64.safetensors")
RANDOM_HEADS = os.path.join(CACHE, "locret-random-heads-h256.safetensors")
# run.py's FULL mode and corpus offsets
DECODE, DEPTHS, PASSAGE, CUE = 128, [0.1, 0.3, 0.5, 0.7, 0.9], 32, 8
BODY_START, PASSAGE_START = 20000, 600000


def unpermute(w, n_head):
    """GGUF q/k rows (llama.cpp's interleaved RoPE order) -> HF order."""
    o, i = w.shape
    return w.reshape(n_head, o // n_head // 2, 2, i).transpose(1, 2).reshape(o, i)


class Model:
    def __init__(self, path):
        import gguf

        r = gguf.GGUFReader(path)
        f = {k: v for k, v in r.fields.items()}

        def meta(k):
            x = f[k]
            return x.parts[x.data[0]][0]

        self.L = int(meta("llama.block_count"))
        self.nq = int(meta("llama.attention.head_count"))
        self.nkv = int(meta("llama.attention.head_count_kv"))
        self.theta = float(meta("llama.rope.freq_base"))
        self.eps = float(meta("llama.attention.layer_norm_rms_epsilon"))
        t = {x.name: torch.from_numpy(np.array(x.data, dtype=np.float32)) for x in r.tensors}
        self.emb = t["token_embd.weight"]
        self.d = self.emb.shape[1] // self.nq
        self.norm = t["output_norm.weight"]
        self.out = t.get("output.weight", self.emb)
        self.blk = []
        for l in range(self.L):
            g = lambda n: t[f"blk.{l}.{n}.weight"]  # noqa: E731
            self.blk.append({
                "an": g("attn_norm"), "q": unpermute(g("attn_q"), self.nq), "k": unpermute(g("attn_k"), self.nkv),
                "v": g("attn_v"), "o": g("attn_output"), "fn": g("ffn_norm"), "gate": g("ffn_gate"),
                "up": g("ffn_up"), "down": g("ffn_down")})
        inv = 1.0 / (self.theta ** (torch.arange(0, self.d, 2, dtype=torch.float64) / self.d))
        self.inv = inv

    def rms(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def rope(self, x, pos):
        """x [n, heads, d] (HF halves layout) at positions pos [n]."""
        ang = pos[:, None].double() * self.inv[None]
        cos = torch.cat([ang.cos(), ang.cos()], -1).float()[:, None]
        sin = torch.cat([ang.sin(), ang.sin()], -1).float()[:, None]
        h = self.d // 2
        rot = torch.cat([-x[..., h:], x[..., :h]], -1)
        return x * cos + rot * sin


class Heads:
    def __init__(self, path, L):
        from safetensors.torch import load_file

        w = load_file(path)
        self.w1 = [w[f"model.layers.{l}.self_attn.fc1.weight"].float() for l in range(L)]
        self.w2 = [w[f"model.layers.{l}.self_attn.fc2.weight"].float() for l in range(L)]

    def __call__(self, l, x):
        """x [n, (nq + 2 nkv) d] pre-RoPE -> [nkv, n] raw scores."""
        return (torch.nn.functional.silu(x @ self.w1[l].T) @ self.w2[l].T).T


# modes scored at the prompt's end from the last keep_last prompt queries
OBS_MODES = ("obs:", "obsp:", "hybp:")


def token_scores(rule, rows):
    """llama_locret_score.rs over the held tokens' rows [n, width].
    `RULE+poolW` (offline only): RULE's scores max-pooled over W neighbouring
    held tokens (SnapKV's pooling: a kept token keeps its neighbours)."""
    if "+pool" in rule:
        base, w = rule.split("+pool")
        w = int(w)
        sc = token_scores(base, rows)
        return torch.nn.functional.max_pool1d(sc[None, None].float(), w, 1, w // 2)[0, 0][: sc.shape[0]]
    if rule == "raw_max":
        return rows.max(1).values
    if rule == "raw_sum":  # offline only (obsp: attention weights summed over columns)
        return rows.sum(1)
    if rule == "z_max":
        r = rows.double()
        mu = r.mean(0, keepdim=True)
        sd = (r - mu).pow(2).mean(0, keepdim=True).sqrt()
        z = torch.where(sd > 0, (r - mu) / sd.clamp_min(1e-300), torch.zeros_like(r))
        return z.max(1).values.float()
    if rule in ("soft_sum", "soft_max"):
        # each (layer, KV head) column as a softmax over the held tokens (the
        # heads regress pre-softmax logits: a proxy of the attention share),
        # then the token's sum / max over columns
        p = rows.double().softmax(0)
        return (p.sum(1) if rule == "soft_sum" else p.max(1).values).float()
    if rule == "rank_max":
        n = rows.shape[0]
        # mean rank for ties, scaled to [0, 1]
        out = torch.full((n,), -math.inf)
        for c in range(rows.shape[1]):
            col = rows[:, c]
            col = col.contiguous()
            srt = col.sort().values
            lo = torch.searchsorted(srt, col, right=False).double()
            hi = torch.searchsorted(srt, col, right=True).double() - 1
            rk = ((lo + hi) / 2 / max(n - 1, 1)).float()
            out = torch.maximum(out, rk)
        return out
    raise ValueError(rule)


def choose(scores, pinned, budget, stab):
    """choose_evictions over held units in position order: indices to evict."""
    n = scores.shape[0]
    protected_from = max(n - max(stab, 1), 0)
    free = int((~pinned).sum())
    need = max(free - budget, 0)
    cand = torch.arange(protected_from)[~pinned[:protected_from]]
    need = min(need, cand.numel())
    if need == 0:
        return cand[:0]
    s = scores[cand].double()
    # lowest score first, ties older first: stable sort on score
    order = torch.sort(s, stable=True).indices
    return cand[order[:need]]


def run(m, heads, seq, mode, budget, stab, keep_last, ubatch, once, oracle_mass=None, want_mass=False,
        oracle_logit=None, calib=None):
    ids = torch.tensor(seq.ids)
    T, P = len(seq.ids), seq.prefill
    L, nq, nkv, d = m.L, m.nq, m.nkv, m.d
    g = nq // nkv
    keep = torch.zeros(L, nkv, T, dtype=torch.bool)  # held (prompt) per column
    rows = torch.zeros(T, L * nkv)  # raw scores per token
    K = [torch.zeros(nkv, T, d) for _ in range(L)]
    V = [torch.zeros(nkv, T, d) for _ in range(L)]
    pos = torch.arange(T)
    h = m.emb[ids]
    logits_at = {}
    mass = torch.zeros(L, nkv, P) if want_mass else None
    maxlogit = torch.zeros(L, nkv, P) if want_mass else None
    obslogit = torch.zeros(L, nkv, P)
    scored_q = torch.tensor([t - 1 - P for t in seq.decode_scored])  # tail rows whose logits score decode targets
    evicting = mode != "dense"
    # prefill ubatches; with `once` (and the oracles) nothing is evicted
    # before the first decode (the same math as one dense prefill chunk)
    chunks = [(a, min(a + ubatch, P)) for a in range(0, P, ubatch)]
    chunks.append((P, T))
    pinned = torch.zeros(T, dtype=torch.bool)

    def evict(held_upto, final):
        if final:
            pinned[max(P - keep_last, 0):P] = True
        if mode.startswith(("token:", "oracle-token", "oracle-logit:") + OBS_MODES):
            held = keep[0, 0, :held_upto].nonzero().flatten()
            if mode.startswith(("obs:", "obsp:")):
                # SnapKV-style: the max pre-softmax logit (obs) or the summed
                # attention weight (obsp, SnapKV's own) the last keep_last
                # prompt queries give each key (seen at the prompt's end)
                lg = obslogit.permute(2, 0, 1).reshape(-1, L * nkv)
                sc = token_scores(mode.split(":")[1], lg[held])
            elif mode.startswith("hybp:"):
                # both signals: the heads' 90 columns beside SnapKV's 90
                lg = obslogit.permute(2, 0, 1).reshape(-1, L * nkv)
                sc = token_scores(mode.split(":")[1], torch.cat([rows[held], lg[held]], 1))
            elif mode.startswith("oracle-logit:"):
                # the heads' own training target (max pre-softmax logit from
                # the decode-scored queries, max over the GQA group), exact
                lg = oracle_logit.permute(2, 0, 1).reshape(-1, L * nkv)
                sc = token_scores(mode.split(":")[1], lg[held])
            elif mode == "oracle-token":
                sc = oracle_mass.amax(dim=(0, 1))[held]
            elif mode == "oracle-token-sum":
                sc = oracle_mass.sum(dim=(0, 1))[held]
            else:
                rule = mode.split(":")[1]
                r = rows[held]
                if rule.startswith("cal_") or rule.startswith("aff_"):
                    # per-column calibration fitted offline (--calib): a x pred
                    # + a bias by log2 distance to the next query (cal_), or
                    # a x pred + c (aff_), then the rule
                    if rule.startswith("aff_"):
                        r = r * calib["aff"][..., 0].reshape(1, -1) + calib["aff"][..., 1].reshape(1, -1)
                    else:
                        nb = calib["NB"]
                        bk = (held_upto - held).float().log2().floor().clamp(0, nb - 1).long()
                        beta = calib["beta"].reshape(L * nkv, nb)
                        r = r * calib["a"].reshape(1, -1) + beta[:, bk].T
                    rule = rule[4:]
                sc = token_scores(rule, r)
            ev = held[choose(sc, pinned[held], budget, stab)]
            keep[:, :, ev] = False
        else:
            for l in range(L):
                for hh in range(nkv):
                    held = keep[l, hh, :held_upto].nonzero().flatten()
                    if mode == "oracle-head":
                        sc = oracle_mass[l, hh, held]
                    elif mode == "head-cal":
                        nb = calib["NB"]
                        bk = (held_upto - held).float().log2().floor().clamp(0, nb - 1).long()
                        sc = rows[held, l * nkv + hh] * calib["a"][l, hh] + calib["beta"][l, hh, bk]
                    else:
                        sc = rows[held, l * nkv + hh]
                    ev = held[choose(sc, pinned[held], budget, stab)]
                    keep[l, hh, ev] = False

    for ci, (a, b) in enumerate(chunks):
        if evicting and a > 0 and (not once or b == T):
            evict(a, final=(b == T))
        n = b - a
        x = h[a:b]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for l in range(L):
            B = m.blk[l]
            y = m.rms(x, B["an"])
            q, k, v = y @ B["q"].T, y @ B["k"].T, y @ B["v"].T
            if b <= P:
                rows[a:b, l * nkv:(l + 1) * nkv] = heads(l, torch.cat([q, k, v], -1)).T
            qr = m.rope(q.view(n, nq, d), pos[a:b])
            kr = m.rope(k.view(n, nkv, d), pos[a:b])
            K[l][:, a:b] = kr.transpose(0, 1)
            V[l][:, a:b] = v.view(n, nkv, d).transpose(0, 1)
            vis = keep[l, :, :a] if evicting else torch.ones(nkv, a, dtype=torch.bool)
            # mask [nkv, n, a + n]: held prompt keys (per column) + causal chunk
            mask = torch.cat([vis[:, None, :].expand(nkv, n, a), causal[None].expand(nkv, n, n)], -1)
            qh = qr.transpose(0, 1).reshape(nkv, g, n, d)
            kk, vv = K[l][:, :b], V[l][:, :b]
            att = torch.einsum("kgnd,ksd->kgns", qh, kk) / math.sqrt(d)
            if want_mass and b == T:
                maxlogit[l] = att[:, :, scored_q, :P].amax(dim=(1, 2))
            att = att.masked_fill(~mask[:, None], -math.inf)
            w = keep_last
            if mode.startswith(OBS_MODES) and b == P and n < w:
                raise SystemExit(f"{mode}: the last prompt ubatch ({n}) is shorter than the observation window ({w})")
            if mode.startswith("obs:") and b == P:
                obslogit[l] = att[:, :, n - w:, :P].amax(dim=(1, 2))
            att = att.softmax(-1)
            if mode.startswith(("obsp:", "hybp:")) and b == P:
                obslogit[l] = att[:, :, n - w:, :P].sum(dim=(1, 2))
            if want_mass and b == T:
                mass[l] = att[:, :, scored_q, :P].sum(dim=(1, 2))
            o = torch.einsum("kgns,ksd->kgnd", att, vv).reshape(nq, n, d).transpose(0, 1).reshape(n, nq * d)
            x = x + o @ B["o"].T
            y = m.rms(x, B["fn"])
            x = x + (torch.nn.functional.silu(y @ B["gate"].T) * (y @ B["up"].T)) @ B["down"].T
        h[a:b] = x
        if b <= P:
            keep[:, :, a:b] = True
    # logits of the tail (targets P+1..T-1 are scored by rows P..T-2) and of row P-1
    xs = m.rms(h[P - 1:T - 1], m.norm)
    logp = (xs @ m.out.T).log_softmax(-1)
    tgt = ids[P:T]
    nll = -logp[torch.arange(T - P), tgt]  # nll[i]: target P + i
    am = logp.argmax(-1) == tgt
    return {"nll": nll, "argmax": am, "keep": keep[:, :, :P].clone(), "mass": mass, "maxlogit": maxlogit,
            "rows": rows[:P].clone()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--modes", default="dense,token:z_max,head")
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--decode", type=int, default=DECODE, help="decode tokens (the suite's --decode)")
    ap.add_argument("--body-start", type=int, default=BODY_START, help="corpus offset of the body (run.py's --body-start)")
    ap.add_argument("--heads", default=HEADS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--calib", default=None, help="calibration for cal_/aff_ rules (offline experiment)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    m = Model(GGUF)
    corpus = np.fromfile(os.path.join(CACHE, "text", "austen-paragraphs.b179c9523d0e.ids"), dtype="<i4")
    seq = probes.copy_sequence(corpus, a.ctx, a.decode, DEPTHS, PASSAGE, CUE, a.body_start, PASSAGE_START, None)
    heads = Heads(a.heads, m.L)
    ctx = a.ctx
    budget, stab, keep_last = ctx // 8 - ctx // 32, ctx // 32, ctx // 32
    P = seq.prefill
    dec = torch.tensor([t - P for t in seq.decode_scored])
    probe_idx = [torch.tensor([t - P for t in p["scored"]]) for p in seq.probes]
    t0 = time.time()
    dtag = ("" if a.decode == DECODE else f"-d{a.decode}") + ("" if a.body_start == BODY_START else f"-b{a.body_start}")
    cache = os.path.join(REPO, "target", "sim", f"dense-{ctx}-{a.ubatch}{dtag}.pt")
    dense = torch.load(cache) if os.path.exists(cache) else {}
    if dense.get("maxlogit") is None:
        dense = run(m, heads, seq, "dense", budget, stab, keep_last, a.ubatch, False, want_mass=True)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        torch.save(dense, cache)
    dmass = dense["mass"]  # [L, nkv, P]
    out = []

    def report(name, r, secs):
        dn = r["nll"][dec] - dense["nll"][dec]
        n = dn.numel()
        rec = {"ctx": ctx, "body_start": a.body_start, "mode": name, "budget": budget, "stabilizer": stab, "keep_last": keep_last,
               "ubatch": a.ubatch, "heads": os.path.basename(a.heads), "prompt": P,
               "ppl_decode": math.exp(r["nll"][dec].mean().item()),
               "ppl_decode_dense": math.exp(dense["nll"][dec].mean().item()),
               "dnll": dn.mean().item(), "dnll_2se": 2 * dn.std().item() / math.sqrt(n),
               "copy_acc": float(torch.cat([r["argmax"][i] for i in probe_idx]).float().mean()),
               "seconds": round(secs, 1),
               "nll_decode": [round(x, 5) for x in r["nll"][dec].tolist()]}
        rec["ppl_change_pct"] = 100 * (math.exp(rec["dnll"]) - 1)
        if name != "dense":
            kp = r["keep"]  # [L, nkv, P]
            tot = dmass.sum(-1)
            rec["mass_kept"] = (dmass * kp).sum(-1).div(tot).mean().item()
            rec["mass_kept_min_layer"] = (dmass * kp).sum(-1).div(tot).mean(1).min().item()
            rec["held_per_column"] = int(kp[0, 0].sum())
            union = kp.any(dim=(0, 1))
            rec["union_cells"] = int(union.sum())
            rec["kv_compression_cells"] = P / max(int(union.sum()), 1)
            # share of the per-(layer, head) attended prompt keys
            rec["attended_prompt_keys_per_column"] = kp.sum(-1).float().mean().item()
        print(json.dumps(rec), flush=True)
        out.append(rec)

    report("dense", dense, time.time() - t0)
    for mode in a.modes.split(","):
        if mode == "dense":
            continue
        once = mode.endswith("@once")
        base = mode.replace("@once", "")
        t1 = time.time()
        r = run(m, heads, seq, base, budget, stab, keep_last, a.ubatch, once or base.startswith(("oracle",) + OBS_MODES),
                oracle_mass=dmass, oracle_logit=dense["maxlogit"],
                calib=torch.load(a.calib) if a.calib else None)
        report(mode, r, time.time() - t1)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

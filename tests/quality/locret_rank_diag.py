"""Diagnostic for the Locret quality rows (BENCHMARKS.md): do the trained
heads' scores, and their token-level max over layers and KV heads (what
llama.cpp's Locret evicts by), track the Locret target better than random
heads? HF checkpoint of the suite's model (locret_pack), Austen text, 1024
tokens, last 128 as the queries (as in training). Needs torch, transformers,
safetensors; prints one JSON line. `aggregate_top8_vs_token_max_target`
compares token-level aggregates of the per-(layer, KV head) scores (raw,
rank- or z-normalised per (layer, head); max or mean) with the oracle's
token-level top 1/8: llama.cpp's `locret.token_score` offers z_max (default),
rank_max and raw_max. LOCRET_DIAG_DUMP=path caches the model's forward.

    python tests/quality/locret_rank_diag.py
"""
import json, os, sys, numpy as np, torch
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.expanduser("~/.cache/infinitehip")
sys.path.insert(0, os.path.join(REPO, "python-shim"))
from infinitehip import locret_train as lt
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
md = os.path.join(CACHE, "models", "SmolLM2-135M-Instruct.Q4_1-hf")
tok = AutoTokenizer.from_pretrained(md)
model = AutoModelForCausalLM.from_pretrained(md, dtype=torch.float32).eval()
text = open(os.path.join(CACHE, "quality", "text", "austen.txt"), encoding="utf-8").read()
ids = tok(text[200000:260000], return_tensors="pt").input_ids[0][:1024]
shape = lt.Shape(model.config)
dump = os.environ.get("LOCRET_DIAG_DUMP")  # cache of (x, t): the forward is the slow part
if dump and os.path.exists(dump):
    x, t = torch.load(dump)
else:
    x, t = lt.Collector(model, shape)(ids, 128)  # x [L,P,in], t [L,nkv,P]
    if dump:
        torch.save((x, t), dump)
def heads(path):
    st = load_file(path)
    w1 = torch.stack([st[lt.fc1_name(l)].float() for l in range(shape.n_layers)])
    w2 = torch.stack([st[lt.fc2_name(l)].float() for l in range(shape.n_layers)])
    h = torch.nn.functional.silu(torch.einsum("lpi,lhi->lph", x, w1))
    return torch.einsum("lph,lkh->lkp", h, w2)
out = {}
P = t.shape[-1]
k = P // 8
tt = t.amax(dim=(0, 1))
def ov(a, b):
    ta, tb = set(a.topk(k).indices.tolist()), set(b.topk(k).indices.tolist())
    return len(ta & tb) / k
for name, path in [("trained", os.path.join(REPO, "python-shim", "infinitehip", "heads", "smollm2-135m-instruct.h64.safetensors")),
                   ("random", os.path.join(CACHE, "quality", "locret-random-heads-h256.safetensors"))]:
    p = heads(path)
    rho, o = lt.rank_quality(p, t)
    pt = p.amax(dim=(0, 1))
    # token rank-normalised per (layer, head) then max: a scale-free aggregate
    r = p.argsort(-1).argsort(-1).float() / P
    z = (p - p.mean(-1, keepdim=True)) / p.std(-1, keepdim=True).clamp_min(1e-12)
    aggs = {"raw_max": pt, "raw_mean": p.mean(dim=(0, 1)), "rank_max": r.amax(dim=(0, 1)),
            "rank_mean": r.mean(dim=(0, 1)), "z_max": z.amax(dim=(0, 1)), "z_mean": z.mean(dim=(0, 1))}
    out[name] = {"per_head_spearman": rho, "per_head_top8": o,
                 "token_max_top8_vs_token_max_target": ov(pt, tt),
                 "token_rankmax_top8_vs_token_max_target": ov(r.amax(dim=(0, 1)), tt),
                 "aggregate_top8_vs_token_max_target": {a: ov(v, tt) for a, v in aggs.items()},
                 "pos0_rank_of_token_max": int((pt > pt[0]).sum()),
                 "which_layer_wins": np.bincount(p.amax(dim=1).argmax(0).numpy(), minlength=shape.n_layers).tolist()}
out["target_pos0_rank"] = int((tt > tt[0]).sum())
out["target_which_layer_wins"] = np.bincount(t.amax(dim=1).argmax(0).numpy(), minlength=shape.n_layers).tolist()
print(json.dumps(out))

#!/usr/bin/env python3
"""Where hip's decode loss at 8x comes from on SmolLM2, measured offline on
real q/k dumped from llama.cpp (INFINITEHIP_DUMP_QKV, see selq_replay.rs):
attention mass kept by a shared (GQA-pooled) exact top-k at a fixed budget,
against what a per-q-head choice of the same size would keep, and how the
budget split (sink / window / selected) and a per-layer budget change it.

    python3 tests/quality/selq/pooled_recall.py DUMP_DIR [--layers 3,8] [--stride 8]

Decode queries at positions 1536..2047 of a 2K dump (SmolLM2: 9 q / 3 KV
heads, head_dim 64); budget 256 keys = 1/8 of 2048. Pools compared for the
shared selection of the middle keys (sink and window always kept):
  max_raw      max over the group's q heads of q.k (hip's probe score)
  max_prob     max over heads of the per-head log-probability (normalised
               over the middle keys only, which a selector can compute)
  sum_prob     sum over heads of those probabilities
  sum_true     sum over heads of the true probabilities (normalised over
               every key): the shared set that maximises mean recall
  per_head     each q head its own top-k (not one mask per KV head)
"""
import argparse

import numpy as np

HQ, HK, D = 9, 3, 64
G = HQ // HK


def head_scores(q, k, t, h):
    s = q[t, h * G:(h + 1) * G] @ k[:t + 1, h].T / np.sqrt(D)
    p = np.exp(s - s.max(1, keepdims=True))
    return s, p / p.sum(1, keepdims=True)


def recall(p, fixed, sel):
    return float((p[:, fixed].sum(1) + p[:, sel].sum(1)).mean())


def pools(s, p, sink, win, k):
    n = s.shape[1]
    fixed = np.zeros(n, bool)
    fixed[:sink] = True
    fixed[n - win:] = True
    mid = np.nonzero(~fixed)[0]
    sm, pm = s[:, mid], p[:, mid]
    top = lambda score: mid[np.argpartition(-score, k)[:k]] if len(mid) > k else mid
    mx = sm.max(1, keepdims=True)
    lse = np.log(np.exp(sm - mx).sum(1, keepdims=True)) + mx
    out = {name: recall(p, fixed, top(score)) for name, score in [
        ("max_raw", sm.max(0)), ("max_prob", (sm - lse).max(0)), ("sum_prob", np.exp(sm - lse).sum(0)),
        ("sum_true", pm.sum(0))]}
    out["per_head"] = float((p[:, fixed].sum(1) + np.sort(pm, 1)[:, ::-1][:, :k].sum(1)).mean())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dump")
    ap.add_argument("--layers", default=",".join(str(x) for x in range(3, 30)))
    ap.add_argument("--stride", type=int, default=8, help="score every stride-th query of 1536..2047")
    ap.add_argument("--budget", type=int, default=256)
    a = ap.parse_args()
    layers = [int(x) for x in a.layers.split(",")]
    splits = [(32, 64), (4, 64), (16, 32), (4, 16), (32, 128)]
    res, split_res = {}, {}
    for l in layers:
        q = np.fromfile(f"{a.dump}/L{l}.q.f32", dtype="<f4").reshape(-1, HQ, D)
        k = np.fromfile(f"{a.dump}/L{l}.k.f32", dtype="<f4").reshape(-1, HK, D)
        for t in range(1536, min(2048, len(k)), a.stride):
            for h in range(HK):
                s, p = head_scores(q, k, t, h)
                for name, v in pools(s, p, 32, 64, a.budget - 96).items():
                    res.setdefault(name, {}).setdefault(l, []).append(v)
                for sink, win in splits:
                    v = pools(s, p, sink, win, a.budget - sink - win)["max_raw"]
                    split_res.setdefault((sink, win), []).append(v)
    names = list(res)
    print("recall (attention mass kept), sink 32 + window 64 + top-k of the middle, budget", a.budget)
    print("layer " + " ".join(f"{n:>9}" for n in names))
    for l in layers:
        print(f"{l:5d} " + " ".join(f"{np.mean(res[n][l]):9.4f}" for n in names))
    print(" mean " + " ".join(f"{np.mean([np.mean(res[n][l]) for l in layers]):9.4f}" for n in names))
    print("\nbudget split, exact max_raw top-k (sink, window): recall")
    for sw, v in split_res.items():
        print(f"  {sw}: {np.mean(v):.4f}")


if __name__ == "__main__":
    main()

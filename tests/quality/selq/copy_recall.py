#!/usr/bin/env python3
"""hip's decode selection replayed on real q/k of the quality suite's 8K
sequence (continuation + copy probes), per candidate fix for issue 12:
attention mass kept on the continuation queries and on the copy-probe
queries, and on the probe queries the share of the planted passage's dense
attention mass that the selection keeps.

    python3 tests/quality/selq/copy_recall.py DUMP_DIR [--layers 3,8,...] [--variants a,b]

DUMP_DIR: `INFINITEHIP_DUMP_QKV=DIR` (cpp-bridge/src/llama.rs) of
`ihip_run score` on the suite's 8K sequence (`--prefill 7904`) with a
covering hip config and `dense_layers: 0`, so q/k are the dense model's.
The probe layout is rebuilt with probes.copy_sequence exactly as run.py
builds it (FULL mode: decode 128, depths 0.1..0.9, passages of 32, cue 8).
The dump of BENCHMARKS.md "hip at 8K on SmolLM2: copy gap closed":

    # seq8k.ids: the suite's q8192 sequence; cover.json: configs/hip-cover.json's
    # policy instantiated at 8192 plus prefill/decode_dense_below 0
    INFINITEHIP_DUMP_QKV=DIR LLAMA_INFINITEHIP_CONFIG=cover.json \
      BUILD/build-patched/bin/ihip_run score MODEL --input seq8k.ids --prefill 7904 \
      --nll cover.nll --kv f16 --batch 512 --threads 1 --prefill-logits all

(30 layers x 8191 tokens x (9 + 3 + 3) heads x 64 f32: 0.94 GB.)

Variants (budget per KV head = sink 32 + window ctx/32 + `sel` middle keys,
sel = ctx/8 - 32 - ctx/32, as configs/hip-1_8-*.json):
  topk         exact GQA-pooled top-sel of the middle every step (hip-1/8-topk)
  perhead      each q head its own top-sel (not one mask per KV head)
  c2rR         stage 1 chunks of 2 (exact chunk max, = the representative
               search at chunk 2) keeping ctx/2, refreshed every R steps;
               stage 2 token top-sel over stage 1's set every step; tokens
               that slid out of the window since stage 1 ran stay (hip.rs)
  c2rR+succN   c2rR, and stage 2's candidates also hold the successors
               (x+1..x+N, N default 1) of the keys stage 2 chose at the previous step
               (induction: the copy head's next key is the last one's successor)
  pq-V         variant V run by each q head on its own scores with its own
               state and the same budget (hip.per_q_head), e.g. pq-c2r8+succ4
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import probes  # noqa: E402

HQ, HK, D = 9, 3, 64
G = HQ // HK


def sequence(corpus_ids, ctx):
    return probes.copy_sequence(corpus_ids, ctx, 128, [0.1, 0.3, 0.5, 0.7, 0.9], 32, 8, 20000, 600000, None)


class Sim:
    """One (layer, KV head) decode replay of one variant."""

    def __init__(self, kind, refresh, succ, ctx):
        self.kind, self.refresh, self.succ = kind, refresh, succ
        self.sink, self.win = 32, ctx // 32
        self.sel = ctx // 8 - 32 - ctx // 32
        self.keep1 = ctx // 2
        self.step = 0
        self.s1 = None
        self.mid_end = 0
        self.prev = np.zeros(0, np.int64)

    def select(self, s, pos):
        """s: [G, pos+1] raw scores of the group's q heads. Returns a bool mask
        per q head [G, pos+1] (the same row for shared selections)."""
        n = pos + 1
        sink_end = min(self.sink, n)
        win_start = max(n - self.win, sink_end)
        fixed = np.zeros(n, bool)
        fixed[:sink_end] = True
        fixed[win_start:] = True
        mid = np.arange(sink_end, win_start)
        pooled = s.max(0)
        if self.kind == "perhead":
            m = np.repeat(fixed[None], G, 0)
            for g in range(G):
                sc = s[g, mid]
                pick = mid[np.argpartition(-sc, self.sel)[:self.sel]] if len(mid) > self.sel else mid
                m[g, pick] = True
            return m
        if self.kind == "topk":
            pick = mid[np.argpartition(-pooled[mid], self.sel)[:self.sel]] if len(mid) > self.sel else mid
            m = fixed.copy()
            m[pick] = True
            return np.repeat(m[None], G, 0)
        # c2: stage 1 refresh
        if self.s1 is None or self.step % self.refresh == 0:
            self.mid_end = win_start
            c0 = mid[::2]
            pm = pooled[mid]
            if len(pm) % 2:
                pm = np.append(pm, -np.inf)
            cs = pm.reshape(-1, 2).max(1)
            nk = self.keep1 // 2
            if len(cs) <= nk:
                self.s1 = mid.copy()
            else:
                keep = np.sort(np.argpartition(-cs, nk - 1)[:nk])
                toks = np.concatenate([c0[keep], c0[keep] + 1])
                self.s1 = np.sort(toks[toks < win_start])
        self.step += 1
        cand = self.s1
        if self.succ and len(self.prev):
            extra = np.unique((self.prev[:, None] + np.arange(1, self.succ + 1)[None]).ravel())
            extra = extra[(extra >= sink_end) & (extra < win_start)]
            cand = np.union1d(cand, extra)
        if len(cand) > self.sel:
            pick = cand[np.argpartition(-pooled[cand], self.sel)[:self.sel]]
        else:
            pick = cand
        self.prev = pick
        m = fixed.copy()
        m[pick] = True
        m[max(self.mid_end, sink_end):win_start] = True  # slid out of the window since stage 1 ran
        return np.repeat(m[None], G, 0)


class PerQ:
    """`pq-VARIANT`: VARIANT run by each q head on its own scores, with its
    own state and the same budget (hip.per_q_head)."""

    def __init__(self, kind, refresh, succ, ctx):
        self.sims = [Sim(kind, refresh, succ, ctx) for _ in range(G)]

    def select(self, s, pos):
        return np.stack([sim.select(s[g:g + 1], pos)[0] for g, sim in enumerate(self.sims)])


def make_sim(v, ctx):
    if v.startswith("pq-"):
        return PerQ(*parse_variant(v[3:]), ctx)
    return Sim(*parse_variant(v), ctx)


def parse_variant(v):
    if v in ("topk", "perhead"):
        return v, 1, False
    base, _, succ = v.partition("+succ")
    assert base.startswith("c2r"), v
    return "c2", int(base[3:]), (int(succ) if succ else 1) if "+succ" in v else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dump")
    ap.add_argument("--ids", required=True, help="corpus ids (austen-paragraphs.*.ids)")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--layers", default=",".join(str(x) for x in range(3, 30)))
    ap.add_argument("--variants", default="topk,perhead,c2r8,c2r4,c2r2,c2r8+succ,c2r1")
    a = ap.parse_args()
    corpus = np.fromfile(a.ids, dtype="<i4")
    seq = sequence(corpus, a.ctx)
    P = seq.prefill
    cont_q = list(range(P, P + 127))  # queries whose logits score decode_scored targets
    probe_q = []  # (query pos, planted passage range)
    for p in seq.probes:
        r0 = p["scored"].start - 8
        for t in p["scored"]:
            probe_q.append((t - 1, range(p["planted_at"], p["planted_at"] + 32)))
    probe_of = {t: r for t, r in probe_q}
    layers = [int(x) for x in a.layers.split(",")]
    variants = a.variants.split(",")
    res = {v: {"cont": [], "probe": [], "planted": [], "planted_dense": []} for v in variants}
    per_layer = {v: {} for v in variants}
    last_q = max(t for t, _ in probe_q)
    for l in layers:
        q = np.fromfile(f"{a.dump}/L{l}.q.f32", dtype="<f4").reshape(-1, HQ, D)
        k = np.fromfile(f"{a.dump}/L{l}.k.f32", dtype="<f4").reshape(-1, HK, D)
        assert len(k) > last_q, (len(k), last_q)
        for h in range(HK):
            sims = {v: make_sim(v, a.ctx) for v in variants}
            kh = k[:, h]
            for pos in range(P, last_q + 1):
                s = q[pos, h * G:(h + 1) * G] @ kh[:pos + 1].T / np.sqrt(D)
                p = np.exp(s - s.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                for v, sim in sims.items():
                    m = sim.select(s, pos)  # stateful: every step runs
                    kept = (p * m).sum(1)
                    if pos in probe_of:
                        r = probe_of[pos]
                        pl = p[:, r.start:r.stop].sum(1)
                        plk = (p[:, r.start:r.stop] * m[:, r.start:r.stop]).sum(1)
                        res[v]["probe"].extend(kept)
                        res[v]["planted"].extend(plk)
                        res[v]["planted_dense"].extend(pl)
                        per_layer[v].setdefault(l, {"cont": [], "probe": []})["probe"].extend(kept)
                    elif pos < P + 127:
                        res[v]["cont"].extend(kept)
                        per_layer[v].setdefault(l, {"cont": [], "probe": []})["cont"].extend(kept)
        print(f"layer {l}: " + "  ".join(
            f"{v} {np.mean(per_layer[v][l]['cont']):.4f}/{np.mean(per_layer[v][l]['probe']):.4f}" for v in variants),
            flush=True)
    print("\nmass kept (mean over layers x q heads x queries); planted = passage mass kept / passage dense mass")
    print(f"{'variant':>14} {'continuation':>13} {'probe':>8} {'planted':>8}")
    for v in variants:
        r = res[v]
        print(f"{v:>14} {np.mean(r['cont']):13.4f} {np.mean(r['probe']):8.4f} "
              f"{np.sum(r['planted']) / np.sum(r['planted_dense']):8.4f}")
    print(f"dense passage mass on probe queries (mean): {np.mean(res[variants[0]]['planted_dense']):.4f}")


if __name__ == "__main__":
    main()

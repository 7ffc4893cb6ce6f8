#!/usr/bin/env python3
"""Decode speed, stock vs patched llama.cpp, at long contexts (one run).

Same tiny random Llama GGUF (make_tiny_gguf.py), same threads, same ctx.
For each depth the KV cache is filled once by the patched build (sparse
prefill: a dense O(n^2) prefill of 128K tokens does not fit this 2-core
machine's time) and saved as a llama.cpp session file; stock and patched then
each load that same state and time GEN decode steps (the first step untimed).
Decode cost does not depend on the cached values for stock attention, so the
stock number is what stock decode costs at that depth.

    python3 tests/llama-cpp/bench.py [--depths 8192,32768,131072] [--gen 64] [--threads 2]
        [--json BENCH.json]

--real: the quality suite's real model (SmolLM2-135M-Instruct Q4_1, 30
layers, 9 q / 3 KV heads, head_dim 64, trained for 8K: contexts beyond are
for speed only) on real text (Emma, tokenized by the model), flash attention
on, prefill AND decode, stock vs patched in one run (bench_real.py).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from e2e_test import hip_config  # noqa: E402

# InfiniteHiP-like budget for a tiny model: sink 64, window 512, 3 stages down to 1024 tokens.
CONFIG = hip_config(sink=64, window=512, stages=[(64, 4096, 16), (16, 2048, 8), (8, 1024, 4)], block_size_q=64)
# the plugin's own attention at every depth (no dense-below route)
CONFIG |= {"prefill_dense_below": 0, "decode_dense_below": 0}
# Only fills the KV cache for the timed decode (values do not change stock's
# decode cost): one coarse stage and strided scoring keep a 128K prefill short.
FILL_CONFIG = hip_config(sink=16, window=256, stages=[(512, 512, 1)], block_size_q=64, q_stride=16)
FILL_CONFIG |= {"prefill_dense_below": 0, "decode_dense_below": 0}


def run(exe, args, config_path=None, threads=2):
    env = dict(os.environ)
    env.pop("LLAMA_INFINITEHIP_CONFIG", None)
    env["INFINITEHIP_THREADS"] = str(threads)  # the plugin's own selection threads = llama's
    if config_path:
        env["LLAMA_INFINITEHIP_CONFIG"] = config_path
    r = subprocess.run([exe] + args, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"failed: {exe} {' '.join(args)}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    if "--real" in sys.argv:
        sys.argv.remove("--real")
        import bench_real  # noqa: E402

        return bench_real.main()
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=os.path.join(REPO, "target", "llama.cpp"))
    ap.add_argument("--depths", default="8192,32768,131072")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per build, interleaved; best and median reported")
    ap.add_argument("--json", default=os.path.join(REPO, "target", "bench-llama-cpp.json"))
    a = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="ihip-bench-")
    model = os.path.join(tmp, "tiny.gguf")
    subprocess.run([sys.executable, os.path.join(HERE, "make_tiny_gguf.py"), model], check=True,
                   stdout=subprocess.DEVNULL)
    cfg = os.path.join(tmp, "hip.json")
    with open(cfg, "w") as f:
        json.dump(CONFIG, f)
    fill_cfg = os.path.join(tmp, "fill.json")
    with open(fill_cfg, "w") as f:
        json.dump(FILL_CONFIG, f)
    stock = os.path.join(a.work, "build-stock", "bin", "ihip_run")
    patched = os.path.join(a.work, "build-patched", "bin", "ihip_run")

    rows = []
    for depth in [int(x) for x in a.depths.split(",")]:
        ctx = ((depth + a.gen + 16 + 255) // 256) * 256
        common = ["--ctx", str(ctx), "--threads", str(a.threads)]
        state = os.path.join(tmp, f"state-{depth}.bin")
        fill = run(patched, ["fill", model, "--depth", str(depth), "--state", state] + common, fill_cfg, a.threads)
        bench = ["bench", model, "--depth", str(depth), "--gen", str(a.gen), "--state", state] + common
        load0 = os.getloadavg()[0]
        ss, ps = [], []
        for _ in range(a.reps):
            s = run(stock, bench, None, a.threads)
            p = run(patched, bench, cfg, a.threads)
            ss.append(s["decode_tok_s"])
            ps.append(p["decode_tok_s"])
        os.remove(state)
        row = {
            "context": depth,
            "threads": a.threads,
            "decode_tokens": s["decode_tokens"],
            "stock_tok_s": max(ss),
            "patched_tok_s": max(ps),
            "speedup": max(ps) / max(ss),
            "stock_tok_s_median": statistics.median(ss),
            "patched_tok_s_median": statistics.median(ps),
            "speedup_median": statistics.median(ps) / statistics.median(ss),
            "reps": a.reps,
            "fill_prefill_s": fill["prefill_s"],
            "load_avg_1m_before": load0,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    out = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "model": "tiny random Llama GGUF: 2 layers, n_embd 128, 4 q heads / 2 kv heads, head_dim 32, f32 weights, f16 KV",
        "config": CONFIG,
        "fill_config": FILL_CONFIG,
        "note": "KV filled once by the patched build with fill_config (sparse prefill) and loaded by both builds from the same session file; decode timed over decode_tokens steps after one untimed step",
        "results": rows,
    }
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nthreads {a.threads}, best of {a.reps} (median in parentheses)")
    print("| context | stock tok/s | patched tok/s | speedup | fill (s) | load avg |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['context']} | {r['stock_tok_s']:.1f} ({r['stock_tok_s_median']:.1f}) | "
              f"{r['patched_tok_s']:.1f} ({r['patched_tok_s_median']:.1f}) | {r['speedup']:.2f}x ({r['speedup_median']:.2f}x) | "
              f"{r['fill_prefill_s']:.1f} | {r['load_avg_1m_before']:.1f} |")
    print(f"\njson: {a.json}")


if __name__ == "__main__":
    main()

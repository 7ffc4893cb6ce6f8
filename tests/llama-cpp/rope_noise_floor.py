#!/usr/bin/env python3
"""Noise floor of gpu_test.py section 12 (hip's RoPE modes past the trained
length), measured on the CPU route: a diagnostic, not a test.

Section 12 compares the CUDA route's teacher-forced logits with the CPU
route's on a random 2-layer model trained at 256 tokens, 2048 + 48 tokens,
small hip budgets. On such a model a rounding-sized change flips near-tied
block choices and one flip moves the logits a lot. This prints how far the
CPU route moves against itself under rounding-level changes (threads 1 vs 2;
K/V cache f32 vs f16, ~5e-4 relative), with a covering budget, and under the
controls (the other scoring mode, original positions), so a route difference
can be read against it.

    python3 tests/llama-cpp/make_tiny_gguf.py tinyrope.gguf --layers 2 --embd 512 --heads 8 \\
        --kv-heads 2 --head-dim 64 --ff 1024 --ctx 256
    python3 tests/llama-cpp/rope_noise_floor.py target/llama.cpp/build-patched/bin/ihip_run tinyrope.gguf TMPDIR
"""
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import compare, hip_config  # noqa: E402

EXE, M, T = sys.argv[1:4]
P, G, B = 2048, 48, 512  # as gpu_test.py's ROPE_P, ROPE_G, ROPE_B


def cfg(scoring, attention, cover=False):
    st = [(32, 1 << 16, 8), (8, 1 << 15, 4)] if cover else [(32, 512, 8), (8, 128, 4)]
    c = hip_config(sink=16, window=128, stages=st, rope=(scoring, attention))  # gpu_test.py rope_cfg
    c["default"]["mask_estimator"] = "reference"
    return c


def gen(tag, c, threads=2, kv="f16", force=None):
    os.makedirs(T, exist_ok=True)
    p = os.path.join(T, tag + ".json")
    with open(p, "w") as f:
        json.dump(c, f)
    env = dict(os.environ, LLAMA_INFINITEHIP_CONFIG=p, INFINITEHIP_THREADS=str(threads))
    lp, tp = os.path.join(T, tag + ".logits"), os.path.join(T, tag + ".tokens")
    args = [EXE, "gen", M, "--prompt-len", str(P), "--gen", str(G), "--logits", lp, "--tokens", tp, "--kv", kv,
            "--fa", "on", "--ctx", str(P + G + 256), "--batch", str(B), "--threads", str(threads)]
    if force:
        args += ["--force", force]
    r = subprocess.run(args, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    n_vocab = json.loads(r.stdout.strip().splitlines()[-1])["n_vocab"]
    return np.fromfile(lp, dtype=np.float32).reshape(G, n_vocab), tp


base, tf = gen("base", cfg("chunk_indexed", "streaming"))
rows = [
    ("threads 1 vs 2", gen("t1", cfg("chunk_indexed", "streaming"), threads=1, force=tf)[0], base),
    ("K/V f32 vs f16, chunk_indexed", gen("kv32", cfg("chunk_indexed", "streaming"), kv="f32", force=tf)[0], base),
]
rel16 = gen("rel16", cfg("relative", "streaming"), force=tf)[0]
rows.append(("K/V f32 vs f16, relative", gen("rel32", cfg("relative", "streaming"), kv="f32", force=tf)[0], rel16))
cov16 = gen("cov16", cfg("chunk_indexed", "streaming", True), force=tf)[0]
rows.append(("K/V f32 vs f16, covering budget", gen("cov32", cfg("chunk_indexed", "streaming", True), kv="f32",
                                                   force=tf)[0], cov16))
rows.append(("control: relative vs chunk_indexed scoring", rel16, base))
orig = dict(cfg("original", "original"), prefill_dense_below=0, decode_dense_below=0)
rows.append(("control: original positions", gen("orig", orig, force=tf)[0], base))
print("| change (CPU route, teacher-forced 2048 + 48) | rel RMS of the logits | max abs | top-1 agreement |")
print("|---|---:|---:|---:|")
for name, x, y in rows:
    c = compare(x, y)
    print(f"| {name} | {c['rel_rms_diff']:.3e} | {c['max_abs_diff']:.3e} | {c['top1_agree']:.3f} |")

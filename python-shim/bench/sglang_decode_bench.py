"""CPU benchmark: SGLang engine decode tokens/s, `infinitehip` (hip) vs
`torch_native`, at a long context, in one run.

Model: a random-weight 2-layer GQA Llama (8 q heads, 2 KV heads, head_dim
64, hidden 512), float32, made here (no hub, no tokenizer). For each backend:
one request prefills the prompt and streams `--tokens` greedy tokens; decode
tokens/s is measured between the first and the last streamed chunk, so the
prefill and request set-up are excluded.

    SGLANG_USE_CPU_ENGINE=1 python sglang_decode_bench.py --context 16384 --json out.json
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

HIP = {
    "dense_layers": 0,
    "kv": {"page_size": 64},
    "default": {
        "method": "hip", "sink": 64, "window": 512,
        "stages": [{"chunk_size": 64, "keep_tokens": 4096, "refresh_interval": 16},
                   {"chunk_size": 16, "keep_tokens": 2048, "refresh_interval": 8},
                   {"chunk_size": 8, "keep_tokens": 1024, "refresh_interval": 4}],
        "block_size_q": 64, "q_stride": 4, "prefill_chunk": 4096,
    },
}


def make_model(path, ctx):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=ctx + 4096, rope_theta=500000.0,
                      torch_dtype="float32")
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def machine():
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def bench(model_path, backend, prompt, n, cfg_path):
    import sglang as sgl

    if cfg_path:
        os.environ["INFINITEHIP_CONFIG"] = cfg_path
    eng = sgl.Engine(model_path=model_path, device="cpu", dtype="float32",
                     attention_backend=backend, skip_tokenizer_init=True,
                     disable_cuda_graph=True, max_total_tokens=len(prompt) + 2 * n + 1024,
                     max_running_requests=1, chunked_prefill_size=-1,
                     mem_fraction_static=0.5, log_level="warning")
    try:
        sp = {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}
        t0 = time.perf_counter()
        marks, chunks = [], []
        for ch in eng.generate(input_ids=prompt, sampling_params=sp, stream=True):
            marks.append((time.perf_counter(), ch["meta_info"]["completion_tokens"]))
            chunks.append(list(ch["output_ids"]))
    finally:
        eng.shutdown()
    (ta, ca), (tb, cb) = marks[0], marks[-1]
    out = chunks[-1] if len(chunks[-1]) == n else [t for c in chunks for t in c]
    assert cb == n and len(out) == n, (cb, len(out))
    return {
        "backend": backend,
        "prefill_s": ta - t0,  # time to the first token: prefill + one decode step
        "decode_tokens_timed": cb - ca,
        "decode_tok_s": (cb - ca) / (tb - ta),
        "decode_ms_per_token": (tb - ta) / (cb - ca) * 1e3,
        "output_ids": out,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=128, help="greedy tokens generated (streamed)")
    ap.add_argument("--json")
    ap.add_argument("--omp-wait-policy", choices=["default", "passive"], default="default",
                    help="OMP_WAIT_POLICY for SGLang's processes (both backends)")
    args = ap.parse_args()
    if args.omp_wait_policy == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import random

    import infinitehip.sglang  # noqa: F401

    rng = random.Random(0)
    prompt = [1] + [rng.randrange(2, 512) for _ in range(args.context - 1)]
    with tempfile.TemporaryDirectory() as d:
        make_model(d, args.context)
        cfg_path = os.path.join(d, "hip.json")
        with open(cfg_path, "w") as f:
            json.dump(HIP, f)
        rows = [bench(d, "torch_native", prompt, args.tokens, None),
                bench(d, "infinitehip", prompt, args.tokens, cfg_path)]
    ref = rows[0]["output_ids"]
    for r in rows:
        r["token_agreement_vs_torch_native"] = sum(x == y for x, y in zip(r["output_ids"], ref)) / len(ref)
    speedup = rows[1]["decode_tok_s"] / rows[0]["decode_tok_s"]
    print(f"\nSGLang CPU decode, context {args.context} tokens, 2-layer Llama (8 q / 2 kv heads, head_dim 64), float32")
    print(f"machine: {machine()}; OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(f"{'backend':14s} {'1st token s':>10s} {'decode tok/s':>13s} {'ms/token':>9s} {'tokens = torch_native':>22s}")
    for r in rows:
        print(f"{r['backend']:14s} {r['prefill_s']:10.1f} {r['decode_tok_s']:13.2f} "
              f"{r['decode_ms_per_token']:9.1f} {r['token_agreement_vs_torch_native']:22.0%}")
    print(f"infinitehip / torch_native decode speedup: {speedup:.2f}x "
          f"(hip attends sink 64 + window 512 + 1024 selected tokens per KV head)")
    if args.json:
        out = {"machine": machine(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
               "context": args.context, "tokens": args.tokens,
               "model": "llama 2 layers, 8 q heads, 2 kv heads, head_dim 64, hidden 512, f32",
               "hip_config": HIP, "speedup": speedup,
               "results": [{k: v for k, v in r.items() if k != "output_ids"} for r in rows]}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

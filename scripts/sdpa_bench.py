#!/usr/bin/env python3
"""PyTorch SDPA (flash backend) decode baseline at Llama-3.1-8B shape, one layer.

Run on the GPU machine by scripts/gpu-run.sh. Flash attention's cost does not
depend on the values, so K/V are random bf16 of the same shape as the Rust
benchmark's (32 q heads, 8 kv heads, head_dim 128). Writes
{"name": ..., "results": {"<tokens>x<batch>": median_ms}, "skipped": {...}}.
"""
import argparse, json, sys
import torch
from torch.nn.attention import sdpa_kernel, SDPBackend
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", default="32768,131072,524288,1048576")
ap.add_argument("--batch", default="1,16")
ap.add_argument("--reps", type=int, default=20)
ap.add_argument("--prefill-tokens", default="32768,131072,1048576")
ap.add_argument("--json", required=True)
# Whole-model decode step: --layers SDPA calls in a row, each layer with its
# own K/V where they fit (else a ring of as many distinct buffers as fit).
ap.add_argument("--model-tokens", default="")
ap.add_argument("--model-batch", default="1,16")
ap.add_argument("--layers", type=int, default=32)
a = ap.parse_args()
res, skipped, distinct = {}, {}, {}
name = f"torch {torch.__version__} scaled_dot_product_attention, FLASH_ATTENTION backend, enable_gqa"
for t in [int(x) for x in a.tokens.split(",") if x]:
    for b in [int(x) for x in a.batch.split(",")]:
        key = f"{t}x{b}"
        try:
            torch.cuda.empty_cache()
            k = torch.randn(b, 8, t, 128, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(b, 8, t, 128, device="cuda", dtype=torch.bfloat16)
            q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                f = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                o = f()
                torch.cuda.synchronize()
                assert torch.isfinite(o).all()
                ts = []
                for _ in range(a.reps):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record(); f(); e.record(); e.synchronize()
                    ts.append(s.elapsed_time(e))
            ts.sort()
            res[key] = ts[len(ts) // 2]
            print(f"sdpa T={t} B={b}: {res[key]:.3f} ms", flush=True)
            del k, v, q, o
        except Exception as ex:  # OOM or unsupported: record why
            skipped[key] = f"{type(ex).__name__}: {str(ex)[:200]}"
            print(f"sdpa T={t} B={b}: skipped ({skipped[key]})", flush=True)
            torch.cuda.empty_cache()
for t in [int(x) for x in a.prefill_tokens.split(",") if x]:
    key = f"prefill_{t}"
    try:
        torch.cuda.empty_cache()
        k = torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(1, 32, t, 128, device="cuda", dtype=torch.bfloat16)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            o = f(); torch.cuda.synchronize()
            assert torch.isfinite(o).all()
            ts = []
            for _ in range(3 if t <= 262144 else 1):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(); f(); e.record(); e.synchronize()
                ts.append(s.elapsed_time(e))
        ts.sort()
        res[key] = ts[len(ts) // 2]
        print(f"sdpa causal prefill T={t}: {res[key]:.1f} ms", flush=True)
        del k, v, q, o
    except Exception as ex:
        skipped[key] = f"{type(ex).__name__}: {str(ex)[:200]}"
        print(f"sdpa prefill T={t}: skipped ({skipped[key]})", flush=True)
        torch.cuda.empty_cache()
for t in [int(x) for x in a.model_tokens.split(",") if x]:
    for b in [int(x) for x in a.model_batch.split(",") if x]:
        key = f"model_{t}x{b}"
        try:
            torch.cuda.empty_cache()
            layer_bytes = 2 * b * 8 * t * 128 * 2
            free, _ = torch.cuda.mem_get_info()
            r = min(a.layers, int(free * 0.85 // layer_bytes))
            if r == 0:
                raise MemoryError("one layer's K/V does not fit")
            kv = [(torch.randn(b, 8, t, 128, device="cuda", dtype=torch.bfloat16),
                   torch.randn(b, 8, t, 128, device="cuda", dtype=torch.bfloat16)) for _ in range(r)]
            qs = [torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16) for _ in range(a.layers)]
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                def step():
                    for l in range(a.layers):
                        k, v = kv[l % r]
                        F.scaled_dot_product_attention(qs[l], k, v, enable_gqa=True)
                step(); torch.cuda.synchronize()
                ts = []
                for _ in range(5):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record(); step(); e.record(); e.synchronize()
                    ts.append(s.elapsed_time(e))
            ts.sort()
            res[key] = ts[len(ts) // 2]
            distinct[key] = r
            print(f"sdpa {a.layers} layers T={t} B={b} ({r} distinct K/V): {res[key]:.3f} ms", flush=True)
            del kv, qs
        except Exception as ex:
            skipped[key] = f"{type(ex).__name__}: {str(ex)[:200]}"
            print(f"sdpa model T={t} B={b}: skipped ({skipped[key]})", flush=True)
            torch.cuda.empty_cache()
json.dump({"name": name, "results": res, "skipped": skipped, "model_distinct": distinct}, open(a.json, "w"), indent=1)

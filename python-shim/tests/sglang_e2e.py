"""End to end through `sglang.Engine` on the CPU: a random-weight 2-layer GQA
Llama (transformers LlamaConfig + save_pretrained; no hub, no tokenizer:
skip_tokenizer_init with token ids).

1. `attention_backend="infinitehip"` with a hip config whose budget covers
   the context gives the same greedy tokens as `torch_native`. The requests
   run one after another with shared prefixes, so SGLang's radix cache hands
   our backend prefix hits (the rebuild-from-pool path) and reused rows.
2. A small budget on a context several times the budget runs; its tokens
   and agreement with torch_native are reported.
3. Locret on every layer (random retaining heads, budget LOCRET_BUDGET),
   radix cache off: with the evicted slots handed back to SGLang's
   allocator (locret_free.py) the greedy tokens equal the retained-set path
   (INFINITEHIP_LOCRET_FREE=0), and every prompt longer than the budget
   returns exactly N - budget slots (the allocator's free count, logged by
   the scheduler's hook to INFINITEHIP_LOCRET_STATS).
4. SGLang's own kernel behind ours and the split backend flags, each with the
   covering budget, greedy tokens equal to torch_native: (a) one dense layer
   plus the default `prefill_dense_below` / `decode_dense_below` (SGLang's
   torch_native serves the dense layer and the short batches of the hip
   layer, the long prompt goes through hip), (b) `--prefill-attention-backend
   torch_native --decode-attention-backend infinitehip` (our backend builds
   each request's copy from SGLang's pool at its first decode), (c) the
   reverse.
5. Host offload (kv.device_cache_pages = OFFLOAD_CELLS, offload.py): SGLang's
   pool is the host tier, the engine's page cache (the CPU stand-in for device
   memory) holds 256 cells per layer; two requests whose KV is ~4x that
   decode the same greedy tokens as the all-resident run of the same config,
   and the backend's cache counters (INFINITEHIP_OFFLOAD_STATS) show
   evictions and misses.

Run: SGLANG_USE_CPU_ENGINE=1 python sglang_e2e.py [--json out.json]
(spawned scheduler processes re-import this file: keep the __main__ guard).
"""

import argparse
import json
import os
import sys
import tempfile
import time

N_LAYERS, N_HEADS, N_KV, HEAD_DIM = 2, 4, 2, 16
LONG = 1024  # tokens of the long prompt
NEW = 12  # greedy tokens per request

FULL_BUDGET = {
    "dense_layers": 0,
    "prefill_dense_below": 0,  # every layer through the plugin's hip path
    "decode_dense_below": 0,
    "kv": {"page_size": 16},
    "default": {
        "method": "hip", "sink": 16, "window": 64,
        "stages": [{"chunk_size": 32, "keep_tokens": 4096, "refresh_interval": 4},
                   {"chunk_size": 8, "keep_tokens": 2048, "refresh_interval": 2}],
        "block_size_q": 16, "q_stride": 2, "prefill_chunk": 256,
    },
}
# Attends sink 8 + window 32 + 64 selected = 104 of 1024+ tokens.
SMALL_BUDGET = {
    "dense_layers": 0,
    "prefill_dense_below": 0,
    "decode_dense_below": 0,
    "kv": {"page_size": 16},
    "default": {
        "method": "hip", "sink": 8, "window": 32,
        "stages": [{"chunk_size": 32, "keep_tokens": 256, "refresh_interval": 4},
                   {"chunk_size": 8, "keep_tokens": 64, "refresh_interval": 2}],
        "block_size_q": 16, "q_stride": 2, "prefill_chunk": 256,
    },
}


LOCRET_BUDGET = 64


def locret_config(heads):
    return {"dense_layers": 0, "kv": {"page_size": 16},
            "default": {"method": "locret", "budget": LOCRET_BUDGET, "chunk": 4096, "stabilizer": 16,
                        "keep_last": 8, "sink": 0, "hidden": 32, "weights": heads}}


def write_locret_heads(path, hidden=32):
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    t = {}
    for l in range(N_LAYERS):
        t[f"model.layers.{l}.self_attn.fc1.weight"] = (
            rng.standard_normal((hidden, (N_HEADS + 2 * N_KV) * HEAD_DIM)) / 8).astype("f4")
        t[f"model.layers.{l}.self_attn.fc2.weight"] = (rng.standard_normal((N_KV, hidden)) / 6).astype("f4")
    save_file(t, path)


def make_model(path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128,
        num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV, head_dim=HEAD_DIM,
        max_position_embeddings=4096, rope_theta=10000.0, torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    # Larger weights than the init default: sharper, less tied logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(path)


def prompts():
    import random

    rng = random.Random(1)
    long = [1] + [rng.randrange(2, 512) for _ in range(LONG - 1)]
    return [
        [1, 5, 9, 17, 33, 65],
        [1, 7, 8],
        long[:300],
        long,  # radix hit: 300-token prefix of the previous request
        long[:700] + [rng.randrange(2, 512) for _ in range(100)],  # hit on 700
    ]


def run(model_path, backend, config=None, prompt_list=None, **engine_args):
    import sglang as sgl

    if config is not None:
        fd, cfg_path = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        os.environ["INFINITEHIP_CONFIG"] = cfg_path
    else:
        os.environ.pop("INFINITEHIP_CONFIG", None)
    t0 = time.time()
    if backend is not None:
        engine_args["attention_backend"] = backend
    eng = sgl.Engine(
        model_path=model_path, device="cpu", dtype="float32", skip_tokenizer_init=True,
        disable_cuda_graph=True, max_total_tokens=8192, max_running_requests=4,
        mem_fraction_static=0.5, log_level="warning", **engine_args,
    )
    outs = []
    try:
        ps = prompt_list or prompts()
        for p in ps:  # one at a time: later requests hit the radix cache
            o = eng.generate(input_ids=p, sampling_params={"max_new_tokens": NEW, "temperature": 0})
            outs.append(list(o["output_ids"]))
        # And a batch of all of them at once (rows reused, mixed lengths).
        batch = eng.generate(
            input_ids=ps, sampling_params={"max_new_tokens": NEW, "temperature": 0}
        )
        outs.extend(list(o["output_ids"]) for o in batch)
    finally:
        eng.shutdown()
    return outs, time.time() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    import infinitehip.sglang  # noqa: F401  (the entry point registers it in SGLang processes)

    with tempfile.TemporaryDirectory() as d:
        make_model(d)
        ref, t_ref = run(d, "torch_native")
        full, t_full = run(d, "infinitehip", FULL_BUDGET)
        small, t_small = run(d, "infinitehip", SMALL_BUDGET)
        locret = run_locret(d)
        offl = run_offload(d)
        wrapped = {
            "dense_layer_and_thresholds": run(d, "infinitehip", {
                **{k: v for k, v in FULL_BUDGET.items() if not k.endswith("_dense_below")},
                "dense_layers": 1, "decode_dense_below": 512})[0],
            "prefill_torch_native_decode_infinitehip": run(
                d, None, FULL_BUDGET, prefill_attention_backend="torch_native",
                decode_attention_backend="infinitehip")[0],
            "prefill_infinitehip_decode_torch_native": run(
                d, None, FULL_BUDGET, prefill_attention_backend="infinitehip",
                decode_attention_backend="torch_native")[0],
        }

    lens = [len(p) for p in prompts()] * 2
    print(f"torch_native {t_ref:.1f}s, infinitehip full budget {t_full:.1f}s, small budget {t_small:.1f}s")
    ok = True
    for i, (r, f, s) in enumerate(zip(ref, full, small)):
        same = r == f
        ok &= same
        agree = sum(a == b for a, b in zip(r, s))
        print(f"req {i} prompt {lens[i]:5d}: torch_native {r}")
        print(f"{'':22s}infinitehip  {f}  {'EQUAL' if same else 'DIFFERENT'}")
        print(f"{'':22s}small budget {s}  ({agree}/{len(r)} tokens agree)")
    result = {
        "equal_full_budget": ok,
        "prompt_lens": lens,
        "torch_native": ref,
        "infinitehip_full_budget": full,
        "infinitehip_small_budget": small,
        "small_budget_attended_tokens": 8 + 32 + 64,
        "small_budget_agreement": [sum(a == b for a, b in zip(r, s)) / len(r) for r, s in zip(ref, small)],
    }
    result["locret"] = locret
    result["offload"] = offl
    for name, outs in wrapped.items():
        same = outs == ref
        ok &= same
        result[name] = {"equal": same, "tokens": outs}
        print(f"{name}: {'EQUAL' if same else 'DIFFERENT'} to torch_native")
        if not same:
            for r, o in zip(ref, outs):
                print(f"  torch_native {r}\n  {name} {o}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    valid = all(len(s) == NEW and all(0 <= t < 512 for t in s) for s in small)
    if not ok:
        print("FAIL: infinitehip with a covering budget (or SGLang's kernel behind it) differs from torch_native")
    if not valid:
        print("FAIL: small-budget outputs are not NEW valid tokens each")
    return 0 if ok and valid and locret["pass"] and offl["pass"] else 1


OFFLOAD_CELLS = 256  # 2 x (sink 8 + window 32 + 64 kept + 4 slid) = 216 cells per batch step


def run_offload(d):
    """Part 5: host offload vs all-resident KV, same small-budget hip config."""
    base = json.loads(json.dumps(SMALL_BUDGET))
    base["kv"] = {"page_size": 1}
    off = json.loads(json.dumps(base))
    off["kv"]["device_cache_pages"] = OFFLOAD_CELLS
    ps = prompts()
    plist = [ps[3], ps[4]]  # 1024 and 800 tokens: KV 3-4x the device cache
    res, t_res = run(d, "infinitehip", base, prompt_list=plist)
    stats_path = os.path.join(d, "offload-stats.json")
    os.environ["INFINITEHIP_OFFLOAD_STATS"] = stats_path
    try:
        got, t_off = run(d, "infinitehip", off, prompt_list=plist)
    finally:
        os.environ.pop("INFINITEHIP_OFFLOAD_STATS", None)
    stats = json.load(open(stats_path)) if os.path.exists(stats_path) else {"layers": []}
    evicted = bool(stats["layers"]) and all(l["evictions"] > 0 and l["misses"] > 0 for l in stats["layers"])
    same = got == res
    print(f"offload: resident {t_res:.1f}s, offloaded {t_off:.1f}s ({OFFLOAD_CELLS} cells per layer, prompts "
          f"{[len(p) for p in plist]}); greedy tokens {'EQUAL' if same else 'DIFFERENT'}; cache {stats['layers']}")
    if not same:
        for a, b in zip(res, got):
            print(f"  resident {a}\n  offload  {b}")
        print("FAIL: host offload differs from the all-resident run")
    if not evicted:
        print("FAIL: the device page cache did not evict (the KV did not exceed it)")
    return {"pass": bool(same and evicted), "cells": OFFLOAD_CELLS, "prompt_lens": [len(p) for p in plist],
            "resident": res, "offload": got, "cache": stats["layers"],
            "seconds": {"resident": t_res, "offload": t_off}}


def run_locret(d):
    """Part 3: Locret with the evicted slots freed vs kept."""
    heads = os.path.join(d, "locret-heads.safetensors")
    write_locret_heads(heads)
    cfg = locret_config(heads)
    opts = {"disable_radix_cache": True, "disable_overlap_schedule": True}
    outs, times, stats = {}, {}, {}
    for mode in ["0", "1"]:
        os.environ["INFINITEHIP_LOCRET_FREE"] = mode
        path = os.path.join(d, f"locret-stats-{mode}.jsonl")
        os.environ["INFINITEHIP_LOCRET_STATS"] = path
        outs[mode], times[mode] = run(d, "infinitehip", cfg, **opts)
        stats[mode] = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
    os.environ.pop("INFINITEHIP_LOCRET_FREE", None)
    os.environ.pop("INFINITEHIP_LOCRET_STATS", None)
    lens = [len(p) for p in prompts()] * 2
    long = [n for n in lens if n > LOCRET_BUDGET]
    freed = sorted((r["tokens"], r["freed"]) for r in stats["1"])
    want = sorted((n, n - LOCRET_BUDGET) for n in long)
    counts_ok = freed == want and all(r["available_after"] - r["available_before"] == r["freed"] for r in stats["1"])
    same = outs["0"] == outs["1"]
    print(f"locret: retained set {times['0']:.1f}s, slots freed {times['1']:.1f}s; greedy tokens "
          f"{'EQUAL' if same else 'DIFFERENT'}; freed per request (tokens, freed) {freed}")
    if stats["0"]:
        print("FAIL: INFINITEHIP_LOCRET_FREE=0 still freed slots")
    if not counts_ok:
        print(f"FAIL: freed slots {freed}, expected {want}")
    if not same:
        for a, b in zip(outs["0"], outs["1"]):
            print(f"  kept {a}\n  freed {b}")
        print("FAIL: Locret with slots freed differs from the retained-set path")
    return {"pass": bool(same and counts_ok and not stats["0"]), "budget": LOCRET_BUDGET, "prompt_lens": lens,
            "retained_set": outs["0"], "slots_freed": outs["1"], "freed": stats["1"],
            "seconds": {"retained_set": times["0"], "slots_freed": times["1"]}}


if __name__ == "__main__":
    sys.exit(main())

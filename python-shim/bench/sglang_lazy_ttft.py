"""CPU benchmark (issue 18): SGLang time to first token, stock
(`torch_native`) vs `infinitehip` lazy with rows dropped between layers
(lazy_rows.py), and the same plugin with every keep fraction 1.0 (the rows
route without pruning: the backend's own cost), in one run.

Model: a Hugging Face Llama-family checkpoint (default: the quality suite's
SmolLM2-135M-Instruct dequantized, `~/.cache/infinitehip/models/
SmolLM2-135M-Instruct.Q4_1-hf`), float32; prompt: the first `--tokens`
tokens of a real text (default Emma). TTFT = wall time of one generate of
1 token (prefill + first token), radix cache off, one extend for the whole
prompt (chunked prefill size above the prompt); best of `--reps` after a
warm-up. Rows computed = sum over layers of the rows the hook ran
(INFINITEHIP_LAZY_ROWS_STATS) / (prompt x layers).

    SGLANG_USE_CPU_ENGINE=1 python sglang_lazy_ttft.py --tokens 4096 --json out.json
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time

HOME = os.path.expanduser("~/.cache/infinitehip")
SCHEDULE = [{"layer": 8, "keep": 0.9}, {"layer": 16, "keep": 0.8}, {"layer": 24, "keep": 0.7},
            {"layer": 28, "keep": 0.6}]


def prompt_ids(model, text, n):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(open(text, encoding="utf-8", errors="replace").read()[: n * 8])["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"{text} gives {len(ids)} tokens, need {n}")
    return ids[:n]


def bench(model, backend, cfg, ids, reps, d, tag, decode=0, revive=None):
    import sglang as sgl

    if revive is not None:  # lazy_rows' INFINITEHIP_LAZY_REVIVE for this engine (its scheduler inherits it)
        os.environ["INFINITEHIP_LAZY_REVIVE"] = revive
    else:
        os.environ.pop("INFINITEHIP_LAZY_REVIVE", None)

    if cfg is not None:
        path = os.path.join(d, f"{tag}.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        os.environ["INFINITEHIP_CONFIG"] = path
    stats = os.path.join(d, f"{tag}.jsonl")
    os.environ["INFINITEHIP_LAZY_ROWS_STATS"] = stats
    eng = sgl.Engine(model_path=model, device="cpu", dtype="float32", skip_tokenizer_init=True,
                     attention_backend=backend, disable_cuda_graph=True, disable_radix_cache=True,
                     disable_overlap_schedule=True, chunked_prefill_size=len(ids) + 64,
                     max_total_tokens=len(ids) + 1024, max_running_requests=1, mem_fraction_static=0.5,
                     log_level="warning")
    times, toks = [], []
    try:
        eng.generate(input_ids=ids[:64], sampling_params={"max_new_tokens": 1, "temperature": 0})
        for _ in range(reps):
            t0 = time.perf_counter()
            o = eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 1, "temperature": 0})
            times.append(time.perf_counter() - t0)
            toks.append(o["output_ids"][0])
        dec = None
        if decode:
            # Decode cost: one streamed request of 1 + decode tokens; per step =
            # (last chunk's time - first chunk's) / decode steps after the
            # first token (revival runs in these steps; the prefill is out).
            stamps = []
            for _ in eng.generate(input_ids=ids, sampling_params={"max_new_tokens": 1 + decode, "temperature": 0,
                                                                  "ignore_eos": True}, stream=True):
                stamps.append(time.perf_counter())
            dec = (stamps[-1] - stamps[0]) / decode if len(stamps) == decode + 1 else None
            if dec is None:
                print(f"{tag}: {len(stamps)} stream chunks for {decode + 1} tokens: decode time not measured")
    finally:
        eng.shutdown()
    recs = [json.loads(l) for l in open(stats)] if os.path.exists(stats) else []
    recs = [r for r in recs if r.get("prompt") == len(ids) and r.get("rows")]
    frac = sum(recs[-1]["rows"]) / (len(ids) * len(recs[-1]["rows"])) if recs else 1.0
    return {"ttft_s": min(times), "all_s": times, "first_token": toks, "rows_fraction": frac, "decode_step_s": dec}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(HOME, "models/SmolLM2-135M-Instruct.Q4_1-hf"))
    ap.add_argument("--text", default=os.path.join(HOME, "text/rope/emma.txt"))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--schedule", choices=["old", "default"], default="old",
                    help="old: the fixed 8/16/24/28 schedule above; default: a lazy policy naming no points "
                    "(the plugin's depth-aware default: 30 layers -> keep 0.8/0.5/0.3 after layers 8/17/26)")
    ap.add_argument("--no-keep1", action="store_true", help="skip the keep-1.0 rows-route run (nothing pruned)")
    ap.add_argument("--revive-off", action="store_true",
                    help="also run lazy with INFINITEHIP_LAZY_REVIVE=0 (no aux cache; the lazy run uses the default)")
    ap.add_argument("--decode", type=int, default=0,
                    help="also time N decode steps per config (after the TTFT reps): seconds per step")
    ap.add_argument("--json")
    a = ap.parse_args()
    ids = prompt_ids(a.model, a.text, a.tokens)
    if a.schedule == "old":
        lazy = {"dense_layers": 0, "default": {"method": "lazy", "points": SCHEDULE}}
        cover = {"dense_layers": 0, "default": {"method": "lazy", "points": [dict(p, keep=1.0) for p in SCHEDULE]}}
    else:
        # keep-1.0 control at the default's layers (config.rs: after ceil(f * n_layers) - 1 for f = 0.3/0.6/0.9)
        n = json.load(open(os.path.join(a.model, "config.json")))["num_hidden_layers"]
        pts = [{"layer": math.ceil(f * n - 1e-9) - 1, "keep": 1.0} for f in (0.3, 0.6, 0.9)]
        lazy = {"dense_layers": 0, "default": {"method": "lazy"}}
        cover = {"dense_layers": 0, "default": {"method": "lazy", "points": pts}}
    res = {"tokens": a.tokens, "model": a.model, "schedule": SCHEDULE if a.schedule == "old" else "default",
           "uptime_before": os.popen("uptime").read()}
    with tempfile.TemporaryDirectory() as d:
        revive = os.environ.get("INFINITEHIP_LAZY_REVIVE")
        res["stock"] = bench(a.model, "torch_native", None, ids, a.reps, d, "stock", a.decode)
        if cover is not None and not a.no_keep1:
            res["lazy_keep1"] = bench(a.model, "infinitehip", cover, ids, a.reps, d, "keep1")
        if a.revive_off:
            res["lazy_revive_off"] = bench(a.model, "infinitehip", lazy, ids, a.reps, d, "lazy0", a.decode, "0")
        res["lazy"] = bench(a.model, "infinitehip", lazy, ids, a.reps, d, "lazy", a.decode, revive)
        res["lazy_revive"] = revive or "1"
    res["uptime_after"] = os.popen("uptime").read()
    s = res["stock"]["ttft_s"]
    print(f"| config | TTFT s (best of {a.reps}) | vs stock | rows computed | first token | decode s/step |")
    print("|---|---:|---:|---:|---|---:|")
    for k in ("stock", "lazy_keep1", "lazy_revive_off", "lazy"):
        if k not in res:
            continue
        r = res[k]
        ds = "-" if r.get("decode_step_s") is None else f"{r['decode_step_s']:.3f}"
        name = f"lazy (revive {res['lazy_revive']})" if k == "lazy" else k
        print(f"| {name} | {r['ttft_s']:.2f} | {s / r['ttft_s']:.2f}x | {r['rows_fraction']:.3f} | {r['first_token']} "
              f"| {ds} |")
    print(res["uptime_before"].strip(), "/", res["uptime_after"].strip())
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

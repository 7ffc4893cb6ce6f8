"""The quality suite through SGLang on the CPU (`run.py --engine sglang`):
stock `sglang.Engine(attention_backend="torch_native")` vs the patched one
(`attention_backend="infinitehip"`, INFINITEHIP_CONFIG = the config's policy),
same configs, sequences, metrics, checks and output as the llama.cpp route
(run.Suite; only the scorer differs: sglang_engine.SglangEngine).

Model: the same SmolLM2 Q4_1 GGUF converted to a Hugging Face checkpoint
(dequantized f32, python-shim/infinitehip/gguf_to_hf.py); SGLang runs it in
float32 with a float32 KV cache, so the exactness check (covering budgets
vs stock within EXACT_BOUND nats per token) uses the same model as the rows.
Tokens: the checkpoint's own tokenizer (transformers).

run.py is started by any python3; this module re-runs it inside the SGLang
venv (the one .ci/stages/sglang.sh keeps, created here if missing) with
SGLANG_USE_CPU_ENGINE=1, the repo's python-shim on PYTHONPATH and
INFINITEHIP_LIB = target/release/libinfinitehip.so (built if missing).

One engine per config, started once and fed every sequence that config
scores (engine start-up, ~30-60 s on 2 cores, dominates short runs).
"""
import hashlib
import importlib.util
import math
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

import locret_heads
import probes
import run
import sources
import suite_config

HERE = run.HERE
REPO = run.REPO
INSIDE_ENV = "IHIP_QUALITY_SGLANG_CHILD"  # set in the re-run: never re-run twice
METHODS = {"stock", "hip", "lazy", "squeeze", "locret"}  # what the backend runs on the CPU host path
# The CI slice: the covering budget equals stock (and hip-1/4 does not), hip-1/4
# at 1K within run.py's stated sparse bound. Fewer configs than the llama.cpp
# slice: each costs an engine start.
QUICK_EXACT = ["hip-cover"]


def log(msg):
    print(f"[quality/sglang] {msg}", file=sys.stderr, flush=True)


def sglang_version():
    src = open(os.path.join(REPO, "python-shim", "infinitehip", "sglang", "__init__.py")).read()
    return re.search(r'^SGLANG_VERSION = "(.*)"$', src, re.M).group(1)


def venv_dir():
    cache = os.environ.get("INFINITEHIP_CI_CACHE", os.path.expanduser("~/.cache/infinitehip-ci"))
    return os.path.join(cache, f"venv-sglang-{sglang_version()}")


def ensure_venv():
    """The SGLang venv's python (created like .ci/stages/sglang.sh does:
    pinned sglang, the sgl_kernel stub, the python shim's entry point)."""
    venv = venv_dir()
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(os.path.join(venv, ".complete")):
        log(f"creating {venv} (pip install sglang=={sglang_version()}: ~4.2 GB of wheels, 11 GB on disk)")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", f"sglang=={sglang_version()}", "pytest"], check=True)
        open(os.path.join(venv, ".complete"), "w").close()
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    stub = os.path.join(REPO, ".ci", "sglang", "ihip_sgl_kernel_stub.py")
    if not os.path.exists(os.path.join(site, "ihip_sgl_kernel_stub.pth")):
        subprocess.run(["cp", stub, site], check=True)
        with open(os.path.join(site, "ihip_sgl_kernel_stub.pth"), "w") as f:
            f.write("import ihip_sgl_kernel_stub\n")
    # SGLang finds the backend through the installed distribution's entry
    # point; the code itself comes from the repo (PYTHONPATH, below).
    if subprocess.run([py, "-c", "import importlib.metadata as m; m.distribution('infinitehip')"],
                      capture_output=True).returncode != 0:
        subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", os.path.join(REPO, "python-shim")],
                       check=True, env=dict(os.environ, INFINITEHIP_LIB=library()))
    return py


def library():
    lib = os.environ.get("INFINITEHIP_LIB") or os.path.join(REPO, "target", "release", "libinfinitehip.so")
    if not os.path.exists(lib):
        log("building libinfinitehip (cargo build --release -p infinitehip-capi)")
        subprocess.run(["cargo", "build", "--release", "-p", "infinitehip-capi"], cwd=REPO, check=True)
    return lib


def rerun_in_venv(argv, script="run.py"):
    """Run `script` (tests/quality/) again inside the SGLang venv; its exit status."""
    py = ensure_venv()
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1", INFINITEHIP_LIB=library(), **{INSIDE_ENV: "1"})
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "python-shim"), HERE] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([py, os.path.join(HERE, script)] + argv, env=env).returncode


def hf_checkpoint(py=sys.executable):
    """The SmolLM2 Q4_1 GGUF as a dequantized HF checkpoint (converted once)."""
    stem = os.path.basename(sources.MODEL_MEMBER).replace(".gguf", "-hf")
    cands = [os.path.join(sources.CACHE, "models", stem)]
    if "IHIP_CACHE" not in os.environ:
        cands.append(os.path.expanduser(os.path.join("~", ".cache", "infinitehip", "models", stem)))
    for d in cands:
        if os.path.exists(os.path.join(d, ".complete")):
            return d
    gguf = sources.model_gguf()
    out = cands[0]
    for pkg in ["gguf", "accelerate"]:  # transformers' GGUF loader needs them
        if importlib.util.find_spec(pkg) is None:
            subprocess.run([py, "-m", "pip", "install", "-q", pkg], check=True)
    log(f"converting {gguf} to a Hugging Face checkpoint (infinitehip.gguf_to_hf)")
    subprocess.run([py, "-m", "infinitehip.gguf_to_hf", gguf, out], check=True)
    with open(os.path.join(out, ".complete"), "w") as f:
        f.write(gguf + "\n")
    return out


class HfTokenizer:
    """run.Suite's tokenizer interface (tokenize_str) over the checkpoint's
    transformers tokenizer."""

    def __init__(self, model_dir):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)

    def ids(self, text):
        return list(self.tok(text)["input_ids"])

    def tokenize_str(self, model, text, tmp):
        return self.ids(text)


class SglangSuite(run.Suite):
    """run.Suite with SGLang as the scorer. Every (config, sequence) pair
    the base flow will ask for is scored first, one engine per config."""

    def __init__(self, a):
        self.a = a
        self.configs = suite_config.load_dir(os.path.join(HERE, "configs"))
        self.tmp = tempfile.mkdtemp(prefix="ihip-quality-sglang-")
        self.model = hf_checkpoint()
        self.text = sources.austen_text()
        self.tok = HfTokenizer(self.model)
        self.run = {"stock": self.tok, "patched": self.tok}  # passkey() tokenizes through run["stock"]
        self.corpus = self._corpus()
        probe = self.tok.ids("Hello")
        self.bos = probe[0] if len(probe) > 1 and probe[0] == self.corpus[0] else None
        heads, hidden, trained = locret_heads.find(REPO, sources.CACHE)
        rnd, rnd_hidden = locret_heads.random_heads(sources.CACHE)
        self.subst = {"locret_weights": heads, "locret_hidden": hidden,
                      "locret_random_weights": rnd, "locret_random_hidden": rnd_hidden}
        self.locret_trained = trained
        self.failures = []
        self.results = {}
        self.engine_info = {}

    def _corpus(self):
        key = hashlib.sha256(open(os.path.join(self.model, "tokenizer.json"), "rb").read()).hexdigest()[:12]
        path = os.path.join(sources.CACHE, "text", f"austen-paragraphs.hf-{key}.ids")
        if not os.path.exists(path):
            log("tokenizing the novels (transformers)")
            with open(self.text, encoding="utf-8") as f:
                np.asarray(self.tok.ids(f.read()), dtype="<i4").tofile(path + ".tmp")
            os.replace(path + ".tmp", path)
        return np.fromfile(path, dtype="<i4")

    def f32_model(self):
        return self.model  # already float32 weights and KV

    @staticmethod
    def _key(name, seq, first):
        h = hashlib.sha256(np.asarray(seq.ids, dtype="<i4").tobytes()).hexdigest()[:16]
        return (name, h, seq.prefill, first)

    # -- prompt logprobs: which runs ask SGLang for them ---------------------
    def prompt_logprobs(self, name):
        """Whether `name`'s quality rows ask SGLang for prompt logprobs
        (prefill-scored perplexity). --prefill-scored config (default): all
        but configs saying "prefill_logits": "last" (lazy: SGLang's LazyLLM
        rows route prunes no prefill that returns logprobs, so a lazy row that
        asked would measure stock); all: every config (lazy then prunes
        nothing, and its row fails); none: no config, stock included."""
        mode = getattr(self.a, "prefill_scored", None) or "config"
        if mode == "all":
            return True
        if mode == "none":
            return False
        return self.configs[name].get("prefill_logits", "all") == "all"

    def first_scored(self, name, seq, exact=False):
        """The first target scored from the prompt's logprobs, or None (the
        request asks for no logprobs). Exactness compares every target from 1."""
        if exact:
            return 1
        if not len(seq.prefill_scored) or not self.prompt_logprobs(name):
            return None
        return seq.prefill_scored.start

    def prefill_logits(self, name, kv):
        if kv == "f32":
            return "all"
        return "all" if self.prompt_logprobs(name) else "last"

    def lookup(self, name, seq, first, tag):
        key = self._key(name, seq, first)
        if key not in self.results:
            raise RuntimeError(f"{tag}: {name} was not planned (SglangSuite.plan)")
        return self.results[key]

    def score(self, name, model, seq, tag, kv="f16"):
        return self.lookup(name, seq, self.first_scored(name, seq, exact=kv == "f32"), tag)

    def quality(self, ctx, res):
        """run.Suite.quality with each row paired with the stock run that
        asked SGLang for the same prompt logprobs (a lazy row: stock without
        them; its prefill time then excludes the logprob pass too). When
        both stock runs exist, their decode-path records must be equal
        (stock_logprob_check)."""
        seq = self.sequence(ctx)
        f0 = self.first_scored("stock", seq)
        ref, ref_t, _ = self.lookup("stock", seq, f0, f"q{ctx}-stock")
        res["rows"].append(self.row("stock", ctx, seq, ref, ref, ref_t, None))
        refs = {f0: (ref, ref_t)}
        for name in self.mode["configs"]:
            f = self.first_scored(name, seq)
            if f not in refs:
                refs[f] = self.lookup("stock", seq, f, f"q{ctx}-stock")[:2]
            rec, t, st = self.lookup(name, seq, f, f"q{ctx}-{name}")
            r = self.row(name, ctx, seq, rec, refs[f][0], t, st)
            r["prompt_logprobs"] = f is not None
            r["stock_prefill_s"] = refs[f][1]["prefill_s"]
            r["prefill_speedup"] = refs[f][1]["prefill_s"] / t["prefill_s"]
            res["rows"].append(r)
            self.save(res)
        if len(refs) > 1:
            (fa, (ra, _)), (fb, (rb, _)) = sorted(refs.items(), key=lambda kv: kv[0] is None)
            chk = stock_logprob_check(ra, rb, seq)
            chk["ctx"] = ctx
            res.setdefault("stock_logprob_check", []).append(chk)
            if not chk["pass"]:
                self.failures.append(f"stock with vs without prompt logprobs at {ctx}: {chk}")
        self.save(res)

    def row(self, name, ctx, seq, rec, ref, t, st):
        """run.Suite's row plus greedy agreement with stock: the fraction of
        decode-path positions (continuation and copy probes, teacher forced)
        where this config's argmax is stock's."""
        r = super().row(name, ctx, seq, rec, ref, t, st)
        idx = [i for i in range(seq.prefill + 1, len(seq)) if rec["path"][i] == 1]
        r["argmax_agree_decode"] = float((rec["argmax"][idx] == ref["argmax"][idx]).mean()) if idx else None
        r["n_decode_steps"] = len(idx)
        c = self.configs[name]
        if c["method"] == "lazy" and not c.get("cover"):
            r["lazy_rows"] = dict((st or {}).get("lazy_rows") or {}) or None
            if r["lazy_rows"] and "kept" in r["lazy_rows"]:
                r["lazy_rows"]["probe_passage_kept"] = probe_passage_kept(
                    r["lazy_rows"].pop("kept"), seq.probes, self.mode["passage_len"], r["copy"].get("per_probe"))
            problem = lazy_rows_problem(r["lazy_rows"], seq.prefill)
            r["lazy_rows_ok"] = problem is None
            if problem is not None:
                self.failures.append(f"{name} at {ctx}: {problem}")
        return r

    # -- the plan: what the base flow will score ----------------------------
    def plan(self):
        """{config: [(tag, sequence)]} in the base flow's order."""
        jobs = {}

        def add(name, tag, seq, first):
            # first: the first target scored from the prefill's input logprobs (None: no logprobs asked)
            jobs.setdefault(name, []).append((tag, seq, first))

        if not self.a.no_exact:
            seq = self.sequence(self.mode["exact_ctx"], **run.EXACT_SEQ)
            for name in ["stock"] + self.exact_configs() + [run.EXACT_NEGATIVE]:
                add(name, f"exact-{name}", seq, self.first_scored(name, seq, exact=True))
        for ctx in self.mode["lengths"]:
            seq = self.sequence(ctx)
            # stock once per prompt-logprob mode its rows need (its own first)
            firsts = [self.first_scored("stock", seq)]
            for name in self.mode["configs"]:
                f = self.first_scored(name, seq)
                if f not in firsts:
                    firsts.append(f)
            for f in firsts:
                add("stock", f"q{ctx}-stock" + ("" if f is not None else "-nolp"), seq, f)
            for name in self.mode["configs"]:
                add(name, f"q{ctx}-{name}", seq, self.first_scored(name, seq))
        for ctx in self.mode["passkey_lengths"]:
            for depth, seq in self.passkey_sequences(ctx):
                for name in ["stock"] + self.mode["configs"]:
                    add(name, f"pk{ctx}-{depth}-{name}", seq, self.first_scored(name, seq))
        return jobs

    def exact_configs(self):
        return QUICK_EXACT if self.a.quick else run.EXACT_CONFIGS

    def passkey_sequences(self, ctx):
        """The same sequences run.Suite.passkey builds."""
        start = len(self.text_str) // 3
        filler = self.text_str[start:start + ctx * 4]
        out = []
        for depth in self.mode["passkey_depths"]:
            prompt, full = probes.passkey_texts(filler, depth, run.PASSKEY)
            pids, fids = self.tok.ids(prompt), self.tok.ids(full)
            span = probes.answer_span(pids, fids)
            out.append((depth, probes.Sequence(ids=fids, prefill=span.start - 1, prefill_scored=range(0),
                                               decode_scored=span)))
        return out

    def execute(self, jobs):
        from sglang_engine import SglangEngine

        for name, items in jobs.items():
            policy = None
            if name != "stock":
                # The policy at each sequence's length: one engine per distinct policy.
                by_policy = {}
                for item in items:
                    p = self.policy(name, len(item[1]))
                    by_policy.setdefault(json_key(p), (p, []))[1].append(item)
                groups = list(by_policy.values())
            else:
                groups = [(policy, items)]
            for policy, group in groups:
                todo = []
                for tag, seq, first in group:
                    key = self._key(name, seq, first)
                    if key in self.results:
                        continue
                    saved = self.load_saved(name, policy, seq, first)
                    if saved is not None:
                        log(f"{tag}: {name} reused from --resume {self.a.resume}")
                        self.results[key] = saved
                    else:
                        todo.append((tag, seq, first))
                if not todo:
                    continue
                max_len = max(len(s) for _, s, _ in todo)
                log(f"{name}: starting sglang.Engine ({'torch_native' if policy is None else 'infinitehip'}), "
                    f"{len(todo)} sequence(s) up to {max_len} tokens")
                eng = SglangEngine(self.model, policy, self.tmp, name.replace("/", "_"), max_len,
                                   threads=getattr(self.a, "threads", None))
                self.engine_info[name] = {"args": eng.args, "startup_s": eng.startup_s}
                try:
                    for tag, seq, first in todo:
                        key = self._key(name, seq, first)
                        if key in self.results:
                            continue
                        log(f"{tag}: {name} ({len(seq)} tokens, prefill {seq.prefill})")
                        self.results[key] = eng.score(seq.ids, seq.prefill, first, tag.replace("/", "_"))
                        self.save_result(name, policy, seq, first, self.results[key])
                finally:
                    eng.shutdown()

    # -- --resume DIR: results of identical runs, saved as they finish -------
    def _saved_path(self, name, policy, seq, first):
        if not getattr(self.a, "resume", None):
            return None
        h = hashlib.sha256(np.asarray(seq.ids, dtype="<i4").tobytes()).hexdigest()
        k = {"name": name, "policy": policy, "ids": h, "prefill": seq.prefill, "first": first,
             "model": os.path.basename(self.model), "engine": "sglang", "threads": getattr(self.a, "threads", None)}
        if first is None:
            k["logprobs"] = "none"  # before this key, first None still asked for logprobs (return_logprob on)
        rv = os.environ.get("INFINITEHIP_LAZY_REVIVE", "1")
        if policy is not None and '"lazy"' in json_key(policy) and rv != "0":
            k["lazy_revive"] = rv  # revival runs differ; "0" (none) keeps the key of the runs before it
        key = json_key(k)
        return os.path.join(self.a.resume, hashlib.sha256(key.encode()).hexdigest()[:24])

    def save_result(self, name, policy, seq, first, result):
        path = self._saved_path(name, policy, seq, first)
        if path is None:
            return
        import json

        os.makedirs(self.a.resume, exist_ok=True)
        rec, timings, st = result
        rec.tofile(path + ".rec.tmp")
        with open(path + ".json.tmp", "w") as f:
            json.dump({"config": name, "timings": timings, "stats": st}, f)
        os.replace(path + ".rec.tmp", path + ".rec")
        os.replace(path + ".json.tmp", path + ".json")

    def load_saved(self, name, policy, seq, first):
        path = self._saved_path(name, policy, seq, first)
        if path is None or not os.path.exists(path + ".json"):
            return None
        import json

        import stats

        with open(path + ".json") as f:
            meta = json.load(f)
        return stats.read_records(path + ".rec", len(seq)), meta["timings"], meta["stats"]

    def main(self):
        a = self.a
        self.mode = dict(run.QUICK if a.quick else run.FULL)
        if not a.quick:
            self.mode["passkey_lengths"] = []  # default off here (the llama.cpp route has it); --passkey-lengths
        for k in ["lengths", "passkey_lengths", "configs", "decode"]:
            v = getattr(a, k, None)
            if v is not None:
                self.mode[k] = v
        if a.quick:  # exactness at the row's length: one hip-1/4 engine serves the negative control and the bound
            self.mode["exact_ctx"] = self.mode["lengths"][0]
        unknown = [c for c in self.mode["configs"] if c not in self.configs]
        if unknown:
            raise SystemExit(f"unknown configs {unknown}; known: {sorted(self.configs)}")
        bad = [c for c in self.mode["configs"] if self.configs[c]["method"] not in METHODS]
        if bad:
            raise SystemExit(f"configs {bad}: methods the SGLang backend does not run")
        with open(self.text, encoding="utf-8") as f:
            self.text_str = f.read()
        self.execute(self.plan())
        saved = run.EXACT_CONFIGS
        run.EXACT_CONFIGS = self.exact_configs()  # the base exactness() iterates this list
        try:
            return self._report()
        finally:
            run.EXACT_CONFIGS = saved

    def _report(self):
        import datetime
        import platform
        import json

        a = self.a
        res = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
                        "command": " ".join(sys.argv), "engine": "sglang", "threads": a.threads, "sglang": sglang_version(),
                        "mode": self.mode, "model": os.path.basename(self.model) + " (float32, KV float32)",
                        "text": "r-cran-janeaustenr 1.0.0-1 (6 novels)", "tokenizer": "transformers (checkpoint)",
                        "stock_backend": "torch_native", "engines": self.engine_info,
                        "locret_heads": self.subst["locret_weights"], "locret_heads_trained": self.locret_trained,
                        "sparse_path_fields": run.SPARSE_PATH_FIELDS,
                        "prefill_scored": getattr(a, "prefill_scored", None) or "config",
                        "timing_note": "prefill_s includes SGLang's input logprobs of the prefill-scored half when "
                                       "the run asked for them (row prompt_logprobs; each row is paired with the "
                                       "stock run of the same kind: stock_prefill_s); decode tok/s includes the "
                                       "teacher-forcing processor (the same in both)"},
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
        import report

        print(report.table(res).replace("Quality (Q4_1;", "Quality (SGLang CPU, Q4_1 dequantized to f32;"))
        if res["rows"]:
            print("\nGreedy agreement with stock on the decode path (teacher forced: continuation + copy probes):")
            for r in res["rows"]:
                print(f"  {r['ctx']} {r['config']}: {r['argmax_agree_decode']:.3f} of {r['n_decode_steps']} steps")
            print("\nPrefill seconds vs the stock run of the same kind (untimed unless run under the timing lock):")
            for r in res["rows"]:
                if "stock_prefill_s" in r:
                    print(f"  {r['ctx']} {r['config']}: {r['prefill_s']:.1f} s vs stock {r['stock_prefill_s']:.1f} s "
                          f"({r['prefill_speedup']:.2f}x; prompt logprobs {'on' if r['prompt_logprobs'] else 'off'})")
            for r in res["rows"]:
                if "lazy_rows" in r:
                    lr = r["lazy_rows"] or {}
                    print(f"  {r['ctx']} {r['config']}: LazyLLM rows dropped {lr.get('dropped_rows')} "
                          f"(computed {lr.get('row_fraction', float('nan')):.3f} of prompt x layers; "
                          f"rows per layer {lr.get('rows_per_layer')}; skipped: {lr.get('skipped')}; "
                          f"revival {lr.get('revive')}: {lr.get('revived_rows')} rows in {lr.get('revive_steps')} "
                          f"decode steps, {lr.get('row_fraction_with_revival', float('nan')):.3f} with them) "
                          f"{'ok' if r['lazy_rows_ok'] else 'FAIL'}")
        for c in res.get("stock_logprob_check", []):
            print(f"\nStock at {c['ctx']} with vs without prompt logprobs: {c['decode_steps']} forced decode steps "
                  f"{'bit-equal' if c['decode_bit_equal'] else 'DIFFER'} (max |dNLL| {c['max_abs_dnll_decode']:.3g}); "
                  f"step 0 (last prompt row) |dNLL| {c['step0_abs_dnll']:.3g} (bound {c['step0_bound']:.0e}); "
                  f"argmax equal {c['argmax_equal']:.4f}: {'PASS' if c['pass'] else 'FAIL'}")
        if not a.no_plot and res["rows"]:
            report.plot(a.json, a.png)
        if self.failures:
            print("FAILED:\n  " + "\n  ".join(self.failures))
            return 1
        print("quality suite (SGLang): all checks passed")
        return 0


def keep_count(keep, n):
    """Rows kept of an n-token prompt at keep fraction `keep` (lazy_rows.keep_count,
    the core's lazy::keep_count; copied so the suite's unit tests need no torch)."""
    if n == 0:
        return 0
    return min(max(math.ceil(keep * n - 1e-6), 1), n)


def expected_rows(points, n, n_layers):
    """Rows each layer computes in the rows route for an n-token prompt:
    after pruning layer p (points {layer: keep}), later layers run the top
    keep_count(keep, n) rows (never more than an earlier point left)."""
    pts = {int(k): float(v) for k, v in points.items()}
    out, cur = [], n
    for layer in range(n_layers):
        out.append(cur)
        if layer in pts:
            cur = min(cur, keep_count(pts[layer], n))
    return out


def probe_passage_kept(kept, probes, passage_len, per_probe=None):
    """Per copy probe: the fraction of its planted passage's prompt tokens
    still among the rows after each pruning point ({layer: fraction}),
    beside the probe's copy accuracy (per_probe, same order) when given."""
    out = []
    for i, p in enumerate(probes):
        span = set(range(p["planted_at"], p["planted_at"] + passage_len))
        row = {"depth": p["depth"],
               "kept_after": {k: len(span.intersection(v)) / passage_len for k, v in sorted(kept.items(), key=lambda kv: int(kv[0]))}}
        if per_probe:
            row["copy_accuracy"] = per_probe[i]["accuracy"]
        out.append(row)
    return out


def lazy_rows_problem(lr, prompt):
    """Why a lazy row must not pass (None: it pruned as its schedule says).
    lr: sglang_engine.lazy_rows_summary of the row's request."""
    if lr is None:
        return "no LazyLLM rows stats (INFINITEHIP_LAZY_ROWS_STATS): the rows route did not report"
    if not lr.get("rows_per_layer") or lr.get("dropped_rows", 0) <= 0:
        why = "; ".join(lr.get("skipped") or []) or "no prefill reached the rows route"
        return f"LazyLLM dropped 0 prefill rows ({why}): this row measures stock, not LazyLLM"
    rows = lr["rows_per_layer"]
    if lr.get("points") is not None:
        want = expected_rows(lr["points"], prompt, len(rows))
        if rows != want:
            return f"LazyLLM rows per layer {rows} are not its schedule's {want} (points {lr['points']})"
    return None


def stock_logprob_check(with_lp, without_lp, seq, step0_bound=run.EXACT_BOUND):
    """Stock's records with and without prompt logprobs after the prompt.
    Every forced single-token decode (the decode-scored tokens and the copy
    probes) must be equal bit for bit, or a row paired with the other stock
    run would mix two scorings. Step 0 (the prompt's last row, scored by the
    extend; not a decode-scored token) may differ by f32 rounding: SGLang
    computes its logits in one matmul with the prompt rows when logprobs are
    asked (measured 3.7e-6 nats at 2K), so it is held to `step0_bound`.
    Argmax equal everywhere; NaN never passes."""
    idx = np.arange(seq.prefill, len(seq))
    a, b = with_lp["nll"][idx], without_lp["nll"][idx]
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    diff = np.abs(a - b)
    same_arg = with_lp["argmax"][idx] == without_lp["argmax"][idx]
    decode_equal = finite and bool((a[1:] == b[1:]).all())
    step0 = float(diff[0]) if len(idx) else 0.0
    ok = decode_equal and bool(same_arg.all()) and finite and step0 <= step0_bound
    return {"positions": int(len(idx)), "decode_steps": int(max(len(idx) - 1, 0)),
            "max_abs_dnll_decode": float(np.nanmax(diff[1:])) if len(idx) > 1 else 0.0,
            "decode_bit_equal": decode_equal, "step0_abs_dnll": step0, "step0_bound": step0_bound,
            "argmax_equal": float(same_arg.mean()) if len(idx) else 1.0, "finite": finite, "pass": bool(ok)}


def json_key(p):
    import json

    return json.dumps(p, sort_keys=True)


def main(a, argv):
    """run.py --engine sglang: re-run inside the venv, or run the suite."""
    if os.environ.get(INSIDE_ENV) != "1" and importlib.util.find_spec("sglang") is None:
        return rerun_in_venv(argv)
    if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        raise SystemExit("set SGLANG_USE_CPU_ENGINE=1 (the SGLang route runs the CPU engine)")
    return SglangSuite(a).main()

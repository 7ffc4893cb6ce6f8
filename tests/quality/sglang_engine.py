"""Teacher-forced scoring through `sglang.Engine` on the CPU (the SGLang
route of the quality suite; runs inside the SGLang venv).

One engine per config (the attention backend and INFINITEHIP_CONFIG are read
when SGLang spawns its scheduler). A sequence is scored by one request: its
first `prefill` ids are the prompt (prefill-scored targets come from SGLang's
input logprobs, argmax from its top-1 input logprobs), the rest are forced
one sampling step at a time by sglang_force.ForceTargets (step 0 from the
last prefill row, later steps from single-token decode forwards). The result
is the same per-token records as ihip_run's (stats.RECORD: nll, argmax,
path 0 prefill / 1 decode / -1 unscored), so run.py's statistics apply.
"""
import json
import os
import time

import numpy as np

import stats

STOCK_BACKEND = "torch_native"  # SGLang's CPU attention without AMX kernels
PATCHED_BACKEND = "infinitehip"
# Fixed engine options: float32 (the checkpoint is the Q4_1 GGUF dequantized
# to f32, KV in f32), one request at a time, no radix cache (each sequence is
# scored from scratch; Locret's slot freeing needs it off), no overlap
# schedule (the forcing processor reads output_ids of the current step).
ENGINE_ARGS = {"device": "cpu", "dtype": "float32", "skip_tokenizer_init": True, "disable_cuda_graph": True,
               "disable_radix_cache": True, "disable_overlap_schedule": True,
               "enable_custom_logit_processor": True, "max_running_requests": 1, "log_level": "warning",
               # One forward (a sparse config's prefill past 8K) takes many minutes on a loaded 2-core
               # machine; SGLang's scheduler watchdog (300 s) killed a 16K run (a 4096-token chunk).
               "watchdog_timeout": 7200,
               # SGLang's automatic value reserves 1.5 MB of "GPU" memory per prefill-chunk token, which on the
               # CPU engine with one 16K chunk exceeds this 24 GB machine (mem_fraction_static = -0.05: the engine
               # refuses to start). The KV pool is capped by max_total_tokens anyway, so fix the fraction.
               "mem_fraction_static": 0.8}


def _force_str():
    from sglang_force import ForceTargets  # importable in the scheduler too (PYTHONPATH)

    return ForceTargets.to_str()


class SglangEngine:
    """One sglang.Engine: stock (policy None, torch_native) or patched."""

    def __init__(self, model_dir, policy, tmp, tag, max_len, chunked_prefill=None, threads=None, extra_args=None):
        import sglang as sgl

        self.tmp, self.tag, self.policy = tmp, tag, policy
        env = {}
        if threads:  # torch's OpenMP pool and the plugin's workers (2 spinning threads on a loaded 2-core box are slow)
            env["OMP_NUM_THREADS"] = env["INFINITEHIP_THREADS"] = str(threads)
        if policy is not None:
            cfg = os.path.join(tmp, f"{tag}.policy.json")
            with open(cfg, "w") as f:
                json.dump(policy, f)
            env["INFINITEHIP_CONFIG"] = cfg
            self.locret_stats = os.path.join(tmp, f"{tag}.locret.jsonl")
            env["INFINITEHIP_LOCRET_STATS"] = self.locret_stats
        else:
            self.locret_stats = None
        # LazyLLM's rows route (python-shim/infinitehip/sglang/lazy_rows.py):
        # one line per pruned prefill, one per prefill that computed every row.
        self.lazy_files = None
        if policy is not None and '"lazy"' in json.dumps(policy):
            self.lazy_files = (os.path.join(tmp, f"{tag}.lazy-rows.jsonl"), os.path.join(tmp, f"{tag}.lazy-skips.jsonl"),
                               os.path.join(tmp, f"{tag}.lazy-revive.jsonl"))
            (env["INFINITEHIP_LAZY_ROWS_STATS"], env["INFINITEHIP_LAZY_ROWS_SKIPS"],
             env["INFINITEHIP_LAZY_REVIVE_STATS"]) = self.lazy_files
        saved = {k: os.environ.pop(k, None)
                 for k in ["INFINITEHIP_CONFIG", "INFINITEHIP_LOCRET_STATS", "OMP_NUM_THREADS", "INFINITEHIP_THREADS",
                           "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "INFINITEHIP_LAZY_ROWS_STATS",
                           "INFINITEHIP_LAZY_ROWS_SKIPS", "INFINITEHIP_LAZY_REVIVE_STATS"]}
        os.environ.update(env)
        # context_length above the sequence: SGLang caps max_new_tokens at
        # context_len - 2 - prompt, which at the model's trained length (8192
        # for SmolLM2) would drop the last forced steps. Positions stay below
        # the sequence length, so the model's rotary table still covers them.
        # One prefill chunk per prompt: SGLang samples (and so calls the
        # forcing processor) after every chunk, which would record step 0 twice.
        os.environ["SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"] = "1"  # restored below
        args = dict(ENGINE_ARGS, model_path=model_dir, max_total_tokens=max_len + 64, context_length=max_len + 64,
                    chunked_prefill_size=chunked_prefill or max_len + 64,
                    attention_backend=PATCHED_BACKEND if policy is not None else STOCK_BACKEND)
        args.update(extra_args or {})  # e.g. json_model_override_args beyond the trained length
        t0 = time.time()
        try:
            self.eng = sgl.Engine(**args)
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None)
                if v is not None:
                    os.environ[k] = v
        self.startup_s = time.time() - t0
        self.args = {k: v for k, v in args.items() if k != "model_path"}
        self.args["threads"] = threads
        self.force = _force_str()

    def shutdown(self):
        self.eng.shutdown()

    def score(self, ids, prefill, first_prefill_scored, tag):
        """(records, timings, stats) of one teacher-forced sequence.

        first_prefill_scored: the first target position scored from the
        prefill's input logprobs. None: the request asks SGLang for no
        logprobs at all (return_logprob off), so only the forced steps are
        scored; LazyLLM's rows route prunes only such a prefill."""
        ids = [int(x) for x in ids]
        n = len(ids)
        if not 0 < prefill < n:
            raise ValueError(f"prefill {prefill} of {n} tokens")
        out = os.path.join(self.tmp, f"{tag}.steps.jsonl")
        if os.path.exists(out):
            os.remove(out)
        lp_start = -1 if first_prefill_scored is None else first_prefill_scored - 1
        if lp_start == -1 or not 0 <= lp_start < prefill:
            lp_start = -1
        sp = {"max_new_tokens": n - prefill, "temperature": 0, "ignore_eos": True,
              "custom_params": {"targets": ids[prefill:], "out": out}}
        lp = {} if first_prefill_scored is None else {"return_logprob": True, "logprob_start_len": lp_start,
                                                      "top_logprobs_num": 1}
        self._clear_lazy()
        t0 = time.time()
        o = self.eng.generate(input_ids=ids[:prefill], sampling_params=sp, custom_logit_processor=self.force, **lp)
        t1 = time.time()
        mi = o["meta_info"]
        if mi.get("num_retractions", 0):
            raise RuntimeError(f"{tag}: SGLang retracted the request (its decode tokens would be re-prefilled)")
        steps = [json.loads(line) for line in open(out)] if os.path.exists(out) else []
        steps = last_chunk_steps(steps)
        rec = assemble(ids, prefill, lp_start, mi.get("input_token_logprobs"), mi.get("input_top_logprobs"), steps,
                       o["output_ids"], tag)
        ts = sorted(s["t"] for s in steps)
        prefill_s = ts[0] - t0
        dec = (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else float("nan")
        timings = {"prefill_s": prefill_s, "prefill_tok_s": prefill / prefill_s, "decode_tok_s": dec,
                   "total_s": t1 - t0, "engine_startup_s": self.startup_s}
        return rec, timings, self._stats(n, prefill)

    def _clear_lazy(self):
        for f in self.lazy_files or ():
            if os.path.exists(f):
                os.remove(f)

    def _stats(self, n, prefill):
        """The plugin's side of a run: Locret's freed slots (locret_free's
        INFINITEHIP_LOCRET_STATS lines of this request), LazyLLM's rows
        (lazy_rows_summary), else None."""
        if self.lazy_files is not None:
            rows, skips, revive = ([json.loads(l) for l in open(f)] if os.path.exists(f) else []
                                   for f in self.lazy_files)
            self._clear_lazy()
            return {"lazy_rows": lazy_rows_summary(rows, skips, prefill, revive)}
        if self.policy is None or (self.policy.get("default") or {}).get("method") != "locret":
            return None
        lines = [json.loads(l) for l in open(self.locret_stats)] if os.path.exists(self.locret_stats) else []
        os.makedirs(self.tmp, exist_ok=True)
        if os.path.exists(self.locret_stats):
            os.remove(self.locret_stats)  # the next request's lines only
        freed = sum(r["freed"] for r in lines)
        kept = prefill - freed
        # Visible cells at the last decode step: the kept prompt plus every
        # decoded token (decoded tokens are never evicted).
        return {"locret": {"evicted_tokens": freed, "compactions": lines, "max_visible_cells": prefill,
                           "last_visible_cells": kept + (n - prefill - 1)}}


def lazy_rows_summary(rows, skips, prompt, revive=()):
    """What LazyLLM's rows route did with one request's `prompt`-token
    prefill, from the plugin's INFINITEHIP_LAZY_ROWS_STATS lines (`rows`:
    {"prompt", "rows" per layer, "points"}) and INFINITEHIP_LAZY_ROWS_SKIPS
    lines (`skips`: {"tokens", "why"}): rows per layer, rows dropped (sum over
    layers of prompt - rows), the fraction of (token, layer) rows computed,
    and why a prefill computed every row. No pruned line: dropped 0."""
    mine = [r for r in rows if r.get("prompt") == prompt]
    why = sorted({r.get("why") for r in skips if r.get("why")})
    if not mine:
        return {"tokens": prompt, "rows_per_layer": None, "dropped_rows": 0, "row_fraction": 1.0, "points": None,
                "prefills": 0, "skipped": why}
    last = mine[-1]["rows"]
    out = {"tokens": prompt, "rows_per_layer": last, "dropped_rows": sum(prompt - r for r in last),
           "row_fraction": sum(last) / (prompt * len(last)), "points": mine[-1].get("points"),
           "prefills": len(mine), "skipped": why}
    # Revival (INFINITEHIP_LAZY_REVIVE_STATS lines of this request's decode
    # steps): prompt rows computed later from the aux cache.
    rv = [r for r in revive if r.get("prompt") == prompt]
    out["revive"] = os.environ.get("INFINITEHIP_LAZY_REVIVE", "1")
    out["revived_rows"] = sum(r["computed"] for r in rv)
    out["revive_steps"] = len(rv)
    out["row_fraction_with_revival"] = (sum(last) + out["revived_rows"]) / (prompt * len(last))
    if "kept" in mine[-1]:  # INFINITEHIP_LAZY_ROWS_STATS_KEPT=1: positions kept after each point
        out["kept"] = mine[-1]["kept"]
    return out


def last_chunk_steps(steps):
    """A chunked prefill (a prompt longer than SGLang's chunked_prefill_size:
    SglangEngine passes one chunk per prompt unless told `chunked_prefill`)
    runs the sampler, hence the forcing processor, after every chunk while
    the request has no output yet: each chunk logs a step 0, and SGLang keeps
    only the last chunk's token. Step 0 is that last record (the prompt's
    true last row); the others are dropped."""
    zeros = [s for s in steps if s["step"] == 0]
    if len(zeros) <= 1:
        return steps
    last = max(zeros, key=lambda s: s["t"])
    return [s for s in steps if s["step"] != 0 or s is last]


def assemble(ids, prefill, lp_start, itl, itop, steps, output_ids, tag=""):
    """Per-token records of one forced request, checked: the input logprobs
    are for ids[lp_start:prefill] (entry 0 has none), every forced step
    0..n-prefill-1 was recorded once with its target, and SGLang's output
    tokens are the targets. Step 0 is the last prefill row (path 0), later
    steps single-token decodes (path 1); unscored positions get path -1."""
    n = len(ids)
    rec = np.zeros(n, dtype=stats.RECORD)
    rec["nll"], rec["argmax"], rec["path"] = np.nan, -1, -1
    if lp_start >= 0:
        if itl is None or itop is None or len(itl) != prefill - lp_start or len(itop) != len(itl):
            raise RuntimeError(f"{tag}: {None if itl is None else len(itl)} input logprobs from {lp_start}, "
                               f"prompt {prefill}")
        for j, (lp, tid, _) in enumerate(itl):
            pos = lp_start + j
            if tid != ids[pos]:
                raise RuntimeError(f"{tag}: input logprob {j} is for token {tid}, ids[{pos}] = {ids[pos]}")
            if lp is None:
                continue
            rec[pos] = (-lp, itop[j][0][1], 0)
    seen = sorted(s["step"] for s in steps)
    if seen != list(range(n - prefill)):
        raise RuntimeError(f"{tag}: forced steps {seen[:3]}..{seen[-3:]} ({len(seen)}), expected 0..{n - prefill - 1}")
    if list(output_ids) != list(ids[prefill:]):
        raise RuntimeError(f"{tag}: SGLang's output tokens are not the forced targets")
    for s in steps:
        pos = prefill + s["step"]
        if s["target"] != ids[pos]:
            raise RuntimeError(f"{tag}: step {s['step']} forced {s['target']}, ids[{pos}] = {ids[pos]}")
        rec[pos] = (s["nll"], s["argmax"], 0 if s["step"] == 0 else 1)
    return rec

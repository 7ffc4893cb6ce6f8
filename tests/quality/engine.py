"""Runs ihip_run (tests/llama-cpp/ihip_run.cpp) against stock or patched
libllama: tokenize, dequant, and teacher-forced scoring with timings and
the plugin's stats."""
import json
import os
import subprocess

import numpy as np

import stats


def parse_plugin_stats(stderr):
    """The plugin's stats JSON (logged when the context is freed), or None."""
    for line in stderr.splitlines():
        if "infinitehip: stats " in line:
            return json.loads(line.split("infinitehip: stats ", 1)[1])
    return None


def parse_last_json(stdout):
    lines = [l for l in stdout.strip().splitlines() if l.startswith("{")]
    if not lines:
        raise ValueError(f"no JSON line in ihip_run output: {stdout[-300:]!r}")
    return json.loads(lines[-1])


class IhipRun:
    def __init__(self, exe, threads=2, nice=0):
        if not os.path.exists(exe):
            raise FileNotFoundError(f"{exe} missing: build it with scripts/llama-cpp-build.sh")
        self.exe, self.threads, self.nice = exe, threads, nice

    def _run(self, args, env=None):
        cmd = ([ "nice", "-n", str(self.nice)] if self.nice else []) + [self.exe] + args
        e = dict(os.environ)
        for k in ["LLAMA_INFINITEHIP_CONFIG", "LLAMA_INFINITEHIP_ROUTE", "IHIP_RUN_VERBOSE"]:
            e.pop(k, None)
        e.update(env or {})
        r = subprocess.run(cmd, env=e, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        return r

    def tokenize(self, model, text_path, out):
        self._run(["tokenize", model, "--text", text_path, "--out", out, "--threads", str(self.threads)])
        return np.fromfile(out, dtype="<i4")

    def tokenize_str(self, model, text, tmp):
        p = os.path.join(tmp, "tok.txt")
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)
        return self.tokenize(model, p, os.path.join(tmp, "tok.ids")).tolist()

    def dequant(self, model, out):
        self._run(["dequant", model, "--out", out, "--threads", str(self.threads)])

    def score(self, model, ids, prefill, tmp, tag, config=None, kv="f16", batch=512, prefill_logits="all"):
        """Teacher-forced scoring of `ids` (first `prefill` through prefill
        ubatches): (records, timings JSON, plugin stats or None).
        prefill_logits "last": prefill rows ask for no logits but the last
        (their records have path -1), as LazyLLM needs to prune rows."""
        ids_path = os.path.join(tmp, f"{tag}.ids")
        np.asarray(ids, dtype="<i4").tofile(ids_path)
        nll = os.path.join(tmp, f"{tag}.nll")
        env = {}
        if config is not None:
            cfg = os.path.join(tmp, f"{tag}.json")
            with open(cfg, "w") as f:
                json.dump(config, f)
            env["LLAMA_INFINITEHIP_CONFIG"] = cfg
        r = self._run(["score", model, "--input", ids_path, "--prefill", str(prefill), "--nll", nll, "--kv", kv,
                       "--batch", str(batch), "--threads", str(self.threads), "--prefill-logits", prefill_logits], env)
        st = parse_plugin_stats(r.stderr)
        if config is not None and st is None:
            raise RuntimeError(f"{tag}: the plugin printed no stats (is this the patched build?)\n{r.stderr[-2000:]}")
        return stats.read_records(nll, len(ids)), parse_last_json(r.stdout), st

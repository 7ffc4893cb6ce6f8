"""The suite's table (stdout) and plot (PNG, matplotlib; run in a cached
venv when this Python has no matplotlib)."""
import os
import subprocess
import sys

import sources


def _pct(x):
    return f"{100 * x:+.1f}%"


def _delta(d):
    return "-" if d is None else f"{d['mean']:+.3f} +- {2 * d['se']:.3f} (n {d['n']})"


def heads_note(label):
    """The row-name suffix saying which Locret heads a row used (none for
    the committed trained heads and non-Locret rows)."""
    if label == "random":
        return " (random heads)"
    if label and label.startswith("file:"):
        return f" (heads {os.path.basename(label[5:])})"
    return ""


def quality_lines(rows):
    head = ["ctx", "config", "attended", "decode keys", "ppl prefill", "ppl decode (dNLL +- 2se)", "prefill tail dNLL +- 2se", "copy acc",
            "copied", "copy nll", "prefill s", "decode tok/s"]
    out = [head]
    for r in rows:
        dd = r["d_decode"]
        att = r.get("attended_fraction")
        out.append([
            str(r["ctx"]), r["config"] + heads_note(r.get("locret_heads")),
            "-" if att is None else f"{att:.3f}",
            f"{r['nominal_decode_fraction']:.3f}" if r.get("nominal_decode_fraction") is not None else "-",
            "- (not scored)" if r["ppl_prefill"] is None else f"{r['ppl_prefill']:.2f} ({_pct(r['d_prefill']['ppl_ratio'] - 1)})",
            f"{r['ppl_decode']:.2f} ({_pct(dd['ppl_ratio'] - 1)}, {dd['mean']:+.3f} +- {2 * dd['se']:.3f})",
            _delta(r.get("d_prefill_tail")),
            f"{r['copy']['accuracy']:.3f}", f"{r['copy']['copied']}/{r['copy']['probes']}",
            f"{r['copy']['nll']:.3f}", f"{r['prefill_s']:.1f}", f"{r['decode_tok_s']:.1f}"])
    return out


def _fmt(lines):
    w = [max(len(l[i]) for l in lines) for i in range(len(lines[0]))]
    return "\n".join("| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(l)) + " |" for l in lines[:1]) + "\n" + \
        "|" + "|".join("-" * (x + 2) for x in w) + "|\n" + \
        "\n".join("| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(l)) + " |" for l in lines[1:])


def table(res):
    parts = []
    if res.get("exactness"):
        lines = [["config", "ctx", "max |dNLL|", "mean dNLL", "argmax agree", "bound", "result"]]
        for e in res["exactness"]:
            verdict = ("PASS" if e["pass"] else "FAIL") + (" (negative control: must exceed)" if e["negative_control"] else "")
            lines.append([e["config"], str(e["ctx"]), f"{e['max_abs_dnll']:.2e}", f"{e['mean_dnll']:+.2e}",
                          f"{e['argmax_agree']:.4f}", f"{e['bound']:.0e}", verdict])
        parts.append("Exactness (f32 weights, f32 KV; covering budget vs stock, every target token):\n" + _fmt(lines))
    if res.get("rows"):
        parts.append("Quality (Q4_1; dNLL = mean per-token NLL minus stock's on the same tokens; attended = "
                     "plugin's attended/causal-context over sparse layers, prefill + decode; decode keys = "
                     "config's nominal decode fraction):\n" + _fmt(quality_lines(res["rows"])))
    if res.get("passkey"):
        lines = [["config", "ctx", "depth", "retrieved", "answer nll"]]
        for p in res["passkey"]:
            lines.append([p["config"], str(p["ctx"]), f"{p['depth']:.2f}",
                          "error" if "error" in p else ("yes" if p["ok"] else "no"),
                          "-" if "error" in p else f"{p['answer_nll']:.3f}"])
        parts.append("Passkey:\n" + _fmt(lines))
    if res.get("checks"):
        lines = [["check", "ctx", "decode dNLL", "bound", "copy acc drop", "bound", "result"]]
        for c in res["checks"]:
            lines.append([c["config"], str(c["ctx"]), f"{c['decode_dnll']:+.3f}", f"{c['nll_bound']:.2f}",
                          f"{c['copy_acc_drop']:+.3f}", f"{c['copy_bound']:.2f}", "PASS" if c["pass"] else "FAIL"])
        parts.append("Sparse bound (Q4_1):\n" + _fmt(lines))
    return "\n\n".join(parts)


def _python_with_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return sys.executable
    except ImportError:
        pass
    venv = os.path.join(sources.CACHE, "venv-plot")
    py = os.path.join(venv, "bin", "python")
    if subprocess.run([py, "-c", "import matplotlib"], capture_output=True).returncode if os.path.exists(py) else True:
        print("[quality] creating a venv with matplotlib for the plot", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "matplotlib"], check=True)
    return py


def plot(json_path, png_path):
    py = _python_with_matplotlib()
    subprocess.run([py, os.path.join(os.path.dirname(os.path.abspath(__file__)), "plot.py"), json_path, png_path],
                   check=True)
    print(f"plot: {png_path}")

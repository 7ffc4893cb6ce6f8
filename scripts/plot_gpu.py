#!/usr/bin/env python3
"""Latency vs context length from bench-gpu's JSON: plot_gpu.py IN.json OUT.png"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

d = json.load(open(sys.argv[1]))
fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
panels = [(1, "decode", "decode, batch 1"), (16, "decode", "decode, batch 16"), (1, "prefill", "chunked prefill, batch 1")]
for ax, (b, phase, title) in zip(axes, panels):
    rows = sorted([r for r in d["results"] if r["batch"] == b and r.get("phase", "decode") == phase],
                  key=lambda r: r["tokens"])
    if not rows:
        continue
    x = [r["tokens"] for r in rows]
    series = (("baseline_ms", "PyTorch SDPA flash"), ("dense_ms", "ours, dense"),
              ("refresh_ms", "hip, refresh step"), ("ours_ms", "hip, amortised" if phase == "decode" else "hip (mask + attention)"))
    for k, lab in series:
        ys = [(xx, r.get(k)) for xx, r in zip(x, rows) if r.get(k)]
        if ys:
            ax.plot([a for a, _ in ys], [c for _, c in ys], marker="o", label=lab)
    ax.set_xscale("log", base=2); ax.set_yscale("log")
    ax.set_xlabel("context tokens"); ax.set_ylabel("attention latency (ms), one layer")
    ax.set_title(f"Llama-3.1-8B shape: {title}"); ax.grid(True, which="both", alpha=.3); ax.legend(fontsize=8)
fig.suptitle(d["machine"], fontsize=8)
fig.tight_layout(); fig.savefig(sys.argv[2], dpi=110)

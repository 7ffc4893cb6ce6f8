#!/usr/bin/env python3
"""Latency vs context length from bench-gpu's JSON: plot_gpu.py IN.json OUT.png"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

d = json.load(open(sys.argv[1]))
fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
for ax, b in zip(axes, (1, 16)):
    rows = sorted([r for r in d["results"] if r["batch"] == b], key=lambda r: r["tokens"])
    if not rows:
        continue
    x = [r["tokens"] for r in rows]
    for k, lab in (("baseline_ms", "PyTorch SDPA flash"), ("dense_ms", "ours, dense"),
                   ("refresh_ms", "hip, refresh step"), ("ours_ms", "hip, amortised")):
        ys = [(xx, r.get(k)) for xx, r in zip(x, rows) if r.get(k)]
        if ys:
            ax.plot([a for a, _ in ys], [c for _, c in ys], marker="o", label=lab)
    ax.set_xscale("log", base=2); ax.set_yscale("log")
    ax.set_xlabel("context tokens"); ax.set_ylabel("decode attention latency (ms)")
    ax.set_title(f"Llama-3.1-8B shape, 1 layer, batch {b}"); ax.grid(True, which="both", alpha=.3); ax.legend()
fig.suptitle(d["machine"], fontsize=8)
fig.tight_layout(); fig.savefig(sys.argv[2], dpi=110)

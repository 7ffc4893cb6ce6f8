"""plot.py RESULTS.json OUT.png: quality vs sparsity and vs context length."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    res = json.load(open(src))
    rows = res["rows"]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
    methods = sorted({r["method"] for r in rows if r["config"] != "stock"})
    marks = dict(zip(methods, "osD^v<>"))
    for r in rows:
        if r["config"] == "stock":
            continue
        frac = r.get("nominal_decode_fraction") or 1.0
        x = 1.0 / max(frac, 1e-6)
        for i, key in enumerate(["d_decode", "d_prefill"]):
            ax[i].scatter(x, 100 * (r[key]["ppl_ratio"] - 1), marker=marks[r["method"]], s=40,
                          label=f"{r['config']} @{r['ctx']}")
            ax[i].annotate(f"{r['config']}@{r['ctx'] // 1024}K", (x, 100 * (r[key]["ppl_ratio"] - 1)), fontsize=6)
    for i, t in enumerate(["decode-scored", "prefill-scored"]):
        ax[i].axhline(0, color="k", lw=0.5)
        ax[i].axhline(2, color="g", lw=0.5, ls="--")
        ax[i].set_xscale("log", base=2)
        ax[i].set_xlabel("nominal decode sparsity (context / keys attended)")
        ax[i].set_ylabel(f"{t} perplexity vs stock (%)")
        ax[i].set_title(f"{t} perplexity vs sparsity")
    by = {}
    for r in rows:
        by.setdefault(r["config"], []).append((r["ctx"], r["copy"]["accuracy"]))
    for name, pts in sorted(by.items()):
        pts.sort()
        ax[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, lw=2 if name == "stock" else 1)
    ax[2].set_xscale("log", base=2)
    ax[2].set_xlabel("context length (tokens)")
    ax[2].set_ylabel("copy-probe token accuracy")
    ax[2].set_ylim(0, 1.02)
    ax[2].set_title("copy probe vs context length")
    ax[2].legend(fontsize=7)
    m = res["meta"]
    fig.suptitle(f"{m['model']} on {m['text']}, llama.cpp CPU, stock vs patched ({m['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

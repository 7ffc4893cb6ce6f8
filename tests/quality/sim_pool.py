"""Pool `locret_sim.py --json` records over sequences (runs with different
`--body-start`): per mode, the decode-scored dNLL against the same
sequence's dense run, mean over every token of every sequence, its per-token
2se, the per-sequence perplexity changes, and (with --base MODE) the paired
difference MODE' - BASE per token on the same sequences.

    python3 tests/quality/sim_pool.py A.json B.json .. [--base token:z_max]

Records of one (ctx, body start, mode) given twice are an error."""
import argparse
import json
import math


def stats(xs):
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return m, 2 * sd / math.sqrt(n)


def pool(records, base=None):
    dense, per = {}, {}
    for r in records:
        key = (r["ctx"], r["body_start"])
        if r["mode"] == "dense":
            dense[key] = r["nll_decode"]
            continue
        d = per.setdefault((r["ctx"], r["mode"]), {})
        if key in d:
            raise ValueError(f"{r['mode']} at {key} given twice")
        d[key] = r["nll_decode"]
    out = []
    for (ctx, mode), seqs in sorted(per.items()):
        keys = sorted(seqs)
        missing = [k for k in keys if k not in dense]
        if missing:
            raise ValueError(f"{mode}: no dense run for {missing}")
        for k in keys:
            if len(seqs[k]) != len(dense[k]):
                raise ValueError(f"{mode} at {k}: {len(seqs[k])} scored tokens, dense {len(dense[k])}")
        diffs = {k: [a - b for a, b in zip(seqs[k], dense[k])] for k in keys}
        allx = [x for k in keys for x in diffs[k]]
        m, se = stats(allx)
        row = {"ctx": ctx, "mode": mode, "sequences": [k[1] for k in keys], "dnll": m, "two_se": se,
               "ppl_change_pct": 100 * (math.exp(m) - 1),
               "per_sequence_pct": [100 * (math.exp(sum(diffs[k]) / len(diffs[k])) - 1) for k in keys]}
        b = per.get((ctx, base)) if base and mode != base else None
        if b is not None and all(k in b for k in keys):
            pm, pse = stats([x - y for k in keys for x, y in zip(seqs[k], b[k])])
            row["paired_vs_base"] = {"base": base, "dnll": pm, "two_se": pse}
        out.append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--base")
    a = ap.parse_args(argv)
    recs = []
    for f in a.files:
        with open(f) as fh:
            recs += json.load(fh)
    print("| ctx | mode | sequences | ppl change | dNLL +- 2se | per sequence | paired vs base |")
    print("|---:|---|---:|---:|---:|---|---:|")
    for r in pool(recs, a.base):
        pb = r.get("paired_vs_base")
        pstr = f"{pb['dnll']:+.3f} +- {pb['two_se']:.3f}" if pb else "-"
        per = " / ".join(f"{x:+.1f}%" for x in r["per_sequence_pct"])
        print(f"| {r['ctx']} | {r['mode']} | {len(r['sequences'])} | {r['ppl_change_pct']:+.1f}% | "
              f"{r['dnll']:+.3f} +- {r['two_se']:.3f} | {per} | {pstr} |")


if __name__ == "__main__":
    main()

"""Rows of several suite runs that differ only in `--body-start` (one scored
sequence each), pooled per config: the suite's rows rest on one sequence per
length, and their +- 2se are per token, so they ignore how much another
stretch of text would move the result.

    python3 tests/quality/multiseq.py A.json B.json .. [--base CONFIG] [--json OUT]

Per config and length: the perplexity change against stock on each sequence,
the pooled change (mean dNLL over every decode-scored token of every
sequence; equal tokens per sequence), its per-token 2se, and the 2se over
sequences (spread of the per-sequence means, k - 1 degrees of freedom).
With --base, also each config minus BASE on the same sequences (sequence
means; per-token pairing is tests/quality/paired.py's job)."""
import argparse
import json
import math
import sys


def load(paths):
    runs = []
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        start = r["meta"]["mode"].get("body_start")
        runs.append((p, start, {(row["config"], row["ctx"]): row for row in r["rows"]}))
    starts = [s for _, s, _ in runs]
    if len(set(starts)) != len(starts):
        raise SystemExit(f"two runs share a body start: {starts}")
    return runs


def pooled(means, ses):
    k = len(means)
    m = sum(means) / k
    tok_2se = 2 * math.sqrt(sum(s * s for s in ses)) / k
    seq_2se = 2 * math.sqrt(sum((x - m) ** 2 for x in means) / (k - 1)) / math.sqrt(k) if k > 1 else float("nan")
    return m, tok_2se, seq_2se


def pct(dnll):
    return 100 * (math.exp(dnll) - 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--base", help="config to pair the others with (sequence means)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    runs = load(a.runs)
    keys = sorted({k for _, _, rows in runs for k in rows if k[0] != "stock"}, key=lambda k: (k[1], k[0]))
    out = []
    print("| ctx | config | per sequence (body start: ppl change) | pooled ppl change | dNLL | 2se tokens | 2se sequences |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for cfg, ctx in keys:
        have = [(s, rows[(cfg, ctx)]) for _, s, rows in runs if (cfg, ctx) in rows]
        if len(have) < len(runs):
            print(f"{cfg} at {ctx}: in {len(have)} of {len(runs)} runs, skipped", file=sys.stderr)
            continue
        means = [r["d_decode"]["mean"] for _, r in have]
        ses = [r["d_decode"]["se"] for _, r in have]
        m, t2, s2 = pooled(means, ses)
        rec = {"config": cfg, "ctx": ctx, "per_sequence": [{"body_start": s, "dnll": r["d_decode"]["mean"],
                                                            "se": r["d_decode"]["se"], "n": r["d_decode"]["n"],
                                                            "ppl_change_pct": pct(r["d_decode"]["mean"])}
                                                           for s, r in have],
               "dnll": m, "two_se_tokens": t2, "two_se_sequences": s2, "ppl_change_pct": pct(m)}
        if a.base and cfg != a.base and all((a.base, ctx) in rows for _, _, rows in runs):
            diffs = [r["d_decode"]["mean"] - rows[(a.base, ctx)]["d_decode"]["mean"]
                     for (_, _, rows), (_, r) in zip(runs, have)]
            dm, _, ds = pooled(diffs, [0.0] * len(diffs))
            rec["minus_base"] = {"base": a.base, "per_sequence": diffs, "mean": dm, "two_se_sequences": ds}
        out.append(rec)
        seqs = ", ".join(f"{s}: {pct(x):+.1f}%" for s, x in zip([h[0] for h in have], means))
        print(f"| {ctx} | {cfg} | {seqs} | {pct(m):+.1f}% | {m:+.4f} | {t2:.4f} | {s2:.4f} |")
    if a.base:
        print(f"\nminus {a.base} (mean over sequences +- 2se over sequences):")
        for rec in out:
            if "minus_base" in rec:
                mb = rec["minus_base"]
                print(f"  {rec['ctx']} {rec['config']}: {mb['mean']:+.4f} +- {mb['two_se_sequences']:.4f}  "
                      f"({', '.join(f'{x:+.3f}' for x in mb['per_sequence'])})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"runs": [{"path": p, "body_start": s} for p, s, _ in runs], "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()

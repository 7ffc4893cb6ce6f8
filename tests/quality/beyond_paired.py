#!/usr/bin/env python3
"""Per-probe copy accuracy and paired differences between beyond.py runs.

    python3 tests/quality/beyond_paired.py RUNS_DIR L CONFIG_A CONFIG_B ... [--layout c128-k16x24]

Reads RUNS_DIR/<config>-<L>-<layout>.json (beyond.py's cache; runs made with the
per-token records, i.e. `hits`/`nlls` per probe and `continuation_nlls`). Prints per
config: copy accuracy, its standard error over probes (probes are the sampling unit:
passages differ in difficulty), per-probe accuracies; then, for each config against
the first, the paired differences on the same tokens: copy accuracy and copy NLL
(mean +- 2 se over probes of the per-probe differences) and the continuation's
NLL (mean +- 2 se over tokens). Runs at one L share their input, so pairs are exact.
"""
import argparse
import json
import math
import os


def mse(xs):
    k = len(xs)
    m = sum(xs) / k
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (k - 1) / k) if k > 1 else float("nan")
    return m, se


def fill_from_nll(r, nll_path, input_path):
    """Per-token records of an older run: from its .nll (f32 nll, i32 argmax, i32 path per target) and input."""
    import array
    import struct

    data = open(nll_path, "rb").read()
    rec = [struct.unpack_from("<fii", data, i * 12) for i in range(len(data) // 12)]
    ids = array.array("i")
    ids.frombytes(open(input_path, "rb").read())
    P = r["prefill"]
    r["continuation_nlls"] = [rec[i][0] for i in range(P + 1, P + r["decode_text_tokens"] + 1)]
    for pr in r["probes"]:
        lo, hi = pr["answer"]
        pr["hits"] = [int(rec[i][1] == ids[i]) for i in range(lo, hi)]
        pr["nlls"] = [rec[i][0] for i in range(lo, hi)]
        assert abs(sum(pr["hits"]) / len(pr["hits"]) - pr["acc"]) < 1e-9, "records do not match the run"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs")
    ap.add_argument("L", type=int)
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--layout", default="c128-k16x24")
    ap.add_argument("--input", help="the run's input ids: rebuild per-token records from the .nll beside a "
                    "JSON that lacks them (runs made before beyond.py stored them)")
    a = ap.parse_args()
    rows = []
    for c in a.configs:
        p = os.path.join(a.runs, f"{c}-{a.L}-{a.layout}.json")
        r = json.load(open(p))
        if "continuation_nlls" not in r:
            fill_from_nll(r, p[:-5] + ".nll", a.input)
        rows.append(r)
    print(f"L={a.L} layout {a.layout}")
    for r in rows:
        accs = [p["acc"] for p in r["probes"]]
        m, se = mse(accs)
        print(f"  {r['config']:<22} ppl {r['ppl_decode']:9.2f}  copy {100 * m:5.1f}% +- {100 * se:4.1f} (se over "
              f"{len(accs)} probes)  nll {r['copy_nll']:.3f}  per probe: " + " ".join(f"{x:.2f}" for x in accs))
    base = rows[0]
    for r in rows[1:]:
        da = [p["acc"] - q["acc"] for p, q in zip(r["probes"], base["probes"])]
        dn = [p["nll"] - q["nll"] for p, q in zip(r["probes"], base["probes"])]
        dc = [x - y for x, y in zip(r["continuation_nlls"], base["continuation_nlls"])]
        (ma, sa), (mn, sn), (mc, sc) = mse(da), mse(dn), mse(dc)
        print(f"  {r['config']} - {base['config']}: copy acc {100 * ma:+.1f} +- {200 * sa:.1f} points, copy nll "
              f"{mn:+.3f} +- {2 * sn:.3f}, continuation nll {mc:+.4f} +- {2 * sc:.4f} (2 se)")


if __name__ == "__main__":
    main()

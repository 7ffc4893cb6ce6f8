#!/usr/bin/env python3
"""Compare `ihip_run score` NLL files on the same targets, split by path.

  compare.py STOCK.nll OTHER.nll [OTHER2.nll ...]

Records are {f32 nll, i32 argmax, i32 path} (tests/llama-cpp/ihip_run.cpp).
Prints, per file and path (0 = prefill ubatch, 1 = single-token decode), the
perplexity over targets scored on that path in every file, its change vs the
first file, and the paired per-token log-loss difference with its standard
error.
"""
import math
import struct
import sys


def load(path):
    data = open(path, "rb").read()
    return [struct.unpack_from("<fii", data, 12 * i) for i in range(len(data) // 12)]


def main():
    runs = [load(p) for p in sys.argv[1:]]
    n = min(len(r) for r in runs)
    base = runs[0]
    for path in (0, 1):
        idx = [i for i in range(n) if all(r[i][2] == path for r in runs) and not math.isnan(base[i][0])]
        if not idx:
            continue
        b = [base[i][0] for i in idx]
        print(f"path {path} ({'prefill' if path == 0 else 'decode'}): {len(idx)} targets {idx[0]}..{idx[-1]}")
        for name, r in zip(sys.argv[1:], runs):
            x = [r[i][0] for i in idx]
            d = [xi - bi for xi, bi in zip(x, b)]
            m = sum(d) / len(d)
            sd = math.sqrt(sum((v - m) ** 2 for v in d) / max(1, len(d) - 1))
            ppl = math.exp(sum(x) / len(x))
            rel = math.exp(m) - 1
            print(f"  {name:40s} ppl {ppl:8.3f}  {rel:+7.2%}  dlogloss {m:+.4f} ± {sd / math.sqrt(len(d)):.4f}")


if __name__ == "__main__":
    main()

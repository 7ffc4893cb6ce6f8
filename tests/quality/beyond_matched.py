#!/usr/bin/env python3
"""Copy accuracy of one long run against shorter runs on the same passages.

`beyond.py --offset O --probe-src S1,..` makes a short input whose probes copy
given text passages (e.g. the passages a 32K run's probes copy). This pairs
each probe of LONG (a run JSON) with the probe of the SHORT runs (run JSONs)
that copies the same text position and prints the paired difference (mean +-
1 se over passages).

    python3 tests/quality/beyond_matched.py RUNS/hip_rope-d64-s4-32768-c128-k16x24.json \
        RUNS/hip_rope-d64-s4-8192-c128-k16x24-o*.json
"""
import json
import math
import sys


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    long = json.load(open(sys.argv[1]))
    off = long.get("offset", 0)
    short = {}
    for f in sys.argv[2:]:
        d = json.load(open(f))
        for p in d["probes"]:
            short[p.get("text_src", d.get("offset", 0) + p["src"])] = (p, d.get("offset", 0), d["L"])
    rows = []
    for p in long["probes"]:
        s = p.get("text_src", off + p["src"])
        if s in short:
            q, o, L = short[s]
            rows.append((s, o, q["src"], p["acc"], q["acc"], p["nll"], q["nll"]))
            print(f"text_src {s:6d}  short run (L={L}, offset {o:6d}, passage at {q['src']:5d}): "
                  f"copy long {p['acc']:.2f} short {q['acc']:.2f}  nll long {p['nll']:.3f} short {q['nll']:.3f}")
    k = len(rows)
    if k < 2:
        sys.exit("fewer than 2 matched passages")

    def mse(xs):
        m = sum(xs) / len(xs)
        return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))

    a, _ = mse([r[3] for r in rows])
    b, _ = mse([r[4] for r in rows])
    d, se = mse([r[3] - r[4] for r in rows])
    dn, sen = mse([r[5] - r[6] for r in rows])
    print(f"{k} passages: copy long {100 * a:.1f}%  short {100 * b:.1f}%  paired long - short "
          f"{100 * d:+.1f} +- {100 * se:.1f} points (1 se over passages); copy nll {dn:+.3f} +- {sen:.3f}")


if __name__ == "__main__":
    main()

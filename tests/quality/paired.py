"""Paired per-token NLL differences between two configs' scoring runs of the
same suite sequence (not only each against stock): the suite's dNLL +- 2se
against stock carries stock-vs-config noise twice when two configs are
compared by subtraction; pairing them directly removes what they share.

    python3 tests/quality/paired.py [--decode N] CTX BASE.nll OTHER.nll [OTHER.nll ..]

The .nll files are `ihip_run score` records the suite leaves in its
temporary folder (/tmp/ihip-quality-*/q{CTX}-{config}.nll, the config name
with '/' as '_') or in --stock-cache. Prints, per OTHER, the mean NLL
difference OTHER - BASE and 2 standard errors over the decode-scored
targets, the prefill tail (last eighth of the prefill, as the suite) and all
prefill-scored targets, for the suite's sequence layout (5 planted passages
of 32; 128 decode tokens, or N as run.py's --decode N)."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import stats  # noqa: E402
from run import FULL, prefill_tail  # noqa: E402


def ranges(ctx, mode=FULL):
    """(decode_scored, prefill_tail, prefill_scored) target positions of the
    suite's sequence of ctx tokens (probes.copy_sequence's layout)."""
    from types import SimpleNamespace

    prefill = ctx - mode["decode"] - len(mode["depths"]) * mode["passage_len"]
    seq = SimpleNamespace(prefill=prefill, prefill_scored=range(prefill // 2, prefill + 1))
    return range(prefill + 1, prefill + mode["decode"]), prefill_tail(seq), seq.prefill_scored


def paired(ctx, base_path, other_path, decode=None):
    base = stats.read_records(base_path, ctx)
    other = stats.read_records(other_path, ctx)
    out = {}
    mode = FULL if decode is None else {**FULL, "decode": decode}
    for name, pos in zip(("decode", "prefill_tail", "prefill"), ranges(ctx, mode)):
        d = stats.paired_delta(other, base, pos)
        out[name] = {"mean": d["mean"], "two_se": 2 * d["se"], "n": d["n"]}
    return out


def main(argv):
    decode = None
    if argv[:1] == ["--decode"]:
        decode, argv = int(argv[1]), argv[2:]
    if len(argv) < 3:
        raise SystemExit(__doc__)
    ctx = int(argv[0])
    rows = {os.path.basename(o): paired(ctx, argv[1], o, decode) for o in argv[2:]}
    for name, r in rows.items():
        print(name, "-", os.path.basename(argv[1]) + ":",
              "  ".join(f"{k} {v['mean']:+.4f} +- {v['two_se']:.4f} (n {v['n']})" for k, v in r.items()))
    print(json.dumps({"ctx": ctx, "decode": decode or FULL["decode"], "base": argv[1], "rows": rows}))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Statistics over per-token records of a scoring run.

Records (ihip_run score): record i scores target ids[i]: nll (f32), argmax
(i32), path (0 prefill ubatch, 1 single-token decode, -1 none)."""
import math

import numpy as np

RECORD = np.dtype([("nll", "<f4"), ("argmax", "<i4"), ("path", "<i4")])


def read_records(path, n=None):
    rec = np.fromfile(path, dtype=RECORD)
    if n is not None and len(rec) != n:
        raise ValueError(f"{path}: {len(rec)} records, expected {n}")
    return rec


def check_paths(rec, positions, path):
    """Every scored position went through the expected path (a run whose
    decode tokens came from a prefill would measure the wrong thing)."""
    got = rec["path"][list(positions)]
    if not (got == path).all():
        raise ValueError(f"positions {positions}: paths {sorted(set(got.tolist()))}, expected {path}")


def mean_nll(rec, positions):
    x = rec["nll"][list(positions)].astype(np.float64)
    if len(x) == 0 or not np.isfinite(x).all():
        raise ValueError("no scored tokens, or a non-finite NLL")
    return float(x.mean())


def ppl(rec, positions):
    return math.exp(mean_nll(rec, positions))


def paired_delta(rec, ref, positions):
    """Mean per-token NLL difference (rec - ref) over the same targets, with
    its standard error (tokens as samples; neighbouring tokens correlate, so
    treat it as a lower bound on the uncertainty)."""
    idx = list(positions)
    d = rec["nll"][idx].astype(np.float64) - ref["nll"][idx].astype(np.float64)
    if len(d) == 0 or not np.isfinite(d).all():
        raise ValueError("no scored tokens, or a non-finite NLL")
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "max_abs": float(np.abs(d).max()), "n": len(d),
            "ppl_ratio": math.exp(float(d.mean()))}


def copy_scores(rec, ids, probes):
    """Copy probe: token accuracy (argmax == target) and mean NLL over every
    probe's scored tokens, and how many probes were copied at >= 90%."""
    accs, nlls, ok = [], [], 0
    per = []
    for p in probes:
        idx = list(p["scored"])
        hit = rec["argmax"][idx] == np.asarray(ids)[idx]
        a = float(hit.mean())
        accs.append(hit)
        nlls.append(rec["nll"][idx].astype(np.float64))
        ok += a >= 0.9
        per.append({"depth": p["depth"], "accuracy": a, "nll": float(nlls[-1].mean())})
    allhit = np.concatenate(accs)
    alln = np.concatenate(nlls)
    if not np.isfinite(alln).all():
        raise ValueError("non-finite NLL in the copy probe")
    return {"accuracy": float(allhit.mean()), "nll": float(alln.mean()), "copied": int(ok), "probes": len(probes),
            "per_probe": per}


def passkey_ok(rec, ids, span):
    """The answer is retrieved when every answer token is the argmax."""
    idx = list(span)
    return bool((rec["argmax"][idx] == np.asarray(ids)[idx]).all())


def exact_verdict(delta, argmax_agree, bound, negative):
    """Covering budget: every token's NLL within `bound` of stock and the
    argmax (almost) always the same. A negative control (a sparse config)
    must exceed the bound, which shows the check can fail."""
    if negative:
        return delta["max_abs"] > bound
    return delta["max_abs"] <= bound and argmax_agree >= 0.99

"""LazyLLM rows dropped between layers in SGLang's prefill (lazy_rows.py),
end to end through `sglang.Engine` on the CPU (issue 18), on the random
2-layer GQA Llama of sglang_e2e.py, radix cache off (each prompt is one
extend from position 0, the route's setting; the batch of all prompts at
the end falls back to SGLang's forward: several requests):

1. every layer lazy, one pruning point after layer 0 with keep 1.0, rows
   route: greedy tokens identical to torch_native (stock), and the route
   ran (stats: rows per layer [N, N] for each single prompt);
2. keep 0.5: layer 1 computes ceil(N / 2) rows (stats), and each single
   prompt's first token equals the older key-set route's
   (INFINITEHIP_LAZY_ROWS=0, every row computed, layer 1's keys narrowed
   to the same keep set): the last row's math is the same, so a wrong
   gather (rows, positions or slots) shows here. Later tokens differ by
   design (the key-set route re-ranks the prompt every decode step; the
   rows route's decode revives by the decode token's attention), so they
   are reported, not compared;
3. revival (the aux cache), keep 0.5, INFINITEHIP_LAZY_REVIVE=all (every
   pruned token resumes at layer 1 from its hidden state after layer 0 at
   the first decode step): layer 0 is computed for every row, so a revived
   token's layer-1 K/V is the full forward's, and each single prompt's
   greedy tokens must equal stock's (its first token comes from the pruned
   prefill: checked equal first); the revival stats must show N - ceil(N/2)
   rows revived, once. The same run with INFINITEHIP_LAZY_REVIVE=0 must
   differ from stock on some prompt (so skipping revival fails this test);
4. the paper's progressive revival (default, INFINITEHIP_LAZY_REVIVE=1):
   some rows revived, never more than were pruned (each (token, layer)
   computed at most once); tokens reported against stock.

Run: SGLANG_USE_CPU_ENGINE=1 python sglang_lazy_e2e.py [--json out.json]
(spawned scheduler processes re-import this file: keep the __main__ guard).
"""

import argparse
import json
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sglang_e2e as e2e  # noqa: E402


def lazy_config(keep):
    return {"dense_layers": 0, "kv": {"page_size": 16},
            "default": {"method": "lazy", "points": [{"layer": 0, "keep": keep}]}}


def run(d, backend, cfg=None, rows="1", tag="x", revive="1", revive_stats=None):
    os.environ["INFINITEHIP_LAZY_ROWS"] = rows
    os.environ["INFINITEHIP_LAZY_REVIVE"] = revive
    path = os.path.join(d, f"lazy-stats-{tag}.jsonl")
    os.environ["INFINITEHIP_LAZY_ROWS_STATS"] = path
    rpath = os.path.join(d, f"lazy-revive-{tag}.jsonl")
    os.environ["INFINITEHIP_LAZY_REVIVE_STATS"] = rpath
    outs, secs = e2e.run(d, backend, cfg, disable_radix_cache=True, disable_overlap_schedule=True)
    stats = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
    if revive_stats is not None:
        revive_stats.extend(json.loads(l) for l in open(rpath)) if os.path.exists(rpath) else None
    return outs, secs, stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    ok = True
    res = {}
    with tempfile.TemporaryDirectory() as d:
        e2e.make_model(d)
        lens = [len(p) for p in e2e.prompts()]
        stock, t0, _ = run(d, "torch_native", tag="stock")
        full, t1, st1 = run(d, "infinitehip", lazy_config(1.0), tag="full")
        same = full == stock
        # The single prompts come first; a later lone prefill of the batch part may add records.
        want1 = [(n, [n, n]) for n in lens]
        got1 = [(r["prompt"], r["rows"]) for r in st1]
        good1 = got1[: len(lens)] == want1 and all(r == [p, p] for p, r in got1)
        print(f"keep 1.0: rows route {t1:.1f}s vs torch_native {t0:.1f}s; greedy tokens "
              f"{'IDENTICAL' if same else 'DIFFERENT'}; pruned prefills (prompt, rows per layer) {got1}")
        if not same:
            for a, b in zip(stock, full):
                print(f"  stock {a}\n  rows  {b}")
            print("FAIL: keep 1.0 through the rows route differs from stock")
        if not good1:
            print(f"FAIL: the rows route ran on {got1}, expected {want1} first")
        ok &= same and good1
        half, t2, st2 = run(d, "infinitehip", lazy_config(0.5), tag="half")
        keyset, t3, st3 = run(d, "infinitehip", lazy_config(0.5), rows="0", tag="keyset")
        want2 = [(n, [n, math.ceil(n / 2)]) for n in lens]
        got2 = [(r["prompt"], r["rows"]) for r in st2]
        good2 = got2[: len(lens)] == want2 and all(r == [p, math.ceil(p / 2)] for p, r in got2)
        n1 = len(lens)
        first_same = [a[0] == b[0] for a, b in zip(half[:n1], keyset[:n1])]
        agree = sum(x == y for a, b in zip(half, stock) for x, y in zip(a, b)) / sum(len(a) for a in stock)
        print(f"keep 0.5: rows route {t2:.1f}s, key-set route {t3:.1f}s; rows per layer {got2}; first token "
              f"equal to the key-set route {first_same}; token agreement with stock {agree:.2f}")
        if not good2:
            print(f"FAIL: keep 0.5 rows {got2}, expected {want2} first")
        if not all(first_same):
            for a, b in zip(half[:n1], keyset[:n1]):
                print(f"  rows   {a}\n  keyset {b}")
            print("FAIL: the rows route's first token differs from the key-set route's")
        if st3:
            print("FAIL: INFINITEHIP_LAZY_ROWS=0 still pruned rows")
        ok &= good2 and all(first_same) and not st3
        # 3. revival of every pruned token at the first decode step vs stock.
        rv_all, rv_prog = [], []
        r_all, t4, _ = run(d, "infinitehip", lazy_config(0.5), tag="revive-all", revive="all", revive_stats=rv_all)
        r_off, t5, _ = run(d, "infinitehip", lazy_config(0.5), tag="revive-off", revive="0")
        first_stock = [a[0] == b[0] for a, b in zip(half[:n1], stock[:n1])]
        same_all = [a == b for a, b in zip(r_all[:n1], stock[:n1])]
        off_differs = [a != b for a, b in zip(r_off[:n1], stock[:n1])]
        # One revival step per single prompt (its first decode, decode position N), rows N - ceil(N/2).
        want_rv = [(n, n, n - math.ceil(n / 2)) for n in lens if n - math.ceil(n / 2) > 0]
        got_rv = [(r["prompt"], r["pos"], r["computed"]) for r in rv_all][: len(want_rv)]
        print(f"revive all: single prompts equal to stock {same_all} (first tokens equal to stock "
              f"{first_stock}); revived rows per step {got_rv} (want {want_rv} first); "
              f"revival off differs from stock {off_differs}")
        good3 = all(first_stock) and all(same_all) and got_rv == want_rv and any(off_differs)
        if not good3:
            for a, b in zip(r_all[:n1], stock[:n1]):
                print(f"  revive-all {a}\n  stock      {b}")
            print("FAIL: revival of every pruned token does not give stock's tokens (or revived the wrong rows, "
                  "or revival off equals stock: the check would not see a skipped revival)")
        ok &= good3
        # 4. the paper's progressive revival (the default).
        r_prog, t6, _ = run(d, "infinitehip", lazy_config(0.5), tag="revive-1", revive="1", revive_stats=rv_prog)
        per_req = {}
        for r in rv_prog:
            per_req.setdefault(r["req"], []).append(r)
        tot = sum(r["computed"] for r in rv_prog)
        # 2 layers, one point: a revived token computes layer 1 once, so a
        # request revives at most the rows its prefill pruned.
        once = all(sum(r["computed"] for r in v) <= v[0]["prompt"] - math.ceil(v[0]["prompt"] / 2)
                   for v in per_req.values())
        agree_p = sum(x == y for a, b in zip(r_prog[:n1], stock[:n1]) for x, y in zip(a, b)) / sum(
            len(a) for a in stock[:n1])
        agree_o = sum(x == y for a, b in zip(r_off[:n1], stock[:n1]) for x, y in zip(a, b)) / sum(
            len(a) for a in stock[:n1])
        print(f"revive progressive: {len(rv_prog)} decode steps revived {tot} rows (at most once per token: {once}); single prompts' token "
              f"agreement with stock {agree_p:.2f} (revival off {agree_o:.2f}); first tokens "
              f"{[a[0] == b[0] for a, b in zip(r_prog[:n1], half[:n1])]} equal to keep 0.5 without it")
        # Each single prompt's aux tokens are revived at most once (2 layers, one point).
        good4 = tot > 0 and once and all(a[0] == b[0] for a, b in zip(r_prog[:n1], half[:n1]))
        if not good4:
            print("FAIL: progressive revival revived nothing, too much, or changed the prefill's token")
        ok &= good4
        res.update({"revive_all": r_all, "revive_off": r_off, "revive_1": r_prog, "revive_all_steps": rv_all,
                    "revive_1_steps": rv_prog, "revive_seconds": {"all": t4, "off": t5, "1": t6}})
        res.update({"pass": bool(ok), "prompt_lens": lens, "stock": stock, "keep_1": full, "keep_0.5_rows": half,
               "keep_0.5_keyset": keyset, "rows_keep_1": st1, "rows_keep_0.5": st2,
               "seconds": {"stock": t0, "keep_1": t1, "keep_0.5_rows": t2, "keep_0.5_keyset": t3}})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print("sglang lazy rows e2e:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

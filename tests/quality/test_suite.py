"""Unit tests for the quality suite's own logic (no model, no llama.cpp):
python3 -m unittest discover -s tests/quality -p 'test_*.py'"""
import gzip
import io
import json
import math
import os
import struct
import sys
import tarfile
import tempfile
import unittest
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import engine  # noqa: E402
import locret_heads  # noqa: E402
import probes  # noqa: E402
import rdata  # noqa: E402
import report  # noqa: E402
import sources  # noqa: E402
import stats  # noqa: E402
import suite_config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


# A minimal XDR writer for R objects, the inverse of rdata's reader (R's serialize.c layout).
def _i(v):
    return struct.pack(">i", v)


def _charsxp(s):
    if s is None:
        return _i(9) + _i(-1)
    b = s.encode()
    return _i(9) + _i(len(b)) + b


def _strsxp(vals, names=None):
    return _vec(16, b"".join(_charsxp(v) for v in vals), len(vals), names)


def _vec(t, body, n, names=None):
    flags = t | ((1 << 9) if names is not None else 0)
    out = _i(flags) + _i(n) + body
    if names is not None:  # attributes: pairlist (tag "names", value STRSXP), then NILVALUE
        out += _i(2 | (1 << 10)) + _i(1) + _charsxp("names") + _strsxp(names) + _i(254)
    return out


def _intsxp(vals):
    return _vec(13, b"".join(_i(v) for v in vals), len(vals))


def _list(items, names):
    return _vec(19, b"".join(items), len(items), names)


def _serialized(obj, version=3):
    head = b"X\n" + _i(version) + _i(0x040300) + _i(0x030500)
    if version == 3:
        head += _i(5) + b"UTF-8"
    return head + obj


def _blob(data):
    return struct.pack(">I", len(data)) + zlib.compress(data)


def make_lazyload(variables):
    """(rdx bytes, rdb bytes) holding {name: list of strings}."""
    rdb, pos = b"", []
    for name, vals in variables.items():
        b = _blob(_serialized(_strsxp(vals)))
        pos.append((len(rdb), len(b)))
        rdb += b
    index = _list([_list([_intsxp(list(p)) for p in pos], list(variables)), _i(254),
                   _vec(10, _i(1), 1)], ["variables", "references", "compressed"])
    return gzip.compress(_serialized(index)), rdb


def make_deb(files):
    """A .deb (ar archive) whose data.tar.gz holds {path: bytes}."""
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w:gz") as t:
        for path, data in files.items():
            ti = tarfile.TarInfo(path)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    out = b"!<arch>\n"
    for name, data in [("debian-binary", b"2.0\n"), ("control.tar.gz", b"x"), ("data.tar.gz", tbuf.getvalue())]:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        if len(data) & 1:
            out += b"\n"
    return out


class RData(unittest.TestCase):
    def test_character_vector_with_na_and_names(self):
        o = rdata.unserialize(_serialized(_strsxp(["a", None, "héllo"], names=["x", "y", "z"])))
        self.assertEqual(o.value, ["a", None, "héllo"])
        self.assertEqual(o.names(), ["x", "y", "z"])

    def test_version2_and_named_list(self):
        o = rdata.unserialize(_serialized(_list([_intsxp([1, -(2**31)]), _strsxp(["q"])], ["n", "s"]), version=2))
        d = o.as_dict()
        self.assertEqual(d["n"].value, [1, None])
        self.assertEqual(d["s"].value, ["q"])

    def test_lazyload_roundtrip(self):
        rdx, rdb = make_lazyload({"emma": ["EMMA", "", "line"], "persuasion": ["P"]})
        v = rdata.read_lazyload(rdx, rdb)
        self.assertEqual(v["emma"].value, ["EMMA", "", "line"])
        self.assertEqual(v["persuasion"].value, ["P"])

    def test_truncated_and_bad_format_fail(self):
        data = _serialized(_strsxp(["abc", "def"]))
        with self.assertRaises(ValueError):
            rdata.unserialize(data[:-2])
        with self.assertRaises(ValueError):
            rdata.unserialize(b"A\n" + data[2:])
        with self.assertRaises(ValueError):  # blob length header disagrees
            rdata._blob(struct.pack(">I", 5) + zlib.compress(b"abc"))


class Sources(unittest.TestCase):
    def test_paragraphs(self):
        self.assertEqual(sources.paragraphs(["Chapter 1", "", "It is a truth", "  universally.", "", "", None, "End"]),
                         ["Chapter 1", "It is a truth universally.", "End"])

    def test_novels_from_deb(self):
        novels = {k: [k.upper(), "", "one", "two"] for k in sources.NOVELS}
        rdx, rdb = make_lazyload(novels)
        deb = make_deb({sources.TEXT_DATA + ".rdx": rdx, sources.TEXT_DATA + ".rdb": rdb})
        got = sources.novels_from_deb(deb)
        self.assertEqual(got, novels)
        text = sources.novels_text(got)
        self.assertTrue(text.startswith("PRIDEPREJUDICE\n\none two\n\nSENSESENSIBILITY"))
        with self.assertRaises(ValueError):
            sources.novels_from_deb(b"not a deb at all")


class Probes(unittest.TestCase):
    corpus = list(range(100000))

    def seq(self, **kw):
        a = dict(length=1024, n_decode=64, depths=[0.1, 0.5, 0.9], passage_len=32, cue=8, body_start=1000,
                 passage_start=50000, bos=7)
        a.update(kw)
        return probes.copy_sequence(self.corpus, **a)

    def test_layout(self):
        s = self.seq()
        self.assertEqual(len(s), 1024)
        self.assertEqual(s.ids[0], 7)  # BOS first
        self.assertEqual(probes.copy_sequence(self.corpus, 1024, 64, [0.5], 32, 8, 1000, 50000).ids[0], 1000)
        body = s.ids[:s.prefill]
        for i, p in enumerate(s.probes):
            passage = list(range(50000 + 32 * i, 50000 + 32 * (i + 1)))
            self.assertEqual(body[p["planted_at"]:p["planted_at"] + 32], passage)
            self.assertAlmostEqual(p["planted_at"] / s.prefill, p["depth"], delta=0.05)
            r = p["scored"]
            self.assertEqual(len(r), 32 - 8)
            self.assertEqual([s.ids[j] for j in r], passage[8:])  # second occurrence, after the cue
            self.assertGreaterEqual(r.start, s.prefill + 64)
        # the continuation continues the body text where it stopped
        last_text = [x for x in body if x < 50000][-1]
        self.assertEqual(s.ids[s.prefill], last_text + 1)
        self.assertEqual(s.decode_scored, range(s.prefill + 1, s.prefill + 64))
        self.assertEqual(s.prefill_scored.stop, s.prefill + 1)
        # body text has no gaps and no repeats besides the passages
        text = [x for x in body[1:] if x < 50000]
        self.assertEqual(text, list(range(text[0], text[0] + len(text))))

    def test_prefill_tail(self):
        import run

        s = self.seq()
        t = run.prefill_tail(s)
        self.assertEqual(t.stop, s.prefill + 1)  # ends where the decode-scored targets start
        self.assertEqual(len(t), s.prefill // 8)
        self.assertGreaterEqual(t.start, s.prefill_scored.start)

    def test_rejects_bad_layouts(self):
        with self.assertRaises(ValueError):
            self.seq(length=200)
        with self.assertRaises(ValueError):
            self.seq(depths=[0.5, 0.1])
        with self.assertRaises(ValueError):
            self.seq(passage_start=1100)  # overlaps the body
        with self.assertRaises(ValueError):
            self.seq(cue=32)

    def test_passkey(self):
        filler = "A a.\n\nB b.\n\nC c.\n\nD d."
        prompt, full = probes.passkey_texts(filler, 0.5, 123)
        self.assertIn("The pass key is 123. Remember it.", prompt)
        self.assertTrue(prompt.endswith("The pass key is"))
        self.assertEqual(full, prompt + " 123.")
        self.assertLess(prompt.index("123"), prompt.index("C c."))  # at a paragraph boundary near the middle
        self.assertEqual(probes.answer_span([1, 2, 3], [1, 2, 3, 4, 5]), range(3, 5))
        self.assertEqual(probes.answer_span([1, 2, 3], [1, 2, 7, 5]), range(2, 4))  # merged at the boundary
        with self.assertRaises(ValueError):
            probes.answer_span([1, 2], [1, 2])


def recs(nll, argmax=None, path=None):
    r = np.zeros(len(nll), dtype=stats.RECORD)
    r["nll"] = nll
    r["argmax"] = argmax if argmax is not None else 0
    r["path"] = path if path is not None else 1
    return r


class Paired(unittest.TestCase):
    def test_ranges_are_the_suites(self):
        import paired
        import run

        m = run.FULL
        for ctx in (2048, 4096, 8192):
            s = probes.copy_sequence(list(range(100000)), ctx, m["decode"], m["depths"], m["passage_len"], m["cue"],
                                     1000, 50000)
            self.assertEqual(paired.ranges(ctx), (s.decode_scored, run.prefill_tail(s), s.prefill_scored))
            # run.py --decode N: the same layout with N continuation tokens
            s = probes.copy_sequence(list(range(100000)), ctx, 512, m["depths"], m["passage_len"], m["cue"],
                                     1000, 50000)
            self.assertEqual(paired.ranges(ctx, {**m, "decode": 512}),
                             (s.decode_scored, run.prefill_tail(s), s.prefill_scored))

    def test_paired_difference(self):
        import paired

        ctx = 2048
        rng = np.random.default_rng(3)
        base = np.zeros(ctx, stats.RECORD)
        base["nll"] = rng.uniform(1, 5, ctx)
        other = base.copy()
        dec, tail, _ = paired.ranges(ctx)
        other["nll"][list(dec)] += 0.5  # only the decode-scored targets differ
        with tempfile.TemporaryDirectory() as d:
            bp, op = os.path.join(d, "b.nll"), os.path.join(d, "o.nll")
            base.tofile(bp)
            other.tofile(op)
            r = paired.paired(ctx, bp, op)
        self.assertAlmostEqual(r["decode"]["mean"], 0.5, places=5)
        self.assertEqual(r["decode"]["n"], len(dec))
        self.assertEqual((r["prefill_tail"]["mean"], r["prefill"]["mean"]), (0.0, 0.0))
        self.assertEqual(r["prefill_tail"]["n"], len(tail))
        # with --decode 512 the decode-scored range is longer and starts earlier
        dec512, _, _ = paired.ranges(ctx, {**paired.FULL, "decode": 512})
        other["nll"][list(dec512)] = base["nll"][list(dec512)] + 0.25
        with tempfile.TemporaryDirectory() as d:
            bp, op = os.path.join(d, "b.nll"), os.path.join(d, "o.nll")
            base.tofile(bp)
            other.tofile(op)
            r = paired.paired(ctx, bp, op, decode=512)
        self.assertAlmostEqual(r["decode"]["mean"], 0.25, places=5)
        self.assertEqual(r["decode"]["n"], 511)


class MultiSeq(unittest.TestCase):
    def write_runs(self, d, specs):
        paths = []
        for i, (start, rows) in enumerate(specs):
            p = os.path.join(d, f"r{i}.json")
            with open(p, "w") as f:
                json.dump({"meta": {"mode": {"body_start": start}},
                           "rows": [{"config": c, "ctx": 8192, "d_decode": {"mean": m, "se": se, "n": 511}}
                                    for c, m, se in rows]}, f)
            paths.append(p)
        return paths

    def test_pools_sequences_and_pairs_with_a_base(self):
        import multiseq

        with tempfile.TemporaryDirectory() as d:
            paths = self.write_runs(d, [
                (20000, [("stock", 0.0, 0.0), ("a", 0.02, 0.01), ("b", 0.05, 0.02)]),
                (50000, [("stock", 0.0, 0.0), ("a", 0.06, 0.03), ("b", 0.07, 0.02)]),
            ])
            out = os.path.join(d, "o.json")
            with contextlib_redirect():
                multiseq.main(paths + ["--base", "a", "--json", out])
            rows = {r["config"]: r for r in json.load(open(out))["rows"]}
        a, b = rows["a"], rows["b"]
        self.assertAlmostEqual(a["dnll"], 0.04)
        self.assertAlmostEqual(a["two_se_tokens"], 2 * math.sqrt(0.01 ** 2 + 0.03 ** 2) / 2)
        # two sequence means 0.02, 0.06: sample std 0.02*sqrt(2), over sqrt(2)
        self.assertAlmostEqual(a["two_se_sequences"], 2 * 0.02 * math.sqrt(2) / math.sqrt(2))
        self.assertAlmostEqual(a["ppl_change_pct"], 100 * (math.exp(0.04) - 1))
        self.assertEqual([s["body_start"] for s in a["per_sequence"]], [20000, 50000])
        self.assertAlmostEqual(b["minus_base"]["mean"], 0.02)
        self.assertEqual([round(x, 6) for x in b["minus_base"]["per_sequence"]], [0.03, 0.01])
        self.assertNotIn("stock", rows)

    def test_refuses_two_runs_of_one_sequence(self):
        import multiseq

        with tempfile.TemporaryDirectory() as d:
            paths = self.write_runs(d, [(20000, [("a", 0.1, 0.01)]), (20000, [("a", 0.1, 0.01)])])
            with self.assertRaises(SystemExit):
                multiseq.main(paths)


class SimPool(unittest.TestCase):
    def recs(self, start, dense, modes):
        out = [{"ctx": 8192, "body_start": start, "mode": "dense", "nll_decode": dense}]
        out += [{"ctx": 8192, "body_start": start, "mode": m, "nll_decode": v} for m, v in modes.items()]
        return out

    def test_pools_against_each_sequences_dense_and_pairs(self):
        import sim_pool

        recs = self.recs(20000, [1.0, 2.0], {"a": [1.1, 2.3], "b": [1.0, 2.1]})
        recs += self.recs(50000, [3.0, 1.0], {"a": [3.5, 1.1], "b": [3.0, 1.0]})
        rows = {r["mode"]: r for r in sim_pool.pool(recs, base="b")}
        a = rows["a"]
        diffs = [0.1, 0.3, 0.5, 0.1]
        m = sum(diffs) / 4
        sd = math.sqrt(sum((x - m) ** 2 for x in diffs) / 3)
        self.assertAlmostEqual(a["dnll"], m)
        self.assertAlmostEqual(a["two_se"], 2 * sd / 2)
        self.assertEqual(a["sequences"], [20000, 50000])
        self.assertAlmostEqual(a["per_sequence_pct"][0], 100 * (math.exp(0.2) - 1))
        # paired a - b per token: 0.1, 0.2, 0.5, 0.1
        self.assertAlmostEqual(a["paired_vs_base"]["dnll"], 0.9 / 4)
        self.assertNotIn("paired_vs_base", rows["b"])

    def test_refuses_a_missing_dense_run_or_a_duplicate(self):
        import sim_pool

        recs = self.recs(20000, [1.0, 2.0], {"a": [1.1, 2.3]})
        with self.assertRaises(ValueError):
            sim_pool.pool(recs + [{"ctx": 8192, "body_start": 50000, "mode": "a", "nll_decode": [1.0, 1.0]}])
        with self.assertRaises(ValueError):
            sim_pool.pool(recs + recs[1:])
        with self.assertRaises(ValueError):  # token counts differ from dense
            sim_pool.pool(self.recs(20000, [1.0, 2.0], {"a": [1.1]}))


def contextlib_redirect():
    import contextlib

    return contextlib.redirect_stdout(io.StringIO())


class HeadsLabel(unittest.TestCase):
    def test_rows_say_which_heads(self):
        import run

        subst = {"locret_weights": "t.safetensors", "locret_random_weights": "r.safetensors"}
        self.assertEqual(run.locret_heads_label("t.safetensors", subst, True), "trained")
        self.assertEqual(run.locret_heads_label("t.safetensors", subst, False), "random")
        self.assertEqual(run.locret_heads_label("r.safetensors", subst, True), "random")
        self.assertEqual(run.locret_heads_label("/x/new.safetensors", subst, True), "file:/x/new.safetensors")
        self.assertEqual(report.heads_note("file:/x/new.safetensors"), " (heads new.safetensors)")
        self.assertEqual(report.heads_note("random"), " (random heads)")
        self.assertEqual(report.heads_note("trained") + report.heads_note(None), "")


class Stats(unittest.TestCase):
    def test_ppl_and_delta(self):
        a, b = recs([1.0, 2.0, 3.0]), recs([1.0, 1.0, 2.0])
        self.assertAlmostEqual(stats.ppl(a, range(3)), math.exp(2.0), places=5)
        d = stats.paired_delta(a, b, range(3))
        self.assertAlmostEqual(d["mean"], 2 / 3, places=6)
        self.assertAlmostEqual(d["max_abs"], 1.0)
        self.assertAlmostEqual(d["se"], np.std([0, 1, 1], ddof=1) / math.sqrt(3), places=6)
        self.assertAlmostEqual(d["ppl_ratio"], math.exp(2 / 3), places=6)

    def test_nan_never_passes(self):
        with self.assertRaises(ValueError):
            stats.ppl(recs([1.0, float("nan")]), range(2))
        with self.assertRaises(ValueError):
            stats.paired_delta(recs([1.0, float("nan")]), recs([1.0, 1.0]), range(2))
        with self.assertRaises(ValueError):
            stats.mean_nll(recs([1.0]), range(0))

    def test_paths(self):
        r = recs([1, 1, 1, 1], path=[-1, 0, 0, 1])
        stats.check_paths(r, range(1, 3), 0)
        with self.assertRaises(ValueError):
            stats.check_paths(r, range(2, 4), 1)

    def test_copy_and_passkey(self):
        ids = [5, 6, 7, 8, 9, 10]
        r = recs([0.1] * 6, argmax=[0, 6, 7, 8, 0, 10])
        c = stats.copy_scores(r, ids, [{"depth": 0.1, "scored": range(1, 4)}, {"depth": 0.9, "scored": range(4, 6)}])
        self.assertAlmostEqual(c["accuracy"], 4 / 5)
        self.assertEqual(c["copied"], 1)
        self.assertEqual([p["accuracy"] for p in c["per_probe"]], [1.0, 0.5])
        self.assertTrue(stats.passkey_ok(r, ids, range(1, 4)))
        self.assertFalse(stats.passkey_ok(r, ids, range(3, 6)))  # one wrong digit fails

    def test_exact_verdict(self):
        same, off = {"max_abs": 1e-5}, {"max_abs": 0.3}
        self.assertTrue(stats.exact_verdict(same, 1.0, 2e-4, False))
        self.assertFalse(stats.exact_verdict(off, 1.0, 2e-4, False))
        self.assertFalse(stats.exact_verdict(same, 0.9, 2e-4, False))
        self.assertTrue(stats.exact_verdict(off, 0.9, 2e-4, True))
        self.assertFalse(stats.exact_verdict(same, 1.0, 2e-4, True))  # a negative control that matches fails

    def test_records_file(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "r.nll")
            recs([0.5, 1.5], argmax=[3, 4], path=[0, 1]).tofile(p)
            r = stats.read_records(p, 2)
            self.assertEqual(r["argmax"].tolist(), [3, 4])
            with self.assertRaises(ValueError):
                stats.read_records(p, 3)


class Configs(unittest.TestCase):
    def test_size_expressions(self):
        self.assertEqual(suite_config.eval_size("ctx/8 - 32 - ctx/32", 2048), 256 - 32 - 64)
        self.assertEqual(suite_config.eval_size("ctx", 7), 7)
        self.assertEqual(suite_config.eval_size("(ctx + 1) * 2", 3), 8)
        for bad in ["ctx ** 2", "__import__('os')", "ctx/2.5", "x"]:
            with self.assertRaises(ValueError):
                suite_config.eval_size(bad, 10)
        with self.assertRaises(ValueError):
            suite_config.eval_size("ctx - 100", 10)

    def test_instantiate(self):
        p = {"a": "ctx/2", "b": ["@w", {"c": 3, "d": "x"}]}
        self.assertEqual(suite_config.instantiate(p, 100, {"w": "heads"}), {"a": 50, "b": ["heads", {"c": 3, "d": "x"}]})
        with self.assertRaises(ValueError):
            suite_config.instantiate({"a": "@missing"}, 1, {})

    def test_plain_policy_file(self):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "hip_x.json"), "w") as f:
                json.dump({"dense_layers": 0, "default": {"method": "hip", "sink": 4}}, f)
            c = suite_config.load_dir(d)["hip_x"]
            self.assertEqual((c["method"], c["policy"]["default"]["sink"]), ("hip", 4))

    def test_shipped_configs(self):
        cs = suite_config.load_dir(os.path.join(HERE, "configs"))
        self.assertIn("stock", cs)
        subst = {"locret_weights": "w.safetensors", "locret_hidden": 256,
                 "locret_random_weights": "r.safetensors", "locret_random_hidden": 256}
        for ctx in [512, 1024, 2048, 4096, 8192]:
            for name, c in cs.items():
                if c["method"] == "stock":
                    continue
                if name == "hip-1/16" and ctx < 1024:
                    continue
                p = suite_config.instantiate(c["policy"], ctx, subst)
                self.assertEqual(p["default"]["method"], c["method"], name)
                f = suite_config.nominal_decode_fraction(p, ctx)
                if c.get("cover"):
                    self.assertEqual(f, 1.0, name)
                elif c["method"] in ("hip", "locret") and "/" in name:
                    want = float(name.split("/")[1].split("-")[0])
                    self.assertAlmostEqual(f, 1 / want, delta=0.01, msg=f"{name} at {ctx}")
                if c["method"] == "hip":
                    keeps = [s["keep_tokens"] for s in p["default"]["stages"]]
                    self.assertEqual(keeps, sorted(keeps, reverse=True), name)
                    self.assertTrue(all(k > 0 for k in keeps), name)


class Engine(unittest.TestCase):
    def test_parsers(self):
        err = "x\ninfinitehip: plugin on\ninfinitehip: stats {\"attended_fraction\": 0.25, \"locret\": null}\n"
        self.assertEqual(engine.parse_plugin_stats(err)["attended_fraction"], 0.25)
        self.assertIsNone(engine.parse_plugin_stats("nothing"))
        self.assertEqual(engine.parse_last_json("log\n{\"a\": 1}\n{\"b\": 2}\n"), {"b": 2})
        with self.assertRaises(ValueError):
            engine.parse_last_json("no json")


class Heads(unittest.TestCase):
    def test_random_heads_shape(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "h.safetensors")
            locret_heads.write_random(p, hidden=16, layers=2)
            self.assertEqual(locret_heads.hidden_of(p), 16)
            with open(p, "rb") as f:
                raw = f.read()
            (n,) = struct.unpack("<Q", raw[:8])
            h = json.loads(raw[8:8 + n])
            self.assertEqual(h["model.layers.1.self_attn.fc1.weight"]["shape"], [16, (9 + 6) * 64])
            self.assertEqual(h["model.layers.0.self_attn.fc2.weight"]["shape"], [3, 16])


class Report(unittest.TestCase):
    def test_table(self):
        d = {"mean": 0.1, "se": 0.01, "max_abs": 0.5, "n": 10, "ppl_ratio": math.exp(0.1)}
        row = {"ctx": 2048, "config": "hip-1/8", "attended_fraction": 0.2, "nominal_decode_fraction": 0.125,
               "ppl_prefill": 20.0, "ppl_decode": 22.0, "d_prefill": d, "d_decode": d,
               "copy": {"accuracy": 0.8, "copied": 3, "probes": 5, "nll": 0.4}, "prefill_s": 10.0,
               "decode_tok_s": 5.0}
        res = {"exactness": [{"config": "hip-cover", "ctx": 512, "max_abs_dnll": 1e-5, "mean_dnll": 0.0,
                              "argmax_agree": 1.0, "bound": 2e-4, "negative_control": False, "pass": False}],
               "rows": [row], "passkey": [{"config": "stock", "ctx": 1024, "depth": 0.5, "ok": True, "answer_nll": 0.1}],
               "checks": []}
        t = report.table(res)
        self.assertIn("+10.5%", t)
        self.assertIn("FAIL", t)
        self.assertIn("3/5", t)
        row["d_prefill_tail"] = dict(d, mean=-0.02, n=99)
        self.assertIn("-0.020 +- 0.020 (n 99)", report.table(res))


class PrefillLogits(unittest.TestCase):
    def test_lazy_rows_skip_prefill_scoring(self):
        import argparse
        import run

        seen = []

        class FakeRun:
            def score(self, model, ids, prefill, tmp, tag, cfg, kv, batch, prefill_logits):
                seen.append((tag, prefill_logits))
                rec = np.zeros(len(ids), dtype=stats.RECORD)
                rec["nll"] = 1.0
                rec["path"][1:prefill + 1] = 0 if prefill_logits == "all" else -1
                rec["path"][prefill] = 0
                rec["path"][prefill + 1:] = 1
                return rec, {"prefill_s": 1.0, "prefill_tok_s": 1.0, "decode_tok_s": 1.0}, {"attended_fraction": 1.0}

        s = run.Suite.__new__(run.Suite)
        s.a = argparse.Namespace(stock_cache=None, threads=1)
        s.configs = suite_config.load_dir(os.path.join(HERE, "configs"))
        s.mode, s.tmp, s.run = {"batch": 512}, "/nonexistent", {"stock": FakeRun(), "patched": FakeRun()}
        s.subst, s.locret_trained = {}, False
        ids = list(range(64))
        seq = probes.Sequence(ids=ids, prefill=40, prefill_scored=range(20, 41), decode_scored=range(41, 50),
                              probes=[{"depth": 0.5, "scored": range(55, 64)}])
        ref, _, _ = s.score("stock", "m", seq, "s")
        for name in ["lazy-default", "squeeze-default"]:
            rec, t, st = s.score(name, "m", seq, name)
            r = s.row(name, 1024, seq, rec, ref, t, st)
            lazy = name == "lazy-default"
            self.assertEqual(r["ppl_prefill"] is None, lazy)
            self.assertEqual(r["d_prefill_tail"] is None, lazy)
            self.assertIsNotNone(r["ppl_decode"])
        # lazy asks llama.cpp for no prefill logits, others (and stock) for all; exactness (f32) always all
        self.assertEqual([p for _, p in seen], ["all", "last", "all"])
        self.assertEqual(s.prefill_logits("lazy-default", "f32"), "all")
        # the table shows the missing prefill perplexity
        self.assertIn("not scored", report.table({"rows": [r | {"ppl_prefill": None, "d_prefill": None}]}))


class StockCache(unittest.TestCase):
    def test_reused_only_for_the_same_input(self):
        import argparse
        import run

        calls = []

        class FakeRun:
            def score(self, model, ids, prefill, tmp, tag, cfg, kv, batch, prefill_logits="all"):
                calls.append(tag)
                rec = np.zeros(len(ids), dtype=stats.RECORD)
                rec["nll"] = np.arange(len(ids)) + prefill
                rec.tofile(os.path.join(tmp, f"{tag}.nll"))
                return stats.read_records(os.path.join(tmp, f"{tag}.nll")), {"prefill_s": 1.0}, None

        with tempfile.TemporaryDirectory() as d:
            model = os.path.join(d, "m.gguf")
            with open(model, "wb") as f:
                f.write(b"model")
            s = run.Suite.__new__(run.Suite)
            s.a = argparse.Namespace(stock_cache=os.path.join(d, "cache"), threads=2)
            s.mode, s.tmp, s.run = {"batch": 512}, d, {"stock": FakeRun()}
            seq = probes.Sequence(ids=[1, 2, 3, 4], prefill=2, prefill_scored=range(1, 2), decode_scored=range(2, 4))
            a, ta, _ = s.score("stock", model, seq, "t1")
            b, tb, _ = s.score("stock", model, seq, "t2")
            self.assertEqual(calls, ["t1"])
            self.assertTrue((a == b).all())
            self.assertEqual(ta, tb)
            # Another prefill split, other ids or no cache: run again.
            s.score("stock", model, probes.Sequence(ids=[1, 2, 3, 4], prefill=3, prefill_scored=range(1, 3),
                                                     decode_scored=range(3, 4)), "t3")
            s.score("stock", model, probes.Sequence(ids=[1, 2, 3, 5], prefill=2, prefill_scored=range(1, 2),
                                                     decode_scored=range(2, 4)), "t4")
            s.a.stock_cache = None
            s.score("stock", model, seq, "t5")
            self.assertEqual(calls, ["t1", "t3", "t4", "t5"])


if __name__ == "__main__":
    unittest.main()

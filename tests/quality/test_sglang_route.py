"""Unit tests of the suite's SGLang route without SGLang: the record
assembly of a forced request, and the whole flow (plan, one engine per
config, exactness, rows, --quick's bound) over a fake engine, where a
covering config that moves one token must fail."""
import argparse
import os
import sys
import tempfile
import types
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402
import sglang_engine  # noqa: E402
import sglang_route  # noqa: E402
import suite_config  # noqa: E402


def steps_for(ids, prefill, nll=0.5):
    return [{"step": s, "target": ids[prefill + s], "nll": nll, "argmax": ids[prefill + s], "t": float(s)}
            for s in range(len(ids) - prefill)]


class Assemble(unittest.TestCase):
    ids = [10, 11, 12, 13, 14, 15, 16]

    def test_paths_and_values(self):
        itl = [(None, 12, None), (-1.5, 13, None)]
        itop = [None, [(-1.0, 99, None)]]
        r = sglang_engine.assemble(self.ids, 4, 2, itl, itop, steps_for(self.ids, 4), self.ids[4:])
        self.assertEqual(r["path"].tolist(), [-1, -1, -1, 0, 0, 1, 1])
        self.assertAlmostEqual(float(r["nll"][3]), 1.5)
        self.assertEqual(int(r["argmax"][3]), 99)
        self.assertTrue(np.isnan(r["nll"][:3]).all())

    def test_chunked_prefill_step_zero_is_the_last_chunk(self):
        # The processor also runs after each earlier prefill chunk (SGLang
        # discards those tokens): the last step-0 record is the prompt's.
        st = steps_for(self.ids, 4)
        early = [dict(st[0], nll=9.0, argmax=1, t=-2.0), dict(st[0], nll=8.0, argmax=2, t=-1.0)]
        kept = sglang_engine.last_chunk_steps(early + st)
        r = sglang_engine.assemble(self.ids, 4, -1, None, None, kept, self.ids[4:])
        self.assertAlmostEqual(float(r["nll"][4]), 0.5)
        self.assertEqual(int(r["argmax"][4]), self.ids[4])
        # duplicates of a later step (a re-run decode) still fail
        with self.assertRaises(RuntimeError):
            sglang_engine.assemble(self.ids, 4, -1, None, None, sglang_engine.last_chunk_steps(st + [st[1]]),
                                   self.ids[4:])

    def test_inconsistent_runs_fail(self):
        good = steps_for(self.ids, 4)
        with self.assertRaises(RuntimeError):  # a step missing
            sglang_engine.assemble(self.ids, 4, -1, None, None, good[:-1], self.ids[4:])
        with self.assertRaises(RuntimeError):  # a step twice
            sglang_engine.assemble(self.ids, 4, -1, None, None, good + good[-1:], self.ids[4:])
        with self.assertRaises(RuntimeError):  # output not the forced tokens
            sglang_engine.assemble(self.ids, 4, -1, None, None, good, [1, 2, 3])
        with self.assertRaises(RuntimeError):  # input logprobs for other tokens
            sglang_engine.assemble(self.ids, 4, 2, [(None, 12, None), (-1.0, 77, None)], [None, [(0, 1, None)]],
                                   good, self.ids[4:])


class FakeEngine:
    """Scores like a model whose NLL depends on the position only; sparse
    configs add 0.01 nats per decode token; `moved` configs move one."""
    started = []
    moved = set()

    def __init__(self, model_dir, policy, tmp, tag, max_len, chunked_prefill=None, threads=None):
        self.policy, self.tag = policy, tag
        self.startup_s, self.args = 0.0, {}
        FakeEngine.started.append(tag)

    def shutdown(self):
        pass

    def score(self, ids, prefill, first, tag):
        n = len(ids)
        nll = 1.0 + 0.001 * np.arange(n)
        sparse = self.policy is not None and not any(
            s["keep_tokens"] >= n for s in (self.policy.get("default") or {}).get("stages", [{"keep_tokens": n}]))
        steps = [{"step": s, "target": ids[prefill + s], "argmax": ids[prefill + s], "t": float(s),
                  "nll": float(nll[prefill + s] + (0.01 if sparse and s > 0 else 0.0))} for s in range(n - prefill)]
        if self.tag in FakeEngine.moved:
            steps[3]["nll"] += 1e-3  # one token off: as if one key were dropped
        lp = first - 1
        itl = [(None if j == 0 else -float(nll[lp + j]), ids[lp + j], None) for j in range(prefill - lp)]
        itop = [None if j == 0 else [(0.0, ids[lp + j], None)] for j in range(prefill - lp)]
        rec = sglang_engine.assemble(ids, prefill, lp, itl, itop, steps, ids[prefill:], tag)
        return rec, {"prefill_s": 1.0, "prefill_tok_s": prefill, "decode_tok_s": 10.0}, None


def fake_suite(d):
    s = sglang_route.SglangSuite.__new__(sglang_route.SglangSuite)
    s.a = argparse.Namespace(quick=True, no_exact=False, no_plot=True, lengths=None, passkey_lengths=None,
                             configs=None, json=os.path.join(d, "q.json"), png=None, resume=None, threads=2, decode=None)
    s.configs = suite_config.load_dir(os.path.join(HERE, "configs"))
    s.tmp, s.model, s.text = d, d, os.path.join(d, "t.txt")
    with open(s.text, "w") as f:
        f.write("text")
    s.corpus = np.arange(700000, dtype="<i4") % 5000
    s.bos, s.locret_trained, s.failures, s.results, s.engine_info = None, False, [], {}, {}
    s.subst = {"locret_weights": "w", "locret_hidden": 64, "locret_random_weights": "r", "locret_random_hidden": 64}
    return s


class Flow(unittest.TestCase):
    def setUp(self):
        self.saved = sglang_engine.SglangEngine
        sglang_engine.SglangEngine = FakeEngine
        FakeEngine.started, FakeEngine.moved = [], set()

    def tearDown(self):
        sglang_engine.SglangEngine = self.saved

    def test_quick_passes_with_one_engine_per_config(self):
        with tempfile.TemporaryDirectory() as d:
            self.assertEqual(fake_suite(d).main(), 0)
            # stock, hip-cover, hip-1/4 (the negative control and the bound share the 1K policy)
            self.assertEqual(FakeEngine.started, ["stock", "hip-cover", "hip-1_4"])

    def test_a_moved_token_fails_exactness(self):
        FakeEngine.moved = {"hip-cover"}
        with tempfile.TemporaryDirectory() as d:
            s = fake_suite(d)
            self.assertEqual(s.main(), 1)
            self.assertTrue(any(f.startswith("exactness hip-cover") for f in s.failures), s.failures)

    def test_resume_reuses_saved_results_only(self):
        with tempfile.TemporaryDirectory() as d:
            s = fake_suite(d)
            s.a.resume = os.path.join(d, "runs")
            self.assertEqual(s.main(), 0)
            first = open(s.a.json).read()
            FakeEngine.started = []
            s2 = fake_suite(d)
            s2.a.resume = s.a.resume
            self.assertEqual(s2.main(), 0)
            self.assertEqual(FakeEngine.started, [])  # everything reused
            import json
            rows = lambda t: [(r["config"], r["ppl_decode"]) for r in json.loads(t)["rows"]]
            self.assertEqual(rows(open(s2.a.json).read()), rows(first))
            s3 = fake_suite(d)  # another length: only its runs start engines
            s3.a.resume, s3.a.lengths, s3.a.no_exact = s.a.resume, [1536], True
            self.assertEqual(s3.main(), 0)
            self.assertEqual(FakeEngine.started, ["stock", "hip-1_4"])

    def test_unplanned_pair_is_an_error(self):
        with tempfile.TemporaryDirectory() as d:
            s = fake_suite(d)
            s.mode = dict(run.QUICK)
            with self.assertRaises(RuntimeError):
                s.score("hip-1/8", s.model, s.sequence(1024), "x")


if __name__ == "__main__":
    unittest.main()

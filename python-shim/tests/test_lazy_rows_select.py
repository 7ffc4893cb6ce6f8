"""lazy_rows' row selection (keep_count, top_rows, last_row_importance)
against direct definitions: the core's `lazy::keep_count` formula, top-k
with the last row forced and ties to the later row, and the last row's
softmax (GQA) mean over q heads."""

import math

import pytest

torch = pytest.importorskip("torch")

from infinitehip.sglang.lazy_rows import keep_count, last_row_importance, top_rows  # noqa: E402


def test_keep_count():
    assert keep_count(0.5, 0) == 0
    assert keep_count(1.0, 7) == 7
    assert keep_count(0.5, 7) == 4
    assert keep_count(0.9, 10) == 9  # 9.000000000000002 - 1e-6 -> 9
    assert keep_count(0.001, 10) == 1


def test_top_rows_forces_last_and_prefers_later_on_ties():
    imp = torch.tensor([0.5, 0.1, 0.5, 0.9, 0.0])
    assert top_rows(imp, 5).tolist() == [0, 1, 2, 3, 4]
    # Last row (0.0) forced; 0.9 next; tie 0.5 vs 0.5 -> the later (2).
    assert top_rows(imp, 3).tolist() == [2, 3, 4]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = 50
        imp = torch.rand(n, generator=g)
        k = 17
        got = top_rows(imp, k).tolist()
        want = sorted([n - 1] + sorted(range(n - 1), key=lambda i: (-float(imp[i]), -i))[: k - 1])
        assert got == want


def test_last_row_importance_is_the_mean_softmax():
    g = torch.Generator().manual_seed(1)
    h, hk, d, n = 6, 2, 8, 13
    q = torch.randn(h, d, generator=g)
    k = torch.randn(n, hk, d, generator=g)
    got = last_row_importance(q, k, 0.3)
    want = torch.zeros(n)
    for i in range(h):
        want += torch.softmax(k[:, i // (h // hk)] @ q[i] * 0.3, 0)
    assert torch.allclose(got, want / h, atol=1e-6)
    assert math.isclose(float(got.sum()), 1.0, rel_tol=1e-5)


class _Layer:
    tp_q_head_num, qk_head_dim = 6, 8
    scaling = 0.3


def test_revive_attention_against_a_direct_causal_softmax():
    """A revival decode step's attention (rows at scattered positions over
    pool slots, causal by position, GQA, in blocks of 256 rows) against a
    per-row, per-head softmax; the importance is the last row's."""
    from infinitehip.sglang.lazy_rows import revive_attention

    g = torch.Generator().manual_seed(2)
    h, hk, d, slots = 6, 2, 8, 700
    kb = torch.randn(slots, hk, d, generator=g)
    vb = torch.randn(slots, hk, d, generator=g)
    for m, r in ((40, 5), (600, 300)):  # 300 rows: two blocks
        key_pos = torch.sort(torch.randperm(2 * m, generator=g)[:m]).values
        key_loc = torch.randperm(slots, generator=g)[:m]
        rows = torch.sort(torch.randperm(m - 1, generator=g)[: r - 1]).values
        rows = torch.cat([rows, torch.tensor([m - 1])])  # the decode token: the last key
        q = torch.randn(r, h * d, generator=g)
        rv = {"key_loc": key_loc, "key_pos": key_pos, "q_pos": key_pos[rows], "imp": None}
        got = revive_attention(q, _Layer, kb, vb, rv)
        assert torch.isfinite(got).all()
        want = torch.zeros(r, h * d)
        for i in range(r):
            vis = key_pos <= key_pos[rows[i]]
            for j in range(h):
                k = kb[key_loc[vis], j // (h // hk)]
                p = torch.softmax(k @ q[i, j * d:(j + 1) * d] * 0.3, 0)
                want[i, j * d:(j + 1) * d] = p @ vb[key_loc[vis], j // (h // hk)]
        assert (got - want).abs().max() < 1e-5
        imp = last_row_importance(q[-1].reshape(h, d), kb[key_loc], 0.3)
        assert (rv["imp"] - imp).abs().max() < 1e-6
        # Dropping one visible key of the first row changes its output.
        rv2 = dict(rv, key_loc=key_loc[1:], key_pos=key_pos[1:])
        assert (revive_attention(q[-1:], _Layer, kb, vb, dict(rv2, q_pos=rv["q_pos"][-1:])) - got[-1:]).abs().max() > 1e-5


def test_select_keeps_the_top_and_the_decode_token():
    from infinitehip.sglang.lazy_rows import _select

    imp = torch.tensor([0.3, 0.05, 0.4, 0.05, 0.2, 0.0])
    key_tok = torch.tensor([0, 2, 3, 7, 8, 9])
    assert _select(imp, key_tok, 0.3, 10, "1").tolist() == [0, 3, 9]  # keep_count(0.3, 10) = 3
    assert _select(imp, key_tok, 0.3, 10, "all").tolist() == key_tok.tolist()


def test_a_revival_step_that_fails_ends_the_requests_revival(monkeypatch):
    """A decode step that raises inside forward_revive must drop the row's
    aux entry (its engine copies may hold rows the entry does not record),
    and re-raise; other rows' entries stay."""
    from types import SimpleNamespace

    from infinitehip.sglang import lazy_rows as lr

    backend = SimpleNamespace(lazy_points=lambda: {2: 0.5}, _generation=lambda r: 0)
    monkeypatch.setattr(lr, "_backend", lambda: backend)
    monkeypatch.setenv(lr.REVIVE_ENV, "1")
    monkeypatch.setenv(lr.ROWS_ENV, "1")
    monkeypatch.setattr(lr, "_aux", {3: {"n": 4, "gen": 0, "done": torch.zeros(4, dtype=torch.long)},
                                     5: {"n": 4, "gen": 0}})
    fb = SimpleNamespace(forward_mode=SimpleNamespace(is_decode=lambda: True, is_extend=lambda: False),
                         req_pool_indices=torch.tensor([3]), seq_lens_cpu=torch.tensor([9]), seq_lens=None)

    def boom(*a, **k):
        raise RuntimeError("layer 7 failed")

    monkeypatch.setattr(lr, "forward_revive", boom)
    with pytest.raises(RuntimeError, match="layer 7"):
        lr.around_forward(None, None, None, None, fb)
    assert 3 not in lr._aux and 5 in lr._aux

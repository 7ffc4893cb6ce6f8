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

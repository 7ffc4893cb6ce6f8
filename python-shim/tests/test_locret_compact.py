"""`locret_free.compact_per_head` (the SGLang CUDA path's in-place move of
Locret's retained K/V into a request's first slots) against a per-unit loop
over a copy, on fresh random buffers, positions and slot orders; a wrong
destination must fail the comparison."""

import pytest

torch = pytest.importorskip("torch")

from infinitehip.sglang.locret_free import compact_per_head  # noqa: E402


def reference(kb, vb, slots, pos):
    k0, v0 = kb.clone(), vb.clone()
    kr, vr = kb.clone(), vb.clone()
    for h in range(pos.shape[0]):
        for i, p in enumerate(pos[h].tolist()):
            kr[slots[i], h] = k0[slots[p], h]
            vr[slots[i], h] = v0[slots[p], h]
    return kr, vr


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compact_per_head_equals_a_loop(seed):
    g = torch.Generator().manual_seed(seed)
    n_slots, hk, d, n, m = 300, 3, 8, 120, 40
    kb = torch.randn(n_slots, hk, d, generator=g).to(torch.bfloat16)
    vb = torch.randn(n_slots, hk, d, generator=g).to(torch.bfloat16)
    slots = torch.randperm(n_slots - 1, generator=g)[:n] + 1
    # Per head a different sorted retained set (sources overlap destinations).
    pos = torch.stack([torch.randperm(n, generator=g)[:m].sort().values for _ in range(hk)])
    kr, vr = reference(kb, vb, slots, pos)
    compact_per_head(kb, vb, slots, pos)
    assert torch.equal(kb, kr) and torch.equal(vb, vr)
    # Slots outside the request are untouched (covered by equality); a
    # shifted destination differs.
    kb2 = kr.clone()
    compact_per_head(kb2, vr.clone(), slots[1:], pos.clamp(max=n - 2))
    assert not torch.equal(kb2, kr)

"""Host offload in SGLang (offload.py) over SGLang's real pools and allocator
on the CPU engine: SGLang's token pool is the host tier (the plugin's
HostTierKVPool; plain host memory here) and the engine's page cache of
`kv.device_cache_pages` cells per layer stands in for device memory. Two
requests whose KV is several times that capacity decode exactly as the
all-resident twin (same ops, no device cache), the cache really evicts and
refetches, and a request that reuses a freed row and freed slots still
matches (a stale cached page would not). A negative control shows the
comparison sees one changed cell. Also the two SGLang hooks: pool class
and admission budget."""

import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from infinitehip.sglang import graph_capable_config, offload  # noqa: E402
from infinitehip.sglang.backend import InfiniteHipAttnBackend  # noqa: E402
from sglang_fakes import FakeModelConfig  # noqa: E402

L, H, HK, D, CTX = 2, 4, 2, 16, 1024
SLOTS = 800  # small: request B must take request A's freed slots
CELLS = 112  # device page cache per layer: 2 x (sink 8 + window 16 + 16 kept + 4 slid) = 88 needed
LENS = (420, 330)  # each request's KV is 3-4x the device capacity
DECODE = 10

HIP = {"method": "hip", "sink": 8, "window": 16,
       "stages": [{"chunk_size": 32, "keep_tokens": 64, "refresh_interval": 4},
                  {"chunk_size": 8, "keep_tokens": 16, "refresh_interval": 2}],
       "block_size_q": 16, "q_stride": 2, "prefill_chunk": 256}


def config(cells):
    kv = {"page_size": 1}
    if cells:
        kv["device_cache_pages"] = cells
    return {"dense_layers": 0, "prefill_dense_below": 0, "decode_dense_below": 0, "kv": kv, "default": HIP}


def make(tmp_path, monkeypatch, cells):
    path = tmp_path / f"c{cells}.json"
    path.write_text(json.dumps(config(cells)))
    monkeypatch.setenv("INFINITEHIP_CONFIG", str(path))
    rpool = ReqToTokenPool(size=4, max_context_len=CTX, device="cpu", enable_memory_saver=False)
    kv = offload.host_tier_pool_class()(
        size=SLOTS, page_size=1, dtype=torch.float32, head_num=HK, head_dim=D, layer_num=L, device="cpu",
        enable_memory_saver=False, enable_alt_stream=False)
    alloc = TokenToKVPoolAllocator(SLOTS, torch.float32, "cpu", kv, need_sort=False)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=rpool, token_to_kv_pool=kv,
                             model_config=FakeModelConfig(H, HK, D, CTX), server_args=SimpleNamespace(tp_size=1),
                             model=torch.nn.ModuleList())
    backend = InfiniteHipAttnBackend(runner)
    layers = [SimpleNamespace(layer_id=l, tp_q_head_num=H, tp_k_head_num=HK, qk_head_dim=D, v_head_dim=D,
                              scaling=D ** -0.5, logit_cap=0.0, sliding_window_size=-1, is_cross_attention=False,
                              attn_type=None) for l in range(L)]
    return SimpleNamespace(rpool=rpool, kv=kv, alloc=alloc, backend=backend, layers=layers)


def forward(s, mode, rows, seq_lens, n_new, inputs):
    """One forward as SGLang runs it: slots from the allocator into
    req_to_token, init_forward_metadata, per layer attention (the backend
    writes K/V into SGLang's pool). `inputs`: per layer (q, k, v) of all
    new tokens, request after request."""
    locs = []
    for r, sl, n in zip(rows, seq_lens, n_new):
        loc = s.alloc.alloc(n)
        s.rpool.req_to_token[r, sl - n:sl] = loc.to(torch.int32)
        locs.append(loc)
    loc = torch.cat(locs)
    pos = torch.cat([torch.arange(sl - n, sl) for sl, n in zip(seq_lens, n_new)])
    fb = SimpleNamespace(
        forward_mode=mode, batch_size=len(rows), req_pool_indices=torch.tensor(rows),
        seq_lens=torch.tensor(seq_lens), seq_lens_cpu=None, extend_seq_lens_cpu=list(n_new),
        extend_seq_lens=torch.tensor(n_new), extend_prefix_lens_cpu=[sl - n for sl, n in zip(seq_lens, n_new)],
        out_cache_loc=loc, out_cache_loc_is_physical=False, positions=pos)
    s.backend.init_forward_metadata(fb)
    outs = []
    for layer, (q, k, v) in zip(s.layers, inputs):
        fwd = s.backend.forward_decode if mode.is_decode() else s.backend.forward_extend
        outs.append(fwd(q.reshape(-1, H * D), k, v, layer, fb, save_kv_cache=True))
    return torch.stack(outs), loc


def qkv(g, n):
    return [(torch.randn(n, H, D, generator=g), torch.randn(n, HK, D, generator=g) * 2,
             torch.randn(n, HK, D, generator=g)) for _ in range(L)]


def run_pair(off, res, rows, lens, g, steps):
    """Prefill `rows` together, then `steps` decode steps; every output of
    the offloaded twin must equal the resident twin's bit for bit."""
    prompt = qkv(g, sum(lens))
    o1, loc = forward(off, ForwardMode.EXTEND, rows, list(lens), list(lens), prompt)
    o2, _ = forward(res, ForwardMode.EXTEND, rows, list(lens), list(lens), prompt)
    assert torch.equal(o1, o2)
    for t in range(steps):
        step = qkv(g, len(rows))
        sl = [n + t + 1 for n in lens]
        o1, _ = forward(off, ForwardMode.DECODE, rows, sl, [1] * len(rows), step)
        o2, _ = forward(res, ForwardMode.DECODE, rows, sl, [1] * len(rows), step)
        assert torch.isfinite(o1).all()
        assert torch.equal(o1, o2), f"decode step {t}: offloaded != resident (max diff {(o1 - o2).abs().max()})"
    return loc, step, o1


def test_long_requests_decode_through_the_device_cache_like_resident(tmp_path, monkeypatch):
    off = make(tmp_path, monkeypatch, CELLS)
    res = make(tmp_path, monkeypatch, None)
    assert off.backend.offload == (CELLS, 0) and res.backend.offload is None
    rows = off.rpool.alloc_rows(2)
    assert res.rpool.alloc_rows(2) == rows
    g = torch.Generator().manual_seed(0)
    loc_a, _, _ = run_pair(off, res, rows, LENS, g, DECODE)
    st = off.backend.engine.stats()["layers"]
    for l in st:
        # The request's KV exceeds the device capacity: blocks were evicted
        # and fetched again from the host tier, and the cache stayed bounded.
        assert l["cache"]["misses"] > 0 and l["cache"]["evictions"] > 0, l
        assert 0 < l["device_bytes"] < l["host_bytes"] / 3, l
    assert min(LENS) > 2.9 * CELLS

    # Request A (rows[0]) ends: SGLang frees its slots and row. Request B
    # takes the row and reuses A's slots with other K/V: a cached copy of a
    # freed slot read again would make B differ from the resident twin.
    for s in (off, res):
        s.alloc.free(s.rpool.req_to_token[rows[0], : LENS[0] + DECODE].long())
        s.rpool.free_rows([rows[0]])
    (row_b,) = off.rpool.alloc_rows(1)
    assert res.rpool.alloc_rows(1) == [row_b]
    g2 = torch.Generator().manual_seed(1)
    n_b = 380
    prompt = qkv(g2, n_b)
    ob, loc_b = forward(off, ForwardMode.EXTEND, [row_b], [n_b], [n_b], prompt)
    rb, _ = forward(res, ForwardMode.EXTEND, [row_b], [n_b], [n_b], prompt)
    assert torch.equal(ob, rb)
    assert len(set(loc_a.tolist()) & set(loc_b.tolist())) > 100, "B should reuse A's freed slots"
    for t in range(DECODE):
        step = qkv(g2, 1)
        ob, _ = forward(off, ForwardMode.DECODE, [row_b], [n_b + t + 1], [1], step)
        rb, _ = forward(res, ForwardMode.DECODE, [row_b], [n_b + t + 1], [1], step)
        assert torch.equal(ob, rb), f"reused row/slots, step {t}"

    # Negative control: one cell of B's (always attended) sink changed in the
    # resident twin's copy -> the next outputs differ, so the equality above
    # would catch one lost or stale page.
    slot = int(res.rpool.req_to_token[row_b, 3])
    sid = res.backend.rows[row_b].sid
    res.backend._drop(row_b)  # the twin rebuilds its copy from SGLang's pool
    res.kv.get_key_buffer(0)[slot] += 3.0
    step = qkv(g2, 1)
    n = n_b + DECODE + 1
    ob, _ = forward(off, ForwardMode.DECODE, [row_b], [n], [1], step)
    rb, _ = forward(res, ForwardMode.DECODE, [row_b], [n], [1], step)
    assert res.backend.rows[row_b].sid != sid
    assert ((ob - rb).norm() / rb.norm()).item() > 1e-3


def test_cache_too_small_for_a_step_is_a_config_error(tmp_path, monkeypatch):
    s = make(tmp_path, monkeypatch, 20)  # below sink + window + kept tokens
    rows = s.rpool.alloc_rows(1)
    g = torch.Generator().manual_seed(2)
    forward(s, ForwardMode.EXTEND, rows, [200], [200], qkv(g, 200))
    with pytest.raises(Exception) as ei:
        forward(s, ForwardMode.DECODE, rows, [201], [1], qkv(g, 1))
    assert "cache" in str(ei.value).lower(), ei.value


def test_hooks_pick_the_host_pool_and_the_host_budget(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config(CELLS)))
    monkeypatch.setenv("INFINITEHIP_CONFIG", str(path))
    monkeypatch.setenv(offload.HOST_KV_ENV, "1.5")
    orig_pool = lambda self, *, kind, default: default  # noqa: E731
    assert offload._resolve_pool(orig_pool, None, kind="mha", default=MHATokenToKVPool) is \
        offload.host_tier_pool_class()
    assert offload._resolve_pool(orig_pool, None, kind="mla", default=int) is int
    assert offload._budget(lambda self, pre: 123, None, 0) == int(1.5 * (1 << 30))
    ok, why = graph_capable_config(str(path))
    assert not ok and "device_cache_pages" in why
    # Offload off: SGLang's own choices stand.
    path.write_text(json.dumps(config(None)))
    assert offload._resolve_pool(orig_pool, None, kind="mha", default=MHATokenToKVPool) is MHATokenToKVPool
    assert offload._budget(lambda self, pre: 123, None, 0) == 123


def test_pinned_sizing_fits_the_budget_after_power_of_two_rounding():
    def rounded_total(tokens, row, layers, page):
        per = (tokens + page) * row
        return 2 * layers * (1 << (per - 1).bit_length())

    for budget, row, layers, page in [(400 << 30, 2048, 32, 1), (3 << 30, 4096, 28, 16), (10 ** 9, 512, 2, 1)]:
        b = offload.pinned_pool_bytes(budget, row, layers, page)
        tokens = b // (2 * layers * row)
        assert tokens > 0 and rounded_total(tokens, row, layers, page) <= budget
        # Within 2x of the budget: the next power of two would not fit.
        assert rounded_total(tokens, row, layers, page) * 2 > budget
    assert offload.pinned_pool_bytes(1000, 2048, 32) == 0

"""The backend's request lifecycle over SGLang's real pools (ReqToTokenPool,
MHATokenToKVPool): a request's copy is built, extended by decode, dropped
when its row is released, rebuilt from SGLang's pool when a reused row
arrives with a radix-cache prefix or a shorter prefix (retraction), and
every output equals an SDPA reference over SGLang's pool (the truth) — with a
softmax scale that is not 1/sqrt(head_dim)."""

import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from infinitehip.sglang.backend import InfiniteHipAttnBackend  # noqa: E402
from sglang_fakes import FakeModelConfig  # noqa: E402

H, HK, D, CTX = 4, 2, 16, 128
SCALE = 0.2  # not 1/sqrt(16) = 0.25: the backend must rescale q



@pytest.fixture
def setup(tmp_path, monkeypatch):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"dense_layers": 0, "kv": {"page_size": 4},
                               "prefill_dense_below": 0, "decode_dense_below": 0, "default": {
        "method": "hip", "sink": 2, "window": 4,
        "stages": [{"chunk_size": 4, "keep_tokens": 512, "refresh_interval": 2}],
        "block_size_q": 4, "q_stride": 1, "prefill_chunk": 8}}))
    monkeypatch.setenv("INFINITEHIP_CONFIG", str(cfg))
    rpool = ReqToTokenPool(size=3, max_context_len=CTX, device="cpu", enable_memory_saver=False)
    kv = MHATokenToKVPool(size=512, page_size=1, dtype=torch.float32, head_num=HK, head_dim=D,
                          layer_num=1, device="cpu", enable_memory_saver=False, enable_alt_stream=False)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=rpool, token_to_kv_pool=kv,
                             model_config=FakeModelConfig(H, HK, D, CTX), server_args=SimpleNamespace(tp_size=1))
    backend = InfiniteHipAttnBackend(runner)
    layer = SimpleNamespace(layer_id=0, tp_q_head_num=H, tp_k_head_num=HK, qk_head_dim=D,
                            v_head_dim=D, scaling=SCALE, logit_cap=0.0, sliding_window_size=-1,
                            is_cross_attention=False, attn_type=None)
    state = {"next_slot": 1, "gen": torch.Generator().manual_seed(0)}
    return rpool, kv, backend, layer, state


def new_slots(state, n):
    s = list(range(state["next_slot"], state["next_slot"] + n))
    state["next_slot"] += n
    return s


def step(setup, reqs, mode):
    """reqs: list of (row, seq_len, new_slots). Writes K/V of the new tokens
    into SGLang's pool and req_to_token (as SGLang does), runs the backend
    and checks against SDPA over the pool."""
    rpool, kv, backend, layer, state = setup
    g = state["gen"]
    for row, sl, slots in reqs:
        rpool.req_to_token[row, sl - len(slots):sl] = torch.tensor(slots, dtype=torch.int32)
    loc = torch.tensor([s for _, _, ss in reqs for s in ss], dtype=torch.int64)
    n = loc.numel()
    k = torch.randn(n, HK, D, generator=g)
    v = torch.randn(n, HK, D, generator=g)
    kv.set_kv_buffer(layer, loc, k, v)
    q = torch.randn(n, H * D, generator=g)
    ext = [len(ss) for _, _, ss in reqs]
    fb = SimpleNamespace(
        forward_mode=mode, batch_size=len(reqs),
        req_pool_indices=torch.tensor([r for r, _, _ in reqs]),
        seq_lens=torch.tensor([sl for _, sl, _ in reqs]), seq_lens_cpu=None,
        extend_seq_lens_cpu=ext, extend_seq_lens=torch.tensor(ext),
        extend_prefix_lens_cpu=[sl - e for (_, sl, _), e in zip(reqs, ext)],
        out_cache_loc=loc)
    backend.init_forward_metadata(fb)
    fwd = backend.forward_decode if mode.is_decode() else backend.forward_extend
    out = fwd(q, None, None, layer, fb, save_kv_cache=False)
    # Reference: SDPA over SGLang's pool, causal within each request.
    kb, vb = kv.get_key_buffer(0), kv.get_value_buffer(0)
    pos = 0
    for (row, sl, slots), e in zip(reqs, ext):
        toks = rpool.req_to_token[row, :sl].long()
        kk = kb[toks].repeat_interleave(H // HK, dim=1).transpose(0, 1)  # [H, sl, D]
        vv = vb[toks].repeat_interleave(H // HK, dim=1).transpose(0, 1)
        qq = q[pos:pos + e].view(e, H, D).transpose(0, 1)  # [H, e, D]
        s = qq @ kk.transpose(1, 2) * SCALE
        qpos = torch.arange(sl - e, sl).unsqueeze(1)
        s = s.masked_fill(torch.arange(sl).unsqueeze(0) > qpos, float("-inf"))
        want = (torch.softmax(s, -1) @ vv).transpose(0, 1).reshape(e, H * D)
        got = out[pos:pos + e]
        err = ((got - want).norm() / want.norm()).item()
        assert err <= 1e-5, (row, sl, err)
        pos += e


def test_lifecycle(setup):
    rpool, kv, backend, layer, state = setup
    EXT, DEC = ForwardMode.EXTEND, ForwardMode.DECODE
    (ra,) = rpool.alloc_rows(1)
    (rc,) = rpool.alloc_rows(1)
    a = new_slots(state, 20)
    c = new_slots(state, 7)
    step(setup, [(ra, 20, a), (rc, 7, c)], EXT)  # two prefills in one batch
    for t in range(3):  # decode both
        a1, c1 = new_slots(state, 1), new_slots(state, 1)
        a += a1
        c += c1
        step(setup, [(ra, len(a), a1), (rc, len(c), c1)], DEC)
    sid_a = backend.rows[ra].sid
    assert backend.engine.seq_len(0, sid_a) == 23
    # Chunked prefill continuing the same request: mirrored, no rebuild.
    more = new_slots(state, 9)
    a += more
    step(setup, [(ra, len(a), more)], EXT)
    assert backend.rows[ra].sid == sid_a

    # Request C finishes: its row goes back to SGLang's free list; the next
    # forward (without C) frees its copy.
    rpool.free_rows([rc])
    a1 = new_slots(state, 1)
    a += a1
    step(setup, [(ra, len(a), a1)], DEC)
    assert rc not in backend.rows
    assert backend.engine.stats()["layers"][0]["sequences"] == 1

    # A finishes; B takes the same row (generation bumps) with a radix hit on
    # A's first 10 tokens plus 5 new ones: rebuilt from SGLang's pool.
    rpool.free_rows([ra])
    (rb,) = rpool.alloc_rows(1)
    assert rb == ra
    b = a[:10] + new_slots(state, 5)
    step(setup, [(rb, 15, b[10:])], EXT)
    assert backend.rows[rb].sid != sid_a
    assert backend.engine.stats()["layers"][0]["sequences"] == 1
    sid_b = backend.rows[rb].sid
    b1 = new_slots(state, 1)
    b += b1
    step(setup, [(rb, len(b), b1)], DEC)

    # Same row and generation but a shorter prefix (retracted and resumed):
    # rebuilt, then continues.
    b = b[:12] + new_slots(state, 3)
    step(setup, [(rb, 15, b[12:])], EXT)
    assert backend.rows[rb].sid != sid_b
    assert backend.engine.seq_len(0, backend.rows[rb].sid) == 15


def test_unsupported_layers_are_refused(setup):
    _, _, backend, layer, _ = setup
    bad = SimpleNamespace(**{**vars(layer), "sliding_window_size": 8})
    with pytest.raises(NotImplementedError, match="sliding-window"):
        backend.forward_decode(torch.zeros(1, H * D), None, None, bad, None)
    bad = SimpleNamespace(**{**vars(layer), "logit_cap": 30.0})
    with pytest.raises(NotImplementedError, match="soft-capping"):
        backend.forward_extend(torch.zeros(1, H * D), None, None, bad, None)


def test_config_errors(tmp_path, monkeypatch, setup):
    from infinitehip import InfinitehipError
    from infinitehip.sglang.backend import build_policy_config

    rpool, kv, backend, layer, state = setup
    runner = SimpleNamespace(model_config=FakeModelConfig(H, HK, D, CTX), server_args=SimpleNamespace(tp_size=1))
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"model": {"n_q_heads": 8}}))
    with pytest.raises(InfinitehipError, match="model.n_q_heads = 8 but SGLang's model has 4"):
        build_policy_config(runner, kv, str(p))
    p.write_text("{oops")
    with pytest.raises(InfinitehipError, match="not valid JSON"):
        build_policy_config(runner, kv, str(p))
    with pytest.raises(InfinitehipError, match="cannot read"):
        build_policy_config(runner, kv, str(tmp_path / "missing.json"))
    cfg = build_policy_config(runner, kv, "")  # default: shape, dtype, dense_layers filled
    assert cfg["model"]["n_layers"] == 1 and cfg["model"]["n_kv_heads"] == HK
    assert cfg["kv"]["dtype"] == "f32" and cfg["dense_layers"] == 1
    p.write_text(json.dumps({"default": {"method": "hip", "stages": []}}))
    monkeypatch.setenv("INFINITEHIP_CONFIG", str(p))
    with pytest.raises(InfinitehipError, match="default.stages"):
        InfiniteHipAttnBackend(SimpleNamespace(device="cpu", req_to_token_pool=rpool,
                                               token_to_kv_pool=kv, model_config=FakeModelConfig(H, HK, D, CTX),
                                               server_args=SimpleNamespace(tp_size=1)))


def test_speculative_modes_are_refused_and_failures_force_a_rebuild(setup):
    rpool, kv, backend, layer, state = setup
    fb = SimpleNamespace(forward_mode=ForwardMode.TARGET_VERIFY, batch_size=1)
    with pytest.raises(NotImplementedError, match="TARGET_VERIFY"):
        backend.init_forward_metadata(fb)
    (ra,) = rpool.alloc_rows(1)
    a = new_slots(state, 6)
    step(setup, [(ra, 6, a)], ForwardMode.EXTEND)
    assert ra in backend.rows
    # A forward that fails (here: q with the wrong head count) drops the
    # batch's copies so the next forward rebuilds them from SGLang's pool.
    a1 = new_slots(state, 1)
    rpool.req_to_token[ra, 6] = a1[0]
    fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=1,
                         req_pool_indices=torch.tensor([ra]), seq_lens=torch.tensor([7]),
                         seq_lens_cpu=None, out_cache_loc=torch.tensor(a1))
    backend.init_forward_metadata(fb)
    with pytest.raises(Exception):
        backend.forward_decode(torch.zeros(1, H * D + 1), None, None, layer, fb, save_kv_cache=False)
    assert ra not in backend.rows
    step(setup, [(ra, 7, a1)], ForwardMode.DECODE)  # rebuilt: still equals the reference

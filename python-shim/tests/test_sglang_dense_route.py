"""Dense attention through SGLang's own backend (issue 13): `dense` layers
and hip layers of batches below `prefill_dense_below` / `decode_dense_below`
are served by the backend SGLang would pick (torch_native on the CPU), the
engine's copy still receives every token, and the later sparse (here:
covering-budget hip) steps over that copy equal SDPA over SGLang's pool.
Needs sglang (CI: .ci/stages/sglang.sh) and SGLANG_USE_CPU_ENGINE=1."""

import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from sglang.srt.layers.radix_attention import AttentionType  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

import infinitehip  # noqa: E402
from infinitehip.sglang.backend import InfiniteHipAttnBackend  # noqa: E402
from sglang_fakes import FakeModelConfig  # noqa: E402

H, HK, D, CTX = 4, 2, 16, 256
SCALE = 0.2
N_LAYERS = 2  # layer 0 dense, layer 1 hip



def config(prefill_below, decode_below):
    return {"dense_layers": 1, "kv": {"page_size": 4},
            "prefill_dense_below": prefill_below, "decode_dense_below": decode_below,
            "default": {"method": "hip", "sink": 2, "window": 4,
                        "stages": [{"chunk_size": 4, "keep_tokens": 512, "refresh_interval": 2}],
                        "block_size_q": 4, "q_stride": 1, "prefill_chunk": 8}}


def make(tmp_path, monkeypatch, cfg, dense_env=None):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    monkeypatch.setenv("INFINITEHIP_CONFIG", str(p))
    if dense_env is None:
        monkeypatch.delenv("INFINITEHIP_DENSE_BACKEND", raising=False)
    else:
        monkeypatch.setenv("INFINITEHIP_DENSE_BACKEND", dense_env)
    rpool = ReqToTokenPool(size=3, max_context_len=CTX, device="cpu", enable_memory_saver=False)
    kv = MHATokenToKVPool(size=1024, page_size=1, dtype=torch.float32, head_num=HK, head_dim=D,
                          layer_num=N_LAYERS, device="cpu", enable_memory_saver=False, enable_alt_stream=False)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=rpool, token_to_kv_pool=kv,
                             model_config=FakeModelConfig(H, HK, D, CTX), server_args=SimpleNamespace(tp_size=1))
    backend = InfiniteHipAttnBackend(runner)
    layers = [SimpleNamespace(layer_id=i, tp_q_head_num=H, tp_k_head_num=HK, qk_head_dim=D,
                              v_head_dim=D, scaling=SCALE, logit_cap=0.0, sliding_window_size=-1,
                              is_cross_attention=False, attn_type=AttentionType.DECODER)
              for i in range(N_LAYERS)]
    return {"rpool": rpool, "kv": kv, "backend": backend, "layers": layers,
            "next": 1, "g": torch.Generator().manual_seed(0)}


def step(st, row, seq_len, n_new, mode):
    """One forward of one request through both layers (K/V written by the
    backend, as in a model); checks every layer against SDPA over the pool."""
    rpool, kv, backend = st["rpool"], st["kv"], st["backend"]
    slots = list(range(st["next"], st["next"] + n_new))
    st["next"] += n_new
    rpool.req_to_token[row, seq_len - n_new:seq_len] = torch.tensor(slots, dtype=torch.int32)
    loc = torch.tensor(slots, dtype=torch.int64)
    fb = SimpleNamespace(
        forward_mode=mode, batch_size=1, req_pool_indices=torch.tensor([row]),
        seq_lens=torch.tensor([seq_len]), seq_lens_cpu=torch.tensor([seq_len]),
        extend_seq_lens_cpu=[n_new], extend_seq_lens=torch.tensor([n_new]),
        extend_prefix_lens_cpu=[seq_len - n_new], extend_prefix_lens=torch.tensor([seq_len - n_new]),
        encoder_lens=None, encoder_out_cache_loc=None, out_cache_loc=loc, out_cache_loc_is_physical=False,
        positions=torch.arange(seq_len - n_new, seq_len))
    backend.init_forward_metadata(fb)
    g = st["g"]
    for layer in st["layers"]:
        q = torch.randn(n_new, H * D, generator=g)
        k = torch.randn(n_new, HK, D, generator=g)
        v = torch.randn(n_new, HK, D, generator=g)
        fwd = backend.forward_decode if mode.is_decode() else backend.forward_extend
        out = fwd(q, k, v, layer, fb, save_kv_cache=True).reshape(n_new, H * D)
        kb, vb = kv.get_key_buffer(layer.layer_id), kv.get_value_buffer(layer.layer_id)
        toks = rpool.req_to_token[row, :seq_len].long()
        kk = kb[toks].repeat_interleave(H // HK, dim=1).transpose(0, 1)
        vv = vb[toks].repeat_interleave(H // HK, dim=1).transpose(0, 1)
        qq = q.view(n_new, H, D).transpose(0, 1)
        s = qq @ kk.transpose(1, 2) * SCALE
        qpos = torch.arange(seq_len - n_new, seq_len).unsqueeze(1)
        s = s.masked_fill(torch.arange(seq_len).unsqueeze(0) > qpos, float("-inf"))
        want = (torch.softmax(s, -1) @ vv).transpose(0, 1).reshape(n_new, H * D)
        err = ((out - want).norm() / want.norm()).item()
        assert err <= 1e-5, (layer.layer_id, seq_len, err)


def calls(st):
    return st["backend"].stats()["dense_backend_calls"]


def test_dense_layers_and_short_hip_batches_go_through_sglangs_backend(tmp_path, monkeypatch):
    st = make(tmp_path, monkeypatch, config(prefill_below=64, decode_below=100))
    b = st["backend"]
    assert b.stats()["dense_backend"] == "torch_native"
    step(st, 1, 40, 40, ForwardMode.EXTEND)  # context 40 < 64: both layers dense
    assert calls(st) == 2
    step(st, 1, 41, 1, ForwardMode.DECODE)  # 41 < 100: both dense
    assert calls(st) == 4
    # The hip layer's engine copy got every token while SGLang's kernel served it.
    sid = b.rows[1].sid
    assert b.engine.seq_len(1, sid) == 41
    step(st, 1, 120, 79, ForwardMode.EXTEND)  # 120 >= 64: layer 1 through hip
    assert calls(st) == 5
    step(st, 1, 121, 1, ForwardMode.DECODE)  # 121 >= 100: layer 1 through hip
    assert calls(st) == 6
    assert b.engine.seq_len(1, sid) == 121


def test_thresholds_zero_keep_hip_layers_on_the_plugin(tmp_path, monkeypatch):
    st = make(tmp_path, monkeypatch, config(0, 0))
    step(st, 1, 30, 30, ForwardMode.EXTEND)
    step(st, 1, 31, 1, ForwardMode.DECODE)
    assert calls(st) == 2  # the dense layer only


def test_own_dense_kernels_on_request(tmp_path, monkeypatch):
    st = make(tmp_path, monkeypatch, config(64, 100), dense_env="infinitehip")
    assert st["backend"].dense is None and st["backend"].stats()["dense_backend"] == "infinitehip"
    step(st, 1, 40, 40, ForwardMode.EXTEND)
    step(st, 1, 41, 1, ForwardMode.DECODE)
    assert calls(st) == 0


def test_unknown_dense_backend_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(infinitehip.InfinitehipError, match="torch_native"):
        make(tmp_path, monkeypatch, config(64, 100), dense_env="no_such_backend")


def test_a_wrong_output_from_the_route_is_caught(tmp_path, monkeypatch):
    """The reference check can fail: corrupt what SGLang's backend returns."""
    st = make(tmp_path, monkeypatch, config(64, 100))
    orig = st["backend"].dense.forward_extend
    st["backend"].dense.forward_extend = lambda *a, **kw: orig(*a, **kw) * 1.01
    with pytest.raises(AssertionError):
        step(st, 1, 40, 40, ForwardMode.EXTEND)

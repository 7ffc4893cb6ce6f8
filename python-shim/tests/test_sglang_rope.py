"""hip's RoPE modes in the SGLang backend (issue 12: context beyond the
trained length), without an engine:

- `check_rope_modes` accepts SGLang's own plain `RotaryEmbedding` (halves
  layout, whole head, the config's base) and refuses, naming why, every
  rotary embedding the core cannot re-rotate with: YaRN, llama3 / linear /
  dynamic-NTK scaling, partial rotary, the interleaved GPT-J layout, another
  base; and a context longer than SGLang's rotary cache (naming the flag).
- `trained_context` (the config's `model.max_position`, which `relative`
  scoring moves long queries back inside) is the checkpoint's own
  max_position_embeddings even when `--json-model-override-args` raised it
  for SGLang (the value SGLang's context length then follows).

The end-to-end check (sglang.Engine vs the core engine driven by a torch
reference on the same tokens) is `sglang_rope_e2e.py`, run below when
SGLANG_USE_CPU_ENGINE=1."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from sglang.srt.layers.rotary_embedding import get_rope  # noqa: E402

from infinitehip import InfinitehipError  # noqa: E402
from infinitehip.sglang.backend import check_rope_modes, rope_modes_in, trained_context  # noqa: E402

D, CTX, THETA = 16, 512, 10000.0
MODES = {"scoring": "relative", "attention": "streaming"}


def cfg(theta=THETA, modes=MODES, method="hip"):
    return {"model": {"head_dim": D, "rope_theta": theta, "max_position": 128},
            "default": {"method": method, "rope": dict(modes)}}


def runner(rope, context_len=CTX, rope_scaling=None):
    model = torch.nn.Module()
    model.rotary = rope
    mc = SimpleNamespace(context_len=context_len, hf_config=SimpleNamespace(rope_scaling=rope_scaling))
    return SimpleNamespace(model=model, model_config=mc)


def plain(rot=D, neox=True, base=THETA, max_pos=CTX, scaling=None):
    return get_rope(D, rot, max_pos, base, neox, rope_scaling=scaling, dtype=torch.float32)


def _fake_gpu(monkeypatch, fail=None):
    """infinitehip.gpu replaced by a stand-in whose GpuAttention records the
    device (or raises `fail`)."""
    import infinitehip

    made = []

    def make(c, device):
        if fail is not None:
            raise fail
        made.append(device)
        return "gpu"

    gpu = SimpleNamespace(GpuAttention=make)
    monkeypatch.setitem(sys.modules, "infinitehip.gpu", gpu)
    monkeypatch.setattr(infinitehip, "gpu", gpu, raising=False)
    monkeypatch.setenv("INFINITEHIP_GPU", "1")
    return made


def _rope_be(b, device, offload=None):
    be = SimpleNamespace(device=device, rope_modes=rope_modes_in(cfg()), offload=offload)
    be._make_rope_gpu = lambda c, d: b.InfiniteHipAttnBackend._make_rope_gpu(be, c, d)
    be._rope_route = lambda c, d: b.InfiniteHipAttnBackend._rope_route(be, c, d)
    return be


def test_cuda_device_runs_rope_modes_on_the_gpu_by_default(monkeypatch, caplog):
    """Since its GPU check (2026-12-05) the GPU route is the default for hip's
    RoPE modes on CUDA (unset or any value but 0/1); INFINITEHIP_SGLANG_ROPE_GPU=0
    keeps the host engine, with a log line naming the switch."""
    import infinitehip.sglang.backend as b

    made = _fake_gpu(monkeypatch)
    make = b.InfiniteHipAttnBackend._make_gpu
    for env in (None, "auto"):
        if env is None:
            monkeypatch.delenv(b.ROPE_GPU_ENV, raising=False)
        else:
            monkeypatch.setenv(b.ROPE_GPU_ENV, env)
        assert make(_rope_be(b, "cuda:0"), cfg()) == "gpu"
    assert made == [0, 0]
    monkeypatch.setenv(b.ROPE_GPU_ENV, "0")
    with caplog.at_level("WARNING", logger="infinitehip.sglang"):
        assert make(_rope_be(b, "cuda:0"), cfg()) is None
    assert "INFINITEHIP_SGLANG_ROPE_GPU=0" in caplog.text and "host engine" in caplog.text
    assert made == [0, 0]
    # Without the modes the switch plays no part.
    assert make(SimpleNamespace(device="cuda:0", rope_modes=[]), cfg(modes={})) == "gpu"
    assert made == [0, 0, 0]


def test_rope_modes_fall_back_to_the_host_engine_unless_forced(monkeypatch, caplog):
    """Unset switch: host offload, or a config the GPU object refuses, runs
    the modes on the host engine with a log line saying why (=1 raises,
    the tests below)."""
    import infinitehip.sglang.backend as b

    made = _fake_gpu(monkeypatch)
    monkeypatch.delenv(b.ROPE_GPU_ENV, raising=False)
    with caplog.at_level("WARNING", logger="infinitehip.sglang"):
        assert b.InfiniteHipAttnBackend._make_gpu(_rope_be(b, "cuda:0", offload=(4096, 0)), cfg()) is None
    assert "host offload" in caplog.text and made == []
    _fake_gpu(monkeypatch, fail=InfinitehipError("layer 0: hip.successors: the GPU decoders refuse it", -1))
    caplog.clear()
    with caplog.at_level("WARNING", logger="infinitehip.sglang"):
        assert b.InfiniteHipAttnBackend._make_gpu(_rope_be(b, "cuda:0"), cfg()) is None
    assert "hip.successors" in caplog.text and "INFINITEHIP_SGLANG_ROPE_GPU=1" in caplog.text, caplog.text


def test_rope_gpu_switch_builds_the_gpu_object(monkeypatch, caplog):
    import infinitehip.sglang.backend as b

    made = _fake_gpu(monkeypatch)
    monkeypatch.setenv(b.ROPE_GPU_ENV, "1")
    be = _rope_be(b, "cuda:1")
    with caplog.at_level("WARNING", logger="infinitehip.sglang"):
        assert b.InfiniteHipAttnBackend._make_gpu(be, cfg()) == "gpu"
    assert made == [1]
    assert "on the GPU over SGLang's pool" in caplog.text and "CUDA graphs" in caplog.text
    # INFINITEHIP_GPU=0 still wins, and a CPU device never builds it.
    monkeypatch.setenv("INFINITEHIP_GPU", "0")
    assert b.InfiniteHipAttnBackend._make_gpu(be, cfg()) is None
    monkeypatch.setenv("INFINITEHIP_GPU", "1")
    assert b.InfiniteHipAttnBackend._make_gpu(_rope_be(b, "cpu"), cfg()) is None
    assert made == [1]


def test_rope_gpu_switch_refuses_host_offload(monkeypatch):
    """The core's host-tier decode has no RoPE modes: refused at start-up,
    naming the switch and the offload field, before any GPU object."""
    import infinitehip.sglang.backend as b

    made = _fake_gpu(monkeypatch)
    monkeypatch.setenv(b.ROPE_GPU_ENV, "1")
    be = _rope_be(b, "cuda:0", offload=(4096, 0))
    with pytest.raises(InfinitehipError) as e:
        b.InfiniteHipAttnBackend._make_gpu(be, cfg())
    msg = str(e.value)
    assert "INFINITEHIP_SGLANG_ROPE_GPU=1" in msg and "kv.device_cache_pages" in msg, msg
    assert "rope.attention streaming" in msg, msg
    assert made == []


def test_rope_gpu_switch_reports_what_the_gpu_object_refuses(monkeypatch):
    """With the switch on, a config GpuAttention refuses (say hip.successors,
    CPU-only) is an error naming the switch, not a silent host fall back."""
    import infinitehip.sglang.backend as b

    _fake_gpu(monkeypatch, fail=InfinitehipError("layer 0: hip.successors: the GPU decoders refuse it", -1))
    monkeypatch.setenv(b.ROPE_GPU_ENV, "1")
    be = _rope_be(b, "cuda:0")
    with pytest.raises(InfinitehipError) as e:
        b.InfiniteHipAttnBackend._make_gpu(be, cfg())
    msg = str(e.value)
    assert "hip.successors" in msg and "unset INFINITEHIP_SGLANG_ROPE_GPU" in msg, msg
    assert e.value.code == -1
    # Control: without the modes a refusal keeps the old behaviour (the
    # host engine, with a log line).
    assert b.InfiniteHipAttnBackend._make_gpu(SimpleNamespace(device="cuda:0", rope_modes=[]), cfg(modes={})) is None


def test_cuda_graphs_refused_with_rope_modes():
    """init_cuda_graph_state with the modes (GPU or host route) raises,
    telling the user to pass --disable-cuda-graph, before any graph state."""
    import infinitehip.sglang.backend as b

    prepared = []
    gpu = SimpleNamespace(prepare_graph=lambda *a: prepared.append(a), info=lambda: {})
    for g in (gpu, None):
        be = SimpleNamespace(offload=None, rope_modes=rope_modes_in(cfg()), gpu=g, dense=None, _decode_below=0,
                             _graph_bs=0, req_to_token_pool=SimpleNamespace(req_to_token=None))
        with pytest.raises(NotImplementedError) as e:
            b.InfiniteHipAttnBackend.init_cuda_graph_state(be, 8, 8)
        assert "--disable-cuda-graph" in str(e.value) and "RoPE modes" in str(e.value), str(e.value)
        assert be._graph_bs == 0
    assert prepared == []
    # Control: without the modes the GPU route prepares the graph decode.
    be = SimpleNamespace(offload=None, rope_modes=[], gpu=gpu, dense=None, _decode_below=0, _graph_bs=0,
                         req_to_token_pool=SimpleNamespace(req_to_token=None))
    b.InfiniteHipAttnBackend.init_cuda_graph_state(be, 8, 8)
    assert be._graph_bs == 8 and len(prepared) == 1


def test_modes_in_config():
    assert rope_modes_in(cfg()) == ["rope.attention streaming", "rope.scoring relative"]
    assert rope_modes_in(cfg(modes={"scoring": "original", "attention": "original"})) == []
    assert rope_modes_in(cfg(method="dense")) == []
    c = cfg(modes={})
    c["overrides"] = [{"layers": [1], "policy": {"method": "hip", "rope": {"scoring": "chunk_indexed"}}}]
    assert rope_modes_in(c) == ["rope.scoring chunk_indexed"]


def test_plain_rope_accepted():
    r = plain()
    assert check_rope_modes(runner(r), cfg()) is r


@pytest.mark.parametrize(
    "name,rope,theta,scaling,expect",
    [
        ("yarn", lambda: plain(scaling={"rope_type": "yarn", "factor": 4.0,
                                        "original_max_position_embeddings": 128}), THETA, "yarn", "YaRNScalingRotaryEmbedding"),
        ("llama3", lambda: plain(scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
         THETA, "llama3", "Llama3RotaryEmbedding"),
        ("linear", lambda: plain(max_pos=CTX // 2, scaling={"rope_type": "linear", "factor": 2.0}),
         THETA, "linear", "not plain RoPE"),
        ("dynamic", lambda: plain(max_pos=CTX // 2, scaling={"rope_type": "dynamic", "factor": 2.0}),
         THETA, "dynamic", "not plain RoPE"),
        ("partial", lambda: plain(rot=D // 2), THETA, None, "partial rotary"),
        ("gptj", lambda: plain(neox=False), THETA, None, "interleaved"),
        ("theta", lambda: plain(base=100000.0), THETA, None, "base 10000"),
    ],
)
def test_refused(name, rope, theta, scaling, expect):
    with pytest.raises(InfinitehipError) as e:
        check_rope_modes(runner(rope(), rope_scaling=scaling and {"rope_type": scaling}), cfg(theta))
    msg = str(e.value)
    assert expect in msg, msg
    assert "rope.scoring relative" in msg and "rope.attention streaming" in msg, msg


def test_context_past_the_rotary_cache_refused_with_the_flag():
    with pytest.raises(InfinitehipError) as e:
        check_rope_modes(runner(plain(), context_len=4 * CTX), cfg())
    assert "--json-model-override-args" in str(e.value) and f'"max_position_embeddings": {4 * CTX}' in str(e.value)


def test_trained_context_survives_the_override(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 128,
                   "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 512}, f)
    hf = SimpleNamespace(max_position_embeddings=640)
    over = SimpleNamespace(context_len=640, hf_config=hf, model_path=str(tmp_path),
                           model_override_args={"max_position_embeddings": 640})
    assert trained_context(over) == 128
    plain_mc = SimpleNamespace(context_len=640, hf_config=hf, model_path=str(tmp_path), model_override_args={})
    assert trained_context(plain_mc) == 640  # not overridden: the model's own field
    bare = SimpleNamespace(context_len=300, hf_config=SimpleNamespace())
    assert trained_context(bare) == 300


@pytest.mark.skipif(os.environ.get("SGLANG_USE_CPU_ENGINE") != "1", reason="needs SGLANG_USE_CPU_ENGINE=1")
def test_engine_rope_modes_equal_the_core_reference():
    """sglang_rope_e2e.py in its own process (SGLang spawns its scheduler)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sglang_rope_e2e.py")
    p = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=900)
    tail = "\n".join(l for l in (p.stdout + p.stderr).splitlines() if "Ignore import" not in l)[-4000:]
    assert p.returncode == 0, tail


def test_dense_thresholds_capped_at_the_trained_context():
    """A hip layer served by SGLang's dense kernel attends at raw positions:
    with the RoPE modes the thresholds stop at the trained context."""
    from infinitehip.sglang.backend import InfiniteHipAttnBackend

    ns = SimpleNamespace(_prefill_below=4096, _decode_below=16384)
    c = cfg()
    c["model"]["max_position"] = 8192
    InfiniteHipAttnBackend._rope_mode_limits(ns, c, ["hip"] * 4)
    assert (ns._prefill_below, ns._decode_below) == (4096, 8192)

"""Which configs keep SGLang's decode CUDA graphs on (the plugin's
resolution hook asks `graph_capable_config`): only dense and hip layers
can be captured (the GPU graph decode); squeeze, lazy, locret, hip with
RoPE modes, an unreadable config or INFINITEHIP_CUDA_GRAPH=0 turn them
off. The capture itself is tested on the GPU (tests/gpu/test_shim_gpu.py)."""

import json

from infinitehip.sglang import graph_capable_config


def write(tmp_path, cfg):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)
    return str(p)


def test_dense_and_hip_configs_keep_decode_graphs(tmp_path, monkeypatch):
    monkeypatch.delenv("INFINITEHIP_CUDA_GRAPH", raising=False)
    monkeypatch.delenv("INFINITEHIP_CONFIG", raising=False)
    assert graph_capable_config() == (True, "")  # the library default: hip
    for cfg in ({"dense_layers": 3, "default": {"method": "hip"}},
                {"default": {"method": "dense"}},
                {"dense_layers": 1, "overrides": [{"layers": [2], "policy": {"method": "dense"}}]}):
        assert graph_capable_config(write(tmp_path, cfg)) == (True, ""), cfg


def test_other_methods_and_opt_out_turn_graphs_off(tmp_path, monkeypatch):
    monkeypatch.delenv("INFINITEHIP_CUDA_GRAPH", raising=False)
    for method in ("squeeze", "lazy", "locret"):
        ok, why = graph_capable_config(write(tmp_path, {"default": {"method": method}}))
        assert not ok and method in why
        ok, why = graph_capable_config(
            write(tmp_path, {"overrides": [{"layers": [5], "policy": {"method": method}}]}))
        assert not ok and method in why
    ok, why = graph_capable_config(write(tmp_path, "{not json"))
    assert not ok and "unreadable" in why
    monkeypatch.setenv("INFINITEHIP_CUDA_GRAPH", "0")
    ok, why = graph_capable_config(write(tmp_path, {"default": {"method": "hip"}}))
    assert not ok and "INFINITEHIP_CUDA_GRAPH=0" in why


def test_rope_modes_turn_graphs_off(tmp_path, monkeypatch):
    """No route captures hip's RoPE modes (the host engine cannot; the GPU
    decode uploads per-step query shifts): decode graphs go off, naming the
    modes; the same hip config at original positions keeps them."""
    monkeypatch.delenv("INFINITEHIP_CUDA_GRAPH", raising=False)
    hip = {"method": "hip", "rope": {"scoring": "relative", "attention": "streaming"}}
    ok, why = graph_capable_config(write(tmp_path, {"dense_layers": 0, "default": hip}))
    assert not ok and "RoPE modes" in why and "rope.scoring relative" in why, why
    ok, why = graph_capable_config(write(tmp_path, {"default": {"method": "hip"},
                                                    "overrides": [{"layers": [3], "policy": hip}]}))
    assert not ok and "rope.attention streaming" in why, why
    orig = {"method": "hip", "rope": {"scoring": "original", "attention": "original"}}
    assert graph_capable_config(write(tmp_path, {"default": orig})) == (True, "")

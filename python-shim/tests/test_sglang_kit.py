"""SGLang's own attention unit-test kit (dense cases: MHA/GQA/MQA, extend and
decode, page sizes 1/16/32, shuffled page layouts, prefixes already in
SGLang's pool) against the infinitehip backend on the CPU in float32.

The prefixes are written into SGLang's pool by the kit, never through our
backend, so every case with a prefix also exercises the rebuild-from-pool
path. Needs sglang (CI: .ci/stages/sglang.sh) and SGLANG_USE_CPU_ENGINE=1."""

import json
import os
import unittest

import pytest

sglang = pytest.importorskip("sglang")
torch = pytest.importorskip("torch")

import infinitehip.sglang  # noqa: E402

infinitehip.sglang.register()

from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit  # noqa: E402

# A hip config whose budget covers the kit's contexts (<= 64 tokens): the
# hip path must then equal dense attention.
HIP_FULL = {
    "dense_layers": 0,
    "prefill_dense_below": 0,  # the plugin's hip path, not SGLang's kernel
    "decode_dense_below": 0,
    "kv": {"page_size": 16},
    "default": {
        "method": "hip", "sink": 4, "window": 8,
        "stages": [{"chunk_size": 8, "keep_tokens": 256, "refresh_interval": 2},
                   {"chunk_size": 4, "keep_tokens": 128, "refresh_interval": 1}],
        "block_size_q": 4, "q_stride": 1, "prefill_chunk": 16,
    },
}
DENSE = {"default": {"method": "dense"}}
# The same hip config with the default thresholds: the kit's short contexts
# then go through SGLang's own backend (torch_native on the CPU).
HIP_BELOW = {k: v for k, v in HIP_FULL.items() if not k.endswith("_dense_below")}
CONFIGS = {
    "dense_own": (DENSE, "infinitehip"),  # the plugin's own dense kernels
    "dense_wrapped": (DENSE, None),  # SGLang's backend through ours
    "hip_full_budget": (HIP_FULL, None),
    "hip_below_threshold": (HIP_BELOW, None),
}

CASES = kit.make_dense_cases("infinitehip")


@pytest.fixture(params=list(CONFIGS))
def policy_config(request, tmp_path, monkeypatch):
    cfg, dense_backend = CONFIGS[request.param]
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(cfg))
    monkeypatch.setenv("INFINITEHIP_CONFIG", str(p))
    if dense_backend:
        monkeypatch.setenv("INFINITEHIP_DENSE_BACKEND", dense_backend)
    else:
        monkeypatch.delenv("INFINITEHIP_DENSE_BACKEND", raising=False)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kit_dense_case(case, policy_config):
    assert len(CASES) >= 12
    tc = unittest.TestCase()
    with torch.no_grad():
        kit.run_dense_attention_case(tc, case, device="cpu", dtype=torch.float32)


def test_kit_tolerance_is_tight_enough_to_fail(tmp_path, monkeypatch):
    """The kit's check can fail: corrupting our output must be caught."""
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(DENSE))
    monkeypatch.setenv("INFINITEHIP_CONFIG", str(p))
    monkeypatch.setenv("INFINITEHIP_DENSE_BACKEND", "infinitehip")
    from infinitehip.sglang.backend import InfiniteHipAttnBackend

    orig = InfiniteHipAttnBackend.forward_extend

    def broken(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        return orig(self, q, k, v, layer, fb, save_kv_cache, **kw) * 1.5

    monkeypatch.setattr(InfiniteHipAttnBackend, "forward_extend", broken)
    with torch.no_grad(), pytest.raises(AssertionError):
        kit.run_dense_attention_case(unittest.TestCase(), CASES[0], device="cpu", dtype=torch.float32)

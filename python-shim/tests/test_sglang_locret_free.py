"""Locret's evicted slots handed back to SGLang (locret_free.py) over SGLang's
real pools and allocator (ReqToTokenPool, MHATokenToKVPool,
TokenToKVPoolAllocator): after a Locret prefill of N tokens with budget B
the allocator's free count rises by N - B, SGLang's view of the request
shrinks to B, decode positions stay the true ones, and every decode output
equals the retained-set path (the same backend with the slots kept) on the
same inputs. A corrupted compacted slot must break that equality, and
releasing the compacted row returns every slot."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sglang")

from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from infinitehip.sglang import locret_free  # noqa: E402
from infinitehip.sglang.backend import InfiniteHipAttnBackend  # noqa: E402
from sglang_fakes import FakeModelConfig  # noqa: E402

L, H, HK, D, CTX, HID = 2, 4, 2, 16, 512, 32
N, BUDGET, DECODE = 160, 48, 6
SCALE = 0.2  # not 1/sqrt(D): the backend must rescale



class Rope(torch.nn.Module):
    """Neox-style RoPE with SGLang's `cos_sin_cache` layout (what the
    backend finds and inverts)."""

    is_neox_style = True

    def __init__(self):
        super().__init__()
        inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        t = torch.arange(CTX * 2, dtype=torch.float32)[:, None] * inv[None]
        self.register_buffer("cos_sin_cache", torch.cat([t.cos(), t.sin()], -1))

    def rotate(self, x, pos):  # x [n, heads, D]
        cs = self.cos_sin_cache[pos]
        cos, sin = cs[:, None, : D // 2], cs[:, None, D // 2 :]
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def write_heads(path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    t = {}
    for l in range(L):
        t[f"model.layers.{l}.self_attn.fc1.weight"] = (rng.standard_normal((HID, (H + 2 * HK) * D)) / 8).astype("f4")
        t[f"model.layers.{l}.self_attn.fc2.weight"] = (rng.standard_normal((HK, HID)) / 6).astype("f4")
    save_file(t, str(path))


def make(tmp_path, monkeypatch):
    heads = tmp_path / "heads.safetensors"
    if not heads.exists():
        write_heads(heads)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"dense_layers": 0, "kv": {"page_size": 4}, "default": {
        "method": "locret", "budget": BUDGET, "chunk": 256, "stabilizer": 16, "keep_last": 8, "sink": 0,
        "hidden": HID, "weights": str(heads)}}))
    monkeypatch.setenv("INFINITEHIP_CONFIG", str(cfg))
    rpool = ReqToTokenPool(size=3, max_context_len=CTX, device="cpu", enable_memory_saver=False)
    kv = MHATokenToKVPool(size=1024, page_size=1, dtype=torch.float32, head_num=HK, head_dim=D,
                          layer_num=L, device="cpu", enable_memory_saver=False, enable_alt_stream=False)
    alloc = TokenToKVPoolAllocator(1024, torch.float32, "cpu", kv, need_sort=False)
    rope = Rope()
    runner = SimpleNamespace(device="cpu", req_to_token_pool=rpool, token_to_kv_pool=kv,
                             model_config=FakeModelConfig(H, HK, D, CTX), server_args=SimpleNamespace(tp_size=1),
                             model=torch.nn.ModuleList([rope]))
    backend = InfiniteHipAttnBackend(runner)
    layers = [SimpleNamespace(layer_id=l, tp_q_head_num=H, tp_k_head_num=HK, qk_head_dim=D, v_head_dim=D,
                              scaling=SCALE, logit_cap=0.0, sliding_window_size=-1, is_cross_attention=False,
                              attn_type=None) for l in range(L)]
    (row,) = rpool.alloc_rows(1)
    return SimpleNamespace(rpool=rpool, kv=kv, alloc=alloc, rope=rope, backend=backend, layers=layers, row=row)


def forward(s, mode, seq_len, n_new, sgl_pos, inputs):
    """One forward of the row as SGLang runs it: slots from the allocator
    into req_to_token, init_forward_metadata (which may move positions),
    then per layer RoPE at forward_batch.positions and attention (the
    backend writes K/V). `inputs`: per layer pre-RoPE (q, k, v)."""
    loc = s.alloc.alloc(n_new)
    s.rpool.req_to_token[s.row, seq_len - n_new:seq_len] = loc.to(torch.int32)
    fb = SimpleNamespace(
        forward_mode=mode, batch_size=1, req_pool_indices=torch.tensor([s.row]),
        seq_lens=torch.tensor([seq_len]), seq_lens_cpu=None,
        extend_seq_lens_cpu=[n_new], extend_seq_lens=torch.tensor([n_new]),
        extend_prefix_lens_cpu=[seq_len - n_new], out_cache_loc=loc, out_cache_loc_is_physical=False,
        positions=torch.tensor(sgl_pos, dtype=torch.int64))
    s.backend.init_forward_metadata(fb)
    outs = []
    for layer, (q, k, v) in zip(s.layers, inputs):
        qr = s.rope.rotate(q, fb.positions).reshape(n_new, H * D)
        kr = s.rope.rotate(k, fb.positions)
        fwd = s.backend.forward_decode if mode.is_decode() else s.backend.forward_extend
        outs.append(fwd(qr, kr, v, layer, fb, save_kv_cache=True))
    return torch.stack(outs), fb.positions


def batch_of(s, seq_len):
    req = SimpleNamespace(rid="r0", kv=SimpleNamespace(req_pool_idx=s.row, kv_committed_len=seq_len,
                                                       kv_allocated_len=seq_len))
    lens = torch.tensor([seq_len], dtype=torch.int64)
    return SimpleNamespace(
        reqs=[req], req_to_token_pool=s.rpool, token_to_kv_pool_allocator=s.alloc,
        tree_cache=SimpleNamespace(disable=True), spec_algorithm=None, enable_overlap=False,
        seq_lens=lens.clone(), seq_lens_cpu=lens.clone(), orig_seq_lens=lens.to(torch.int32), seq_lens_sum=N)


def qkv(g, n):
    return [(torch.randn(n, H, D, generator=g), torch.randn(n, HK, D, generator=g) * 2,
             torch.randn(n, HK, D, generator=g)) for _ in range(L)]


def test_compaction_frees_slots_and_decodes_like_the_retained_set(tmp_path, monkeypatch):
    monkeypatch.delenv(locret_free.FREE_ENV, raising=False)
    stats = tmp_path / "stats.jsonl"
    monkeypatch.setenv(locret_free.STATS_ENV, str(stats))
    free_ = make(tmp_path, monkeypatch)  # slots handed back
    kept = make(tmp_path, monkeypatch)  # the retained-set path (slots kept)
    g = torch.Generator().manual_seed(0)
    prompt = qkv(g, N)
    steps = [qkv(g, 1) for _ in range(DECODE + 1)]
    pos = list(range(N))
    o1, _ = forward(free_, ForwardMode.EXTEND, N, N, pos, prompt)
    o2, _ = forward(kept, ForwardMode.EXTEND, N, N, pos, prompt)
    assert torch.equal(o1, o2)

    # The scheduler's prepare_for_decode hook: compact the free_ row.
    total = free_.alloc.available_size()
    batch = batch_of(free_, N)
    locret_free.before_prepare_for_decode(batch)
    assert free_.alloc.available_size() == total + N - BUDGET
    assert batch.seq_lens_cpu.tolist() == [BUDGET] and batch.seq_lens.tolist() == [BUDGET]
    assert batch.orig_seq_lens.tolist() == [BUDGET] and batch.seq_lens_sum is None
    assert batch.reqs[0].kv.kv_committed_len == BUDGET == batch.reqs[0].kv.kv_allocated_len
    rec = json.loads(stats.read_text().splitlines()[0])
    assert rec["tokens"] == N and rec["kept"] == BUDGET and rec["freed"] == N - BUDGET
    assert rec["available_after"] - rec["available_before"] == N - BUDGET
    # Compaction is not trivial: slot i no longer holds token i's key everywhere.
    assert free_.backend.rows[free_.row].compact

    worst = 0.0
    for t in range(DECODE):
        sgl = BUDGET + t + 1  # SGLang's (shrunk) length
        o1, p1 = forward(free_, ForwardMode.DECODE, sgl, 1, [sgl - 1], steps[t])
        o2, p2 = forward(kept, ForwardMode.DECODE, N + t + 1, 1, [N + t], steps[t])
        assert p1.tolist() == [N + t] == p2.tolist()  # RoPE at the true position
        assert torch.isfinite(o1).all()
        err = ((o1 - o2).norm() / o2.norm()).item()
        worst = max(worst, err)
        assert err <= 1e-5, (t, err)
    # The retained-set path really evicted (else the equality says little).
    sid = kept.backend.rows[kept.row].sid
    assert kept.backend.engine.seq_len(0, sid) == BUDGET + DECODE
    assert free_.backend.rows[free_.row].length == BUDGET + DECODE

    # Negative control: one compacted key of layer 0 corrupted -> differs.
    slot = int(free_.rpool.req_to_token[free_.row, 5])
    free_.kv.get_key_buffer(0)[slot] += 3.0
    o1, _ = forward(free_, ForwardMode.DECODE, BUDGET + DECODE + 1, 1, [BUDGET + DECODE], steps[DECODE])
    o2, _ = forward(kept, ForwardMode.DECODE, N + DECODE + 1, 1, [N + DECODE], steps[DECODE])
    assert ((o1 - o2).norm() / o2.norm()).item() > 1e-3

    # Releasing the row (SGLang frees req_to_token[row, :kv_committed_len])
    # gives every slot back: nothing leaked, nothing freed twice.
    n_held = BUDGET + DECODE + 1
    free_.alloc.free(free_.rpool.req_to_token[free_.row, :n_held].long())
    assert free_.alloc.available_size() == 1024
    assert len(set(free_.alloc.free_pages.tolist())) == 1024


def test_off_switch_and_non_locret_layers_keep_the_slots(tmp_path, monkeypatch):
    s = make(tmp_path, monkeypatch)
    g = torch.Generator().manual_seed(1)
    forward(s, ForwardMode.EXTEND, N, N, list(range(N)), qkv(g, N))
    monkeypatch.setenv(locret_free.FREE_ENV, "0")
    total = s.alloc.available_size()
    batch = batch_of(s, N)
    locret_free.before_prepare_for_decode(batch)
    assert s.alloc.available_size() == total and batch.seq_lens_cpu.tolist() == [N]
    assert not s.backend.rows[s.row].compact
    # The retained-set path decodes on: the first decode append evicts.
    forward(s, ForwardMode.DECODE, N + 1, 1, [N], qkv(g, 1))
    assert s.backend.engine.seq_len(0, s.backend.rows[s.row].sid) == BUDGET + 1

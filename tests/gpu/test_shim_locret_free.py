#!/usr/bin/env python3
"""GPU test (issue 17): Locret's evicted slots handed back to SGLang's
allocator on the CUDA path of the SGLang backend, with a tiny random
Llama-like model (2 layers, GQA 8/2, head_dim 64, f32 activations over a
bf16 KV pool) driving `InfiniteHipAttnBackend` as SGLang would (sglang's
modules stubbed: the device has no SGLang).

Two worlds with the same weights and prompts: "free" runs the scheduler
hook (`locret_free.before_prepare_for_decode`) after the prompts, "kept"
does not (the retained-set path). Three requests in one batch, prompts of
1200, 900 and 200 tokens, budget 256 per KV head (the 200-token prompt is
below it: not compacted, so decode batches mix compacted and retained-set
rows). Checks:
- the allocator's free count rises by exactly sum(N - B) over the
  compacted requests, and SGLang's view of them shrinks to B;
- positions stay the true ones (N + t) after the backend's offset;
- 24 greedy decode steps: tokens equal to the retained-set path and the
  logits within 1e-4 relative (same bf16 K/V bits, f32 accumulation; only
  the kernels' summation order differs);
- a corrupted compacted key moves the logits (the check can fail);
- releasing the rows returns every slot (nothing leaked or freed twice).

Prints PASS/FAIL lines and exits non-zero on a failure.
"""
import ctypes
import json
import math
import os
import sys
import tempfile
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.environ.get("SHIM_DIR", os.path.join(HERE, "..", "..", "python-shim")))
import infinitehip.gpu as ig  # noqa: E402

DEV = torch.device("cuda:0")
HQ, HKV, D, HID, VOCAB, L = 8, 2, 64, 512, 512, 2
PROMPTS = [1200, 900, 200]
ROWS = [2, 0, 5]
BUDGET, CHUNK, STEPS = 256, 512, 24
SLOTS = 4096
RESULTS = []


def check(name, ok, detail):
    RESULTS.append(bool(ok))
    print(f"{'PASS' if ok else 'FAIL'} {name:<78} {detail}", flush=True)


def stub_sglang():
    class AttentionBackend:
        def __init__(self):
            pass

    for n in ["sglang", "sglang.srt", "sglang.srt.layers", "sglang.srt.layers.attention",
              "sglang.srt.layers.attention.base_attn_backend"]:
        sys.modules.setdefault(n, types.ModuleType(n))
    sys.modules["sglang.srt.layers.attention.base_attn_backend"].AttentionBackend = AttentionBackend
    os.environ["INFINITEHIP_DENSE_BACKEND"] = "infinitehip"


class Mode:
    def __init__(self, decode):
        self.decode = decode
        self.name = "DECODE" if decode else "EXTEND"

    def is_decode(self):
        return self.decode

    def is_idle(self):
        return False


class Rope(torch.nn.Module):
    """SGLang RotaryEmbedding-like (neox): cos_sin_cache [max_pos, D]."""

    def __init__(self, theta=10000.0, max_pos=8192):
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=DEV) / D))
        f = torch.arange(max_pos, dtype=torch.float32, device=DEV)[:, None] * inv[None, :]
        self.register_buffer("cos_sin_cache", torch.cat([f.cos(), f.sin()], -1))
        self.is_neox_style = True

    def rotate(self, x, pos):
        cs = self.cos_sin_cache[pos.long()]
        cos, sin = cs[:, None, : D // 2], cs[:, None, D // 2:]
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def write_heads(path, gen, hidden=32):
    tensors, header, off = [], {}, 0
    for l in range(L):
        for name, shp in ((f"model.layers.{l}.self_attn.fc1.weight", [hidden, (HQ + 2 * HKV) * D]),
                          (f"model.layers.{l}.self_attn.fc2.weight", [HKV, hidden])):
            t = (torch.randn(*shp, generator=gen, device=DEV) / math.sqrt(shp[1])).float().cpu().contiguous()
            b = ctypes.string_at(t.data_ptr(), t.numel() * 4)
            header[name] = {"dtype": "F32", "shape": shp, "data_offsets": [off, off + len(b)]}
            tensors.append(b)
            off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for b in tensors:
            f.write(b)


class Tiny:
    """A random Llama-like decoder in f32 whose attention is the backend's."""

    def __init__(self, gen):
        r = lambda *s: torch.randn(*s, generator=gen, device=DEV)  # noqa: E731
        self.emb = r(VOCAB, HID)
        self.w = [dict(q=r(HID, HQ * D) * 2 / math.sqrt(HID), k=r(HID, HKV * D) * 2 / math.sqrt(HID),
                       v=r(HID, HKV * D) / math.sqrt(HID), o=r(HQ * D, HID) / math.sqrt(HQ * D),
                       up=r(HID, 2 * HID) / math.sqrt(HID), down=r(2 * HID, HID) / math.sqrt(2 * HID))
                  for _ in range(L)]
        self.lm = r(HID, VOCAB) / math.sqrt(HID)
        self.rope = Rope()

    @staticmethod
    def norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def forward(self, be, layers, ids, fb, decode):
        x = self.emb[ids]
        n = x.shape[0]
        for w, layer in zip(self.w, layers):
            h = self.norm(x)
            q = self.rope.rotate((h @ w["q"]).view(n, HQ, D), fb.positions)
            k = self.rope.rotate((h @ w["k"]).view(n, HKV, D), fb.positions)
            v = (h @ w["v"]).view(n, HKV, D)
            f = be.forward_decode if decode else be.forward_extend
            o = f(q.reshape(n, HQ * D).contiguous(), k.contiguous(), v.contiguous(), layer, fb)
            x = x + o.float() @ w["o"]
            x = x + torch.nn.functional.silu(self.norm(x) @ w["up"]) @ w["down"]
        return self.norm(x) @ self.lm


class Alloc:
    """SGLang's token allocator, reduced: a free list of slots."""
    page_size = 1

    def __init__(self, gen):
        self.free_list = (torch.randperm(SLOTS, generator=gen, device=DEV) + 1).tolist()

    def available_size(self):
        return len(self.free_list)

    def alloc(self, n):
        out, self.free_list = self.free_list[:n], self.free_list[n:]
        return out

    def free(self, idx):
        self.free_list.extend(int(x) for x in idx.tolist())


class World:
    """One SGLang-like process state: pools, allocator, backend."""

    def __init__(self, model, seed):
        from infinitehip.sglang import backend as bk

        self.k = [torch.zeros(SLOTS + 1, HKV, D, dtype=torch.bfloat16, device=DEV) for _ in range(L)]
        self.v = [torch.zeros(SLOTS + 1, HKV, D, dtype=torch.bfloat16, device=DEV) for _ in range(L)]
        self.r2t = torch.zeros(8, 4096, dtype=torch.int32, device=DEV)
        w = self

        class Pool:
            layer_num = L
            dtype = torch.bfloat16
            start_layer = 0

            def get_key_buffer(self, i):
                return w.k[i]

            def get_value_buffer(self, i):
                return w.v[i]

            def set_kv_buffer(self, layer, loc, k, v):
                w.k[layer.layer_id][loc.long()] = k.to(torch.bfloat16)
                w.v[layer.layer_id][loc.long()] = v.to(torch.bfloat16)

        class ReqPool:
            req_to_token = self.r2t
            free_slots = [r for r in range(8) if r not in ROWS]

        self.rpool = ReqPool()
        self.alloc = Alloc(torch.Generator(device=DEV).manual_seed(seed))
        mdl = torch.nn.Module()
        mdl.rope = model.rope
        mc = types.SimpleNamespace(head_dim=D, context_len=8192, hf_config=types.SimpleNamespace(rope_theta=10000.0),
                                   get_num_attention_heads=lambda tp: HQ, get_num_kv_heads=lambda tp: HKV)
        runner = types.SimpleNamespace(device="cuda:0", req_to_token_pool=self.rpool, token_to_kv_pool=Pool(),
                                       model_config=mc, server_args=types.SimpleNamespace(tp_size=1), model=mdl)
        self.be = bk.InfiniteHipAttnBackend(runner)
        self.layers = [types.SimpleNamespace(layer_id=i, tp_q_head_num=HQ, tp_k_head_num=HKV, qk_head_dim=D,
                                             v_head_dim=D, scaling=1.0 / math.sqrt(D), logit_cap=0,
                                             sliding_window_size=-1, is_cross_attention=False, attn_type=None)
                       for i in range(L)]
        self.model = model
        self.lens = [0] * len(ROWS)

    def forward(self, which, ids, decode):
        """One batch: requests `which` with new token ids `ids[i]` (lists).
        Returns the last row's logits per request and the positions used."""
        rows, locs, pos, n_new = [], [], [], []
        for i, t in zip(which, ids):
            n = len(t)
            s = self.alloc.alloc(n)
            row = ROWS[i]
            self.r2t[row, self.lens[i]:self.lens[i] + n] = torch.tensor(s, dtype=torch.int32, device=DEV)
            pos.extend(range(self.lens[i], self.lens[i] + n))  # SGLang's view
            self.lens[i] += n
            rows.append(row)
            locs.extend(s)
            n_new.append(n)
        lens = [self.lens[i] for i in which]
        fb = types.SimpleNamespace(
            forward_mode=Mode(decode), batch_size=len(rows), req_pool_indices=torch.tensor(rows, device=DEV),
            seq_lens=torch.tensor(lens, device=DEV), seq_lens_cpu=torch.tensor(lens), extend_seq_lens_cpu=n_new,
            extend_seq_lens=torch.tensor(n_new), out_cache_loc=torch.tensor(locs, device=DEV),
            positions=torch.tensor(pos, device=DEV))
        self.be.init_forward_metadata(fb)
        flat = torch.tensor([x for t in ids for x in t], device=DEV)
        logits = self.model.forward(self.be, self.layers, flat, fb, decode)
        last = torch.tensor(n_new, device=DEV).cumsum(0) - 1
        return logits[last], fb.positions

    def prefill(self, prompts):
        """Chunked prefill as SGLang batches it (CHUNK tokens per request
        per step); returns each request's last logits."""
        done = [0] * len(prompts)
        last = [None] * len(prompts)
        while any(d < len(p) for d, p in zip(done, prompts)):
            which = [i for i, p in enumerate(prompts) if done[i] < len(p)]
            ids = [prompts[i][done[i]:done[i] + CHUNK] for i in which]
            lg, _ = self.forward(which, ids, False)
            for j, i in enumerate(which):
                done[i] += len(ids[j])
                last[i] = lg[j]
        return torch.stack(last)

    def hook(self):
        """The scheduler's prepare_for_decode, BEFORE hook (locret_free)."""
        from infinitehip.sglang import locret_free

        reqs = [types.SimpleNamespace(rid=f"r{i}", kv=types.SimpleNamespace(
            req_pool_idx=ROWS[i], kv_committed_len=self.lens[i], kv_allocated_len=self.lens[i]))
            for i in range(len(ROWS))]
        lens = torch.tensor(self.lens, dtype=torch.int64)
        batch = types.SimpleNamespace(
            reqs=reqs, req_to_token_pool=self.rpool, token_to_kv_pool_allocator=self.alloc,
            tree_cache=types.SimpleNamespace(disable=True), spec_algorithm=None, enable_overlap=False,
            seq_lens=lens.to(DEV), seq_lens_cpu=lens.clone(), orig_seq_lens=lens.to(torch.int32),
            seq_lens_sum=int(lens.sum()))
        locret_free.before_prepare_for_decode(batch)
        self.lens = batch.seq_lens_cpu.tolist()
        return batch


def main():
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, gpu_built {ig.gpu_built()}", flush=True)
    stub_sglang()
    gen = torch.Generator(device=DEV).manual_seed(17)
    heads = os.path.join(tempfile.mkdtemp(), "heads.safetensors")
    write_heads(heads, gen)
    cfg = {"model": {"n_layers": L, "n_q_heads": HQ, "n_kv_heads": HKV, "head_dim": D},
           "dense_layers": 0, "default": {"method": "locret", "budget": BUDGET, "chunk": CHUNK, "stabilizer": 64,
                                          "keep_last": 16, "sink": 4, "hidden": 32, "weights": heads}}
    path = os.path.join(tempfile.mkdtemp(), "cfg.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    os.environ["INFINITEHIP_CONFIG"] = path
    os.environ.pop("INFINITEHIP_LOCRET_FREE", None)
    model = Tiny(gen)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen, device=DEV).tolist() for n in PROMPTS]
    free_, kept = World(model, 1), World(model, 1)
    if free_.be.gpu is None:
        check("locret free on the GPU path: backend on CUDA", False, "no GPU object")
        return finish()
    lf = free_.prefill(prompts)
    lk = kept.prefill(prompts)
    e0 = float((lf - lk).norm() / lk.norm())
    check("prefill: both worlds give the same logits", e0 <= 1e-6, f"rel err {e0:.2e}")

    before = free_.alloc.available_size()
    batch = free_.hook()
    after = free_.alloc.available_size()
    want = sum(n - BUDGET for n in PROMPTS if n > BUDGET)
    shrunk = [BUDGET if n > BUDGET else n for n in PROMPTS]
    check("allocator free count rises by sum(N - B) over compacted requests", after - before == want,
          f"{after - before} slots returned (want {want}: N {PROMPTS}, B {BUDGET}); SGLang lens "
          f"{batch.seq_lens_cpu.tolist()} (want {shrunk}), committed {[r.kv.kv_committed_len for r in batch.reqs]}")
    check("SGLang's view shrinks to B", batch.seq_lens_cpu.tolist() == shrunk and batch.seq_lens.tolist() == shrunk
          and [r.kv.kv_committed_len for r in batch.reqs] == shrunk, f"{batch.seq_lens_cpu.tolist()}")
    comp = dict(free_.be._gpu_compact)
    check("compacted rows recorded with their offsets (short prompt not compacted)",
          comp == {ROWS[i]: n - BUDGET for i, n in enumerate(PROMPTS) if n > BUDGET}, f"{comp}")

    tf = lf.argmax(-1).tolist()
    tk = lk.argmax(-1).tolist()
    toks_f, toks_k = [tf], [tk]
    worst, pos_ok = 0.0, True
    every = list(range(len(ROWS)))
    for t in range(STEPS):
        a, pa = free_.forward(every, [[x] for x in tf], True)
        b, pb = kept.forward(every, [[x] for x in tk], True)
        want_pos = [n + t for n in PROMPTS]
        pos_ok &= pa.tolist() == want_pos == pb.tolist()
        worst = max(worst, float((a - b).norm() / b.norm()))
        if not torch.isfinite(a).all():
            worst = float("nan")
        tf, tk = a.argmax(-1).tolist(), b.argmax(-1).tolist()
        toks_f.append(tf)
        toks_k.append(tk)
    check("decode positions are the true ones (N + t) on both paths", pos_ok, "")
    check(f"{STEPS} greedy steps: tokens equal to the retained-set path", toks_f == toks_k,
          f"first tokens {[r[0] for r in toks_f[:6]]} vs {[r[0] for r in toks_k[:6]]}")
    check("decode logits vs the retained-set path", worst <= 1e-4,
          f"worst rel err {worst:.2e} (bound 1e-4: same bf16 K/V bits, f32 accumulation, kernel order)")
    st = kept.be.stats()
    ev = sum(x["evictions"] for x in st.get("locret", []))
    check("the retained-set path evicted (the equality is not trivial)", ev > 0, f"evicting prefill calls {ev}")

    # Negative control: one compacted key of layer 0 of request 0 corrupted.
    slot = int(free_.r2t[ROWS[0], 5])
    free_.k[0][slot] += 4.0
    a, _ = free_.forward(every, [[x] for x in tf], True)
    b, _ = kept.forward(every, [[x] for x in tk], True)
    e = float((a[0] - b[0]).norm() / b[0].norm())
    check("negative control: a corrupted compacted key moves the logits", e > 1e-3, f"rel err {e:.2e} (> 1e-3)")

    # Releasing the rows returns every slot.
    for i, row in enumerate(ROWS):
        free_.alloc.free(free_.r2t[row, :free_.lens[i]].long())
    fl = free_.alloc.free_list
    check("releasing the rows returns every slot, none twice", len(fl) == SLOTS and len(set(fl)) == SLOTS,
          f"{len(fl)} free, {len(set(fl))} distinct (of {SLOTS})")
    return finish()


def finish():
    n_fail = RESULTS.count(False)
    print(f"test_shim_locret_free: {len(RESULTS)} checks, {n_fail} failed", flush=True)
    sys.exit(1 if n_fail else 0)


if __name__ == "__main__":
    main()

"""hip's RoPE modes through `sglang.Engine` on the CPU, beyond the trained
length, vs the core engine driven by an independent torch forward on the
same tokens (issue 12).

Model: a random-weight 2-layer GQA Llama saved with transformers, trained
context TRAINED = 128 (its max_position_embeddings). SGLang runs it at
LEN = 5x that, as a user would (README "SGLang beyond the trained length"):
`json_model_override_args={"max_position_embeddings": CTX}` (SGLang's
rotary cache and context length), `attention_backend="infinitehip"` with a
hip config using `streaming` attention and `chunk_indexed` (layer 0) /
`relative` (layer 1) scoring (sink + window + budget = 72 < TRAINED). The prompt is prefilled in chunks of CHUNK tokens
(chunked prefill), then NEW tokens are decoded greedily.

Reference: the same checkpoint through transformers' own modules (embedding,
norms, projections, HF's rotary embedding, which is not SGLang's) with
attention by `infinitehip.Engine` (the core, host f32), config = the same
policy with the model shape written out and `model.max_position` = TRAINED,
fed the same prompt in the same chunks, then SGLang's output tokens one
decode step at a time. Checked:

1. every prompt token's logprob (SGLang's input logprobs, from the chunked
   prefill) and every output token's logprob (decode path) within BOUND
   nats of the reference, and SGLang's greedy tokens == the reference's
   argmax at every step;
2. negative controls, each must miss BOUND on some token: the reference
   with `model.max_position` = SGLang's context length (what the backend
   handed the core before it read the checkpoint's trained length: it moves
   layer 1's `relative` scoring), the reference with `original` RoPE
   attention, and the reference with `relative` scoring on layer 0 too.
   A control that came out equal would mean the check cannot see what it
   checks.

Run: SGLANG_USE_CPU_ENGINE=1 python sglang_rope_e2e.py [--json out.json]
(spawned scheduler processes re-import this file: keep the __main__ guard).
"""

import argparse
import json
import os
import sys
import tempfile
import time

N_LAYERS, N_HEADS, N_KV, HEAD_DIM, VOCAB = 2, 4, 2, 16, 512
TRAINED = 128  # the checkpoint's max_position_embeddings
PROMPT, NEW = 576, 64
LEN = PROMPT + NEW  # 5x TRAINED
CTX = LEN + 64  # SGLang's rotary cache / context length (it stops ~2 tokens short of it)
CHUNK = 192  # chunked prefill
BOUND = 2e-4  # nats per token (the quality suite's exactness bound)

HIP = {
    "method": "hip", "sink": 8, "window": 32,
    "stages": [{"chunk_size": 4, "keep_tokens": 128, "refresh_interval": 4},
               {"chunk_size": 1, "keep_tokens": 32, "refresh_interval": 1}],
    "successors": 4, "block_size_q": 16, "q_stride": 2, "prefill_chunk": 256,
    "rope": {"scoring": "relative", "attention": "streaming"},
}
# Layer 1 scores with `relative` positions, layer 0 with `chunk_indexed`; both stream.
POLICY = {
    "dense_layers": 0,
    "prefill_dense_below": 0,
    "decode_dense_below": 0,
    "kv": {"page_size": 16},
    "default": HIP,
    "overrides": [{"layers": [0], "policy": dict(HIP, rope={"scoring": "chunk_indexed", "attention": "streaming"})}],
}


def make_model(path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
        num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV, head_dim=HEAD_DIM,
        max_position_embeddings=TRAINED, rope_theta=10000.0, torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper attention and logits than the init default
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(path)


def tokens():
    import random

    rng = random.Random(5)
    # A repeated span makes copying (induction) attention reach far back.
    base = [rng.randrange(2, VOCAB) for _ in range(200)]
    ids = [1] + base + [rng.randrange(2, VOCAB) for _ in range(PROMPT - 401)] + base
    assert len(ids) == PROMPT
    return ids


def run_sglang(model_path, cfg_path, prompt):
    import sglang as sgl

    os.environ["INFINITEHIP_CONFIG"] = cfg_path
    eng = sgl.Engine(
        model_path=model_path, device="cpu", dtype="float32", skip_tokenizer_init=True,
        disable_cuda_graph=True, disable_radix_cache=True, max_total_tokens=CTX + 64, max_running_requests=1,
        chunked_prefill_size=CHUNK, mem_fraction_static=0.5, log_level="warning",
        attention_backend="infinitehip", json_model_override_args=json.dumps({"max_position_embeddings": CTX}),
    )
    try:
        o = eng.generate(input_ids=prompt, sampling_params={"max_new_tokens": NEW, "temperature": 0},
                         return_logprob=True, logprob_start_len=0)
    finally:
        eng.shutdown()
    mi = o["meta_info"]
    inp = [x[0] for x in mi["input_token_logprobs"]]  # inp[0] is None (no context)
    out = [x[0] for x in mi["output_token_logprobs"]]
    return list(o["output_ids"]), inp, out


def reference(model_path, prompt, outputs, max_position, attention="streaming", overrides=True):
    """Per-token logprobs of prompt[1:] and outputs, and the argmax at each
    output step, from transformers' modules + the core engine."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    import infinitehip

    model = LlamaForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    pol = json.loads(json.dumps(POLICY))
    if not overrides:
        del pol["overrides"]
    for p in [pol["default"]] + [o["policy"] for o in pol.get("overrides", [])]:
        p["rope"]["attention"] = attention
    pol["model"] = {"n_layers": N_LAYERS, "n_q_heads": N_HEADS, "n_kv_heads": N_KV, "head_dim": HEAD_DIM,
                    "rope_theta": 10000.0, "max_position": max_position}
    pol["kv"]["dtype"] = "f32"
    eng = infinitehip.Engine(pol)
    eng.add_sequence(1)
    m = model.model

    def forward(ids, start, phase):
        n = len(ids)
        x = m.embed_tokens(torch.tensor(ids))[None]  # [1, n, hidden]
        pos = torch.arange(start, start + n)[None]
        cos, sin = m.rotary_emb(x, pos)
        for li, layer in enumerate(m.layers):
            at = layer.self_attn
            h = layer.input_layernorm(x)
            q = at.q_proj(h).view(1, n, N_HEADS, HEAD_DIM).transpose(1, 2)
            k = at.k_proj(h).view(1, n, N_KV, HEAD_DIM).transpose(1, 2)
            v = at.v_proj(h).view(1, n, N_KV, HEAD_DIM)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            q, k = q.transpose(1, 2)[0].contiguous(), k.transpose(1, 2)[0].contiguous()
            eng.append(li, 1, k, v[0].contiguous(), phase=phase, prompt_done=True)
            if phase == "prefill":
                o = eng.attend_prefill(li, 1, q)
            else:
                o = eng.attend_decode(li, [1], q)
            x = x + at.o_proj(o.reshape(1, n, N_HEADS * HEAD_DIM))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return torch.log_softmax(model.lm_head(m.norm(x))[0].double(), -1)

    with torch.no_grad():
        rows = [forward(prompt[s:s + CHUNK], s, "prefill") for s in range(0, len(prompt), CHUNK)]
        lp = torch.cat(rows)  # [PROMPT, vocab]
        inp = [float(lp[i - 1, prompt[i]]) for i in range(1, len(prompt))]
        out, arg = [float(lp[-1, outputs[0]])], [int(lp[-1].argmax())]
        for i in range(1, len(outputs)):
            r = forward([outputs[i - 1]], len(prompt) + i - 1, "decode")[0]
            out.append(float(r[outputs[i]]))
            arg.append(int(r.argmax()))
    eng.close()
    return inp, out, arg


def compare(name, sg_inp, sg_out, ref):
    inp, out, _ = ref
    d_in = max(abs(a - b) for a, b in zip(sg_inp[1:], inp))
    d_out = max(abs(a - b) for a, b in zip(sg_out, out))
    print(f"{name}: max |dlogprob| prompt {d_in:.3g} ({len(inp)} tokens, chunked prefill), "
          f"decode path {d_out:.3g} ({len(out)} tokens)")
    return d_in, d_out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    import infinitehip.sglang  # noqa: F401  (the entry point registers it in SGLang processes)

    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        make_model(d)
        cfg_path = os.path.join(d, "policy.json")
        with open(cfg_path, "w") as f:
            json.dump(POLICY, f)
        prompt = tokens()
        got, sg_inp, sg_out = run_sglang(d, cfg_path, prompt)
        t_sg = time.time() - t0
        assert len(got) == NEW and len(sg_inp) == PROMPT and len(sg_out) == NEW, (len(got), len(sg_inp), len(sg_out))
        ref = reference(d, prompt, got, TRAINED)
        wrong_maxpos = reference(d, prompt, got, CTX)
        original = reference(d, prompt, got, TRAINED, attention="original")
        relative0 = reference(d, prompt, got, TRAINED, overrides=False)

    res = {"len": LEN, "trained": TRAINED, "ctx": CTX, "chunk": CHUNK, "bound": BOUND, "sglang_s": t_sg}
    ok = True
    d = compare("sglang vs reference", sg_inp, sg_out, ref)
    greedy = got == ref[2]
    print(f"greedy tokens == reference argmax at every step: {greedy}")
    res["reference"] = {"max_dlogprob_prompt": d[0], "max_dlogprob_decode": d[1], "greedy_equal": greedy}
    if not (d[0] <= BOUND and d[1] <= BOUND and greedy):
        print(f"FAIL: SGLang with the RoPE modes differs from the core reference (bound {BOUND})")
        ok = False
    for name, r in [("negative control: max_position = SGLang's context", wrong_maxpos),
                    ("negative control: rope.attention original", original),
                    ("negative control: layer 0 relative, not chunk_indexed", relative0)]:
        dn = compare(name, sg_inp, sg_out, r)
        res[name] = {"max_dlogprob_prompt": dn[0], "max_dlogprob_decode": dn[1]}
        if not max(dn) > BOUND:
            print(f"FAIL: {name} is within the bound: the check cannot see it")
            ok = False
    res["pass"] = ok
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print("sglang_rope_e2e:", "PASS" if ok else "FAIL", f"({time.time() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

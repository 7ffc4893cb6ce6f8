#!/usr/bin/env python3
"""Write a tiny Llama-architecture GGUF with random weights (gguf package).

GQA (4 query heads, 2 KV heads), 2 layers by default, a 256-token SPM-style
vocabulary of placeholder pieces. Weights are seeded normals scaled so the
residual stream stays O(1); enough to exercise attention end to end.

    python3 tests/llama-cpp/make_tiny_gguf.py OUT.gguf [--layers 2] [--embd 128]
        [--heads 4] [--kv-heads 2] [--head-dim EMBD/HEADS] [--ff 256] [--vocab 256]
        [--ctx 131072] [--seed 0]

--head-dim other than embd/heads writes attention.key_length/value_length
(e.g. 256 with 16 heads / 2 KV heads: the shape llama.cpp's CUDA sparse
flash attention takes).
"""
import argparse

import numpy as np
import gguf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--embd", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=0)
    ap.add_argument("--ff", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.heads % a.kv_heads or (not a.head_dim and a.embd % a.heads):
        raise SystemExit("heads must divide by kv-heads, and embd by heads unless --head-dim is given")
    hd = a.head_dim or a.embd // a.heads
    qd = a.heads * hd
    rng = np.random.default_rng(a.seed)

    def w(rows: int, cols: int, scale: float) -> np.ndarray:
        # numpy shape (out, in) = GGUF ne [in, out]
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    wr = gguf.GGUFWriter(a.out, "llama")
    wr.add_name("infinitehip-tiny-random-llama")
    wr.add_context_length(a.ctx)
    wr.add_embedding_length(a.embd)
    wr.add_block_count(a.layers)
    wr.add_feed_forward_length(a.ff)
    wr.add_head_count(a.heads)
    wr.add_head_count_kv(a.kv_heads)
    wr.add_rope_dimension_count(hd)
    if qd != a.embd:
        wr.add_key_length(hd)
        wr.add_value_length(hd)
    wr.add_rope_freq_base(a.rope_theta)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_file_type(gguf.LlamaFileType.ALL_F32)
    wr.add_vocab_size(a.vocab)

    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"t{i}".encode() for i in range(3, a.vocab)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [
        gguf.TokenType.NORMAL
    ] * (a.vocab - 3)
    wr.add_tokenizer_model("llama")
    wr.add_token_list(tokens)
    wr.add_token_scores([0.0] * a.vocab)
    wr.add_token_types(types)
    wr.add_unk_token_id(0)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)

    s_in = 1.0 / np.sqrt(a.embd)
    wr.add_tensor("token_embd.weight", w(a.vocab, a.embd, 1.0))
    for i in range(a.layers):
        p = f"blk.{i}."
        wr.add_tensor(p + "attn_norm.weight", np.ones(a.embd, np.float32))
        # Larger q/k scale gives peaked attention, so selection matters.
        wr.add_tensor(p + "attn_q.weight", w(qd, a.embd, 2.0 * s_in))
        wr.add_tensor(p + "attn_k.weight", w(a.kv_heads * hd, a.embd, 2.0 * s_in))
        wr.add_tensor(p + "attn_v.weight", w(a.kv_heads * hd, a.embd, s_in))
        wr.add_tensor(p + "attn_output.weight", w(a.embd, qd, 1.0 / np.sqrt(qd)))
        wr.add_tensor(p + "ffn_norm.weight", np.ones(a.embd, np.float32))
        wr.add_tensor(p + "ffn_gate.weight", w(a.ff, a.embd, s_in))
        wr.add_tensor(p + "ffn_up.weight", w(a.ff, a.embd, s_in))
        wr.add_tensor(p + "ffn_down.weight", w(a.embd, a.ff, 1.0 / np.sqrt(a.ff)))
    wr.add_tensor("output_norm.weight", np.ones(a.embd, np.float32))
    wr.add_tensor("output.weight", w(a.vocab, a.embd, s_in))

    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    print(f"wrote {a.out}: llama, {a.layers} layers, {a.heads} heads / {a.kv_heads} kv heads, head_dim {hd}, vocab {a.vocab}")


if __name__ == "__main__":
    main()

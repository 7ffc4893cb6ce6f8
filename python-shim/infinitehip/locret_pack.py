"""Pack what `infinitehip.locret_train` needs from a Llama-family GGUF into a
few MiB less than the GGUF, so training can run on a machine that has
neither the model nor internet access (the device machine takes 64 MiB).

    python -m infinitehip.locret_pack pack MODEL.gguf HF_DIR TEXT --out OUT_DIR [--max-tokens N] [--layers K]
    python -m infinitehip.locret_pack unpack OUT_DIR MODEL_DIR
    python -m infinitehip.locret_pack merge NEW.safetensors BASE.safetensors OUT.safetensors

`pack` keeps the GGUF's quantized blocks as they are (Q4_1, Q8_0, F32; the
block streams xz-compressed apart from their scales), and only:
- the text's token ids (the first --max-tokens), tokenized with HF_DIR's
  tokenizer, and the embedding rows of the ids that occur;
- every layer's attention and MLP weights except the last layer's output
  projection and MLP (the heads read the last layer's q/k/v only).
It then checks that unpacking reproduces HF_DIR's tensors exactly
(HF_DIR is the same GGUF converted by `infinitehip.gguf_to_hf`).

`--layers K` packs the first K layers only (the model seen as K layers:
layer K-1 is then the last one, its output projection and MLP omitted), so
heads can be trained for layers 0..K-1 when the whole pack would not fit
the device machine's 64 MiB; `merge` then completes such heads with another
heads file's later layers (the layer l of NEW where NEW has it, else BASE's;
a BASE of a narrower hidden width is padded with zeros, which scores the
same).

`unpack` writes an HF checkpoint directory (config.json, model.safetensors,
tokens.npy, locret_pack.json): embedding rows never packed are NaN, so a
forward that reads one fails loudly; the omitted last-layer tensors are 0.
"""

import argparse
import json
import lzma
import os
import shutil

import numpy as np

Q4_1_BLOCK, Q8_0_BLOCK = 20, 34  # bytes per 32 values

# GGUF tensor suffix -> (HF name under model.layers.N., permuted q/k: which head count)
LAYER_NAMES = {
    "attn_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
    "attn_q.weight": ("self_attn.q_proj.weight", "n_q"),
    "attn_k.weight": ("self_attn.k_proj.weight", "n_kv"),
    "attn_v.weight": ("self_attn.v_proj.weight", None),
    "attn_output.weight": ("self_attn.o_proj.weight", None),
    "ffn_gate.weight": ("mlp.gate_proj.weight", None),
    "ffn_up.weight": ("mlp.up_proj.weight", None),
    "ffn_down.weight": ("mlp.down_proj.weight", None),
}
# Tensors of the last layer the heads never need.
LAST_LAYER_UNUSED = ("attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "ffn_norm.weight")


def hf_name(gguf_name):
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight", None
    if gguf_name == "output_norm.weight":
        return "model.norm.weight", None
    _, l, rest = gguf_name.split(".", 2)
    name, perm = LAYER_NAMES[rest]
    return f"model.layers.{l}.{name}", perm


def unpermute(w, n_head):
    """Undo llama.cpp's q/k row order (rotary pairs interleaved per head)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequant(kind, raw, shape):
    """Blocks of `kind` (uint8 [n, block bytes]) -> f32 array `shape`."""
    if kind == "F32":
        return raw.view(np.float32).reshape(shape)
    if kind == "Q4_1":
        d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
        m = raw[:, 2:4].copy().view(np.float16).astype(np.float32)
        qs = raw[:, 4:]
        q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)
        return (d * q + m).reshape(shape)
    if kind == "Q8_0":
        d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
        q = raw[:, 2:].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(shape)
    raise ValueError(f"tensor type {kind} is not supported by locret_pack")


def block_bytes(kind):
    return {"Q4_1": Q4_1_BLOCK, "Q8_0": Q8_0_BLOCK, "F32": 4}[kind]


def pack(gguf_path, hf_dir, text_paths, out, max_tokens, layers=None):
    import gguf
    from transformers import AutoTokenizer

    from .locret_train import read_text, sha256

    r = gguf.GGUFReader(gguf_path)
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    n_layers = cfg["num_hidden_layers"]
    if layers is not None:
        if not 0 < layers <= n_layers:
            raise SystemExit(f"--layers {layers}: the model has {n_layers} layers")
        n_layers = layers
        cfg["num_hidden_layers"] = layers
    tok = AutoTokenizer.from_pretrained(hf_dir)
    text = "\n\n".join(read_text(p) for p in text_paths)
    ids = np.array(tok(text, add_special_tokens=False)["input_ids"][:max_tokens], dtype=np.int32)
    rows = np.unique(ids)
    os.makedirs(out, exist_ok=True)
    streams = {"scales": [], "blocks": [], "f32": []}
    tensors = []
    for t in r.tensors:
        kind = t.tensor_type.name
        if t.name.startswith(f"blk.{n_layers - 1}.") and t.name.split(".", 2)[2] in LAST_LAYER_UNUSED:
            continue
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= n_layers:
            continue
        if t.name == "output.weight":
            continue
        shape = [int(x) for x in reversed(t.shape.tolist())]  # numpy order [out, in]
        raw = np.asarray(t.data).view(np.uint8).reshape(-1, block_bytes(kind))
        entry = {"name": t.name, "kind": kind, "shape": shape}
        if t.name == "token_embd.weight":
            raw = raw.reshape(shape[0], -1)[rows].reshape(-1, block_bytes(kind))
            entry["rows"] = "embedding_rows"
        if kind == "F32":
            streams["f32"].append(raw.tobytes())
        else:
            streams["scales"].append(raw[:, :4 if kind == "Q4_1" else 2].tobytes())
            streams["blocks"].append(raw[:, 4 if kind == "Q4_1" else 2:].tobytes())
        entry["blocks"] = int(raw.shape[0])
        tensors.append(entry)
    sizes = {}
    for name, parts in streams.items():
        data = lzma.compress(b"".join(parts), preset=6)
        with open(os.path.join(out, name + ".xz"), "wb") as f:
            f.write(data)
        sizes[name] = len(data)
    np.save(os.path.join(out, "embedding_rows.npy"), rows)
    with lzma.open(os.path.join(out, "tokens.npy.xz"), "wb") as f:
        np.save(f, ids.astype(np.uint32 if rows.max() >= 1 << 16 else np.uint16))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    manifest = {
        "gguf": os.path.abspath(gguf_path),
        "gguf_sha256": sha256(gguf_path),
        "text": [{"path": os.path.abspath(p), "sha256": sha256(p)} for p in text_paths],
        "tokenizer": os.path.abspath(hf_dir),
        "tokens": int(len(ids)),
        "embedding_rows": int(len(rows)),
        "layers": n_layers,
        "omitted": [f"blk.{n_layers - 1}.{s}" for s in LAST_LAYER_UNUSED]
        + ([f"blk.{layers}.. (layers {layers} and later)"] if layers is not None and layers < r_layers(r) else []),
        "tensors": tensors,
        "compressed_bytes": sizes,
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def r_layers(reader):
    return 1 + max(int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk."))


def merge(new_path, base_path, out_path):
    """Heads file of BASE's layers with NEW's where NEW has them (same
    widths required); returns which layers came from NEW."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    def load(p):
        with safe_open(p, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}

    new, _ = load(new_path)
    base, base_meta = load(base_path)
    hid = lambda w: {k: v.shape[0] for k, v in w.items() if k.endswith("fc1.weight")}  # noqa: E731
    h_new, h_base = set(hid(new).values()), set(hid(base).values())
    if len(h_new) != 1 or len(h_base) != 1:
        raise SystemExit(f"mixed hidden widths: {h_new} in {new_path}, {h_base} in {base_path}")
    (h_new,), (h_base,) = h_new, h_base
    if h_new < h_base:
        raise SystemExit(f"{new_path} is narrower ({h_new}) than {base_path} ({h_base})")
    if h_new > h_base:
        # A narrower head padded with zero rows of fc1 and zero columns of
        # fc2 scores exactly as before (silu(0) = 0, and fc2 ignores them).
        for k, v in base.items():
            pad = torch.zeros((h_new - h_base, v.shape[1]), dtype=v.dtype) if k.endswith("fc1.weight") \
                else torch.zeros((v.shape[0], h_new - h_base), dtype=v.dtype)
            base[k] = torch.cat([v, pad], 0 if k.endswith("fc1.weight") else 1)
        base_meta = {**base_meta, "locret_hidden": str(h_new)}
    out, taken = dict(base), []
    for k, v in new.items():
        if k not in base or base[k].shape != v.shape:
            raise SystemExit(f"{k}: {tuple(v.shape)} in {new_path}, {tuple(base[k].shape) if k in base else 'absent'} in {base_path}")
        out[k] = v.to(base[k].dtype)
        taken.append(int(k.split(".")[2]))
    save_file(out, out_path, metadata=base_meta)
    return sorted(set(taken))


def load_state(packdir):
    """The packed tensors as {HF name: f32 array}, plus the manifest."""
    man = json.load(open(os.path.join(packdir, "manifest.json")))
    cfg = json.load(open(os.path.join(packdir, "config.json")))
    heads = {"n_q": cfg["num_attention_heads"], "n_kv": cfg.get("num_key_value_heads") or cfg["num_attention_heads"]}
    data = {k: lzma.decompress(open(os.path.join(packdir, k + ".xz"), "rb").read()) for k in ("scales", "blocks", "f32")}
    at = {k: 0 for k in data}
    rows = np.load(os.path.join(packdir, "embedding_rows.npy"))
    state = {}
    for e in man["tensors"]:
        kind, n = e["kind"], e["blocks"]

        def take(stream, nbytes):
            b = np.frombuffer(data[stream], np.uint8, nbytes, at[stream])
            at[stream] += nbytes
            return b

        if kind == "F32":
            raw = take("f32", 4 * n).reshape(n, 4)
        else:
            sb = 4 if kind == "Q4_1" else 2
            s = take("scales", sb * n).reshape(n, sb)
            b = take("blocks", (block_bytes(kind) - sb) * n).reshape(n, -1)
            raw = np.concatenate([s, b], axis=1)
        shape = e["shape"]
        if e.get("rows"):
            w = np.full(shape, np.nan, np.float32)
            w[rows] = dequant(kind, raw, [len(rows), shape[1]])
        else:
            w = dequant(kind, raw, shape)
        name, perm = hf_name(e["name"])
        if perm:
            w = unpermute(w, heads[perm])
        state[name] = np.ascontiguousarray(w)
    return state, man, cfg


def unpack(packdir, out):
    import torch
    from safetensors.torch import save_file

    state, man, cfg = load_state(packdir)
    n_layers, h, ff = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]
    last = f"model.layers.{n_layers - 1}."
    zeros = {"self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (ff, h),
             "mlp.up_proj.weight": (ff, h), "mlp.down_proj.weight": (h, ff),
             "post_attention_layernorm.weight": (h,)}
    for k, s in zeros.items():
        state.setdefault(last + k, np.zeros(s, np.float32))
    os.makedirs(out, exist_ok=True)
    save_file({k: torch.from_numpy(v) for k, v in state.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    shutil.copy(os.path.join(packdir, "config.json"), os.path.join(out, "config.json"))
    with lzma.open(os.path.join(packdir, "tokens.npy.xz")) as f:
        np.save(os.path.join(out, "tokens.npy"), np.load(f).astype(np.int64))
    with open(os.path.join(out, "locret_pack.json"), "w") as f:
        json.dump({k: v for k, v in man.items() if k != "tensors"}, f, indent=1)
    return out


def check(packdir, hf_dir):
    """Max |difference| between the unpacked tensors and HF_DIR's."""
    from safetensors.numpy import load_file

    state, _, _ = load_state(packdir)
    ref = load_file(os.path.join(hf_dir, "model.safetensors"))
    worst = 0.0
    for name, w in state.items():
        r = ref[name]
        ok = ~np.isnan(w)
        if w.shape != r.shape or not ok.any():
            raise SystemExit(f"{name}: shape {w.shape} vs {r.shape}")
        worst = max(worst, float(np.abs(w[ok] - r[ok]).max()))
    return worst


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m infinitehip.locret_pack", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("gguf")
    a.add_argument("hf_dir")
    a.add_argument("text", nargs="+")
    a.add_argument("--out", required=True)
    a.add_argument("--max-tokens", type=int, default=400_000)
    a.add_argument("--layers", type=int, help="pack the first K layers only (heads for layers 0..K-1)")
    b = sub.add_parser("unpack")
    b.add_argument("packdir")
    b.add_argument("out")
    m = sub.add_parser("merge")
    m.add_argument("new")
    m.add_argument("base")
    m.add_argument("out")
    args = p.parse_args(argv)
    if args.cmd == "merge":
        print(json.dumps({"out": args.out, "layers_from_new": merge(args.new, args.base, args.out)}))
        return
    if args.cmd == "pack":
        man = pack(args.gguf, args.hf_dir, args.text, args.out, args.max_tokens, args.layers)
        worst = check(args.out, args.hf_dir)
        print(json.dumps({"compressed_bytes": man["compressed_bytes"], "tokens": man["tokens"],
                          "embedding_rows": man["embedding_rows"], "max_abs_diff_vs_hf": worst}))
        if worst != 0.0:
            raise SystemExit(f"unpacked tensors differ from {args.hf_dir} by up to {worst}")
    else:
        print(unpack(args.packdir, args.out))


if __name__ == "__main__":
    main()

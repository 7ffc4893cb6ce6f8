"""Retaining heads for the locret rows: the trained SmolLM2 heads when the
repository has them (python-shim/infinitehip/heads/smollm2-135m-instruct.*
.safetensors), else seeded random heads of the model's shape (the rows then
say so: random heads measure the mechanism, not Locret's quality)."""
import glob
import json
import os
import struct

import numpy as np

# SmolLM2-135M: 30 layers, 9 q / 3 KV heads, head_dim 64
LAYERS, N_Q, N_KV, HEAD_DIM = 30, 9, 3, 64


def hidden_of(path):
    """The MLP width, from fc2's shape [n_kv, hidden] in the safetensors header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    shapes = [v["shape"] for k, v in header.items() if k.endswith("fc2.weight")]
    if not shapes:
        raise ValueError(f"{path}: no fc2.weight tensors")
    return int(shapes[0][1])


def write_random(path, hidden=256, seed=0, layers=LAYERS, n_q=N_Q, n_kv=N_KV, d=HEAD_DIM):
    rng = np.random.default_rng(seed)
    inp = (n_q + 2 * n_kv) * d
    header, blobs, off = {}, [], 0
    for l in range(layers):
        for name, shape, fan_in in [("fc1", (hidden, inp), inp), ("fc2", (n_kv, hidden), hidden)]:
            b = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype("<f4").tobytes()
            header[f"model.layers.{l}.self_attn.{name}.weight"] = {
                "dtype": "F32", "shape": list(shape), "data_offsets": [off, off + len(b)]}
            blobs.append(b)
            off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    os.replace(path + ".tmp", path)


def random_heads(cache):
    """(weights path, hidden) of the seeded random heads (the control rows)."""
    path = os.path.join(cache, "locret-random-heads-h256.safetensors")
    if not os.path.exists(path):
        write_random(path)
    return path, hidden_of(path)


def find(repo, cache):
    """(weights path, hidden, trained?)"""
    trained = sorted(glob.glob(os.path.join(repo, "python-shim", "infinitehip", "heads",
                                            "smollm2-135m-instruct.*.safetensors")))
    if trained:
        return trained[0], hidden_of(trained[0]), True
    path, hidden = random_heads(cache)
    return path, hidden, False

"""Manual check of the llama-cpp-python route (not in CI: the wheel build takes
3-10 min on 2 cores). Usage, after building the patched sdist into a venv as
tests/llama-cpp/README.md shows and writing the tiny model with
make_tiny_gguf.py:

    python3 tests/llama-cpp/llama_cpp_python_check.py VENV_PYTHON MODEL.gguf WORKDIR

Prints, per config, the last-token logits' max abs difference vs the same
package with the plugin off, and the plugin's log lines (proof it was on)."""
import os, sys, json, numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e_test import write_locret_heads, locret_config
PY, MODEL, W = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(W, exist_ok=True)
import subprocess
def run(cfg_path, n_tokens, n_ctx=2048, n_batch=256):
    code = f"""
import numpy as np, llama_cpp, sys
m = llama_cpp.Llama('{MODEL}', n_ctx={n_ctx}, n_batch={n_batch}, n_ubatch={n_batch}, logits_all=True, verbose=True, seed=0)
rng = np.random.default_rng(1)
toks = [int(t) for t in rng.integers(3, 250, {n_tokens})]
m.eval(toks)
np.save('{W}/out.npy', np.array(m.scores[m.n_tokens-1], dtype=np.float32))
"""
    env = dict(os.environ)
    env.pop("LLAMA_INFINITEHIP_CONFIG", None)
    if cfg_path: env["LLAMA_INFINITEHIP_CONFIG"] = cfg_path
    p = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True)
    log = [l for l in p.stderr.splitlines() if "infinitehip:" in l]
    assert p.returncode == 0, p.stderr[-2000:]
    return np.load(f'{W}/out.npy'), log
hip = {"dense_layers": 0, "default": {"method": "hip", "sink": 16, "window": 64,
       "stages": [{"chunk_size": 16, "keep_tokens": 4096, "refresh_interval": 4}]}}
json.dump(hip, open(f"{W}/hip.json", "w"))
write_locret_heads(f"{W}/locret.safetensors", layers=2, n_q=4, n_kv=2, d=32, hidden=64)
json.dump(locret_config(f"{W}/locret.safetensors", budget=8192), open(f"{W}/loc_cover.json", "w"))
json.dump(locret_config(f"{W}/locret.safetensors", budget=256), open(f"{W}/loc_small.json", "w"))
ref, _ = run(None, 600)
for name, cfg in [("hip covering", f"{W}/hip.json"), ("locret covering", f"{W}/loc_cover.json"), ("locret budget 256", f"{W}/loc_small.json")]:
    out, log = run(cfg, 600)
    d = float(np.abs(out - ref).max())
    print(f"{name}: max abs diff vs stock {d:.3g} (logit rms {float(np.sqrt((ref**2).mean())):.3g}), finite {bool(np.isfinite(out).all())}")
    for l in log[:2]: print("   ", l[:220])

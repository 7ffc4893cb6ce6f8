"""`InfiniteHipAttnBackend`: SGLang attention backend over the infinitehip engine.

Design (see also the project README):

* SGLang's pools stay the truth. Every forward writes K/V into SGLang's
  `token_to_kv_pool` (`set_kv_buffer`) exactly like the in-tree backends, so
  the radix cache, HiCache, retraction and every other SGLang feature see the
  usual state.
* The engine keeps its own copy of each running request's K/V (its paged,
  per-layer pool is what the policies — hip today — select from). The copy is
  fed from SGLang's pool: after `set_kv_buffer`, the new tokens' K/V are read
  back from the pool at `out_cache_loc` and appended. A request's copy is
  tied to its `req_to_token` row; it is trusted only while (row generation,
  length, slot ids) still match what it mirrored. Otherwise — a new request
  in a reused row, a radix-cache prefix hit, a retracted and resumed request —
  the stale copy is freed and the missing prefix is re-read from SGLang's pool
  (`req_to_token[row, :prefix]`), layer by layer at forward time (so HiCache's
  layer-wise loads are honoured). Rows that SGLang returned to its free list
  are freed in the engine at the next forward.
* On the CPU, attention runs in the Rust engine on host f32 arrays through
  the C ABI (the engine keeps its copy of the K/V, described above).
* On a CUDA device (when the library was built with `--features cuda`;
  `INFINITEHIP_GPU=0` turns it off) the backend keeps NO copy: decode and
  extend call `infinitehip.gpu.GpuAttention` directly over SGLang's own
  `k_buffer[layer]` / `v_buffer[layer]` (`[slots, kv_heads, head_dim]`) and
  `req_to_token` (the page table, one row per request, page size 1), with q
  and out in the model's dtype, launched on torch's current stream. Layers
  are dense, hip, squeeze, lazy or locret (per the config). hip: mask-refresh state
  per (layer, req_to_token row), reset by each extend of the row; extend is
  dense causal. squeeze: extend is dense causal (the prompt's own queries)
  and keeps the observation window's queries; the row's first decode seals
  its prompt (one host sync per (row, layer): keys read back, k-means on the
  host) and later decodes look up centroids on the GPU. lazy: keep sets per
  row on the GPU, shared across layers; extend attends the step's set
  causally. locret: each extend's tokens are scored by the retaining head
  on the GPU from pre-RoPE q/k/v; SGLang hands the backend post-RoPE q/k,
  so the backend inverts the model's own rotary embedding (its
  `cos_sin_cache`, per position) in float32 (the bf16 rounding of the
  post-RoPE values carries over into the scores). One host sync per (extend,
  locret layer) reads the scores back; eviction is a retained index set per
  (row, layer, KV head) that attention reads; when every layer is locret
  the scheduler hook (locret_free.py) compacts a request after its prompt
  and returns its evicted slots to SGLang's allocator (on the GPU too). SGLang's chunked-prefill size is the eviction granularity (set
  --chunked-prefill-size to locret.chunk to follow upstream); every extend
  is passed with prompt_done false (the backend cannot tell a prompt's last
  chunk), so the first decode runs the final eviction. A radix-cache prefix
  hit gives tokens that were never scored for the row: an error (run with
  --disable-radix-cache). An extend of a row that has decoded starts a new
  request there (so mixed chunked prefill, which hands decoding rows to
  extend, would restart their squeeze/lazy/locret state: not supported with
  those methods). State is dropped when SGLang frees the row. If the GPU
  object cannot be built (library without CUDA), the backend says why in
  one log line and uses the host path.
* Locret on the host path: appends carry the pre-RoPE q/k/v (the rotary
  embedding inverted as above); extends append with prompt_done false and
  the first decode runs the final eviction (as on the GPU path). When a
  request ends its prompt the scheduler hook in locret_free.py compacts it
  in SGLang's pool and frees the evicted slots (see that module); the row
  then attends densely over its slots with positions offset by the tokens
  evicted. Conditions not met: the engine copy keeps the retained set.
* Dense attention through SGLang's own kernel: layers whose method is
  `dense`, and hip layers of a batch whose longest context is below the
  config's `prefill_dense_below` (extend) / `decode_dense_below` (decode)
  thresholds, are computed by the attention backend SGLang would otherwise
  run (its default for the device: fa3 on Hopper, flashinfer or triton on
  other GPUs, torch_native on the CPU; `INFINITEHIP_DENSE_BACKEND=name`
  picks another registered backend, `=infinitehip` keeps our own dense
  kernels). It is built from SGLang's attention registry with the same
  model runner and gets every `init_forward_metadata`. hip layers served
  densely still feed the engine's copy (host path), so a later sparse step
  sees every token. The thresholds apply to hip layers only (squeeze, lazy
  and locret state must see every token through their own path); on the
  GPU path they apply when every non-dense layer is hip (a dense extend
  there resets the rows' mask state, as our own extend does).
* `--prefill-attention-backend` / `--decode-attention-backend`: infinitehip
  can be either one (SGLang's HybridAttnBackend). As the decode backend it
  builds each request's copy from SGLang's pool at its first decode (the
  rebuild path); locret needs it as the prefill backend too.
* CUDA graphs (decode, GPU path, configs whose layers are all dense or
  hip): `init_cuda_graph_state` allocates the library's graph decode
  buffers once for SGLang's largest captured batch
  (`GpuAttention.prepare_graph`); from then on every decode batch that fits
  runs `decode_graph`, which reads SGLang's `req_pool_indices` and
  `seq_lens` device tensors when the work runs and computes the hip
  metadata (refresh decisions included) on the device: nothing is
  allocated, copied or waited for inside the captured region, and
  `init_forward_metadata_out_graph` (before capture and before every
  replay) only sets a host flag. hip state is then kept per req_to_token
  row (reset by our extend of the row, or detected on the device when the
  row's request changes). In graph mode the per-batch `decode_dense_below`
  switch is off (a captured graph cannot change route per replay). The
  dense backend we wrap gets every graph hook (`init_cuda_graph_state`,
  `init_forward_metadata_out_graph` / `_in_graph`, its seq-len fill
  value), so its layers are captured in the same graph. Other methods
  (squeeze, lazy, locret) and the host path cannot be captured:
  `infinitehip.sglang.register()`'s server-args resolution hook turns
  decode graphs off for such configs, and for configs with hip's RoPE
  modes (and prefill graphs always), with a log line;
  `init_cuda_graph_state` raises if a graph is requested anyway.
* hip's RoPE modes (beyond the trained length) on CUDA: GpuAttention over
  SGLang's pool where it serves the config (no CUDA graphs, no host
  offload: there the host engine runs them, with a log line);
  `INFINITEHIP_SGLANG_ROPE_GPU=0` keeps the host engine, `=1` makes a
  config the GPU route refuses an error (`_rope_route`).
* Policy config: the JSON file named by `INFINITEHIP_CONFIG` (default: the
  library's default config, hip with Llama-3.1-8B budgets). Absent `model`
  fields are filled from SGLang's model config (layers, heads per TP rank,
  head_dim, rope_theta, context length); absent `kv.dtype` follows SGLang's KV
  cache dtype; absent `dense_layers` is capped at the layer count.
* Not supported (a clear error, never a silent fallback): sliding-window
  layers, logit soft-capping, cross/encoder-only attention, qk/v head dims
  that differ. Pre-RoPE projections are not available to an SGLang backend
  directly: locret's are recovered by inverting the model's rotary
  embedding (GPU path, above).
"""

import json
import logging
import math
import os
import time

import torch

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

try:
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc
except ImportError:  # pragma: no cover - older SGLang
    KVWriteLoc = None

import infinitehip
from infinitehip import InfinitehipError

from . import lazy_rows, locret_free, offload, rope_modes_in

logger = logging.getLogger("infinitehip.sglang")

CONFIG_ENV = "INFINITEHIP_CONFIG"
# hip's RoPE modes on CUDA: unset, the GPU route (GpuAttention) where it serves
# the config, else the host engine; "1" the GPU route or an error; "0" the host engine.
ROPE_GPU_ENV = "INFINITEHIP_SGLANG_ROPE_GPU"

_KV_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _hf_attr(model_config, name, default=None):
    for obj in (model_config, getattr(model_config, "hf_text_config", None), getattr(model_config, "hf_config", None)):
        if obj is not None and getattr(obj, name, None) is not None:
            return getattr(obj, name)
    return default


def build_policy_config(model_runner, pool, path=None):
    """The engine's config: `INFINITEHIP_CONFIG`'s JSON (or the default) with
    the model shape filled from SGLang's model config where absent."""
    path = path if path is not None else os.environ.get(CONFIG_ENV)
    if path:
        try:
            with open(path) as f:
                cfg = json.load(f)
        except OSError as e:
            raise InfinitehipError(f"{CONFIG_ENV}={path}: cannot read: {e}") from e
        except json.JSONDecodeError as e:
            raise InfinitehipError(f"{CONFIG_ENV}={path}: not valid JSON: {e}") from e
        if not isinstance(cfg, dict):
            raise InfinitehipError(f"{CONFIG_ENV}={path}: the top level must be a JSON object")
    else:
        cfg = infinitehip.default_config()
        cfg.pop("model", None)
        cfg.get("kv", {}).pop("dtype", None)
        cfg.pop("dense_layers", None)

    mc = model_runner.model_config
    tp = 1
    try:
        from sglang.srt.runtime_context import get_parallel

        tp = get_parallel().attn_tp_size or 1
    except Exception:  # older SGLang or no parallel context
        tp = getattr(getattr(model_runner, "server_args", None), "tp_size", 1) or 1
    sgl = {
        "n_layers": int(pool.layer_num),
        "n_q_heads": int(mc.get_num_attention_heads(tp)),
        "n_kv_heads": int(mc.get_num_kv_heads(tp)),
        "head_dim": int(mc.head_dim),
    }
    rope_theta = _hf_attr(mc, "rope_theta")
    if rope_theta is None:
        rp = _hf_attr(mc, "rope_parameters") or {}
        rope_theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    extra = {"rope_theta": float(rope_theta or 10000.0)}
    trained = trained_context(mc)
    if trained:
        extra["max_position"] = int(trained)

    model = cfg.setdefault("model", {})
    for k, v in sgl.items():
        if k not in model:
            model[k] = v
        elif int(model[k]) != v:
            raise InfinitehipError(
                f"{CONFIG_ENV}: model.{k} = {model[k]} but SGLang's model has {v} "
                "(per tensor-parallel rank); remove the field to take SGLang's value"
            )
    for k, v in extra.items():
        model.setdefault(k, v)
    kv = cfg.setdefault("kv", {})
    kv.setdefault("dtype", _KV_DTYPES.get(getattr(pool, "dtype", None), "bf16"))
    cfg.setdefault("dense_layers", min(3, sgl["n_layers"]))
    return cfg


def trained_context(mc):
    """The model's trained context (`model.max_position`, which `relative`
    scoring moves long queries back inside): the checkpoint's own
    `max_position_embeddings`. Running beyond it in SGLang takes
    `--json-model-override-args '{"max_position_embeddings": N}'` (SGLang
    sizes its rotary cache and derives its context length from that field),
    so an overridden value is read back from the checkpoint's config. Falls
    back to SGLang's context length (a model config without the field)."""
    over = getattr(mc, "model_override_args", None) or {}
    overridden = isinstance(over, dict) and (
        "max_position_embeddings" in over
        or any(isinstance(v, dict) and "max_position_embeddings" in v for v in over.values())
    )
    if overridden:
        path = getattr(mc, "model_path", None)
        try:
            from transformers import AutoConfig

            hf = AutoConfig.from_pretrained(
                path, trust_remote_code=bool(getattr(mc, "trust_remote_code", False)),
                revision=getattr(mc, "revision", None),
            )
            hf = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
            v = getattr(hf, "max_position_embeddings", None)
            if v:
                return int(v)
        except Exception as e:  # a config transformers cannot read
            logger.warning(
                "infinitehip: max_position_embeddings is overridden and the checkpoint's own value at %s could "
                "not be read (%s); model.max_position = SGLang's context length (set model.max_position in "
                "%s to the trained context for `relative` scoring)", path, e, CONFIG_ENV,
            )
        return getattr(mc, "context_len", None)
    v = _hf_attr(mc, "max_position_embeddings")
    return int(v) if v else getattr(mc, "context_len", None)


def check_rope_modes(model_runner, cfg):
    """hip's RoPE modes re-rotate SGLang's stored (post-RoPE) keys and
    queries by position differences with the core's rotary embedding: plain
    RoPE over the whole head in the halves (neox) layout, base
    `model.rope_theta`. Refuse, with an error, a model whose rotary embedding
    is anything else (YaRN, llama3/linear/dynamic scaling, partial rotary,
    the interleaved GPT-J layout, multimodal RoPE), and a context longer than
    SGLang's rotary cache (positions past it cannot be embedded). Returns the
    rotary module."""
    modes = rope_modes_in(cfg)
    m = cfg["model"]
    d = int(m["head_dim"])
    what = f"{CONFIG_ENV} asks for {', '.join(modes)}"
    model = getattr(model_runner, "model", None)
    found = {}
    if model is not None and hasattr(model, "modules"):
        for mod in model.modules():
            c = getattr(mod, "cos_sin_cache", None)
            if isinstance(c, torch.Tensor) and c.dim() == 2 and hasattr(mod, "is_neox_style"):
                found[id(mod)] = mod
    if len(found) != 1:
        raise InfinitehipError(
            f"infinitehip backend: {what}, which needs the model's one rotary embedding; found {len(found)} "
            "rotary modules (cos_sin_cache/is_neox_style)"
        )
    rope = next(iter(found.values()))
    name = type(rope).__name__
    scaling = _hf_attr(model_runner.model_config, "rope_scaling")
    hint = f" ({name}, rope_scaling {scaling})" if scaling else f" ({name})"
    rot = int(rope.cos_sin_cache.shape[-1])
    if "mrope" in name.lower() or getattr(rope, "mrope_section", None):
        raise InfinitehipError(f"infinitehip backend: {what}: multimodal RoPE is not supported{hint}")
    if rot != d:
        raise InfinitehipError(
            f"infinitehip backend: {what}: partial rotary embeddings are not supported (rotary dim {rot}, "
            f"head_dim {d}){hint}; use rope original"
        )
    if not rope.is_neox_style:
        raise InfinitehipError(
            f"infinitehip backend: {what}: the interleaved (GPT-J) RoPE layout is not supported, only the "
            f"halves (neox) layout{hint}; use rope original"
        )
    cache = rope.cos_sin_cache.detach().to("cpu")
    rows = int(cache.shape[0])
    theta = float(m["rope_theta"])
    # The plain RoPE cache as SGLang's RotaryEmbedding computes it (float32).
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    t = torch.arange(rows, dtype=torch.float32)
    f = torch.einsum("i,j->ij", t, inv)
    ref = torch.cat((f.cos(), f.sin()), -1).to(cache.dtype).float()
    tol = 4 * torch.finfo(cache.dtype).eps + 1e-6
    err = float((cache.float() - ref).abs().max()) if rows else 0.0
    if not err <= tol:
        raise InfinitehipError(
            f"infinitehip backend: {what}, but the model's rotary embedding is not plain RoPE with base "
            f"{theta:g} over {d} dims (its cos/sin cache differs by {err:.3g}){hint}: YaRN and the "
            "llama3/linear/dynamic scalings are not supported with the RoPE modes; use rope original"
        )
    ctx = int(getattr(model_runner.model_config, "context_len", 0) or 0)
    if ctx > rows:
        raise InfinitehipError(
            f"infinitehip backend: {what} for a context of {ctx} tokens, but SGLang's rotary cache holds "
            f"{rows} positions (max_position_embeddings): pass --json-model-override-args "
            f"'{{\"max_position_embeddings\": {ctx}}}' so SGLang embeds positions up to the context"
        )
    return rope


def _find_rope(model_runner, head_dim):
    """The model's rotary embedding (an SGLang `RotaryEmbedding`-like module
    with `cos_sin_cache` `[max_pos, rot_dim]` = cat(cos, sin) and
    `is_neox_style`), for locret's pre-RoPE projections. One shared instance
    (SGLang's get_rope caches them) or an error naming what was found."""
    model = getattr(model_runner, "model", None)
    found = {}
    if model is not None and hasattr(model, "modules"):
        for m in model.modules():
            c = getattr(m, "cos_sin_cache", None)
            if isinstance(c, torch.Tensor) and c.dim() == 2 and hasattr(m, "is_neox_style"):
                found[id(m)] = m
    if len(found) != 1:
        raise InfinitehipError(
            f"infinitehip backend: locret needs the model's rotary embedding to recover pre-RoPE q/k; found "
            f"{len(found)} modules with cos_sin_cache/is_neox_style (need exactly one shared instance)"
        )
    rope = next(iter(found.values()))
    rot = int(rope.cos_sin_cache.shape[-1])
    if rot > head_dim or rot % 2:
        raise InfinitehipError(f"infinitehip backend: rotary dim {rot} does not fit head_dim {head_dim}")
    return rope


def _unrope(x, positions, rope):
    """Invert a rotary embedding: x `[n, heads, head_dim]` post-RoPE at
    `positions` `[n]` -> float32 pre-RoPE `[n, heads, head_dim]` (the rotation
    of each pair is inverted exactly, scaled caches included: divide by
    cos^2 + sin^2)."""
    cache = rope.cos_sin_cache
    rot = int(cache.shape[-1])
    cs = cache.index_select(0, positions.reshape(-1).long().to(cache.device)).float()
    cos, sin = cs[:, None, : rot // 2], cs[:, None, rot // 2 :]
    x = x.float()
    xr, rest = x[..., :rot], x[..., rot:]
    if rope.is_neox_style:
        o1, o2 = xr[..., : rot // 2], xr[..., rot // 2 :]
    else:
        o1, o2 = xr[..., 0::2], xr[..., 1::2]
    den = cos * cos + sin * sin
    x1 = (o1 * cos + o2 * sin) / den
    x2 = (o2 * cos - o1 * sin) / den
    y = torch.cat([x1, x2], -1) if rope.is_neox_style else torch.stack([x1, x2], -1).flatten(-2)
    return torch.cat([y, rest], -1).contiguous()


DENSE_BACKEND_ENV = "INFINITEHIP_DENSE_BACKEND"
OWN_DENSE = "infinitehip"  # INFINITEHIP_DENSE_BACKEND value: our own dense kernels


def dense_backend_name(model_runner):
    """The SGLang attention backend that serves dense attention:
    `INFINITEHIP_DENSE_BACKEND`, else SGLang's own default for the device
    (the one `--attention-backend` would pick), torch_native on the CPU."""
    name = os.environ.get(DENSE_BACKEND_ENV, "").strip()
    if name:
        return name
    dev = torch.device(model_runner.device) if not isinstance(model_runner.device, torch.device) else model_runner.device
    if dev.type != "cuda":
        return "torch_native"
    try:
        from sglang.srt.arg_groups.model_override_base import get_default_attn_backend

        name = get_default_attn_backend(model_runner.server_args, False, model_runner.model_config)
    except Exception as e:  # older SGLang or a partial runner
        logger.info("infinitehip: SGLang's default attention backend unknown (%s); dense layers use triton", e)
        name = "triton"
    return OWN_DENSE if name == OWN_DENSE else name


def make_dense_backend(model_runner, name):
    """SGLang's backend `name` built from its registry, or None for our own."""
    if name == OWN_DENSE:
        return None
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    factory = ATTENTION_BACKENDS.get(name)
    if factory is None:
        raise InfinitehipError(
            f"{DENSE_BACKEND_ENV}={name}: not an SGLang attention backend here "
            f"(registered: {', '.join(sorted(ATTENTION_BACKENDS))}; or {OWN_DENSE} for the plugin's own)"
        )
    try:
        return factory(model_runner)
    except Exception as e:
        raise InfinitehipError(
            f"infinitehip: SGLang attention backend {name!r} for the dense layers could not be built: {e} "
            f"(set {DENSE_BACKEND_ENV} to another backend, or {OWN_DENSE})"
        ) from e


class _Seq:
    """The engine's copy of one request row. `compact`: a Locret row whose
    evicted slots went back to SGLang (locret_free): the engine copy is
    gone, decode attends densely over the row's slots, and `offset` (tokens
    evicted) is added to SGLang's positions."""

    __slots__ = ("sid", "gen", "slots", "length", "compact", "offset")

    def __init__(self, sid, gen):
        self.sid, self.gen, self.slots, self.length = sid, gen, [], 0
        self.compact, self.offset = False, 0


class InfiniteHipAttnBackend(AttentionBackend):
    def __init__(self, model_runner):
        super().__init__()
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.start_layer = int(getattr(self.token_to_kv_pool, "start_layer", 0) or 0)
        cfg = build_policy_config(model_runner, self.token_to_kv_pool)
        # hip's RoPE modes (beyond the trained length): the model's RoPE
        # must be what the core re-rotates with.
        self.rope_modes = rope_modes_in(cfg)
        if self.rope_modes:
            check_rope_modes(model_runner, cfg)
        # Host offload (offload.py): kv.device_cache_pages counts SGLang's pages.
        self.offload = offload.offload_settings(cfg)
        if self.offload is not None:
            cfg["kv"]["page_size"] = int(getattr(self.token_to_kv_pool, "page_size", 1) or 1)
        self.gpu = self._make_gpu(cfg)
        self._locret_layers = set()
        self._rope = None
        if self.gpu is not None:
            ms = self.gpu.info()["layers"]
            self._locret_layers = {i for i, m in enumerate(ms) if m == "locret"}
            if self._locret_layers:
                self._rope = _find_rope(model_runner, int(cfg["model"]["head_dim"]))
                locret_free.add_backend(self)
        self._cfg = cfg
        self._gpu_compact = {}  # GPU path: compacted Locret row -> tokens evicted (locret_free)
        self._gpu_dense = None  # GPU path: the dense twin for compacted rows
        self._lazy_points, self._lazy_rows_layers = {}, set()
        if self.gpu is None and lazy_rows.enabled() and '"lazy"' in json.dumps(cfg):
            cfg = self._lazy_rows_config(cfg)
        self.engine = None if self.gpu is not None else infinitehip.Engine(cfg)
        if self._lazy_points:
            lazy_rows.add_backend(self)
        self.n_layers = int(cfg["model"]["n_layers"])
        # Host path locret layers: appends carry the pre-RoPE projections
        # (recovered from SGLang's post-RoPE q/k, as on the GPU path).
        self._locret_host = set()
        if self.engine is not None:
            ms = [l["method"] for l in self.engine.stats()["layers"]]
            self._locret_host = {i for i, m in enumerate(ms) if m == "locret"}
            if self._locret_host:
                self._rope = _find_rope(model_runner, int(cfg["model"]["head_dim"]))
                locret_free.add_backend(self)
        self._graph_bs = 0  # largest decode batch of the prepared graph decode (0: no graphs)
        self._compact_pending = set()  # rows whose last forward was an extend
        self._gpu_rows = set()  # req_to_token rows with GPU policy state
        self.rows = {}  # req_to_token row -> _Seq
        self._next_sid = 1
        self.plan = None
        # INFINITEHIP_PROFILE=N: log where the backend's time goes every N decode batches.
        self._prof_every = int(os.environ.get("INFINITEHIP_PROFILE", "0") or 0)
        self._prof = {"meta": 0.0, "sync": 0.0, "attend": 0.0, "steps": 0, "wall": 0.0, "last": None}
        if self.gpu is not None:
            methods = self.gpu.info()["layers"]
        else:
            methods = [l["method"] for l in self.engine.stats()["layers"]]
        self._setup_dense(model_runner, cfg, methods)
        if self.rope_modes:
            self._rope_mode_limits(cfg, methods)
        if self.offload is not None and self.gpu is not None and self.dense is not None:
            # SGLang's kernels do not read a host pool: ours serve those layers.
            logger.warning("infinitehip host offload: dense layers run the plugin's kernels over the host pool, "
                           "not %s", self.dense_name)
            self.dense, self.dense_name = None, OWN_DENSE
            self._prefill_below = self._decode_below = 0
        logger.warning(
            "infinitehip attention backend: %d layers (%s), kv dtype %s, config from %s, %s; "
            "dense attention through %s (dense layers; hip below %d prefill / %d decode context)",
            self.n_layers,
            ", ".join(f"{m} x{methods.count(m)}" for m in dict.fromkeys(methods)),
            cfg["kv"]["dtype"],
            os.environ.get(CONFIG_ENV) or "the library default",
            "GPU kernels over SGLang's own KV pool" if self.gpu is not None else "host engine",
            self.dense_name if self.dense is not None else "the plugin's own kernels",
            self._prefill_below, self._decode_below,
        )
        if self.rope_modes:
            logger.warning(
                "infinitehip: %s; model.max_position (trained context) %d, rope_theta %g, SGLang context %s",
                ", ".join(self.rope_modes), int(cfg["model"].get("max_position", 0)), float(cfg["model"]["rope_theta"]),
                getattr(model_runner.model_config, "context_len", None),
            )

    def _setup_dense(self, model_runner, cfg, methods):
        """Which layers SGLang's own kernel serves, and that backend."""
        # Lazy layers of the rows route hold per-layer token sets: our engine's.
        self._wrapped = {i for i, m in enumerate(methods) if m == "dense"} - self._lazy_rows_layers
        self._hip = {i for i, m in enumerate(methods) if m == "hip"}
        dflt = infinitehip.default_config()
        self._prefill_below = int(cfg.get("prefill_dense_below", dflt.get("prefill_dense_below", 0)))
        self._decode_below = int(cfg.get("decode_dense_below", dflt.get("decode_dense_below", 0)))
        if self.gpu is not None and not all(m in ("dense", "hip") for m in methods):
            # A dense GPU extend resets every layer's state of the row.
            self._prefill_below = self._decode_below = 0
        if not self._hip:
            self._prefill_below = self._decode_below = 0
        self.dense_name = dense_backend_name(model_runner)
        self.dense = None
        if self._wrapped or self._prefill_below or self._decode_below:
            self.dense = make_dense_backend(model_runner, self.dense_name)
        if self.dense is None:
            self.dense_name = OWN_DENSE
        self._dense_calls = 0

    def _rope_mode_limits(self, cfg, methods):
        """With hip's RoPE modes, hip layers served by a dense kernel would
        attend at SGLang's raw positions: keep the dense thresholds within the
        trained context, and say which layers are not hip."""
        trained = int(cfg["model"].get("max_position", 0) or 0)
        for attr, name in (("_prefill_below", "prefill_dense_below"), ("_decode_below", "decode_dense_below")):
            v = getattr(self, attr)
            if trained and v > trained:
                logger.warning(
                    "infinitehip: %s %d is past the trained context %d: capped to %d, so hip layers past it keep "
                    "the RoPE modes (a dense kernel attends at the raw positions)", name, v, trained, trained,
                )
                setattr(self, attr, trained)
        other = [i for i, m in enumerate(methods) if m != "hip"]
        if other:
            logger.warning(
                "infinitehip: RoPE modes are hip's: layers %s (%s) attend at SGLang's raw positions; beyond the "
                "trained context make every layer hip (\"dense_layers\": 0)", other,
                ", ".join(sorted({methods[i] for i in other})),
            )

    def _dense_hip(self, decode, seq_lens):
        """One decision per batch (as llama.cpp takes one per graph): is the
        batch's longest context below the threshold?"""
        limit = self._decode_below if decode else self._prefill_below
        return self.dense is not None and bool(seq_lens) and max(seq_lens) < limit

    def _make_gpu(self, cfg):
        """The GPU attention object on a CUDA device, else None (with one log
        line saying why when a CUDA device was expected to use it)."""
        dev = torch.device(self.device) if not isinstance(self.device, torch.device) else self.device
        if dev.type != "cuda" or os.environ.get("INFINITEHIP_GPU", "1") == "0":
            return None
        if self.rope_modes:
            return self._rope_route(cfg, dev)
        try:
            import infinitehip.gpu as ig

            idx = dev.index if dev.index is not None else torch.cuda.current_device()
            return ig.GpuAttention(cfg, device=idx)
        except InfinitehipError as e:
            logger.warning(
                "infinitehip: GPU kernels unavailable (%s); attention runs on the host engine "
                "with device<->host copies", e
            )
            return None

    def _rope_route(self, cfg, dev):
        """hip's RoPE modes on CUDA (`INFINITEHIP_SGLANG_ROPE_GPU`): "0" the
        host engine; "1" the GPU route or an error saying why not; unset (or
        anything else) the GPU route where it can serve the config, else the
        host engine with a log line saying why."""
        sw = os.environ.get(ROPE_GPU_ENV, "auto")
        modes = ", ".join(self.rope_modes)
        if sw == "0":
            logger.warning("infinitehip: %s on the host engine with device<->host copies (%s=0)", modes, ROPE_GPU_ENV)
            return None
        if sw == "1":
            return self._make_rope_gpu(cfg, dev)
        if getattr(self, "offload", None) is not None:
            logger.warning(
                "infinitehip: %s with host offload (kv.device_cache_pages): the host engine runs them (the GPU's "
                "host-tier decode has no RoPE modes)", modes,
            )
            return None
        try:
            return self._make_rope_gpu(cfg, dev)
        except InfinitehipError as e:
            logger.warning(
                "infinitehip: %s: the GPU route cannot serve this config (%s); the host engine runs them with "
                "device<->host copies (%s=1 makes this an error)", modes, e, ROPE_GPU_ENV,
            )
            return None

    def _make_rope_gpu(self, cfg, dev):
        """The GPU route for hip's RoPE modes (the default on CUDA since its
        GPU check, 2026-12-05 on an H100: tests/gpu/test_shim_gpu.py
        `test_backend_rope`; layer by layer it equals the host engine up to
        the bf16 rounding of the re-rotated keys its streaming gather
        stores, <= 1.2e-2 per row). What it relies on:

        * keys: SGLang's pool holds post-RoPE keys (queries too), rotated at
          their positions by the model's rotary embedding; GpuAttention's
          RoPE-mode layers re-rotate them by position differences with the
          halves (NEOX) layout at `model.rope_theta`, unscaled (its default:
          no `set_rope_layout`, which llama.cpp's CUDA route needs for its
          interleaved layout and the C ABI does not expose).
          `check_rope_modes` has already refused any other rotary
          embedding (scaled, partial, interleaved, another base).
        * positions: the core takes token t of a request's `req_to_token`
          row to be at position t (queries at lens - n_new .. lens - 1),
          which is SGLang's `positions` on every batch this route serves
          (the Locret compaction offset needs every layer locret, so no hip
          layer; LazyLLM's rows route is the host path's).
        * prefill: a RoPE-mode hip layer's call is dense at the model's
          positions while every query is below `model.max_position` (the
          trained context) and the RoPE-mode sparse prefill for the whole
          call past it (the host engine runs the sparse prefill with the
          modes whenever SGLang's dense kernel does not serve the batch,
          within the trained context too: a difference there only).
          `_rope_mode_limits` caps the dense-kernel thresholds at the
          trained context on both routes.
        * refused: CUDA graphs (`init_cuda_graph_state`; the plugin turns
          decode graphs off for RoPE-mode configs), host offload (the
          core's host-tier decode has no RoPE modes), and whatever
          GpuAttention refuses for the config (e.g. `hip.successors`):
          errors here; `_rope_route` falls back to the host engine unless
          the switch is "1"."""
        modes = ", ".join(self.rope_modes)
        if getattr(self, "offload", None) is not None:
            raise InfinitehipError(
                f"infinitehip backend: {ROPE_GPU_ENV}=1 with {modes} and host offload (kv.device_cache_pages): "
                "the GPU's host-tier decode has no RoPE modes (the rotated scorers and the streaming gather read "
                f"device keys); unset {ROPE_GPU_ENV} (the host engine runs the modes with offload) or use rope "
                "original"
            )
        try:
            import infinitehip.gpu as ig

            idx = dev.index if dev.index is not None else torch.cuda.current_device()
            att = ig.GpuAttention(cfg, device=idx)
        except InfinitehipError as e:
            raise InfinitehipError(
                f"infinitehip backend: {ROPE_GPU_ENV}=1 with {modes}, but the GPU attention object could not be "
                f"built for this config: {e}; unset {ROPE_GPU_ENV} to run the modes on the host engine",
                e.code,
            ) from e
        logger.warning(
            "infinitehip: %s on the GPU over SGLang's pool (%s=0 runs them on the host engine): "
            "prefill within model.max_position %s is dense, the RoPE-mode sparse prefill past it; no CUDA graphs "
            "(pass --disable-cuda-graph where the plugin cannot turn them off)",
            modes, ROPE_GPU_ENV, cfg["model"].get("max_position"),
        )
        return att

    # --- sequence bookkeeping ---------------------------------------------
    def _generation(self, row):
        g = getattr(self.req_to_token_pool, "req_generation", None)
        return int(g[row]) if g is not None else 0

    def _drop(self, row):
        s = self.rows.pop(row, None)
        self._compact_pending.discard(row)
        if s is not None and not s.compact:
            self.engine.free_sequence(s.sid)

    def _fresh(self, row):
        self._drop(row)
        s = _Seq(self._next_sid, self._generation(row))
        self._next_sid += 1
        self.engine.add_sequence(s.sid)
        self.rows[row] = s
        return s

    def _free_released_rows(self, active):
        free = getattr(self.req_to_token_pool, "free_slots", None)
        if free is None or not self.rows:
            return
        stale = [r for r in self.rows if r not in active]
        if stale:
            free = set(free)
            for r in stale:
                if r in free or self._generation(r) != self.rows[r].gen:
                    self._drop(r)

    def _prepare(self, row, prefix, full_check):
        """Make the engine's copy of `row` hold exactly its first `prefix`
        tokens, possibly after a catch-up; returns (seq, catch_up_start)."""
        s = self.rows.get(row)
        rt = self.req_to_token_pool.req_to_token
        ok = s is not None and s.gen == self._generation(row) and s.length <= prefix
        if ok and s.length:
            if full_check:
                cur = rt[row, : s.length].tolist()
                ok = cur == s.slots
            else:
                ok = int(rt[row, s.length - 1]) == s.slots[-1] and int(rt[row, 0]) == s.slots[0]
        if not ok:
            if s is not None:
                logger.debug("infinitehip: row %d changed request or prefix; rebuilding its copy", row)
            s = self._fresh(row)
        start = s.length
        if start < prefix:
            s.slots.extend(rt[row, start:prefix].tolist())
        return s, start

    def init_forward_metadata(self, forward_batch):
        t0 = time.perf_counter()
        try:
            if self.dense is not None:
                self.dense.init_forward_metadata(forward_batch)
            if self.gpu is not None:
                self._init_gpu_metadata(forward_batch)
            else:
                self._init_forward_metadata(forward_batch)
            p = self.plan
            if p is not None and self._graph_decode(p["decode"], len(p["rows"])):
                p["graph"] = True
            if p is not None:
                p["dense_hip"] = self._dense_hip(p["decode"], p["seq_lens"])
                if p["dense_hip"] and self.gpu is not None and not p["decode"]:
                    for r in p["rows"]:  # what our own extend would do: fresh mask state
                        self.gpu.end_request(r)
        finally:
            self._prof["meta"] += time.perf_counter() - t0

    # --- GPU path: no copy of the KV -----------------------------------------
    def _init_gpu_metadata(self, forward_batch):
        mode = forward_batch.forward_mode
        for name in ("is_target_verify", "is_draft_extend", "is_draft_extend_v2", "is_dllm_extend"):
            if getattr(mode, name, lambda: False)():
                raise NotImplementedError(
                    f"infinitehip backend: forward mode {mode.name} (speculative/diffusion decoding) "
                    "is not supported"
                )
        if mode.is_idle() or forward_batch.batch_size == 0:
            self.plan = None
            return
        rows = [int(r) for r in forward_batch.req_pool_indices.tolist()]
        seq_lens = [
            int(x)
            for x in (
                forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens
            ).tolist()
        ]
        decode = mode.is_decode()
        if decode:
            ext = [1] * len(rows)
        else:
            e = forward_batch.extend_seq_lens_cpu
            ext = [int(x) for x in (list(e) if e is not None else forward_batch.extend_seq_lens.tolist())]
        # Rows SGLang released since we last saw them: drop their policy state.
        gone = self._gpu_rows.difference(rows)
        if gone:
            free = getattr(self.req_to_token_pool, "free_slots", None)
            free = set(free.tolist() if hasattr(free, "tolist") else free) if free is not None else None
            for r in gone:
                if free is None or r in free:
                    self.gpu.end_request(r)
                    self._gpu_rows.discard(r)
                    self._gpu_compact.pop(r, None)
        self._gpu_rows.update(rows)
        if self._locret_layers:
            self._gpu_locret_rows(forward_batch, rows, seq_lens, ext, decode)
        self.plan = {"decode": decode, "rows": rows, "seq_lens": seq_lens, "ext": ext}

    def _gpu_locret_rows(self, forward_batch, rows, seq_lens, ext, decode):
        """Locret on the GPU path: compaction candidates, and the compacted
        rows' true positions (locret_free)."""
        comp = self._gpu_compact
        for r, sl, n in zip(rows, seq_lens, ext):
            if decode:
                self._compact_pending.discard(r)
                continue
            self._compact_pending.add(r)
            if r in comp:
                if sl - n != 0:
                    raise NotImplementedError(
                        "infinitehip backend: an extend of a Locret row whose slots were compacted "
                        "(mixed chunked prefill or a prefix hit): not supported"
                    )
                del comp[r]  # a new request in the row
        if decode and comp and any(r in comp for r in rows):
            off = torch.tensor([comp.get(r, 0) for r in rows], dtype=forward_batch.positions.dtype)
            forward_batch.positions = forward_batch.positions + off.to(forward_batch.positions.device)

    def _save_kv(self, k, v, layer, forward_batch, save_kv_cache):
        """Write the new K/V into SGLang's pool (as the in-tree backends do) and
        return (plan, layer index, K buffer, V buffer, req_to_token)."""
        if save_kv_cache and k is not None and v is not None:
            loc = (
                KVWriteLoc.for_layer(forward_batch, layer)
                if KVWriteLoc is not None
                else forward_batch.out_cache_loc
            )
            self.token_to_kv_pool.set_kv_buffer(layer, loc, k, v)
        p = self.plan
        if p is None:
            raise RuntimeError("infinitehip backend: forward without init_forward_metadata")
        li = layer.layer_id - self.start_layer
        kb = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        vb = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        return p, li, kb, vb, self.req_to_token_pool.req_to_token

    def _gpu_forward(self, q, k, v, layer, forward_batch, save_kv_cache, decode):
        self._check_layer(layer)
        p, li, kb, vb, rt = self._save_kv(k, v, layer, forward_batch, save_kv_cache)
        h, d = layer.tp_q_head_num, layer.qk_head_dim
        q2 = q.reshape(-1, h * d)
        if q2.stride(-1) != 1:
            q2 = q2.contiguous()
        out = torch.empty((q2.shape[0], h * d), dtype=q2.dtype, device=q2.device)
        rows = p.get("rows")
        if decode and p.get("graph"):
            # Device metadata from SGLang's own tensors: capturable.
            self.gpu.decode_graph(li, q2, kb, vb, rt, forward_batch.req_pool_indices, forward_batch.seq_lens,
                                  out=out, sm_scale=float(layer.scaling))
        elif decode and self.offload is not None:
            self.gpu.decode_host(li, q2, kb, vb, rt, rows, p["seq_lens"], rows, self.offload[0], self.offload[1],
                                 out=out, sm_scale=float(layer.scaling))
            offload.write_stats(self, li)
        elif decode and self._gpu_compact:
            locret_free.gpu_decode_split(self, li, q2, kb, vb, rt, rows, p["seq_lens"], out, float(layer.scaling))
        elif decode:
            self.gpu.decode(li, q2, kb, vb, rt, rows, p["seq_lens"], rows, out=out, sm_scale=float(layer.scaling))
        else:
            proj = None
            if li in self._locret_layers:
                if k is None or v is None:
                    raise NotImplementedError("infinitehip backend: locret extend needs this forward's k and v")
                pos = forward_batch.positions
                hk = layer.tp_k_head_num
                qp = _unrope(q.reshape(-1, h, d), pos, self._rope).reshape(-1, h * d)
                kp = _unrope(k.reshape(-1, hk, d), pos, self._rope).reshape(-1, hk * d)
                proj = (qp, kp, v.reshape(-1, hk * d).float().contiguous())
            self.gpu.prefill(
                li, q2, kb, vb, rt, rows, p["seq_lens"], p["ext"], rows, out=out, sm_scale=float(layer.scaling),
                proj=proj,
            )
        return out

    def _init_forward_metadata(self, forward_batch):
        mode = forward_batch.forward_mode
        for name in ("is_target_verify", "is_draft_extend", "is_draft_extend_v2", "is_dllm_extend"):
            if getattr(mode, name, lambda: False)():
                raise NotImplementedError(
                    f"infinitehip backend: forward mode {mode.name} (speculative/diffusion decoding) "
                    "is not supported"
                )
        if mode.is_idle() or forward_batch.batch_size == 0:
            self.plan = None
            return
        rows = forward_batch.req_pool_indices.tolist()
        seq_lens = (
            forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens
        ).tolist()
        decode = mode.is_decode()
        if decode:
            ext = [1] * len(rows)
        else:
            e = forward_batch.extend_seq_lens_cpu
            ext = list(e) if e is not None else forward_batch.extend_seq_lens.tolist()
        self._free_released_rows(set(rows))
        out_loc = forward_batch.out_cache_loc.tolist() if forward_batch.out_cache_loc is not None else None
        seqs, catch, starts, offsets = [], [], [], []
        pos = 0
        for row, sl, n in zip(rows, seq_lens, ext):
            prefix = int(sl) - int(n)
            s = self.rows.get(row)
            if s is not None and s.compact and s.gen == self._generation(row):
                if not decode:
                    raise NotImplementedError(
                        "infinitehip backend: an extend of a Locret row whose slots were compacted "
                        "(mixed chunked prefill or a prefix hit): not supported"
                    )
                # Served from SGLang's pool (locret_free): no engine copy.
                seqs.append(None)
                catch.append((0, 0))
                starts.append(pos)
                offsets.append(s.offset)
                s.length = int(sl)
                pos += n
                continue
            offsets.append(0)
            s, c0 = self._prepare(row, prefix, full_check=not decode)
            if decode:
                self._compact_pending.discard(row)
            else:
                self._compact_pending.add(row)
            seqs.append(s.sid)
            catch.append((c0, prefix))
            starts.append(pos)
            new = out_loc[pos : pos + n] if out_loc is not None else []
            s.slots.extend(new)
            s.length = int(sl)
            pos += n
        if any(offsets):
            # True positions of compacted rows' tokens, before the model's RoPE.
            off = torch.tensor(offsets, dtype=forward_batch.positions.dtype)
            forward_batch.positions = forward_batch.positions + off.to(forward_batch.positions.device)
        self.plan = {
            "decode": decode,
            "rows": rows,
            "seqs": seqs,
            "catch": catch,
            "ext": ext,
            "starts": starts,
            "seq_lens": [int(x) for x in seq_lens],
        }

    # --- LazyLLM rows dropped between layers (lazy_rows) ---------------------
    def _lazy_rows_config(self, cfg):
        """Host path: the lazy layers run as dense engine layers over the
        rows the model hook (lazy_rows) hands them; the pruning points are
        kept here. Returns the engine's config."""
        probe = infinitehip.Engine(cfg)
        try:
            full = probe.config
            methods = [l["method"] for l in probe.stats()["layers"]]
        finally:
            probe.close()
        lazy = [i for i, m in enumerate(methods) if m == "lazy"]
        if not lazy:
            return cfg
        pol = full.get("default", {})
        if pol.get("method") != "lazy":
            pol = next(o["policy"] for o in full.get("overrides", []) if o["policy"].get("method") == "lazy")
        self._lazy_points = {int(p["layer"]): float(p["keep"]) for p in pol["points"]}
        self._lazy_rows_layers = set(lazy)
        cfg = dict(cfg)
        cfg["overrides"] = list(cfg.get("overrides") or []) + [{"layers": lazy, "policy": {"method": "dense"}}]
        return cfg

    def lazy_points(self):
        """Pruning points of the rows route {layer: keep} (empty: off)."""
        return self._lazy_points

    def lazy_rows_blocker(self):
        if not self._lazy_points:
            return "no lazy layers on the host path"
        first = min(self._lazy_points)
        other = [i for i in range(first + 1, self.n_layers) if i not in self._lazy_rows_layers]
        if other:
            return f"layers {other} after the first pruning point are not lazy"
        return None

    @staticmethod
    def _rows_plan(p, forward_batch):
        """The plan of a layer after a pruning point: the one request's
        kept rows only (lazy_rows passes them as `ihip_rows`)."""
        n = getattr(forward_batch, "ihip_rows", None)
        if n is None:
            return p
        return dict(p, ext=[n], starts=[0])

    # --- Locret: evicted slots back to SGLang (locret_free) -------------------
    def locret_rows_pending(self, clear=False):
        """Rows whose last forward was an extend (compaction candidates)."""
        if clear:
            self._compact_pending.clear()
        return bool(self._compact_pending)

    def locret_free_blocker(self):
        """Why this backend cannot compact Locret rows, or None."""
        locret = self._locret_layers if self.engine is None else self._locret_host
        if len(locret) != self.n_layers:
            return f"{self.n_layers - len(locret)} of {self.n_layers} layers are not locret"
        return None

    def locret_compact(self, row, seq_len, allocator):
        """Compact `row` (a just-prefilled Locret request of `seq_len`
        tokens): run each layer's owed eviction, write layer l's retained
        units (per KV head, in cache order) into the row's first M slots,
        free slots M..seq_len to `allocator`, drop the engine's copy.
        Returns the number of slots freed (0: nothing done)."""
        if row not in self._compact_pending:
            return 0
        self._compact_pending.discard(row)
        if self.gpu is not None:
            return locret_free.gpu_compact(self, row, seq_len, allocator)
        s = self.rows.get(row)
        if s is None or s.compact or s.gen != self._generation(row) or s.length != seq_len:
            return 0
        for li in range(self.n_layers):
            self.engine.evict(li, s.sid)
        held = {self.engine.seq_len(li, s.sid) for li in range(self.n_layers)}
        if len(held) != 1:
            logger.warning("infinitehip locret: row %d holds %s tokens per layer: not compacted", row, sorted(held))
            return 0
        m = held.pop()
        if m >= seq_len:
            return 0
        rt = self.req_to_token_pool.req_to_token
        slots = rt[row, :seq_len].long()
        keep = slots[:m]
        for li in range(self.n_layers):
            k, v = self.engine.read(li, s.sid, 0, m)
            lid = li + self.start_layer
            kb = self.token_to_kv_pool.get_key_buffer(lid)
            vb = self.token_to_kv_pool.get_value_buffer(lid)
            kb[keep.to(kb.device)] = torch.from_numpy(k).to(device=kb.device, dtype=kb.dtype)
            vb[keep.to(vb.device)] = torch.from_numpy(v).to(device=vb.device, dtype=vb.dtype)
        allocator.free(rt[row, m:seq_len].to(torch.int64).clone())
        self.engine.free_sequence(s.sid)
        s.compact, s.offset = True, seq_len - m
        s.slots, s.length = keep.tolist(), m
        return seq_len - m

    # --- forward ------------------------------------------------------------
    def _check_layer(self, layer):
        if getattr(layer, "is_cross_attention", False):
            raise NotImplementedError("infinitehip backend: cross-attention is not supported")
        sw = getattr(layer, "sliding_window_size", None)
        if sw is not None and sw > -1:
            raise NotImplementedError(
                f"infinitehip backend: layer {layer.layer_id} uses sliding-window attention "
                f"({sw}); not supported, use another --attention-backend"
            )
        cap = getattr(layer, "logit_cap", 0) or 0
        if cap > 0:
            raise NotImplementedError(
                f"infinitehip backend: layer {layer.layer_id} uses logit soft-capping ({cap}); not supported"
            )
        at = getattr(layer, "attn_type", None)
        if at is not None and getattr(at, "name", "") == "ENCODER_ONLY":
            raise NotImplementedError("infinitehip backend: encoder-only (non-causal) attention is not supported")
        if layer.qk_head_dim != layer.v_head_dim:
            raise NotImplementedError(
                f"infinitehip backend: qk head dim {layer.qk_head_dim} != v head dim {layer.v_head_dim}"
            )

    def _host_q(self, q, layer):
        h, d = layer.tp_q_head_num, layer.qk_head_dim
        q = q.reshape(-1, h, d)
        # The engine uses 1/sqrt(head_dim); SGLang's layer may scale otherwise.
        f = float(layer.scaling) * math.sqrt(d)
        qf = q.to(device="cpu", dtype=torch.float32)
        if abs(f - 1.0) > 1e-6:
            qf = qf * f
        return qf.contiguous()

    def _host_proj(self, q, k, v, layer, forward_batch):
        """Pre-RoPE float32 (q, k, v) `[tokens, heads * d]` of this forward's
        tokens (locret scores them): SGLang's post-RoPE q/k un-rotated."""
        h, hk, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        if k is None or v is None:
            raise NotImplementedError("infinitehip backend: locret needs this forward's k and v")
        pos = forward_batch.positions
        qp = _unrope(q.reshape(-1, h, d), pos, self._rope).reshape(-1, h * d).cpu()
        kp = _unrope(k.reshape(-1, hk, d), pos, self._rope).reshape(-1, hk * d).cpu()
        return qp, kp, v.reshape(-1, hk * d).float().cpu().contiguous()

    def _write_and_sync(self, q, k, v, layer, forward_batch, save_kv_cache):
        p, li, kb, vb, rt = self._save_kv(k, v, layer, forward_batch, save_kv_cache)
        p = self._rows_plan(p, forward_batch)
        out_loc = forward_batch.out_cache_loc
        phase = "decode" if p["decode"] else "prefill"
        locret = li in self._locret_host
        proj = self._host_proj(q, k, v, layer, forward_batch) if locret else None
        for i, (row, sid, (c0, c1), n, st) in enumerate(
            zip(p["rows"], p["seqs"], p["catch"], p["ext"], p["starts"])
        ):
            if sid is None:  # compacted Locret row: SGLang's pool only
                continue
            if c0 < c1:  # rebuild the missing prefix from SGLang's pool
                if locret:
                    raise NotImplementedError(
                        f"infinitehip backend: locret layer {li} got {c1 - c0} tokens of row {row} it never "
                        "scored (a radix-cache prefix hit or a resumed request): run with --disable-radix-cache"
                    )
                idx = rt[row, c0:c1].long()
                self.engine.append(li, sid, kb[idx].cpu(), vb[idx].cpu(), phase="prefill", prompt_done=False)
            idx = out_loc[st : st + n].long()
            if locret:
                # As on the GPU path: a prompt's end is not known at extend
                # time, so the first decode append runs the final eviction.
                pr = tuple(a[st : st + n] for a in proj)
                self.engine.append(
                    li, sid, kb[idx].cpu(), vb[idx].cpu(), phase=phase, prompt_done=False, proj=pr
                )
            else:
                self.engine.append(li, sid, kb[idx].cpu(), vb[idx].cpu(), phase=phase, prompt_done=True)
        return li

    def _invalidate_plan(self):
        """After a failed forward the copies may lag SGLang's pool: rebuild
        every row of the batch next time."""
        if self.plan is not None:
            for row in self.plan["rows"]:
                self._drop(row)
            self.plan = None

    def _route_dense(self, layer):
        """Does SGLang's own kernel serve this layer in this batch?"""
        if self.dense is None:
            return False
        li = layer.layer_id - self.start_layer
        if li in self._wrapped:
            return True
        p = self.plan
        return p is not None and p.get("dense_hip", False) and li in self._hip

    def _dense_forward(self, q, k, v, layer, forward_batch, save_kv_cache, decode, kwargs):
        li = layer.layer_id - self.start_layer
        self._check_layer(layer)
        if self.gpu is None and li not in self._wrapped:
            # A hip layer served densely: the engine's copy still gets the
            # tokens (written to SGLang's pool here) for later sparse steps.
            try:
                self._write_and_sync(q, k, v, layer, forward_batch, save_kv_cache)
            except Exception:
                self._invalidate_plan()
                raise
            save_kv_cache = False
        self._dense_calls += 1
        fwd = self.dense.forward_decode if decode else self.dense.forward_extend
        return fwd(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, **kwargs)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if self._route_dense(layer):
            return self._dense_forward(q, k, v, layer, forward_batch, save_kv_cache, False, kwargs)
        if self.gpu is not None:
            return self._gpu_forward(q, k, v, layer, forward_batch, save_kv_cache, decode=False)
        try:
            return self._forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        except Exception:
            self._invalidate_plan()
            raise

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if self._route_dense(layer):
            return self._dense_forward(q, k, v, layer, forward_batch, save_kv_cache, True, kwargs)
        if self.gpu is not None:
            return self._gpu_forward(q, k, v, layer, forward_batch, save_kv_cache, decode=True)
        try:
            return self._forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        except Exception:
            self._invalidate_plan()
            raise

    def _forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache):
        self._check_layer(layer)
        li = self._write_and_sync(q, k, v, layer, forward_batch, save_kv_cache)
        p = self._rows_plan(self.plan, forward_batch)
        if getattr(forward_batch, "ihip_rows_route", False) and li in self._lazy_rows_layers:
            # One request from position 0: dense causal attention over the
            # rows handed here is the extend's own q/k/v (torch's SDPA); the
            # engine copy got the K/V above for decode.
            out = lazy_rows.causal_attention(q, k, v, layer)
            lz = getattr(forward_batch, "ihip_lazy", None)
            if lz is not None:
                lz["imp"] = lazy_rows.last_row_importance(
                    self._host_q(q[-1:], layer)[0], k.reshape(q.shape[0], -1, layer.qk_head_dim).cpu(),
                    1.0 / math.sqrt(layer.qk_head_dim))
            return out.to(dtype=q.dtype)
        qh = self._host_q(q, layer)
        lz = getattr(forward_batch, "ihip_lazy", None)
        if lz is not None:  # a pruning layer of lazy_rows: the last row's attention
            lz["imp"] = lazy_rows.last_row_importance(
                qh[-1], k.reshape(qh.shape[0], -1, layer.qk_head_dim).cpu(), 1.0 / math.sqrt(layer.qk_head_dim)
            )
        out = torch.empty(qh.shape, dtype=torch.float32)
        for sid, n, st in zip(p["seqs"], p["ext"], p["starts"]):
            if n == 0:
                continue
            self.engine.attend_prefill(li, sid, qh[st : st + n], out=out[st : st + n])
        return out.reshape(q.shape[0], -1).to(device=q.device, dtype=q.dtype)

    def _forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache):
        self._check_layer(layer)
        t0 = time.perf_counter()
        li = self._write_and_sync(q, k, v, layer, forward_batch, save_kv_cache)
        t1 = time.perf_counter()
        rv = getattr(forward_batch, "ihip_revive", None)
        if rv is not None:
            # A LazyLLM revival step (lazy_rows.forward_revive): the decode
            # token plus revived rows, causal over this layer's tokens with K/V
            # (SGLang's pool, just written; the engine copy got them above).
            kb = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
            vb = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
            return lazy_rows.revive_attention(q, layer, kb, vb, rv).to(device=q.device, dtype=q.dtype)
        p = self.plan
        qh = self._host_q(q, layer)
        out = torch.empty(qh.shape, dtype=torch.float32)
        live = [i for i, sid in enumerate(p["seqs"]) if sid is not None]
        if len(live) == len(p["seqs"]):
            self.engine.attend_decode(li, p["seqs"], qh, out=out)
        else:
            if live:
                out[live] = self.engine.attend_decode(li, [p["seqs"][i] for i in live], qh[live].contiguous())
            kb = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
            vb = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
            rt = self.req_to_token_pool.req_to_token
            scale = 1.0 / math.sqrt(layer.qk_head_dim)  # qh carries layer.scaling * sqrt(d)
            for i, sid in enumerate(p["seqs"]):
                if sid is None:
                    slots = rt[p["rows"][i], : p["seq_lens"][i]].long()
                    out[i] = locret_free.dense_decode(qh[i], slots.to(kb.device), kb, vb, scale).cpu()
        res = out.reshape(qh.shape[0], -1).to(device=q.device, dtype=q.dtype)
        if self.offload is not None:
            offload.write_stats(self, li)
        pr = self._prof
        pr["sync"] += t1 - t0
        pr["attend"] += time.perf_counter() - t1
        if li == self.engine.n_layers - 1:
            now = time.perf_counter()
            if pr["last"] is not None:
                pr["wall"] += now - pr["last"]
            pr["last"] = now
            pr["steps"] += 1
            if self._prof_every and pr["steps"] % self._prof_every == 0:
                n = pr["steps"]
                logger.warning(
                    "infinitehip profile over %d decode batches: metadata %.2f ms, K/V sync %.2f ms, "
                    "attention %.2f ms per batch (all layers); %.2f ms between consecutive "
                    "decode batches (incl. gaps between requests)",
                    n, pr["meta"] / n * 1e3, pr["sync"] / n * 1e3, pr["attend"] / n * 1e3,
                    pr["wall"] / max(n - 1, 1) * 1e3,
                )
        return res

    # --- CUDA graphs (decode; GPU path, dense and hip layers) ------------------
    def _graph_decode(self, decode, bs):
        """Does this decode batch run the graph decode (device metadata)?"""
        return decode and self._graph_bs > 0 and 0 < bs <= self._graph_bs

    def init_cuda_graph_state(self, max_bs, max_num_tokens):
        if self.offload is not None:
            raise NotImplementedError(
                "infinitehip backend: CUDA graphs with host offload (kv.device_cache_pages): run with CUDA graphs "
                "disabled (the plugin does this automatically; else pass --disable-cuda-graph)"
            )
        if self.rope_modes:
            raise NotImplementedError(
                f"infinitehip backend: CUDA graphs with hip's RoPE modes ({', '.join(self.rope_modes)}): no route "
                "captures them (the GPU decode uploads per-step query shifts from the host); pass "
                "--disable-cuda-graph (the plugin turns decode graphs off itself for RoPE-mode configs where "
                "SGLang has resolution hooks)"
            )
        if self.gpu is None:
            raise NotImplementedError(
                "infinitehip backend: CUDA graphs need the GPU path (this backend runs the host engine); "
                "run with CUDA graphs disabled (the plugin does this automatically; else pass "
                "--disable-cuda-graph)"
            )
        try:
            self.gpu.prepare_graph(int(max_bs), self.req_to_token_pool.req_to_token)
        except InfinitehipError as e:
            raise NotImplementedError(
                f"infinitehip backend: cannot capture CUDA graphs for this config: {e}; run with CUDA graphs "
                "disabled (--disable-cuda-graph, or INFINITEHIP_CUDA_GRAPH=0 so the plugin turns them off)"
            ) from e
        if self.dense is not None:
            self.dense.init_cuda_graph_state(max_bs, max_num_tokens)
        if self._decode_below:
            logger.warning(
                "infinitehip: decode CUDA graphs on: decode_dense_below (%d) is ignored for decode "
                "(a captured graph cannot switch route per batch)", self._decode_below
            )
            self._decode_below = 0
        self._graph_bs = int(max_bs)
        logger.warning("infinitehip: decode CUDA graphs on (batches up to %d): %s", max_bs, self.gpu.info().get("graph"))

    def init_forward_metadata_out_graph(self, forward_batch, in_capture=False):
        """Before capture and before every replay: host flags only (the
        captured launches read SGLang's req_pool_indices / seq_lens)."""
        if self.dense is not None:
            self.dense.init_forward_metadata_out_graph(forward_batch, in_capture=in_capture)
        mode = forward_batch.forward_mode
        if not mode.is_decode():
            raise NotImplementedError(
                f"infinitehip backend: CUDA graphs for forward mode {getattr(mode, 'name', mode)}: only decode"
            )
        bs = int(forward_batch.batch_size)
        if not self._graph_decode(True, bs):
            raise RuntimeError(f"infinitehip backend: graph decode of batch {bs} (prepared up to {self._graph_bs})")
        self.plan = {"decode": True, "graph": True, "dense_hip": False, "bs": bs}

    def init_forward_metadata_in_graph(self, forward_batch):
        if self.dense is not None:
            self.dense.init_forward_metadata_in_graph(forward_batch)

    def get_cuda_graph_seq_len_fill_value(self):
        if self.dense is not None:
            return self.dense.get_cuda_graph_seq_len_fill_value()
        return 1

    def on_after_cuda_graph_warmup(self):
        if self.dense is not None and hasattr(self.dense, "on_after_cuda_graph_warmup"):
            self.dense.on_after_cuda_graph_warmup()

    def support_triton(self):
        return False

    # --- stats ---------------------------------------------------------------
    def stats(self):
        """Engine stats plus the backend's sequence map size."""
        if self.gpu is not None:
            st = self.gpu.info()
            st["rows"] = len(self._gpu_rows)
        else:
            st = self.engine.stats()
            st["rows"] = len(self.rows)
        st["dense_backend"] = self.dense_name
        st["dense_backend_calls"] = self._dense_calls
        return st

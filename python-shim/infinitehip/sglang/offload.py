"""Host offload for SGLang (issue 16): requests whose KV exceeds the GPU.

Turned on by the policy config's `kv.device_cache_pages` (the same field as
llama.cpp's host offload, counted in SGLang's pages: one token each at
SGLang's default page size 1, so in cells as in llama.cpp). Then:

* SGLang's token KV pool IS the host tier. The plugin's `HostTierKVPool`
  (a subclass of SGLang's `MHATokenToKVPool`) allocates every layer's
  `k_buffer`/`v_buffer` in page-locked host memory on CUDA (plain host
  memory on the CPU engine) and writes new K/V there (`_store_kv_layer`).
* The scheduler admits by host memory: SGLang sizes its pool from the byte
  budget `KVCacheConfigurator._profile_available_bytes` returns, which is the
  free GPU memory; under offload it is the host budget instead
  (`INFINITEHIP_HOST_KV_GB`, else half of the host's available memory;
  `--max-total-tokens` still caps it). So `max_total_num_tokens`, and with
  it the longest admitted request, is bounded by host memory, not the GPU.
* The backend keeps a device page cache of `device_cache_pages` cells per
  layer in front of the host tier (GPU: `GpuAttention.decode_host`, the
  caches of `GpuAttention::decode_host_tier`; CPU engine: the engine's page
  cache, a second host arena standing in for device memory, which the CPU
  offload tests already use). Outputs equal the all-resident run bit for bit.

Both seams are SGLang's plugin `HookRegistry` (AROUND hooks on
`KVCacheConfigurator._resolve_kv_pool_class` and `_profile_available_bytes`):
no SGLang file is patched.

Limits (each refused or logged, never silent): MHA models with SGLang's
plain NHD pool (no HND/page-major/quantized/fp8 layouts, no HiCache); CUDA
graphs off; on CUDA the dense layers and the short-context dense route run
the plugin's own kernels over the mapped host memory (SGLang's kernels do not
take a host pool); the new K/V are written with a device->host copy per
layer (a host sync).
"""

import json
import logging
import os

logger = logging.getLogger("infinitehip.sglang")

HOST_KV_ENV = "INFINITEHIP_HOST_KV_GB"

_said = set()


def _say_once(key, msg, *args):
    if key not in _said:
        _said.add(key)
        logger.warning(msg, *args)


def offload_settings(cfg):
    """(device_cache_pages, estimation_cache_rows or 0) from a policy config
    dict, or None when host offload is off."""
    kv = (cfg or {}).get("kv") or {}
    cells = kv.get("device_cache_pages")
    if cells is None:
        return None
    return int(cells), int(kv.get("estimation_cache_rows") or 0)


def config_offload(path=None):
    """`offload_settings` of the `INFINITEHIP_CONFIG` file (None when unset,
    unreadable, or offload is off: the backend reports bad files itself)."""
    path = path if path is not None else os.environ.get("INFINITEHIP_CONFIG")
    if not path:
        return None
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    return offload_settings(cfg) if isinstance(cfg, dict) else None


def host_budget_bytes():
    """The host tier's byte budget: INFINITEHIP_HOST_KV_GB, else half of the
    host's MemAvailable."""
    env = os.environ.get(HOST_KV_ENV, "").strip()
    if env:
        return int(float(env) * (1 << 30))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 << 30


def pinned_pool_bytes(budget, row_bytes, n_layers, page_size=1):
    """Bytes to hand SGLang's sizing so the pinned pool stays within
    `budget` after torch's pinned allocator rounds each layer's K and V
    buffer (`(tokens + page_size) * row_bytes`) up to a power of two: the
    most tokens whose rounded buffers fit, times the pool's bytes per token
    (SGLang divides by its own per-token size, at least this, so it can only
    pick fewer)."""
    share = budget // (2 * n_layers)
    if share < 2 * row_bytes:
        return 0
    p2 = 1 << (share.bit_length() - 1)  # the largest power of two <= share
    tokens = max(p2 // row_bytes - page_size - 1, 0)
    return tokens * 2 * n_layers * row_bytes


def _mha_row_bytes(kvc):
    """(bytes of one token's K of one layer, layers, page size) of the pool
    `kvc` (SGLang's KVCacheConfigurator) will build, or None."""
    try:
        from sglang.srt.runtime_context import get_parallel

        par = get_parallel()
        heads = kvc.model_config.get_num_kv_heads(par.attn_tp_size, par.attn_dcp_size)
        dim = max(int(kvc.model_config.head_dim), int(getattr(kvc.model_config, "v_head_dim", 0) or 0))
        item = kvc.kv_cache_dtype.itemsize
        return int(heads) * dim * int(item), int(kvc.layer_info.num_effective_layers), int(kvc.pool_page_size)
    except Exception as e:  # another SGLang layout
        logger.info("infinitehip host offload: pool shape unknown (%s)", e)
        return None


def _pool_class():
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    class HostTierKVPool(MHATokenToKVPool):
        """SGLang's MHA token pool with its K/V in host memory (module doc):
        page-locked on CUDA so the plugin's kernels and copy engines reach
        it; on the CPU engine this is SGLang's own pool unchanged."""

        def __init__(self, *args, **kwargs):
            dev = str(kwargs.get("device", args[6] if len(args) > 6 else "cpu"))
            self._ihip_pinned = dev.startswith("cuda")
            if self._ihip_pinned and kwargs.get("post_capture_active"):
                # SGLang's CUDA-VMM backing is device memory: not for a host pool.
                logger.warning("infinitehip host offload: post-capture KV sizing turned off for the host pool")
                kwargs["post_capture_active"] = False
            super().__init__(*args, **kwargs)
            if self.kv_cache_layout != "nhd" or self.is_quantized_kv_cache:
                raise NotImplementedError(
                    f"infinitehip host offload: SGLang KV layout {self.kv_cache_layout!r}"
                    f"{' (quantized)' if self.is_quantized_kv_cache else ''}; only the plain NHD pool"
                )

        def _create_buffers_normal(self):
            if not self._ihip_pinned:
                return super()._create_buffers_normal()
            if self.kv_cache_layout != "nhd":
                raise NotImplementedError(f"infinitehip host offload: layout {self.kv_cache_layout}")
            k_shape, v_shape = self._kv_buffer_shapes()

            def pinned(shape):
                return torch.empty(shape, dtype=self.store_dtype, pin_memory=True).zero_()

            self.k_buffer = [pinned(k_shape) for _ in range(self.layer_num)]
            self.v_buffer = [pinned(v_shape) for _ in range(self.layer_num)]
            gib = 2 * self.layer_num * self.k_buffer[0].numel() * self.k_buffer[0].element_size() / (1 << 30)
            logger.warning("infinitehip host offload: SGLang's KV pool (%d tokens, %.2f GiB) in pinned host "
                           "memory", self.size, gib)

        def _store_kv_layer(self, layer_idx, loc, cache_k, cache_v):
            kb, vb = self.k_buffer[layer_idx], self.v_buffer[layer_idx]
            if kb.device == cache_k.device:
                return super()._store_kv_layer(layer_idx, loc, cache_k, cache_v)
            # Device K/V into the pinned host rows (waits for the stream).
            idx = loc.to(device="cpu", dtype=torch.long)
            kb[idx] = cache_k.reshape(-1, *kb.shape[1:]).to("cpu")
            vb[idx] = cache_v.reshape(-1, *vb.shape[1:]).to("cpu")

    return HostTierKVPool


_POOL = None


def host_tier_pool_class():
    """The HostTierKVPool class (built once, needs SGLang)."""
    global _POOL
    if _POOL is None:
        _POOL = _pool_class()
    return _POOL


def _resolve_pool(original, self, *args, **kwargs):
    cls = original(self, *args, **kwargs)
    if kwargs.get("kind") != "mha" or config_offload() is None:
        return cls
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    if cls is not MHATokenToKVPool:
        _say_once("pool", "infinitehip host offload: SGLang picked KV pool %s (not the plain MHA pool): "
                  "offload is off, the pool stays on the device", getattr(cls, "__name__", cls))
        return cls
    return host_tier_pool_class()


def _budget(original, self, *args, **kwargs):
    off = config_offload()
    if off is None:
        return original(self, *args, **kwargs)
    b = host_budget_bytes()
    sized = b
    if str(getattr(self, "device", "")).startswith("cuda"):
        # Pinned buffers are rounded up to powers of two (torch): size for that.
        shape = _mha_row_bytes(self)
        sized = pinned_pool_bytes(b, *shape) if shape else b // 2
    _say_once("budget", "infinitehip host offload: KV pool sized from a host budget of %.2f GiB (%s; %.2f GiB "
              "after pinned-allocation rounding) instead of free device memory; device page cache %d cells per "
              "layer", b / (1 << 30), HOST_KV_ENV if os.environ.get(HOST_KV_ENV) else "half of MemAvailable",
              sized / (1 << 30), off[0])
    return sized


POOL_HOOK = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._resolve_kv_pool_class"
BUDGET_HOOK = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._profile_available_bytes"


def install_hooks():
    """Register the two AROUND hooks (applied by SGLang's load_plugins after
    every plugin's register()); they act only when the config turns offload
    on."""
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    except ImportError as e:  # older SGLang
        logger.info("no SGLang HookRegistry (%s): host offload unavailable", e)
        return False
    HookRegistry.register(POOL_HOOK, _resolve_pool, HookType.AROUND)
    HookRegistry.register(BUDGET_HOOK, _budget, HookType.AROUND)
    return True


STATS_ENV = "INFINITEHIP_OFFLOAD_STATS"


def write_stats(backend, layer):
    """With INFINITEHIP_OFFLOAD_STATS=file: after the last layer of each
    decode batch, rewrite `file` with the device cache counters per layer
    (what the tests read from the scheduler process)."""
    path = os.environ.get(STATS_ENV)
    if not path or layer != backend.n_layers - 1:
        return
    if backend.gpu is not None:
        layers = backend.gpu.info().get("host_tier", [])
    else:
        layers = [
            {"layer": i, "method": l["method"], **l["cache"], "device_bytes": l["device_bytes"],
             "host_bytes": l["host_bytes"]}
            for i, l in enumerate(backend.engine.stats()["layers"])
        ]
    with open(path, "w") as f:
        json.dump({"device_cache_pages": backend.offload[0], "layers": layers}, f)

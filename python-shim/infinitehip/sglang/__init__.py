"""SGLang integration: `--attention-backend infinitehip`.

SGLang loads the `sglang.srt.plugins` entry point `infinitehip =
"infinitehip.sglang:register"` (see pyproject.toml) in every SGLang process;
`register()` adds the backend name to SGLang's choices and its factory to
SGLang's attention registry, and hooks `ScheduleBatch.prepare_for_decode`
through SGLang's plugin HookRegistry (Locret's evicted slots go back to the
allocator: locret_free.py). No SGLang file is patched.

SGLANG_VERSION below is the one SGLang version this backend is tested
against (CI installs exactly it); it is the only place the pin lives.
"""

import logging

SGLANG_VERSION = "0.5.23"
BACKEND_NAME = "infinitehip"

logger = logging.getLogger("infinitehip.sglang")

_registered = False


def register():
    """Plugin entry point (called by sglang.srt.plugins.load_plugins)."""
    global _registered
    if _registered:
        return
    import sglang
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    try:
        from sglang.srt.arg_groups.choices import (
            ATTENTION_BACKEND_CHOICES,
            add_attention_backend_choices,
        )
    except ImportError:  # older layouts re-export it from server_args
        from sglang.srt.server_args import (  # type: ignore
            ATTENTION_BACKEND_CHOICES,
            add_attention_backend_choices,
        )

    version = getattr(sglang, "__version__", "?")
    if version != SGLANG_VERSION:
        logger.warning(
            "infinitehip's SGLang backend is tested with sglang==%s; this is sglang %s",
            SGLANG_VERSION,
            version,
        )
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])

    @register_attention_backend(BACKEND_NAME)
    def _create(model_runner):
        from .backend import InfiniteHipAttnBackend

        return InfiniteHipAttnBackend(model_runner)

    _install_cuda_graph_fallback()
    from .locret_free import install_hook

    install_hook()  # Locret: evicted slots back to SGLang's allocator
    from .offload import install_hooks

    install_hooks()  # host offload: SGLang's pool in host memory (kv.device_cache_pages)
    from .lazy_rows import install_hook as install_lazy_rows

    install_lazy_rows()  # LazyLLM: rows dropped between layers in prefill
    _registered = True


def rope_modes_in(cfg):
    """The non-`original` RoPE modes a config's hip policies ask for
    ({"scoring": ..., "attention": ...} values other than original)."""
    pols = [cfg.get("default") or {}] + [
        o.get("policy") or {} for o in cfg.get("overrides") or [] if isinstance(o, dict)
    ]
    out = set()
    for p in pols:
        if not isinstance(p, dict) or p.get("method") != "hip":
            continue
        r = p.get("rope") or {}
        if not isinstance(r, dict):
            continue
        for k in ("scoring", "attention"):
            if r.get(k, "original") != "original":
                out.add(f"rope.{k} {r[k]}")
    return sorted(out)


GRAPH_ENV = "INFINITEHIP_CUDA_GRAPH"
_GRAPH_METHODS = {"dense", "hip"}


def graph_capable_config(path=None):
    """(True, "") when the policy config (`INFINITEHIP_CONFIG`, else the
    library default: hip) has only dense and hip layers, hip at original
    positions (no RoPE modes), whose decode the backend can capture in a
    CUDA graph; else (False, why)."""
    import json
    import os

    if os.environ.get(GRAPH_ENV, "1") == "0":
        return False, f"{GRAPH_ENV}=0"
    path = path if path is not None else os.environ.get("INFINITEHIP_CONFIG")
    if not path:
        return True, ""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        return False, f"config {path} unreadable ({e})"
    if not isinstance(cfg, dict):
        return False, f"config {path} is not a JSON object"
    if (cfg.get("kv") or {}).get("device_cache_pages") is not None:
        return False, f"config {path} turns host offload on (kv.device_cache_pages)"
    modes = rope_modes_in(cfg)
    if modes:
        # No route captures them: the host engine cannot, and GpuAttention's
        # RoPE-mode decode uploads per-step query shifts from the host.
        return False, f"config {path} asks for hip's RoPE modes ({', '.join(modes)}; graph decode: none)"
    methods = {(cfg.get("default") or {}).get("method", "hip")}
    for o in cfg.get("overrides") or []:
        if isinstance(o, dict):
            methods.add((o.get("policy") or {}).get("method", "hip"))
    other = sorted(m for m in methods if m not in _GRAPH_METHODS)
    if other:
        return False, f"config {path} has {', '.join(map(str, other))} layers (graph decode: dense and hip only)"
    return True, ""


def _install_cuda_graph_fallback():
    """Decode CUDA graphs stay on when every layer is dense or hip without
    RoPE modes (the backend's graph hooks capture them, GPU path); otherwise, or with
    INFINITEHIP_CUDA_GRAPH=0, SGLang's resolution step turns decode graphs
    off, with a log line. Prefill graphs are always turned off (extend runs
    eagerly). (On SGLang versions without resolution hooks, pass
    --disable-cuda-graph for configs that cannot be captured.)"""
    try:
        from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook
        from sglang.srt.arg_groups.overrides import (
            declare_resolution,
            resolved_view,
            resolving_view,
        )
        from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, with_phase
    except ImportError as e:
        logger.info("no SGLang resolution hooks (%s): pass --disable-cuda-graph with infinitehip", e)
        return

    @register_resolution_hook("handle_attention_backend_compatibility")
    def _no_cuda_graph(server_args, previous):
        previous(server_args)
        view = resolved_view(server_args)
        names = {
            getattr(view, "attention_backend", None),
            getattr(view, "decode_attention_backend", None),
            getattr(view, "prefill_attention_backend", None),
        }
        if BACKEND_NAME not in names:
            return
        ok, why = graph_capable_config()
        dev = str(getattr(view, "device", None) or "")
        if ok and dev and not dev.startswith("cuda"):
            ok, why = False, f"device {dev} (graph decode is the GPU path's)"
        phases = (Phase.PREFILL,) if ok else (Phase.DECODE, Phase.PREFILL)
        cfg = resolving_view(server_args).cuda_graph_config
        for ph in phases:
            cfg = with_phase(cfg, ph, backend=Backend.DISABLED)
        declare_resolution(server_args, "infinitehip", cuda_graph_config=cfg)
        if ok:
            logger.warning(
                "infinitehip attention backend: decode CUDA graphs stay on (dense/hip layers, GPU path); "
                "prefill runs eagerly (prefill cuda_graph_config backend set to disabled)"
            )
        else:
            logger.warning(
                "infinitehip attention backend: %s: decode and prefill run eagerly "
                "(cuda_graph_config backends set to disabled)", why
            )

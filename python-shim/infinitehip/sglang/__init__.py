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
    _registered = True


def _install_cuda_graph_fallback():
    """The backend has no CUDA-graph hooks: when it is selected, SGLang's
    resolution step turns decode and prefill CUDA graphs off, with a log line.
    (On SGLang versions without resolution hooks, pass --disable-cuda-graph.)"""
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
        cfg = resolving_view(server_args).cuda_graph_config
        for ph in (Phase.DECODE, Phase.PREFILL):
            cfg = with_phase(cfg, ph, backend=Backend.DISABLED)
        declare_resolution(server_args, "infinitehip", cuda_graph_config=cfg)
        logger.warning(
            "infinitehip attention backend: CUDA graphs are not supported yet; "
            "decode and prefill run eagerly (cuda_graph_config backends set to disabled)"
        )

"""CPU CI only: stand-in for `sgl_kernel` (PyPI's sglang-kernel is a CUDA build
that fails to import without libcuda). Loaded from a .pth file in the CI venv,
so it also takes effect in SGLang's spawned scheduler processes. Active only
when SGLANG_USE_CPU_ENGINE=1; same idea as
sglang.test.test_utils.maybe_stub_sgl_kernel()."""
import os
import sys

if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
    import importlib.abc
    import importlib.machinery

    class _Loader(importlib.abc.Loader):
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            from unittest.mock import MagicMock

            module.__getattr__ = lambda name: MagicMock(name=f"sgl_kernel stub {name}")

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname == "sgl_kernel" or fullname.startswith("sgl_kernel."):
                return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)
            return None

    sys.meta_path.insert(0, _Finder())

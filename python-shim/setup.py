"""Build hook: put libinfinitehip into the package (infinitehip/_lib/).

The library comes from INFINITEHIP_LIB (a path to a built libinfinitehip.so)
when set, otherwise from `cargo build --release -p infinitehip-capi
--features cuda` in the repository this directory belongs to. The `cuda`
feature loads libcuda/libnvrtc at run time, so it builds (and the CPU path
runs) on machines without CUDA; INFINITEHIP_CUDA=0 builds without it. The
wheel is platform specific.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
LIBNAME = "libinfinitehip.dylib" if sys.platform == "darwin" else "libinfinitehip.so"


def find_or_build_library() -> Path:
    env = os.environ.get("INFINITEHIP_LIB")
    if env:
        p = Path(env)
        if not p.is_file():
            raise RuntimeError(f"INFINITEHIP_LIB={env} is not a file")
        return p
    root = HERE.parent
    if not (root / "Cargo.toml").is_file():
        raise RuntimeError(
            f"no INFINITEHIP_LIB set and no Cargo workspace at {root}: build libinfinitehip "
            "with `cargo build --release -p infinitehip-capi` and set INFINITEHIP_LIB to it"
        )
    cmd = ["cargo", "build", "--release", "-p", "infinitehip-capi"]
    if os.environ.get("INFINITEHIP_CUDA", "1") != "0":
        cmd += ["--features", "cuda"]
    subprocess.check_call(cmd, cwd=root)
    target = Path(os.environ.get("CARGO_TARGET_DIR", root / "target"))
    return target / "release" / LIBNAME


class BuildWithLib(build_py):
    def run(self):
        super().run()
        lib = find_or_build_library()
        dst = Path(self.build_lib) / "infinitehip" / "_lib"
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, dst / LIBNAME)
        header = HERE.parent / "rust" / "infinitehip-capi" / "include" / "infinitehip.h"
        if header.is_file():
            inc = Path(self.build_lib) / "infinitehip" / "include"
            inc.mkdir(parents=True, exist_ok=True)
            shutil.copy2(header, inc / "infinitehip.h")


class BinaryDistribution(Distribution):
    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildWithLib}, distclass=BinaryDistribution)

"""The installed entry point is what SGLang loads: in a fresh interpreter,
SGLang's own load_plugins() makes `--attention-backend infinitehip` parse and
puts our factory in the attention registry (no direct register() call)."""

import subprocess
import sys

import pytest

pytest.importorskip("sglang")

CODE = r"""
import argparse
from sglang.srt.plugins import load_plugins
from sglang.srt.server_args import ServerArgs
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

def parse():
    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    p.exit = lambda status=0, message=None: (_ for _ in ()).throw(SystemExit(message))
    return p.parse_args(["--model-path", "x", "--attention-backend", "infinitehip"])

try:
    parse()
    print("parsed-before-plugins")
except SystemExit as e:
    assert "invalid choice" in str(e), e
load_plugins()
a = parse()
assert a.attention_backend == "infinitehip"
assert "infinitehip" in ATTENTION_BACKENDS
import infinitehip.sglang as s
assert s._registered
print("ok")
"""


def test_entry_point_registers_backend_through_sglang_load_plugins():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.split()
    assert lines[-1] == "ok" and "parsed-before-plugins" not in lines, r.stdout

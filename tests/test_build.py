"""The build record, `python -m cogview.info`, and the import-time guard against a stale _C."""
from __future__ import annotations

import os
import subprocess
import sys

import importlib

import pytest
import torch

import cogview
from cogview import _native, ops


def test_build_info_describes_this_build():
    info = _native.BUILD_INFO
    assert info["version"] == cogview.__version__
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert "baseline" in info["cpu_isas"]
    assert info["openmp"] is True
    assert isinstance(info["cuda"], bool)


def test_info_command_lists_every_op():
    out = subprocess.run([sys.executable, "-m", "cogview.info"], capture_output=True, text=True, check=True).stdout
    for op in ops.KERNELS:
        assert op in out
    assert "CPU ISAs compiled" in out


def test_every_public_op_is_exposed():
    for op in ops.KERNELS:
        assert callable(getattr(ops, op, None)), op


def test_cpu_kernels_registered_for_layer_norm():
    assert ops.has_kernel("layer_norm", "cpu") and ops.has_kernel("add_layer_norm", "cpu")


def _import_error(snippet: str) -> str:
    code = f"import sys, torch\n{snippet}\ntry:\n    import cogview\nexcept ImportError as e:\n    print(e)\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_missing_extension_says_how_to_rebuild():
    message = _import_error("sys.modules['cogview._C'] = None")
    assert "cogview._C could not be loaded" in message and "pip install --no-build-isolation -e ." in message


def test_stale_extension_is_refused(monkeypatch):
    import cogview.version

    monkeypatch.setattr(cogview.version, "__version__", "0.0.0-other")
    with pytest.raises(ImportError, match="extension is stale"):
        importlib.reload(_native)
    monkeypatch.undo()
    importlib.reload(_native)


def test_forced_isa_environment_variable():
    code = "import cogview; print(cogview.ops.cpu_isa())"
    env = {**os.environ, "COGVIEW_CPU_ISA": "baseline"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "baseline"

"""cogview.cpu_allocator: glibc's thresholds really change, in a fresh process (it is process-wide)."""
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from cogview.cpu_allocator import auto_tune_cpu_allocator, tune_cpu_allocator

ROOT = Path(__file__).resolve().parent.parent
glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc tuning")

# Where malloc serves blocks of 1, 16 and 48 MiB: mmap'd blocks show up in mallinfo2().hblkhd.
_PROBE = r"""
import ctypes, json, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
from cogview.cpu_allocator import auto_tune_cpu_allocator
applied = auto_tune_cpu_allocator()
where = {}
for mib in (1, 16, 48):
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(mib << 20)
    where[mib] = "mmap" if libc.mallinfo2().hblkhd - before >= mib << 20 else "heap"
    libc.free(block)
print(json.dumps({"applied": applied, "where": where}))
"""


def _probe(env_value: str) -> dict:
    env = {"PYTHONPATH": str(ROOT), "COGVIEW_MALLOC_TUNING": env_value, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc_only
def test_tuning_keeps_blocks_up_to_32_mib_in_the_heap():
    tuned = _probe("1")
    assert tuned["applied"] is True
    assert tuned["where"] == {"1": "heap", "16": "heap", "48": "mmap"}


@glibc_only
def test_environment_turns_automatic_tuning_off():
    assert _probe("0")["applied"] is False


def test_arguments_are_checked():
    for bad in (0, -1, 2048, 1.5, True, "32"):
        with pytest.raises(ValueError, match="mmap_threshold_mb"):
            tune_cpu_allocator(mmap_threshold_mb=bad)
    with pytest.raises(ValueError, match="trim_threshold_mb"):
        tune_cpu_allocator(trim_threshold_mb=0)


def test_auto_tuning_honours_the_environment(monkeypatch):
    monkeypatch.setenv("COGVIEW_MALLOC_TUNING", "0")
    assert auto_tune_cpu_allocator() is False

"""Which ops have a hand-written kernel for which device, and the CPU instruction-set switch.

Resolved once at import: kernels are registered when cogview._C loads and never change after,
and a plain dict lookup keeps the op wrappers traceable by torch.compile.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from cogview._native import _C

# Every public op, as named in cogview.ops; kernels register them as cogview::<name>.
PUBLIC_OPS = (
    "layer_norm",
    "add_layer_norm",
    "gelu_tanh",
    "linear",
    "local_attention",
    "kv_cache_write",
    "decode_attention",
    "sandwich_decode_step",
    "sample_tokens",
)
DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _lookup(op: str, key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"cogview::{op}", key))
    except RuntimeError:  # no schema yet: the op runs through its reference twin
        return False


KERNELS: dict[str, dict[str, bool]] = {
    op: {device: _lookup(op, key) for device, key in DEVICE_KEYS.items()} for op in PUBLIC_OPS
}


# Set only by `force_reference()` below; a module global that torch.compile guards on.
_FORCE_REFERENCE = False


def has_kernel(op: str, device_type: str) -> bool:
    """True when `op` has a hand-written kernel for `device_type` ("cpu", "cuda", ...) and
    `force_reference()` is not active."""
    if _FORCE_REFERENCE:
        return False
    return KERNELS[op].get(device_type, False)


@contextlib.contextmanager
def force_reference() -> Iterator[None]:
    """Inside the block every cogview op computes through its plain-PyTorch twin in
    `cogview.ops.reference`, kernels or not (`has_kernel` answers False). For tests that hold a
    whole model on kernels against the same model on the reference ops, and for benchmarks."""
    global _FORCE_REFERENCE
    previous = _FORCE_REFERENCE
    _FORCE_REFERENCE = True
    try:
        yield
    finally:
        _FORCE_REFERENCE = previous


def cpu_isa() -> str:
    """The instruction set ("baseline", "avx2", "avx512") whose CPU kernels run now."""
    return _C.cpu_isa()


def usable_cpu_isas() -> list[str]:
    """Instruction sets compiled into this build that this CPU can run."""
    return list(_C.usable_cpu_isas())


@contextlib.contextmanager
def use_cpu_isa(name: str) -> Iterator[None]:
    """Run the CPU kernels of instruction set `name` inside the block (tests, benchmarks).

    The default is the best the CPU supports; the COGVIEW_CPU_ISA environment variable sets
    another for the whole process.
    """
    previous = _C.cpu_isa()
    _C.set_cpu_isa(name)
    try:
        yield
    finally:
        _C.set_cpu_isa(previous)

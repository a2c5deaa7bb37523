"""Argument checks shared by the op wrappers: clear Python exceptions that name the argument."""
from __future__ import annotations

import math

import torch

from cogview.ops._registry import has_kernel

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(op: str, name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"cogview.ops.{op}: `{name}` must be a torch.Tensor, got {type(value).__name__}")
    return value


def floating(op: str, name: str, value) -> torch.Tensor:
    tensor(op, name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"cogview.ops.{op}: `{name}` must be float32, float16, bfloat16 or float64, got {value.dtype}"
        )
    return value


def same_device(op: str, reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise ValueError(
                f"cogview.ops.{op}: `{name}` is on {value.device} but `{reference_name}` is on {reference.device}"
            )


def finite_nonnegative(op: str, name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"cogview.ops.{op}: `{name}` must be a finite number >= 0, got {value!r}")
    return float(value)


def kernel_path(op: str, primary_name: str, primary, **others) -> bool:
    """True when `op` runs a hand-written kernel for these arguments.

    The kernel path checks only what the dispatcher cannot: that every tensor is a tensor on the
    primary's device (else a meta or other-device argument would silently pick another kernel).
    The op's C++ implementation checks everything else and raises ValueError/TypeError naming the
    argument, so small calls (decoding) pay no Python validation. The reference path validates in
    Python, with the same messages.
    """
    tensor(op, primary_name, primary)
    device = primary.device
    for name, value in others.items():
        if value is None:
            continue
        tensor(op, name, value)
        if value.device != device:
            raise ValueError(f"cogview.ops.{op}: `{name}` is on {value.device} but `{primary_name}` is on {device}")
    return has_kernel(op, device.type)

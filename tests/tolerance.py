"""The low-precision tolerance rule of DESIGN.md, shared by every kernel test.

A kernel's error against a float64 reference may be at most twice the error of the plain-PyTorch
composition run in the same dtype. One unit of rounding at the output's magnitude is the floor,
since the composition can be exact by luck where the kernel is off by one rounding step.
"""
from __future__ import annotations

import torch


def max_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    diff = (value.double() - exact.double()).abs()
    return float(diff.max()) if diff.numel() else 0.0


def rounding_unit(dtype: torch.dtype, exact: torch.Tensor) -> float:
    magnitude = float(exact.double().abs().max()) if exact.numel() else 0.0
    return torch.finfo(dtype).eps * max(1.0, magnitude)


def assert_within_rule(kernel_out: torch.Tensor, composition_out: torch.Tensor, exact: torch.Tensor,
                       dtype: torch.dtype, what: str = "output") -> None:
    kernel_error = max_error(kernel_out, exact)
    composition_error = max_error(composition_out, exact)
    bound = 2 * max(composition_error, rounding_unit(dtype, exact))
    assert kernel_error <= bound, (
        f"{what}: kernel error {kernel_error:.3g} exceeds 2 x max(composition error "
        f"{composition_error:.3g}, one rounding unit) = {bound:.3g} in {dtype}"
    )

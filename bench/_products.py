"""The matrix products of a callable, recorded once and replayed alone.

`record_products(fn)` runs `fn` once under a dispatch mode that notes every matrix-product call
(aten linear / matmul / mm / addmm / bmm / baddbmm, and `cogview::linear` with its bias and GELU
epilogue, which runs its products inside the op) with the shapes, strides and dtypes of its arguments.
`replay_seconds(calls, device)` times those calls again, each on fresh random tensors of the same
layout, with nothing else in between: the time the callable's products take on this machine as
it ran them. For a callable that is more than its products this is a floor: it cannot run faster
without doing fewer multiply-adds or running them faster.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# (under inference mode the dispatch mode sees linear and matmul themselves, not what they call)
_PRODUCT_NAMES = ("aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                  "cogview::linear")


@dataclass(frozen=True)
class _TensorLayout:
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    address: int  # the recorded tensor's; equal addresses share one replay tensor (weights stay warm)

    def fresh(self, made: dict) -> torch.Tensor:
        out = made.get(self)
        if out is None:  # random storage first: a layout may overlap itself (stride 0)
            extent = 1 + sum((n - 1) * st for n, st in zip(self.size, self.stride)) if all(self.size) else 0
            storage = torch.empty(extent, dtype=self.dtype, device=self.device)
            storage = storage.normal_() if storage.is_floating_point() else storage.zero_()
            made[self] = out = storage.as_strided(self.size, self.stride)
        return out


@dataclass(frozen=True)
class ProductCall:
    func: object
    args: tuple
    kwargs: dict

    def build(self, made: dict) -> tuple[tuple, dict]:
        def materialise(value):
            return value.fresh(made) if isinstance(value, _TensorLayout) else value
        return tuple(materialise(a) for a in self.args), {k: materialise(v) for k, v in self.kwargs.items()}


def _layout(value):
    if isinstance(value, torch.Tensor):
        return _TensorLayout(tuple(value.shape), tuple(value.stride()), value.dtype, value.device,
                             value.data_ptr())
    return value


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[ProductCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in _PRODUCT_NAMES:
            self.calls.append(ProductCall(func, tuple(_layout(a) for a in args),
                                          {k: _layout(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def record_products(fn: Callable[[], object]) -> list[ProductCall]:
    """The matrix-product calls of one run of `fn` (in order)."""
    recorder = _Recorder()
    with torch.inference_mode(), recorder:
        fn()
    return recorder.calls


def multiply_adds(calls: list[ProductCall]) -> int:
    """Multiply-adds of the recorded products (out rows x in x out per call)."""
    total = 0
    for call in calls:
        name = call.func._schema.name
        shapes = [a.size for a in call.args if isinstance(a, _TensorLayout)]
        if name in ("cogview::linear", "aten::linear"):  # x [..., in], weight [out, in]
            x, w = shapes[0], shapes[1]
            total += math.prod(x[:-1]) * w[0] * w[1]
        elif name == "aten::matmul":  # [..., n, k] @ [..., k, m], 1-D operands as a row / a column
            a, b = shapes[0], shapes[1]
            a2, b2 = (1, *a) if len(a) == 1 else a, (*b, 1) if len(b) == 1 else b
            batch = torch.broadcast_shapes(a2[:-2], b2[:-2])
            total += math.prod(batch) * a2[-2] * a2[-1] * b2[-1]
        else:  # mm / bmm: the last two operands; addmm / baddbmm: the first one is the bias
            a, b = shapes[-2], shapes[-1]
            batch = a[0] if len(a) == 3 else 1
            total += batch * a[-2] * a[-1] * b[-1]
    return total


def replay_seconds(calls: list[ProductCall], device: str, rounds: int = 5) -> float:
    """Median seconds of running every recorded product once, in order, on fresh inputs (one warm-up
    round). Inputs are made before the clock starts (arguments that were one tensor in the recorded
    run, such as a layer's weight in every pass, are one tensor here too); outputs are new tensors,
    as in the real run."""
    made: dict = {}
    inputs = [call.build(made) for call in calls]
    samples = []
    with torch.inference_mode():
        for round_index in range(rounds + 1):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for call, (args, kwargs) in zip(calls, inputs):
                call.func(*args, **kwargs)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if round_index:
                samples.append(time.perf_counter() - start)
    return statistics.median(samples)

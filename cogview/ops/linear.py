"""`linear`: y = activation(x W^T + b), the projections of CogView's layers.

    linear(x, weight, bias=None, activation="none")      # activation: "none" or "gelu_tanh"

The same function as `F.linear` (then `gelu_tanh`). On a CPU with AMX matrix tiles (Sapphire
Rapids and later), bfloat16 products whose feature counts are multiples of 32 run on the tiles
(csrc/cpu/kernels/tile_linear.cpp): float accumulation, bias and activation applied in the same
pass, one rounding to bf16. At the sizes of the SR stage (a few hundred rows, 128-512 features)
that is 1.2-1.5x faster than `F.linear` (`python bench/linear.py`), whose bf16 path spends ~40 us
per call on set-up and copies the bias into the output first; products above
`_C.tile_linear_max_macs()` multiply-adds (2^27: CogView2's 3600-row layers) stay with `F.linear`,
whose blocked product is as fast there. Weights are packed into the tile layout once and kept next
to the weight (`pack_linear_weight`; repacked when the weight changes in place), so inference holds
a second bf16 copy of each weight it runs on the tiles. Anything else (float32, other devices,
other sizes, CPUs without AMX) runs `F.linear` and the `gelu_tanh` kernel. Differentiable: the backward is plain
PyTorch matrix products (the `gelu_tanh` backward kernel for the activation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from cogview._native import _C
from cogview.ops import _checks, reference
from cogview.ops.activation import gelu_tanh

__all__ = ["linear", "linear_activations", "pack_linear_weight", "tile_linear_available"]

ACTIVATIONS = ("none", "gelu_tanh")
_PACK_MULTIPLE = 32  # the tile layout groups weight rows and input features by 32

# weight (or the tensor it views) -> {(offset, shape, stride): (version, packed)}
_packed_weights = WeakIdKeyDictionary()


def linear_activations() -> tuple[str, ...]:
    """The `activation` names `linear` accepts."""
    return ACTIVATIONS


def tile_linear_available() -> bool:
    """True when bfloat16 `linear` calls can run on the CPU's AMX tiles now (the CPU has them, Linux
    granted the tile state, and the avx512 kernels are active: see `cogview.ops.use_cpu_isa`)."""
    return bool(_C.tile_linear_available())


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] (bfloat16, both multiples of 32) in the AMX tile layout that `linear`
    reads: [out / 16, in / 32, 16, 32]. `linear` packs and caches on its own; this is for callers
    that keep the packed copy themselves (torch.ops.cogview.linear's `packed_weight`)."""
    _checks.tensor("pack_linear_weight", "weight", weight)
    return torch.ops.cogview.pack_linear_weight(weight)


def _cached_pack(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """The tile packing of `weight` when this call runs on the tiles (packed once per version of the
    weight), else None."""
    if torch.compiler.is_compiling() or not _C.tile_linear_runs(x, weight):  # (the C++ op's own rule)
        return None
    base = weight if weight._base is None else weight._base
    try:
        version = base._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter: pack per call
        return None
    layout = (weight.storage_offset(), tuple(weight.shape), tuple(weight.stride()))
    entries = _packed_weights.setdefault(base, {})
    entry = entries.get(layout)
    if entry is None or entry[0] != version:
        with torch.no_grad():
            entry = (version, torch.ops.cogview.pack_linear_weight(weight))
        entries[layout] = entry
    return entry[1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str = "none") -> torch.Tensor:
    """activation(x @ weight.T + bias): x [..., in], weight [out, in], bias [out] or None, all one
    float dtype; returns [..., out]. activation: "none" or "gelu_tanh"."""
    op = "linear"
    if activation not in ACTIVATIONS:
        raise ValueError(f"cogview.ops.{op}: `activation` must be one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(x, torch.Tensor) and _autocast_enabled(x.device.type):
        # autocast picks the product's dtype (e.g. bf16 from fp32 weights): torch's product, then the
        # activation on its result
        y = F.linear(x, weight, bias)
        return gelu_tanh(y) if activation == "gelu_tanh" else y
    if _checks.kernel_path(op, "x", x, weight=weight, bias=bias):
        return torch.ops.cogview.linear(x, weight, bias, activation, _cached_pack(x, weight))
    _check_reference_arguments(op, x, weight, bias)
    if _checks.has_kernel("gelu_tanh", x.device.type):  # e.g. CUDA: torch's product, the gelu kernel
        y = F.linear(x, weight, bias)
        return gelu_tanh(y) if activation == "gelu_tanh" else y
    return reference.linear(x, weight, bias, activation)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast (meta)
        return False


def _check_reference_arguments(op: str, x, weight, bias) -> None:
    """The C++ op's checks, for the path without a kernel (the same messages)."""
    _checks.floating(op, "x", x)
    _checks.same_device(op, "x", x, weight=weight, bias=bias)
    if weight.dim() != 2:
        raise ValueError(f"cogview.ops.{op}: `weight` must be 2-D [out_features, in_features], got {tuple(weight.shape)}")
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and value.dtype != x.dtype:
            raise TypeError(f"cogview.ops.{op}: `{name}` must have the dtype of `x` ({x.dtype}), got {value.dtype}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"cogview.ops.{op}: `x` must end in in_features = {weight.shape[1]} (the columns of "
                         f"`weight`), got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"cogview.ops.{op}: `bias` must be [{weight.shape[0]}] (out_features), got {tuple(bias.shape)}")


@torch.library.register_fake("cogview::linear")
def _linear_fake(x, weight, bias=None, activation="none", packed_weight=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("cogview::pack_linear_weight")
def _pack_fake(weight):
    out, features = weight.shape
    return weight.new_empty((out // 16, features // _PACK_MULTIPLE, 16, _PACK_MULTIPLE))


def _setup(ctx, inputs, output):
    x, weight, bias, activation, _ = inputs
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias)


def _backward(ctx, grad_out):
    x, weight, bias = ctx.saved_tensors
    grad = grad_out
    if ctx.activation == "gelu_tanh":  # through the activation at the pre-activation value
        grad = torch.ops.cogview.gelu_tanh_backward(grad_out, F.linear(x, weight, bias))
    rows = grad.reshape(-1, grad.shape[-1])
    grad_x = grad @ weight if ctx.needs_input_grad[0] else None
    grad_w = rows.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
    grad_b = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b, None, None


torch.library.register_autograd("cogview::linear", _backward, setup_context=_setup)

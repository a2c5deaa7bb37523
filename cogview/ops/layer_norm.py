"""Sandwich LayerNorm: `layer_norm` and the fused `add_layer_norm` (CogView's residual step).

Dtypes: inputs are float32, float16, bfloat16 or float64 and are never cast (also not inside
`torch.autocast`): the kernels read them as they are, accumulate in float32 (float64 for float64
inputs) and round once when writing. `new_residual` keeps the residual's dtype and `normed` the
branch's, so an fp32 residual stream with a bf16 branch gives an fp32 residual and a bf16
input for the next matmul. Weights and biases may be float32 or an input's dtype.
"""
from __future__ import annotations

import torch

from cogview.ops import _checks, reference

__all__ = ["layer_norm", "add_layer_norm"]


def _check_param(op: str, name: str, value, x: torch.Tensor, *inputs: torch.Tensor) -> None:
    _checks.floating(op, name, value)
    hidden = x.shape[-1]
    if value.dim() != 1 or value.shape[0] != hidden:
        raise ValueError(
            f"cogview.ops.{op}: `{name}` must be 1-D with {hidden} elements (the hidden size), "
            f"got shape {tuple(value.shape)}"
        )
    allowed = {torch.float32, x.dtype, *(t.dtype for t in inputs)}
    if value.dtype not in allowed:
        raise TypeError(
            f"cogview.ops.{op}: `{name}` must be float32 or an input's dtype ({x.dtype}), got {value.dtype}"
        )


def _check_input(op: str, name: str, x) -> None:
    _checks.floating(op, name, x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(
            f"cogview.ops.{op}: `{name}` needs a last (hidden) dimension of size >= 1, got shape {tuple(x.shape)}"
        )


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, pb_relax: bool = False
) -> torch.Tensor:
    """LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.

    `pb_relax=True` is CogView's precision-bottleneck relaxation `LN(x / (max|x| / 8))` with the
    max taken per row (see `reference.pb_relax_layer_norm_global` for the original global form).
    """
    op = "layer_norm"
    if _checks.kernel_path(op, "x", x, weight=weight, bias=bias):
        return torch.ops.cogview.layer_norm(x, weight, bias, eps, bool(pb_relax))[0]
    _check_input(op, "x", x)
    _check_param(op, "weight", weight, x)
    _check_param(op, "bias", bias, x)
    eps = _checks.finite_nonnegative(op, "eps", eps)
    return reference.layer_norm(x, weight, bias, eps, pb_relax)


def add_layer_norm(
    residual: torch.Tensor,
    branch: torch.Tensor,
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    w_next: torch.Tensor | None = None,
    b_next: torch.Tensor | None = None,
    eps: float = 1e-5,
    pb_relax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sandwich step: `new_residual = residual + LN(branch; w_out, b_out)` and
    `normed = LN(new_residual; w_next, b_next)` (None when no next LayerNorm is given).

    One pass over memory: residual and branch are read once, each output written once.
    """
    op = "add_layer_norm"
    if _checks.kernel_path(op, "branch", branch, residual=residual, w_out=w_out, b_out=b_out, w_next=w_next,
                           b_next=b_next):
        new_residual, normed, _ = torch.ops.cogview.add_layer_norm(
            residual, branch, w_out, b_out, w_next, b_next, eps, bool(pb_relax)
        )
        return new_residual, (normed if w_next is not None else None)
    _check_input(op, "residual", residual)
    _check_input(op, "branch", branch)
    if residual.shape != branch.shape:
        raise ValueError(
            f"cogview.ops.{op}: `residual` has shape {tuple(residual.shape)} but `branch` has shape "
            f"{tuple(branch.shape)}"
        )
    if (residual.dtype == torch.float64) != (branch.dtype == torch.float64):
        raise TypeError(
            f"cogview.ops.{op}: float64 `residual` and `branch` must both be float64, got "
            f"{residual.dtype} and {branch.dtype}"
        )
    _check_param(op, "w_out", w_out, branch, residual)
    _check_param(op, "b_out", b_out, branch, residual)
    if (w_next is None) != (b_next is None):
        raise ValueError(f"cogview.ops.{op}: `w_next` and `b_next` must be given together")
    if w_next is not None:
        _check_param(op, "w_next", w_next, branch, residual)
        _check_param(op, "b_next", b_next, branch, residual)
    eps = _checks.finite_nonnegative(op, "eps", eps)
    return reference.add_layer_norm(residual, branch, w_out, b_out, w_next, b_next, eps, pb_relax)


# ---- fake (meta) implementations: shapes and dtypes only, for torch.compile and export ----


def _stats_like(x: torch.Tensor, columns: int) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((rows, columns), dtype=acc)


@torch.library.register_fake("cogview::layer_norm")
def _layer_norm_fake(x, weight, bias, eps=1e-5, pb_relax=False):
    return x.new_empty(x.shape), _stats_like(x, 2)


@torch.library.register_fake("cogview::layer_norm_backward")
def _layer_norm_backward_fake(grad_out, x, weight, stats):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


@torch.library.register_fake("cogview::add_layer_norm")
def _add_layer_norm_fake(residual, branch, w_out, b_out, w_next, b_next, eps=1e-5, pb_relax=False):
    new_residual = residual.new_empty(branch.shape)
    normed = branch.new_empty(branch.shape) if w_next is not None else branch.new_empty((0,))
    return new_residual, normed, _stats_like(branch, 4 if w_next is not None else 2)


@torch.library.register_fake("cogview::add_layer_norm_backward")
def _add_layer_norm_backward_fake(grad_new_residual, grad_normed, branch, new_residual, w_out, w_next, stats):
    def next_grad():  # a fresh tensor each: no two outputs may alias
        return w_next.new_empty(w_next.shape) if w_next is not None else branch.new_empty((0,))

    return (
        new_residual.new_empty(new_residual.shape),
        branch.new_empty(branch.shape),
        w_out.new_empty(w_out.shape),
        w_out.new_empty(w_out.shape),
        next_grad(),
        next_grad(),
    )


# ---- autograd: the backward is itself a registered op ----


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _eps, _pb_relax = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.bias_dtype = bias.dtype


def _layer_norm_backward(ctx, grad_out, _grad_stats):
    x, weight, stats = ctx.saved_tensors
    grad_x, grad_w, grad_b = torch.ops.cogview.layer_norm_backward(grad_out, x, weight, stats)
    return grad_x, grad_w, grad_b.to(ctx.bias_dtype), None, None


def _add_layer_norm_setup(ctx, inputs, output):
    residual, branch, w_out, b_out, w_next, b_next, _eps, _pb_relax = inputs
    new_residual, _normed, stats = output
    ctx.save_for_backward(branch, new_residual, w_out, w_next, stats)
    ctx.has_next = w_next is not None
    ctx.dtypes = (b_out.dtype, b_next.dtype if b_next is not None else None, residual.dtype)


def _add_layer_norm_backward(ctx, grad_new_residual, grad_normed, _grad_stats):
    branch, new_residual, w_out, w_next, stats = ctx.saved_tensors
    b_out_dtype, b_next_dtype, residual_dtype = ctx.dtypes
    grads = torch.ops.cogview.add_layer_norm_backward(
        grad_new_residual, grad_normed if ctx.has_next else None, branch, new_residual, w_out,
        w_next if ctx.has_next else None, stats,
    )
    grad_residual, grad_branch, grad_w_out, grad_b_out, grad_w_next, grad_b_next = grads
    if not ctx.has_next:
        grad_w_next = grad_b_next = None
    else:
        grad_b_next = grad_b_next.to(b_next_dtype)
    return (grad_residual.to(residual_dtype), grad_branch, grad_w_out, grad_b_out.to(b_out_dtype),
            grad_w_next, grad_b_next, None, None)


torch.library.register_autograd("cogview::layer_norm", _layer_norm_backward, setup_context=_layer_norm_setup)
torch.library.register_autograd(
    "cogview::add_layer_norm", _add_layer_norm_backward, setup_context=_add_layer_norm_setup
)

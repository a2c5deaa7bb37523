"""Local (2D neighbourhood) attention with joint text keys: CogView2's high-resolution attention.

Every query of an Hq x Wq image-token grid attends to the kh x kw window of keys (on an
Hk x Wk grid, Hq % Hk == 0, Wq % Wk == 0) centred at (h // (Hq/Hk), w // (Wq/Wk)), plus,
optionally, to every text key, all in ONE softmax. Keys outside the grid are excluded exactly;
the original CUDA kernel scored them -10000, which leaves them a tiny weight on grids smaller
than the window. The log-sum-exp is returned (and differentiable), so attention split over two
calls — e.g. a high-resolution window and a cross-resolution window into a low-res grid — is
merged exactly: out = (exp(lse1 - lse) * out1 + exp(lse2 - lse) * out2), lse = logaddexp(lse1, lse2).

Dtypes: q, k, v, text_k and text_v share one dtype (float32, float16, bfloat16 or float64); a
mix is an error. Inside a `torch.autocast` region of the inputs' device, like
`scaled_dot_product_attention`, every floating input except float64 is first cast to the
autocast dtype. The kernels accumulate in float32 (float64 for float64) and round once. `out`
has q's dtype; `lse` is float32 (float64 for float64 inputs). The CPU kernels take a key whose weight
is below exp(-64) of its query's largest as exactly 0 (far below float precision of the sum; it spares
the subnormal arithmetic that made peaked attention several times slower than flat). On a CPU with
AVX512-BF16 (`local_attention_bf16_dot_available()`), bfloat16 forwards multiply bf16 pairs into
float sums and, as flash attention does, round the softmax weights to bfloat16 for the value product
(normalised by the float sum); float32 and the other dtypes are unchanged.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from cogview._native import _C
from cogview.ops import _checks, reference
from cogview.ops._registry import has_kernel

__all__ = ["local_attention", "local_attention_bf16_dot_available", "local_attention_bf16_dot"]

_OP = "local_attention"


def local_attention_bf16_dot_available() -> bool:
    """True when bfloat16 `local_attention` forwards on CPU run on AVX512-BF16 dot products now (the
    CPU has them and the avx512 kernels are active: see `cogview.ops.use_cpu_isa`): every call with
    an even head_dim except cross-resolution windows shared by blocks of queries without text keys,
    which keep float arithmetic. Elsewhere bfloat16 inputs are converted to float."""
    return bool(_C.local_attention_bf16_dot_available())


@contextlib.contextmanager
def local_attention_bf16_dot(enabled: bool) -> Iterator[None]:
    """Inside the block the bf16 dot-product forward is enabled (the default) or not: with False,
    bfloat16 inputs are converted to float as on CPUs without AVX512-BF16. Process-wide; for tests
    and benchmarks that compare the two on one CPU."""
    if not isinstance(enabled, bool):
        raise TypeError(f"local_attention_bf16_dot: `enabled` must be a bool, got {type(enabled).__name__}")
    previous = _C.set_local_attention_bf16_dot(enabled)
    try:
        yield
    finally:
        _C.set_local_attention_bf16_dot(previous)


def _pair(name: str, value) -> tuple[int, int]:
    ok = isinstance(value, (tuple, list, torch.Size)) and len(value) == 2
    if ok:
        ok = all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in value)
    if not ok:
        raise ValueError(f"cogview.ops.{_OP}: `{name}` must be a pair of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def _check_4d(name: str, t, q: torch.Tensor | None) -> None:
    _checks.floating(_OP, name, t)
    if t.dim() != 4:
        raise ValueError(
            f"cogview.ops.{_OP}: `{name}` must be 4-D [batch, heads, tokens, head_dim], got shape {tuple(t.shape)}"
        )
    if q is None:
        return
    if t.device != q.device:
        raise ValueError(f"cogview.ops.{_OP}: `{name}` is on {t.device} but `q` is on {q.device}")
    if t.dtype != q.dtype:
        raise TypeError(f"cogview.ops.{_OP}: `{name}` has dtype {t.dtype} but `q` has {q.dtype} (they must match)")
    if t.shape[1] != q.shape[1]:
        raise ValueError(f"cogview.ops.{_OP}: `{name}` has {t.shape[1]} heads but `q` has {q.shape[1]}")
    if t.shape[3] != q.shape[3]:
        raise ValueError(f"cogview.ops.{_OP}: `{name}` has head_dim {t.shape[3]} but `q` has {q.shape[3]}")
    if t.shape[0] not in (1, q.shape[0]):
        raise ValueError(
            f"cogview.ops.{_OP}: `{name}` has batch {t.shape[0]} but `q` has {q.shape[0]} (must match or be 1)"
        )


def _autocast(device_type: str, *tensors):
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def _finite(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"cogview.ops.{_OP}: `{name}` must be a finite number, got {value!r}")
    return float(value)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid_q,
    grid_kv,
    window,
    causal: bool = False,
    text_k: torch.Tensor | None = None,
    text_v: torch.Tensor | None = None,
    text_bias: float = 0.0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local window attention joint with text keys; returns (out, lse).

    q [B, heads, Hq*Wq, d]; k, v [B or 1, heads, Hk*Wk, d] (batch 1 is broadcast); tokens in
    raster order. grid_q=(Hq, Wq), grid_kv=(Hk, Wk), window=(kh, kw), both odd. `causal=True`
    (same grid only): a query sees only the window keys at or before itself in raster order.
    text_k, text_v [B or 1, heads, T, d], T >= 0: seen by every query; their logits get
    `text_bias` added. logit = (q . k) * scale, scale defaulting to d**-0.5.
    out [B, heads, Hq*Wq, d] in q's dtype; lse [B, heads, Hq*Wq] = log sum exp(logit) over all
    keys seen (float32; float64 for float64). Both are differentiable.
    """
    _check_4d("q", q, None)
    if torch.is_autocast_enabled(q.device.type):
        q, k, v, text_k, text_v = _autocast(q.device.type, q, k, v, text_k, text_v)
    _check_4d("k", k, q)
    _check_4d("v", v, q)
    if v.shape != k.shape:
        raise ValueError(f"cogview.ops.{_OP}: `v` has shape {tuple(v.shape)} but `k` has {tuple(k.shape)}")
    if q.shape[3] < 1:
        raise ValueError(f"cogview.ops.{_OP}: `q` needs head_dim >= 1, got shape {tuple(q.shape)}")
    hq, wq = _pair("grid_q", grid_q)
    hk, wk = _pair("grid_kv", grid_kv)
    kh, kw = _pair("window", window)
    if q.shape[2] != hq * wq:
        raise ValueError(f"cogview.ops.{_OP}: `q` has {q.shape[2]} tokens but `grid_q` ({hq}, {wq}) has {hq * wq}")
    if k.shape[2] != hk * wk:
        raise ValueError(
            f"cogview.ops.{_OP}: `k` has {k.shape[2]} tokens but `grid_kv` ({hk}, {wk}) has {hk * wk}"
        )
    if hq % hk or wq % wk:
        raise ValueError(
            f"cogview.ops.{_OP}: `grid_q` ({hq}, {wq}) must be a multiple of `grid_kv` ({hk}, {wk}) "
            "in both dimensions"
        )
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"cogview.ops.{_OP}: `window` must be odd in both dimensions, got ({kh}, {kw})")
    if not isinstance(causal, bool):
        raise TypeError(f"cogview.ops.{_OP}: `causal` must be a bool, got {causal!r}")
    if causal and (hq, wq) != (hk, wk):
        raise ValueError(
            f"cogview.ops.{_OP}: `causal` needs `grid_q` == `grid_kv`, got ({hq}, {wq}) and ({hk}, {wk})"
        )
    if (text_k is None) != (text_v is None):
        raise ValueError(f"cogview.ops.{_OP}: `text_k` and `text_v` must be given together")
    if text_k is not None:
        _check_4d("text_k", text_k, q)
        _check_4d("text_v", text_v, q)
        if text_v.shape != text_k.shape:
            raise ValueError(
                f"cogview.ops.{_OP}: `text_v` has shape {tuple(text_v.shape)} but `text_k` has {tuple(text_k.shape)}"
            )
    # A window of 2 * grid - 1 keys already reaches every key from any centre: larger ones mean the same.
    kh, kw = min(kh, 2 * hk - 1), min(kw, 2 * wk - 1)
    text_bias = _finite("text_bias", text_bias)
    scale = q.shape[3] ** -0.5 if scale is None else _finite("scale", scale)
    if has_kernel(_OP, q.device.type):
        return torch.ops.cogview.local_attention(
            q, k, v, [hq, wq], [hk, wk], [kh, kw], causal, text_k, text_v, text_bias, scale
        )
    return reference.local_attention(
        q, k, v, grid_q=(hq, wq), grid_kv=(hk, wk), window=(kh, kw), causal=causal, text_k=text_k,
        text_v=text_v, text_bias=text_bias, scale=scale,
    )


# ---- fake (meta) implementations: shapes and dtypes only, for torch.compile and export ----


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("cogview::local_attention")
def _local_attention_fake(q, k, v, grid_q, grid_kv, window, causal=False, text_k=None, text_v=None,
                          text_bias=0.0, scale=1.0):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))


@torch.library.register_fake("cogview::local_attention_backward")
def _local_attention_backward_fake(grad_out, grad_lse, q, k, v, out, lse, grid_q, grid_kv, window, causal,
                                   text_k, text_v, text_bias, scale):
    empty = q.new_empty((0,))
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        text_k.new_empty(text_k.shape) if text_k is not None else empty,
        text_v.new_empty(text_v.shape) if text_v is not None else empty,
    )


# ---- autograd: the backward is itself a registered op ----


def _setup(ctx, inputs, output):
    q, k, v, grid_q, grid_kv, window, causal, text_k, text_v, text_bias, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, text_k, text_v)
    ctx.params = (grid_q, grid_kv, window, causal, text_bias, scale)
    ctx.has_text = text_k is not None


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, text_k, text_v = ctx.saved_tensors
    grid_q, grid_kv, window, causal, text_bias, scale = ctx.params
    dq, dk, dv, dtext_k, dtext_v = torch.ops.cogview.local_attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, grid_q, grid_kv, window, causal, text_k, text_v, text_bias, scale
    )
    if not ctx.has_text:
        dtext_k = dtext_v = None
    return dq, dk, dv, None, None, None, None, dtext_k, dtext_v, None, None


torch.library.register_autograd("cogview::local_attention", _backward, setup_context=_setup)

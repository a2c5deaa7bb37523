"""Cached decoding: `kv_cache_write` into a static K/V cache and `decode_attention` over it.

Both are inference ops (no autograd). Caches are [batch, heads, max_len, head_dim] of one float
dtype (k_cache and v_cache alike); new keys/values are cast to it when written. Attention
accumulates in float32 (float64 for float64 q) and returns q's dtype. Position checks read
`start`/`lengths` on the host for CPU tensors (eagerly, outside torch.compile) and again inside the
CPU kernel, which raises before writing or reading anything out of range. On CUDA the values stay on
the device (no synchronisation, so a decoding step can be captured in a CUDA graph) and are checked by
the kernels instead: kv_cache_write skips a sequence whose positions would overrun the cache, and
decode_attention returns NaN for a sequence whose length lies outside [n, max_len]. As in
`local_attention`, the CPU kernels take a float32 weight below exp(-64) of the largest as exactly 0.
"""
from __future__ import annotations

import math
import operator

import torch

from cogview.ops import _checks, reference
from cogview.ops.reference import SANDWICH_LAYER_PARAMS

__all__ = ["kv_cache_write", "decode_attention", "sandwich_decode_step", "bind_sandwich_decode_step",
           "pack_projection_weights", "SANDWICH_LAYER_PARAMS"]


def _check_cache_pair(op: str, k_cache, v_cache) -> None:
    _checks.floating(op, "k_cache", k_cache)
    _checks.floating(op, "v_cache", v_cache)
    if k_cache.dim() != 4:
        raise ValueError(f"cogview.ops.{op}: `k_cache` must be [batch, heads, max_len, head_dim], got shape "
                         f"{tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"cogview.ops.{op}: `v_cache` has shape {tuple(v_cache.shape)} but `k_cache` has "
                         f"{tuple(k_cache.shape)}")
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"cogview.ops.{op}: `v_cache` is {v_cache.dtype} but `k_cache` is {k_cache.dtype}")
    _checks.same_device(op, "k_cache", k_cache, v_cache=v_cache)


def _check_positions(op: str, name: str, value, batch: int, device) -> None:
    _checks.tensor(op, name, value)
    if value.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"cogview.ops.{op}: `{name}` must be an int64 (or int32) tensor, got {value.dtype}")
    if value.shape != (batch,):
        raise ValueError(f"cogview.ops.{op}: `{name}` must have shape ({batch},), got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"cogview.ops.{op}: `{name}` is on {value.device} but the cache is on {device}")


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _attention_scalars(op: str, q: torch.Tensor, scale, text_len, text_bias) -> tuple[float, int, float]:
    """scale (default head_dim**-0.5), text_len and text_bias as the op takes them, or a clear error.
    Finiteness is checked by the kernel (and below for the reference path)."""
    if scale is None:
        if q.dim() < 1 or q.shape[-1] < 1:
            raise ValueError(f"cogview.ops.{op}: `q` needs head_dim >= 1 for the default scale, got shape "
                             f"{tuple(q.shape)}")
        scale = q.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"cogview.ops.{op}: `scale` must be a number or None, got {type(scale).__name__}")
    if isinstance(text_len, bool) or not isinstance(text_len, (int, torch.SymInt)):
        try:  # numpy / 0-d integer tensors; floats are refused
            text_len = operator.index(text_len)
        except TypeError:
            raise TypeError(f"cogview.ops.{op}: `text_len` must be an int, got {type(text_len).__name__}") from None
    if isinstance(text_len, int):  # keys at positions < text_len: beyond int64 means the same as its ends
        text_len = min(max(text_len, _INT64_MIN), _INT64_MAX)
    if isinstance(text_bias, bool) or not isinstance(text_bias, (int, float, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"cogview.ops.{op}: `text_bias` must be a number, got {type(text_bias).__name__}")
    return float(scale), text_len, float(text_bias)


def _share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the byte ranges of two tensors on one storage intersect (views of one buffer that do
    not intersect, e.g. cache[0] and cache[1], are fine)."""
    if torch.compiler.is_compiling() or a.device.type == "meta" or not (a.numel() and b.numel()):
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a.data_ptr() == b.data_ptr():
        return True
    if not (a.is_contiguous() and b.is_contiguous()):  # interleaved views: too hard to tell, as in ATen
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        first = t.storage_offset()
        last = first + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return first * t.element_size(), (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def kv_cache_write(k_cache, v_cache, k_new, v_new, start) -> None:
    """Write n new keys/values per sequence into the caches, in place, at positions
    start[b] .. start[b] + n - 1. Caches [B, heads, max_len, d]; k_new/v_new [B, heads, n, d]
    (cast to the cache dtype); start [B] int64. Out-of-range positions raise ValueError (on CUDA:
    that sequence is not written, see the module docstring)."""
    op = "kv_cache_write"
    if _checks.kernel_path(op, "k_cache", k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new, start=start):
        torch.ops.cogview.kv_cache_write(k_cache, v_cache, k_new, v_new, start)  # checks every position first
        return
    _check_cache_pair(op, k_cache, v_cache)
    _checks.floating(op, "k_new", k_new)
    _checks.floating(op, "v_new", v_new)
    batch, heads, max_len, dim = k_cache.shape
    for name, value in (("k_new", k_new), ("v_new", v_new)):
        if value.dim() != 4 or value.shape[0] != batch or value.shape[1] != heads or value.shape[3] != dim:
            raise ValueError(f"cogview.ops.{op}: `{name}` must be [{batch}, {heads}, n, {dim}] to match the "
                             f"cache, got {tuple(value.shape)}")
    if v_new.shape != k_new.shape:
        raise ValueError(f"cogview.ops.{op}: `v_new` has shape {tuple(v_new.shape)} but `k_new` has "
                         f"{tuple(k_new.shape)}")
    _checks.same_device(op, "k_cache", k_cache, k_new=k_new, v_new=v_new)
    _check_positions(op, "start", start, batch, k_cache.device)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if any(stride == 0 and size > 1 for size, stride in zip(cache.shape, cache.stride())):
            raise ValueError(f"cogview.ops.{op}: `{name}` is written in place but some of its elements share "
                             f"memory (an expanded view?); pass a tensor that owns its elements (e.g. .clone())")
    if _share_memory(k_cache, v_cache):
        raise ValueError(f"cogview.ops.{op}: `k_cache` and `v_cache` share memory; they must be separate tensors")
    n = k_new.shape[2]
    if not torch.compiler.is_compiling() and start.numel() and not k_cache.is_cuda:
        lo, hi = int(start.min()), int(start.max())
        if lo < 0 or hi + n > max_len:
            raise ValueError(f"cogview.ops.{op}: writing {n} positions from `start` in [{lo}, {hi}] overruns "
                             f"the cache (max_len {max_len})")
    reference.kv_cache_write(k_cache, v_cache, k_new, v_new, start)


def decode_attention(q, k_cache, v_cache, lengths, *, scale=None, text_len=0, text_bias=0.0):
    """Attention of the n newest queries of each sequence over its cached keys/values.

    q [B, heads, n, d]; lengths [B] int64 = valid cached positions INCLUDING the n new ones
    (already written). Query i sits at position lengths[b] - n + i and attends to cache
    positions <= its own. Logit = (q . k) * scale (default d**-0.5), + text_bias for keys at
    positions < text_len. Returns [B, heads, n, d] in q's dtype.
    """
    op = "decode_attention"
    if _checks.kernel_path(op, "q", q, k_cache=k_cache, v_cache=v_cache, lengths=lengths):
        scale, text_len, text_bias = _attention_scalars(op, q, scale, text_len, text_bias)
        return torch.ops.cogview.decode_attention(q, k_cache, v_cache, lengths, scale, text_len, text_bias)
    _checks.floating(op, "q", q)
    _check_cache_pair(op, k_cache, v_cache)
    batch, heads, max_len, dim = k_cache.shape
    if q.dim() != 4 or q.shape[0] != batch or q.shape[1] != heads or q.shape[3] != dim:
        raise ValueError(f"cogview.ops.{op}: `q` must be [{batch}, {heads}, n, {dim}] to match the cache, got "
                         f"{tuple(q.shape)}")
    _checks.same_device(op, "q", q, k_cache=k_cache)
    _check_positions(op, "lengths", lengths, batch, q.device)
    n = q.shape[2]
    if not torch.compiler.is_compiling() and lengths.numel() and not q.is_cuda:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < n or hi > max_len:
            raise ValueError(f"cogview.ops.{op}: `lengths` must lie in [n, max_len] = [{n}, {max_len}], got "
                             f"values in [{lo}, {hi}]")
    scale, text_len, text_bias = _attention_scalars(op, q, scale, text_len, text_bias)
    if not math.isfinite(scale):
        raise ValueError(f"cogview.ops.{op}: `scale` must be finite, got {scale}")
    if not math.isfinite(text_bias):
        raise ValueError(f"cogview.ops.{op}: `text_bias` must be finite, got {text_bias}")
    return reference.decode_attention(q, k_cache, v_cache, lengths, scale, text_len, text_bias)


def _check_sandwich(op, tokens, positions, start, words, places, first_weight, first_bias, layer_params, k_cache,
                    v_cache, num_heads, scale) -> None:
    """The reference path's checks (the CPU kernel makes the same ones, with the same messages)."""
    for name, value in (("positions", positions), ("word_embeddings", words), ("position_embeddings", places),
                        ("first_weight", first_weight), ("first_bias", first_bias), ("k_cache", k_cache),
                        ("v_cache", v_cache)):
        _checks.tensor(op, name, value)
    for name, value in (("tokens", tokens), ("positions", positions)):
        if value.dtype != torch.int64 or value.shape != (tokens.shape[0] if tokens.dim() else -1, 1):
            raise ValueError(f"cogview.ops.{op}: `{name}` must be int64 [rows, 1] like `tokens`, got {value.dtype} "
                             f"{tuple(value.shape)}")
    if words.dim() != 2 or not words.dtype.is_floating_point:
        raise ValueError(f"cogview.ops.{op}: `word_embeddings` must be a float [vocab, hidden] tensor, got "
                         f"{words.dtype} {tuple(words.shape)}")
    hidden, dtype = words.shape[1], words.dtype
    if k_cache.dim() != 5 or v_cache.shape != k_cache.shape:
        raise ValueError(f"cogview.ops.{op}: `k_cache`/`v_cache` must both be [layers, rows, heads, max_len, "
                         f"head_dim], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    layers, rows, heads, max_len, head_dim = k_cache.shape
    if layers < 1 or len(layer_params) != 16 * layers:
        raise ValueError(f"cogview.ops.{op}: needs 16 `layer_params` per layer ({layers} layers in the cache), got "
                         f"{len(layer_params)}")
    if rows != tokens.shape[0]:
        raise ValueError(f"cogview.ops.{op}: the cache has {rows} rows but `tokens` has {tokens.shape[0]}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or heads != num_heads \
            or num_heads * head_dim != hidden:
        raise ValueError(f"cogview.ops.{op}: `num_heads` {num_heads!r} x head_dim {head_dim} must match the cache's "
                         f"heads {heads} and the hidden size {hidden}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"cogview.ops.{op}: `scale` must be a finite number, got {scale!r}")
    if k_cache.dtype != dtype or v_cache.dtype != dtype:
        raise TypeError(f"cogview.ops.{op}: `k_cache`/`v_cache` must have the dtype of `word_embeddings` ({dtype}), "
                        f"got {k_cache.dtype} and {v_cache.dtype}")
    if places.dim() != 2 or places.shape[1] != hidden or places.dtype != dtype:
        raise ValueError(f"cogview.ops.{op}: `position_embeddings` must be [positions, {hidden}] of {dtype}, got "
                         f"{places.dtype} {tuple(places.shape)}")
    for name, value in (("first_weight", first_weight), ("first_bias", first_bias)):
        if value.shape != (hidden,) or value.dtype != dtype:
            raise ValueError(f"cogview.ops.{op}: `{name}` must be [{hidden}] of {dtype}, got {value.dtype} "
                             f"{tuple(value.shape)}")
    for name, ids, table in (("tokens", tokens, words), ("positions", positions, places)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]):
            raise ValueError(f"cogview.ops.{op}: `{name}` must lie in [0, {table.shape[0]}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
    up = layer_params[8]
    mlp = up.shape[0] if isinstance(up, torch.Tensor) and up.dim() == 2 else -1
    shapes = {0: (3 * hidden, hidden), 1: (3 * hidden,), 2: (hidden, hidden), 8: (mlp, hidden), 9: (mlp,),
              10: (hidden, mlp)}
    for i, value in enumerate(layer_params):
        _checks.tensor(op, f"layer_params[{i}]", value)
        if value.device != k_cache.device:
            raise ValueError(f"cogview.ops.{op}: `layer_params[{i}]` is on {value.device} but the cache is on "
                             f"{k_cache.device}")
        if value.dtype != dtype:
            raise TypeError(f"cogview.ops.{op}: `layer_params[{i}]` is {value.dtype} but `word_embeddings` is {dtype}")
        want = shapes.get(i % 16, (hidden,))
        if mlp < 1 or tuple(value.shape) != want:
            raise ValueError(f"cogview.ops.{op}: `layer_params[{i}]` ({SANDWICH_LAYER_PARAMS[i % 16]} of layer "
                             f"{i // 16}) must have shape {list(want)}, got {list(value.shape)}")
    _check_positions(op, "start", start, rows, k_cache.device)
    if not torch.compiler.is_compiling() and start.numel() and not k_cache.is_cuda:
        lo, hi = int(start.min()), int(start.max())
        if lo < 0 or hi + 1 > max_len:
            raise ValueError(f"cogview.ops.{op}: `start` in [{lo}, {hi}] overruns the cache (max_len {max_len})")


def _sandwich_settings(op, first_norm, layer_params, k_cache, num_heads, scale, eps, pb_relax, packed_weights):
    """The non-tensor checks of sandwich_decode_step -> (first_weight, first_bias, layer_params as a
    list, packed_weights as a list or None)."""
    layer_params = list(layer_params)
    if not isinstance(first_norm, (tuple, list)) or len(first_norm) != 2:
        raise TypeError(f"cogview.ops.{op}: `first_norm` must be a (weight, bias) pair")
    first_weight, first_bias = first_norm
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"cogview.ops.{op}: `num_heads` must be an int, got {type(num_heads).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"cogview.ops.{op}: `scale` must be a finite number, got {scale!r}")
    if not isinstance(pb_relax, bool) or isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"cogview.ops.{op}: `eps` must be a number and `pb_relax` a bool, got {eps!r}, {pb_relax!r}")
    if packed_weights is not None:
        packed_weights = list(packed_weights)
        layers = k_cache.shape[0] if isinstance(k_cache, torch.Tensor) and k_cache.dim() == 5 else -1
        if len(packed_weights) != 4 * layers or not all(isinstance(p, torch.Tensor) for p in packed_weights):
            raise ValueError(f"cogview.ops.{op}: `packed_weights` must hold 4 tensors per layer (qkv, dense, up, "
                             f"down; from pack_projection_weights), got {len(packed_weights)} items")
    return first_weight, first_bias, layer_params, packed_weights


def sandwich_decode_step(tokens, positions, start, *, word_embeddings, position_embeddings, first_norm,
                         layer_params, k_cache, v_cache, num_heads, scale, eps=1e-5, pb_relax=False,
                         packed_weights=None, packed_rows=0):
    """One cached decode step (one new token per row) through a whole stack of CogView's
    sandwich-LayerNorm layers, in one call; returns the final normed hidden state [rows, hidden].

    tokens, positions [rows, 1] int64; start [rows] int64: the cache slot of the new token (it
    attends to slots 0..start). first_norm: (weight, bias) of the first layer's input LayerNorm.
    layer_params: 16 tensors per layer, in the order of SANDWICH_LAYER_PARAMS (the last pair is the
    next layer's input LayerNorm, or the final LayerNorm after the last layer). k_cache, v_cache:
    [layers, rows, heads, max_len, head_dim], written in place. scale: the attention logit scale;
    eps/pb_relax: of every LayerNorm. The definition is `cogview.ops.reference.sandwich_decode_step`;
    the CPU kernel runs the same kernels as the per-op loop (same numbers) without the per-op cost.

    packed_weights (CPU kernel, float32, optional): `pack_projection_weights(layer_params, rows)`, the
    four projection weights of every layer pre-packed for MKL's sgemm for `packed_rows` rows, so that
    a step does not repack them (at a few rows that costs more than the product). The products then
    differ from the unpacked ones by rounding only. Ignored by the reference path.
    """
    op = "sandwich_decode_step"
    first_weight, first_bias, layer_params, packed_weights = _sandwich_settings(
        op, first_norm, layer_params, k_cache, num_heads, scale, eps, pb_relax, packed_weights)
    # (The lists are checked here too: one meta or CUDA tensor in them would send the call to another
    # dispatch key, e.g. the fake kernel, instead of failing.)
    if _checks.kernel_path(op, "tokens", tokens, positions=positions, start=start, word_embeddings=word_embeddings,
                           position_embeddings=position_embeddings, first_weight=first_weight,
                           first_bias=first_bias, k_cache=k_cache, v_cache=v_cache) \
            and tokens.is_cpu and all(isinstance(p, torch.Tensor) and p.is_cpu for p in layer_params) \
            and (packed_weights is None or all(p.is_cpu for p in packed_weights)):
        return torch.ops.cogview.sandwich_decode_step(tokens, positions, start, word_embeddings, position_embeddings,
                                                      first_weight, first_bias, layer_params, k_cache, v_cache,
                                                      int(num_heads), float(scale), float(eps), bool(pb_relax),
                                                      packed_weights, int(packed_rows))
    _check_sandwich(op, tokens, positions, start, word_embeddings, position_embeddings, first_weight, first_bias,
                    layer_params, k_cache, v_cache, num_heads, scale)
    return reference.sandwich_decode_step(tokens, positions, start, word_embeddings, position_embeddings,
                                          first_weight, first_bias, layer_params, k_cache, v_cache, int(num_heads),
                                          float(scale), float(eps), bool(pb_relax))


def bind_sandwich_decode_step(*, word_embeddings, position_embeddings, first_norm, layer_params, k_cache, v_cache,
                              num_heads, scale, eps=1e-5, pb_relax=False, packed_weights=None, packed_rows=0):
    """`sandwich_decode_step` with everything but the per-step inputs bound (same keyword arguments):
    returns step(tokens, positions, start) -> the final normed hidden state [rows, hidden].

    What is bound is checked here, once, so that a step on the CPU kernel checks only its own three
    tensors in Python: at a small model's decode step, looking over ~100 weight tensors per call
    costs a few percent of the step. The kernel itself still checks shapes, dtypes and every
    position on every call. Any other case (no CPU kernel, `force_reference()`, a bad argument)
    goes through `sandwich_decode_step`, with its checks and messages.
    """
    op = "sandwich_decode_step"
    first_weight, first_bias, layer_params, packed_weights = _sandwich_settings(
        op, first_norm, layer_params, k_cache, num_heads, scale, eps, pb_relax, packed_weights)
    bound = dict(word_embeddings=word_embeddings, position_embeddings=position_embeddings,
                 first_norm=(first_weight, first_bias), layer_params=layer_params, k_cache=k_cache, v_cache=v_cache,
                 num_heads=num_heads, scale=scale, eps=eps, pb_relax=pb_relax, packed_weights=packed_weights,
                 packed_rows=packed_rows)
    fixed = [word_embeddings, position_embeddings, first_weight, first_bias, k_cache, v_cache, *layer_params,
             *(packed_weights or [])]
    on_cpu = all(isinstance(t, torch.Tensor) and t.is_cpu for t in fixed)
    args = (word_embeddings, position_embeddings, first_weight, first_bias, layer_params, k_cache, v_cache,
            int(num_heads), float(scale), float(eps), bool(pb_relax), packed_weights, int(packed_rows))
    kernel = torch.ops.cogview.sandwich_decode_step.default

    def step(tokens, positions, start):
        if on_cpu and _checks.has_kernel(op, "cpu") and isinstance(tokens, torch.Tensor) and tokens.is_cpu \
                and isinstance(positions, torch.Tensor) and positions.is_cpu \
                and isinstance(start, torch.Tensor) and start.is_cpu:
            return kernel(tokens, positions, start, *args)
        return sandwich_decode_step(tokens, positions, start, **bound)

    return step


def pack_projection_weights(layer_params, rows: int):
    """MKL-packed copies of the four projection weights (qkv, dense, up, down) of every layer in
    `layer_params` (SANDWICH_LAYER_PARAMS order) for products of `rows` rows, for
    `sandwich_decode_step(packed_weights=..., packed_rows=rows)`; None where that cannot help (not
    float32 on the CPU, or a PyTorch without MKL)."""
    weights = [w for i, w in enumerate(layer_params) if i % 16 in (0, 2, 8, 10)]
    reorder = getattr(torch.ops.mkl, "_mkl_reorder_linear_weight", None) if torch.backends.mkl.is_available() else None
    if reorder is None or rows < 1 or any(w.dtype != torch.float32 or not w.is_cpu for w in weights):
        return None
    with torch.no_grad():
        return [reorder(w.detach().contiguous(), int(rows)) for w in weights]


# ---- fake (meta) implementations: shapes and dtypes only, for torch.compile and export ----


@torch.library.register_fake("cogview::kv_cache_write")
def _kv_cache_write_fake(k_cache, v_cache, k_new, v_new, start):
    return None


@torch.library.register_fake("cogview::decode_attention")
def _decode_attention_fake(q, k_cache, v_cache, lengths, scale, text_len, text_bias):
    return q.new_empty(q.shape)


@torch.library.register_fake("cogview::sandwich_decode_step")
def _sandwich_decode_step_fake(tokens, positions, start, word_embeddings, position_embeddings, first_weight,
                               first_bias, layer_params, k_cache, v_cache, num_heads, scale, eps=1e-5,
                               pb_relax=False, packed_weights=None, packed_rows=0):
    return word_embeddings.new_empty((tokens.shape[0], word_embeddings.shape[1]))

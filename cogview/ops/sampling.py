"""Fused token sampling: `sample_tokens` (vocab range, temperature, top-k, top-p and the draw in one
pass per row, with a counter-based random stream and no host synchronisation).

Definition (the CPU kernel, the CUDA kernel and `reference.sample_tokens` all compute this):

For each row r of `logits` [rows, V], over the allowed ids [lo, hi) (`vocab_range`, default all):

1. x = the logits as float32 (fp16/bf16/fp64 converted), NaN counted as -inf. The *canonical
   order* of ids is: larger x first, ties by lower id (-0 and +0 are equal). It decides which ids
   top-k and top-p keep.
2. temperature T (rounded to float32; 0 = greedy): with T == 0 the token is the first id in
   canonical order (the argmax, lowest id on ties); top_k/top_p are ignored.
   Otherwise s = x / T in float32, clamped to +-float32 max unless x is -inf (so a +inf logit
   acts as the largest finite one: all +inf ids share the probability equally).
3. top_k: keep the first top_k ids in canonical order. 0 = off; a top_k >= the range size keeps
   every id (documented clamping, same as 0). Negative values are an error.
4. softmax over the kept ids: w = exp(s - max s), computed in float64.
5. top_p (1.0 = off): with Z the sum of the kept w and the ids in canonical order, keep the
   shortest prefix whose sum reaches top_p * Z, INCLUDING the id that crosses it (an id is kept
   iff the sum of the w before it is < top_p * Z; the first id is always kept, so top_p = 0
   is greedy). Must lie in [0, 1].
6. Draw: renormalise the kept w; with u the row's uniform (below), the token is the first kept id
   in ASCENDING ID ORDER whose cumulative weight exceeds u * (total kept weight). Ids with zero
   weight (-inf logits) are never drawn.
A row with no allowed logit above -inf (all -inf or NaN) returns lo; if a bool tensor `invalid`
[rows] is given, invalid[r] is set to True for it (other entries are left as they are, so the
flag can accumulate over decoding steps).

Randomness: one uniform per row from Philox4x32-10 (csrc/ops/philox.h, `reference.philox4x32_10`):
key = (seed mod 2^32, seed >> 32), counter = (offset mod 2^32, offset >> 32, r mod 2^32, r >> 32),
u = (first output word) / 2^32, with seed and offset taken as uint64 (two's complement). The same
(seed, offset, row, logits) always gives the same token, whatever else is in the batch; advance
`offset` by one per decoding step. (The layout equals cuRAND's Philox state after
curand_init(seed, r, 4 * offset).) Sums are in float64 in every implementation, in the orders
above; kernel and reference can only disagree where u falls within rounding (~1e-16 relative) of a
cumulative boundary.

temperature, top_k and top_p may be Python numbers (same for every row) or tensors with one
element or one value per row; seed and offset may be Python ints or one-element integer tensors,
which may live on the logits' device (CUDA: read there, no host synchronisation, so the call can be
captured in a CUDA graph). Per-row parameter values held on the GPU cannot raise there: a row with a
negative or non-finite temperature, a negative top_k or a top_p outside [0, 1] returns lo and sets
invalid[row], like a row without finite logits.
"""
from __future__ import annotations

import math
import operator

import torch

from cogview.ops import _checks, reference
from cogview.ops._registry import has_kernel

__all__ = ["sample_tokens"]

_OP = "sample_tokens"
_INT64_MIN, _UINT64_END = -(2**63), 2**64
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _param_tensor(name: str, value: torch.Tensor, rows: int, logits: torch.Tensor, integral: bool) -> None:
    if integral:
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"cogview.ops.{_OP}: `{name}` must be an int or an integer tensor, got {value.dtype}")
    elif not value.dtype.is_floating_point:
        raise TypeError(f"cogview.ops.{_OP}: `{name}` must be a number or a floating-point tensor, got {value.dtype}")
    if value.numel() != 1 and tuple(value.shape) != (rows,):
        raise ValueError(f"cogview.ops.{_OP}: `{name}` must have one element or shape ({rows},), got "
                         f"{tuple(value.shape)}")
    if value.device != logits.device and not (value.device.type == "cpu" and value.numel() == 1):
        raise ValueError(f"cogview.ops.{_OP}: `{name}` is on {value.device} but `logits` is on {logits.device}")


def _check_param_values(temperature, top_k, top_p) -> None:
    """Value checks of tensor parameters for the reference path (CPU tensors only: reading a
    device tensor would synchronise). The kernels check their own."""
    if torch.compiler.is_compiling():
        return
    checks = (
        ("temperature", temperature, lambda t: bool((torch.isfinite(t) & (t >= 0)).all()), "finite and >= 0"),
        ("top_k", top_k, lambda t: bool((t >= 0).all()), ">= 0 (0 = off)"),
        ("top_p", top_p, lambda t: bool(((t >= 0) & (t <= 1)).all()), "in [0, 1]"),
    )
    for name, value, ok, what in checks:
        if isinstance(value, torch.Tensor) and value.device.type == "cpu" and not ok(value):
            raise ValueError(f"cogview.ops.{_OP}: every `{name}` must be {what}, got {value.tolist()}")


def _seed_like(name: str, value, logits: torch.Tensor):
    """A Python int (as a signed int64) or a one-element integer tensor."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"cogview.ops.{_OP}: `{name}` must be an int or an integer tensor, got {value.dtype}")
        if value.numel() != 1:
            raise ValueError(f"cogview.ops.{_OP}: `{name}` must have exactly one element, got shape "
                             f"{tuple(value.shape)}")
        if value.device != logits.device and value.device.type != "cpu":
            raise ValueError(f"cogview.ops.{_OP}: `{name}` is on {value.device} but `logits` is on {logits.device}")
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"cogview.ops.{_OP}: `{name}` must be an int or a one-element integer tensor, got "
                        f"{type(value).__name__}")
    if not _INT64_MIN <= value < _UINT64_END:
        raise ValueError(f"cogview.ops.{_OP}: `{name}` must fit in 64 bits, got {value}")
    return value - _UINT64_END if value >= 2**63 else value


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    vocab_range: tuple[int, int] | None = None,
    seed,
    offset=0,
    invalid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample one token id per row of `logits` [rows, V]; returns int64 [rows].

    Keep ids in `vocab_range` [lo, hi) -> divide by `temperature` (0 = argmax) -> keep the `top_k`
    largest (0 = off; larger than the range = off) -> softmax -> keep the smallest most-probable
    set reaching `top_p` including the crossing token (1.0 = off) -> renormalise -> draw with the
    counter-based uniform of (`seed`, `offset`, row). The exact definition (orders, rounding, the
    random stream) is in this module's docstring. Rows with no finite allowed logit return lo and
    set `invalid[row] = True` when a bool tensor `invalid` [rows] is given.
    """
    if (type(temperature) is float and type(top_k) is int and -2**62 < top_k < 2**62 and type(top_p) is float
            and vocab_range is None
            and isinstance(logits, torch.Tensor) and isinstance(seed, torch.Tensor)
            and isinstance(offset, torch.Tensor) and (invalid is None or isinstance(invalid, torch.Tensor))
            and seed.device.type in ("cpu", logits.device.type) and offset.device.type in ("cpu", logits.device.type)
            and has_kernel(_OP, logits.device.type)):
        # Kernel fast path (a decoding loop's call: plain-number settings, tensor seed/offset): the op
        # checks shapes, dtypes and values itself, with the same messages, so that one call costs little
        # more than the kernel. Checked here only what the op cannot see: the seed/offset devices.
        if (seed.device != logits.device and seed.device.type != "cpu") or (
                offset.device != logits.device and offset.device.type != "cpu"):
            raise ValueError(f"cogview.ops.{_OP}: `seed`/`offset` must be on the CPU or on {logits.device}")
        return torch.ops.cogview.sample_tokens(logits, seed, offset, None, None, None, temperature, top_k, top_p,
                                               0, -1, invalid)
    _checks.tensor(_OP, "logits", logits)
    if logits.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"cogview.ops.{_OP}: `logits` must be float32, float16, bfloat16 or float64, got "
                        f"{logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"cogview.ops.{_OP}: `logits` must be [rows, vocab], got shape {tuple(logits.shape)}")
    rows, vocab = logits.shape
    if vocab == 0:
        raise ValueError(f"cogview.ops.{_OP}: `logits` needs a vocabulary of at least one id, got shape "
                         f"{tuple(logits.shape)}")
    if vocab_range is None:
        lo, hi = 0, vocab
    else:
        try:  # ints (also numpy or 0-d integer tensor ones); floats are refused, not truncated
            lo, hi = (operator.index(v) for v in vocab_range)
        except (TypeError, ValueError):
            raise TypeError(f"cogview.ops.{_OP}: `vocab_range` must be None or a pair of ints (lo, hi), got "
                            f"{vocab_range!r}") from None
        if not 0 <= lo < hi <= vocab:
            raise ValueError(f"cogview.ops.{_OP}: `vocab_range` ({lo}, {hi}) must satisfy 0 <= lo < hi <= "
                             f"vocab size {vocab}")

    scalars = {}
    tensors = {}
    for name, value, integral in (("temperature", temperature, False), ("top_k", top_k, True),
                                  ("top_p", top_p, False)):
        if isinstance(value, torch.Tensor):
            _param_tensor(name, value, rows, logits, integral)
            tensors[name] = value
        elif integral and not (isinstance(value, int) and not isinstance(value, bool)):
            raise TypeError(f"cogview.ops.{_OP}: `{name}` must be an int or an integer tensor, got "
                            f"{type(value).__name__}")
        elif not integral and not _is_number(value):
            raise TypeError(f"cogview.ops.{_OP}: `{name}` must be a number or a floating-point tensor, got "
                            f"{type(value).__name__}")
        else:
            scalars[name] = value
    t_value = float(scalars.get("temperature", 1.0))
    k_value = min(int(scalars.get("top_k", 0)), 2**63 - 1)  # beyond any range size: keeps every id either way
    p_value = float(scalars.get("top_p", 1.0))
    if not (math.isfinite(t_value) and 0 <= t_value <= _FLOAT32_MAX):
        raise ValueError(f"cogview.ops.{_OP}: `temperature` must be finite and >= 0, got {temperature!r}")
    if k_value < 0:
        raise ValueError(f"cogview.ops.{_OP}: `top_k` must be >= 0 (0 = off), got {top_k!r}")
    if not 0.0 <= p_value <= 1.0:
        raise ValueError(f"cogview.ops.{_OP}: `top_p` must lie in [0, 1], got {top_p!r}")
    seed = _seed_like("seed", seed, logits)
    offset = _seed_like("offset", offset, logits)
    if invalid is not None:
        _checks.tensor(_OP, "invalid", invalid)
        if invalid.dtype != torch.bool or tuple(invalid.shape) != (rows,):
            raise ValueError(f"cogview.ops.{_OP}: `invalid` must be a bool tensor of shape ({rows},), got "
                             f"{invalid.dtype} {tuple(invalid.shape)}")
        _checks.same_device(_OP, "logits", logits, invalid=invalid)
        if rows > 1 and invalid.stride(0) == 0:
            raise ValueError(f"cogview.ops.{_OP}: `invalid` is written in place but its elements share memory "
                             f"(an expanded view?)")

    if has_kernel(_OP, logits.device.type):
        if not isinstance(seed, torch.Tensor):
            seed = torch.scalar_tensor(seed, dtype=torch.int64)
        if not isinstance(offset, torch.Tensor):
            offset = torch.scalar_tensor(offset, dtype=torch.int64)
        return torch.ops.cogview.sample_tokens(
            logits, seed, offset, tensors.get("temperature"), tensors.get("top_k"), tensors.get("top_p"),
            t_value, k_value, p_value, lo, hi, invalid,
        )
    _check_param_values(temperature, top_k, top_p)
    return reference.sample_tokens(logits, temperature=temperature, top_k=tensors.get("top_k", k_value), top_p=top_p,
                                   vocab_range=(lo, hi), seed=seed, offset=offset, invalid=invalid)


@torch.library.register_fake("cogview::sample_tokens")
def _sample_tokens_fake(logits, seed, offset, temperature=None, top_k=None, top_p=None, temperature_value=1.0,
                        top_k_value=0, top_p_value=1.0, vocab_lo=0, vocab_hi=-1, invalid=None):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)

"""Fuzzing every public op of cogview.ops with malformed inputs (issue 14).

Each hypothesis test draws one *fault* per example (or none) plus layouts (contiguous, transposed,
strided, expanded/overlapping), dtypes and special values (NaN, +-inf, huge), builds the call from a
seed, and runs it twice: through the op's kernel and through its reference twin
(`cogview.ops.force_reference()`). The contract:

- a malformed call raises ValueError or TypeError (RuntimeError only from the dispatcher's own
  argument parsing) whose message names the argument, on both paths, and leaves in-place outputs
  untouched;
- a well-formed call, however odd its layout or values, returns on both paths, and the results
  agree: the same entries are finite, and finite entries agree within a few rounding units (the
  precision contract itself is tested in each op's own file; this is the "no silent garbage" check);
- nothing crashes, and nothing materialises a huge expanded view: sizes past 2^31 are built as
  expanded or strided views of a few elements, and the kernels must not copy them whole.

The last test calls torch.ops.cogview.* directly with arguments the Python wrappers would refuse,
so that the C++ checks (csrc/ops/*_checks.h) are exercised too: under the sanitizer build
(`make sanitize-check`) that is where undefined behaviour would show.
"""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import cogview.ops as ops
from cogview.ops import reference
from cogview.ops._registry import PUBLIC_OPS

BIG = 2**31 + 7  # past int32 (and uint32 for the products below)
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Relative agreement of kernel and reference, in units of the output's magnitude (loose: this is the
# garbage check, not the precision test).
AGREE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
_NAMED = re.compile(r"`[\w\[\]]+`|argument '\w+'")

FUZZED = {"layer_norm", "add_layer_norm", "kv_cache_write", "decode_attention", "sample_tokens", "local_attention",
          "sandwich_decode_step", "gelu_tanh", "linear"}


def test_every_public_op_is_fuzzed():
    assert set(PUBLIC_OPS) == FUZZED, "a public op was added: give it a fuzz test here"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _outcome(call):
    """('ok', result) or ('error', exception) for a clean error; anything else fails the test."""
    try:
        return "ok", call()
    except (ValueError, TypeError, RuntimeError) as error:
        message = str(error)
        if isinstance(error, RuntimeError) and "argument '" not in message:
            raise AssertionError(f"a RuntimeError that is not an argument error: {message}") from error
        assert _NAMED.search(message), f"the error does not name the argument: {type(error).__name__}: {message}"
        return "error", error


def _both(make, *, reference_too: bool = True):
    """Run `make()` (which builds fresh inputs and calls the op) on the kernel path and, when asked, on
    the reference path; the two must agree on raising. Returns the two outcomes."""
    kernel = _outcome(make)
    if not reference_too:
        return kernel, None
    with ops.force_reference():
        ref = _outcome(make)
    assert kernel[0] == ref[0], (
        f"kernel path: {kernel[0]} ({kernel[1]!r:.200}), reference path: {ref[0]} ({ref[1]!r:.200})")
    return kernel, ref


def _agree(got: torch.Tensor, want: torch.Tensor, what: str = "output") -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    g, w = got.double(), want.double()
    finite = torch.isfinite(w)
    assert torch.equal(torch.isfinite(g), finite), f"{what}: finite entries differ (kernel vs reference)"
    if finite.any():
        scale = max(1.0, float(w[finite].abs().max()))
        err = float((g[finite] - w[finite]).abs().max())
        assert err <= AGREE[got.dtype] * scale, f"{what}: kernel and reference differ by {err:.3g} ({got.dtype})"


def _values(seed: int, shape, dtype, specials: bool, big: bool = True) -> torch.Tensor:
    """Normal values; with `specials`, a few NaN, +-inf and (with `big`) large ones at random places."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
    if specials and x.numel():
        flat = x.view(-1)
        for value in (float("nan"), float("inf"), float("-inf"), 3e4 if big else 2.0):
            if torch.rand((), generator=gen) < 0.4:
                flat[torch.randint(0, flat.numel(), (), generator=gen)] = value
    return x.to(dtype)


def _tensor(seed, shape, dtype, layout: str, specials: bool = False, expand_dims=(), big: bool = True) -> torch.Tensor:
    """Values of `shape` in a layout: contiguous, transposed (last two dims), strided (every other
    element along the last dim) or expanded (the dims in `expand_dims` broadcast from size 1)."""
    shape = tuple(shape)
    if layout == "expanded" and expand_dims:
        base = tuple(1 if i in expand_dims else s for i, s in enumerate(shape))
        return _values(seed, base, dtype, specials, big).expand(shape)
    x = _values(seed, shape, dtype, specials, big)
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided" and x.dim() >= 1:
        spread = x.new_zeros(*shape[:-1], 2 * shape[-1])
        spread[..., ::2] = x
        return spread[..., ::2]
    return x


LAYOUTS = st.sampled_from(["contiguous", "transposed", "strided", "expanded"])


# ---------------------------------------------------------------------------------------------
# layer_norm / add_layer_norm
# ---------------------------------------------------------------------------------------------

LN_FAULTS = ["none", "none", "none", "rows0", "huge_hidden_no_rows", "x_rank0", "hidden0", "weight_len",
             "weight_rank", "weight_int", "weight_other_float", "x_int", "x_complex", "eps_nan", "eps_negative",
             "eps_inf", "eps_str", "weight_meta", "weight_list", "x_list", "residual_shape", "residual_f64_mix",
             "next_alone", "residual_int"]
LN_VALID = {"none", "rows0", "huge_hidden_no_rows"}


@given(seed=st.integers(0, 2**31 - 1), fault=st.sampled_from(LN_FAULTS), fused=st.booleans(),
       dtype=st.sampled_from(FLOATS), param_f32=st.booleans(), layout=LAYOUTS, specials=st.booleans(),
       lead=st.lists(st.integers(1, 4), min_size=0, max_size=2), hidden=st.integers(1, 40),
       pb_relax=st.booleans(), with_next=st.booleans())
def test_layer_norm_fuzz(seed, fault, fused, dtype, param_f32, layout, specials, lead, hidden, pb_relax,
                         with_next):
    if fault.startswith("residual") or fault == "next_alone":
        fused = True
    assume(fault != "huge_hidden_no_rows" or ops.has_kernel("layer_norm", "cpu"))
    shape = (*lead, hidden)
    if fault == "rows0":
        shape = (0, *shape)
    pdtype = torch.float32 if param_f32 else dtype
    expand = tuple(range(len(shape) - 1))  # leading dims only: a constant row is ill-conditioned

    def make():
        if fault == "huge_hidden_no_rows":
            x = torch.empty(0, BIG, dtype=dtype)
            w = torch.ones(1, dtype=pdtype).expand(BIG)
            b = torch.zeros(1, dtype=pdtype).expand(BIG)
        else:
            x = _tensor(seed, shape, dtype, layout, specials, expand)
            w = _tensor(seed + 1, (hidden,), pdtype, "strided" if layout == "strided" else "contiguous")
            b = _tensor(seed + 2, (hidden,), pdtype, "contiguous")
        eps = 1e-5
        if fault == "x_rank0":
            x = torch.tensor(1.0, dtype=dtype)
        elif fault == "hidden0":
            x = torch.empty(*lead, 0, dtype=dtype)
        elif fault == "weight_len":
            w = torch.ones(hidden + 1, dtype=pdtype)
        elif fault == "weight_rank":
            w = w[None]
        elif fault == "weight_int":
            w = torch.ones(hidden, dtype=torch.int32)
        elif fault == "weight_other_float":
            w = w.to(torch.float16 if dtype != torch.float16 else torch.bfloat16)
        elif fault == "x_int":
            x = torch.ones(shape, dtype=torch.int64)
        elif fault == "x_complex":
            x = torch.ones(shape, dtype=torch.complex64)
        elif fault.startswith("eps"):
            eps = {"eps_nan": float("nan"), "eps_negative": -1e-3, "eps_inf": float("inf"), "eps_str": "1e-5"}[fault]
        elif fault == "weight_meta":
            w = w.to("meta")
        elif fault == "weight_list":
            w = w.tolist()
        elif fault == "x_list":
            x = x.tolist()
        if not fused:
            return ops.layer_norm(x, w, b, eps=eps, pb_relax=pb_relax)
        residual = _tensor(seed + 3, x.shape, dtype, "contiguous", specials) if isinstance(x, torch.Tensor) else x
        nw, nb = (w, b) if with_next else (None, None)
        if fault == "residual_shape":
            residual = torch.ones(*shape[:-1], hidden + 1, dtype=dtype)
        elif fault == "residual_f64_mix":
            residual = residual.to(torch.float32 if dtype == torch.float64 else torch.float64)
        elif fault == "next_alone":
            nw, nb = w, None
        elif fault == "residual_int":
            residual = torch.ones(shape, dtype=torch.int32)
        return ops.add_layer_norm(residual, x, w, b, nw, nb, eps=eps, pb_relax=pb_relax)

    kernel, ref = _both(make, reference_too=fault != "huge_hidden_no_rows")
    assert kernel[0] == ("ok" if fault in LN_VALID else "error"), (fault, kernel)
    if kernel[0] == "ok" and ref is not None:
        if fused:
            _agree(kernel[1][0], ref[1][0], "new_residual")
            assert (kernel[1][1] is None) == (ref[1][1] is None)
            if kernel[1][1] is not None:
                _agree(kernel[1][1], ref[1][1], "normed")
        else:
            _agree(kernel[1], ref[1])


# ---------------------------------------------------------------------------------------------
# gelu_tanh
# ---------------------------------------------------------------------------------------------

GELU_FAULTS = ["none", "none", "none", "empty", "huge_empty", "rank0", "x_int", "x_bool", "x_complex", "x_list",
               "x_none", "x_meta"]
GELU_VALID = {"none", "empty", "huge_empty", "rank0", "x_meta"}


@given(seed=st.integers(0, 2**31 - 1), fault=st.sampled_from(GELU_FAULTS), dtype=st.sampled_from(FLOATS),
       layout=LAYOUTS, specials=st.booleans(), shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       backward=st.booleans())
def test_gelu_tanh_fuzz(seed, fault, dtype, layout, specials, shape, backward):
    def make():
        x = _tensor(seed, shape, dtype, layout, specials, (0,))
        if fault == "empty":
            x = x[..., :0]
        elif fault == "huge_empty":  # 0 x 2^31+7 elements: nothing to do, nothing to allocate
            x = torch.zeros(0, 1, dtype=dtype).expand(0, BIG)
        elif fault == "rank0":
            x = x.reshape(-1)[0]
        elif fault == "x_int":
            x = torch.ones(shape, dtype=torch.int64)
        elif fault == "x_bool":
            x = torch.ones(shape, dtype=torch.bool)
        elif fault == "x_complex":
            x = torch.ones(shape, dtype=torch.complex64)
        elif fault == "x_list":
            x = x.tolist()
        elif fault == "x_none":
            x = None
        elif fault == "x_meta":
            x = torch.empty(shape, dtype=dtype, device="meta")
        if backward and fault in ("none", "rank0") and dtype != torch.float16:
            x = x.detach().requires_grad_()
            out = ops.gelu_tanh(x)
            (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
            return out.detach(), grad
        return ops.gelu_tanh(x), None

    kernel, ref = _both(make)
    assert (kernel[0] == "ok") == (fault in GELU_VALID), (fault, kernel)
    if kernel[0] == "ok" and fault != "x_meta":
        _agree(kernel[1][0], ref[1][0])
        if kernel[1][1] is not None:
            _agree(kernel[1][1], ref[1][1], "grad")


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------

LIN_FAULTS = ["none", "none", "none", "rows0", "out0", "in0", "x_rank0", "x_int", "x_list", "weight_int",
              "weight_other_float", "weight_rank", "in_mismatch", "bias_len", "bias_rank", "bias_other_float",
              "activation_bad", "activation_int", "weight_meta", "all_meta"]
LIN_VALID = {"none", "rows0", "out0", "in0", "all_meta"}


@given(seed=st.integers(0, 2**31 - 1), fault=st.sampled_from(LIN_FAULTS), dtype=st.sampled_from(FLOATS),
       layout=LAYOUTS, specials=st.booleans(), lead=st.lists(st.integers(1, 40), min_size=1, max_size=2),
       features=st.sampled_from([1, 7, 32, 64, 96]), out=st.sampled_from([1, 5, 32, 64]), bias=st.booleans(),
       gelu=st.booleans())
def test_linear_fuzz(seed, fault, dtype, layout, specials, lead, features, out, bias, gelu):
    activation = "gelu_tanh" if gelu else "none"

    def make():
        rows = 0 if fault == "rows0" else lead[-1]
        n_in = 0 if fault == "in0" else features
        n_out = 0 if fault == "out0" else out
        x = _tensor(seed, [*lead[:-1], rows, n_in], dtype, layout, specials, (0,))
        w = _tensor(seed + 1, [n_out, n_in], dtype, layout) / max(1, n_in) ** 0.5
        b = _tensor(seed + 2, [n_out], dtype, "contiguous") if bias else None
        act = activation
        if fault == "x_rank0":
            x = x.reshape(-1)[0] if x.numel() else torch.tensor(1.0, dtype=dtype)
        elif fault == "x_int":
            x = torch.ones(*lead, n_in, dtype=torch.int64)
        elif fault == "x_list":
            x = x.tolist()
        elif fault == "weight_int":
            w = torch.ones(n_out, n_in, dtype=torch.int64)
        elif fault == "weight_other_float":
            w = w.to(torch.float64 if dtype != torch.float64 else torch.float32)
        elif fault == "weight_rank":
            w = w.reshape(-1)
        elif fault == "in_mismatch":
            w = torch.ones(n_out, n_in + 1, dtype=dtype)
        elif fault == "bias_len":
            b = torch.ones(n_out + 1, dtype=dtype)
        elif fault == "bias_rank":
            b = torch.ones(1, n_out, dtype=dtype)
        elif fault == "bias_other_float":
            b = torch.ones(n_out, dtype=torch.float64 if dtype != torch.float64 else torch.float32)
        elif fault == "activation_bad":
            act = "relu"
        elif fault == "activation_int":
            act = 1
        elif fault == "weight_meta":
            w = torch.empty(n_out, n_in, dtype=dtype, device="meta")
        elif fault == "all_meta":
            x, w = x.to("meta"), w.to("meta")
            b = None if b is None else b.to("meta")
        return ops.linear(x, w, b, act)

    kernel, ref = _both(make)
    assert (kernel[0] == "ok") == (fault in LIN_VALID), (fault, kernel)
    if kernel[0] == "ok" and fault != "all_meta":
        _agree(kernel[1], ref[1])


# ---------------------------------------------------------------------------------------------
# kv_cache_write
# ---------------------------------------------------------------------------------------------

KV_FAULTS = ["none", "none", "none", "n0", "batch0", "start_negative", "start_overrun", "start_int64_max",
             "start_int64_min", "start_float", "start_int16", "start_shape", "start_list", "new_too_long",
             "new_heads", "new_dim", "new_rank", "v_new_shape", "cache_rank", "cache_int", "v_cache_dtype",
             "v_cache_shape", "expanded_cache", "same_cache", "new_meta", "n0_bad_start", "start_int32",
             "huge_max_len"]
KV_VALID = {"none", "n0", "batch0", "start_int32"}


@given(seed=st.integers(0, 2**31 - 1), fault=st.sampled_from(KV_FAULTS), cache_dtype=st.sampled_from(FLOATS),
       new_dtype=st.sampled_from(FLOATS), cache_layout=st.sampled_from(["contiguous", "transposed", "strided"]),
       new_layout=LAYOUTS, batch=st.integers(1, 3), heads=st.integers(1, 3), max_len=st.integers(1, 9),
       dim=st.integers(1, 9), n=st.integers(1, 4), specials=st.booleans())
def test_kv_cache_write_fuzz(seed, fault, cache_dtype, new_dtype, cache_layout, new_layout, batch, heads, max_len,
                             dim, n, specials):
    n = min(n, max_len)
    if fault in ("n0", "n0_bad_start"):
        n = 0
    if fault == "batch0":
        batch = 0
    caches = {}

    def make():
        k_cache = _tensor(seed, (batch, heads, max_len, dim), cache_dtype, cache_layout)
        v_cache = _tensor(seed + 1, (batch, heads, max_len, dim), cache_dtype, cache_layout)
        new_shape = (batch, heads, n, dim)
        k_new = _tensor(seed + 2, new_shape, new_dtype, new_layout, specials, (0, 1, 2))
        v_new = _tensor(seed + 3, new_shape, new_dtype, new_layout, specials, (1,))
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(0, max_len - n + 1, (batch,), generator=gen)
        if fault == "start_negative":
            start[0] = -1
        elif fault == "start_overrun":
            start[-1] = max_len - n + 1
        elif fault == "start_int64_max":
            start[0] = 2**63 - 1
        elif fault == "start_int64_min":
            start[0] = -(2**63)
        elif fault == "start_float":
            start = start.float()
        elif fault == "start_int16":
            start = start.to(torch.int16)
        elif fault == "start_int32":
            start = start.to(torch.int32)
        elif fault == "start_shape":
            start = start[None]
        elif fault == "start_list":
            start = start.tolist()
        elif fault == "n0_bad_start":
            start[0] = max_len + 1
        elif fault == "new_too_long":
            k_new = v_new = torch.zeros(batch, heads, max_len + 1, dim)
        elif fault == "new_heads":
            k_new = torch.zeros(batch, heads + 1, n, dim)
        elif fault == "new_dim":
            v_new = torch.zeros(batch, heads, n, dim + 1)
        elif fault == "new_rank":
            k_new = k_new[0]
        elif fault == "v_new_shape":
            v_new = torch.zeros(batch, heads, n + 1, dim)
        elif fault == "cache_rank":
            k_cache = k_cache[0]
        elif fault == "cache_int":
            k_cache = torch.zeros(batch, heads, max_len, dim, dtype=torch.int32)
        elif fault == "v_cache_dtype":
            v_cache = v_cache.to(torch.float64 if cache_dtype != torch.float64 else torch.float32)
        elif fault == "v_cache_shape":
            v_cache = torch.zeros(batch, heads, max_len + 1, dim, dtype=cache_dtype)
        elif fault == "expanded_cache":
            k_cache = torch.zeros(1, 1, 1, 1, dtype=cache_dtype).expand(batch, heads, max(max_len, 2), dim)
        elif fault == "same_cache":
            v_cache = k_cache
        elif fault == "new_meta":
            v_new = v_new.to("meta")
        elif fault == "huge_max_len":  # positions past 2^31 in a cache of a few elements: overlapping, refused
            k_cache = torch.zeros(batch * heads * dim, dtype=cache_dtype).as_strided(
                (batch, heads, BIG, dim), (heads * dim, dim, 0, 1))
            v_cache = torch.zeros(batch * heads * dim, dtype=cache_dtype).as_strided(
                (batch, heads, BIG, dim), (heads * dim, dim, 0, 1))
            start = torch.full((batch,), BIG - n)
            k_new = k_new[:, :, :1].expand(batch, heads, n, dim)  # every written position is one element
            v_new = v_new[:, :, :1].expand(batch, heads, n, dim)
        before = (k_cache.clone(), v_cache.clone()) if isinstance(k_cache, torch.Tensor) and k_cache.numel() < 10**6 \
            else None
        caches["last"] = (k_cache, v_cache, before, k_new, v_new)
        ops.kv_cache_write(k_cache, v_cache, k_new, v_new, start)
        return k_cache, v_cache

    kernel = _outcome(make)
    k_kernel = caches["last"]
    if kernel[0] == "error" and k_kernel[2] is not None:
        assert torch.equal(k_kernel[0], k_kernel[2][0]) and torch.equal(k_kernel[1], k_kernel[2][1]), \
            "a refused write changed the caches"
    with ops.force_reference():
        ref = _outcome(make)
    assert kernel[0] == ref[0], (fault, kernel, ref)
    assert kernel[0] == ("ok" if fault in KV_VALID else "error"), (fault, kernel)
    if kernel[0] == "ok":
        for got, want in zip(kernel[1], ref[1]):
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


# ---------------------------------------------------------------------------------------------
# decode_attention
# ---------------------------------------------------------------------------------------------

DA_FAULTS = ["none", "none", "none", "lengths_below_n", "lengths_above_max", "lengths_int64_min",
             "lengths_int64_max", "lengths_float", "lengths_shape", "q_heads", "q_dim", "q_batch", "q_rank",
             "q_int", "scale_nan", "scale_inf", "scale_str", "scale_bool", "text_bias_inf", "text_bias_str",
             "text_len_float", "text_len_huge", "text_len_negative", "cache_dtypes_differ", "head_dim0",
             "head_dim0_scale", "batch0", "heads0", "n0", "huge_cache", "lengths_meta", "stale_beyond_lengths"]
DA_VALID = {"none", "text_len_huge", "text_len_negative", "head_dim0_scale", "batch0", "heads0", "n0",
            "huge_cache", "stale_beyond_lengths"}


@given(seed=st.integers(0, 2**31 - 1), fault=st.sampled_from(DA_FAULTS), q_dtype=st.sampled_from(FLOATS),
       cache_dtype=st.sampled_from(FLOATS), layout=LAYOUTS, batch=st.integers(1, 3), heads=st.integers(1, 3),
       max_len=st.integers(1, 40), dim=st.integers(1, 20), n=st.integers(1, 3), specials=st.booleans(),
       text_len=st.integers(-2, 45), text_bias=st.sampled_from([0.0, 1.5, -3.0]))
def test_decode_attention_fuzz(seed, fault, q_dtype, cache_dtype, layout, batch, heads, max_len, dim, n, specials,
                               text_len, text_bias):
    n = min(n, max_len)
    assume(fault != "huge_cache" or ops.has_kernel("decode_attention", "cpu"))  # the reference builds dense logits
    if fault in ("head_dim0", "head_dim0_scale"):
        dim = 0
    batch = 0 if fault == "batch0" else batch
    heads = 0 if fault == "heads0" else heads
    if fault == "n0":
        n = 0

    calls = {}

    def make():
        gen = torch.Generator().manual_seed(seed)
        # Specials in q and k only: a NaN value row seen by a later new query reaches the earlier ones
        # through the reference's dense matmul (0 * NaN), which the kernel rightly skips.
        q = _tensor(seed, (batch, heads, n, dim), q_dtype, layout, specials, (0, 1), big=False)
        k = _tensor(seed + 1, (batch, heads, max_len, dim), cache_dtype, layout, specials, (0, 1), big=False)
        v = _tensor(seed + 2, (batch, heads, max_len, dim), cache_dtype, layout, False, (0,))
        lengths = torch.randint(n, max_len + 1, (batch,), generator=gen)
        kw = dict(text_len=text_len, text_bias=text_bias)
        if fault == "lengths_below_n":
            lengths[0] = n - 1
        elif fault == "lengths_above_max":
            lengths[-1] = max_len + 1
        elif fault == "lengths_int64_min":
            lengths[0] = -(2**63)
        elif fault == "lengths_int64_max":
            lengths[0] = 2**63 - 1
        elif fault == "lengths_float":
            lengths = lengths.double()
        elif fault == "lengths_shape":
            lengths = lengths[:, None]
        elif fault == "lengths_meta":
            lengths = lengths.to("meta")
        elif fault == "q_heads":
            q = torch.zeros(batch, heads + 1, n, dim, dtype=q_dtype)
        elif fault == "q_dim":
            q = torch.zeros(batch, heads, n, dim + 1, dtype=q_dtype)
        elif fault == "q_batch":
            q = torch.zeros(batch + 1, heads, n, dim, dtype=q_dtype)
        elif fault == "q_rank":
            q = q[0]
        elif fault == "q_int":
            q = torch.zeros(batch, heads, n, dim, dtype=torch.int64)
        elif fault.startswith("scale"):
            kw["scale"] = {"scale_nan": float("nan"), "scale_inf": float("inf"), "scale_str": "0.5",
                           "scale_bool": True}[fault]
        elif fault == "text_bias_inf":
            kw["text_bias"] = float("-inf")
        elif fault == "text_bias_str":
            kw["text_bias"] = "1"
        elif fault == "text_len_float":
            kw["text_len"] = 2.5
        elif fault == "text_len_huge":
            kw["text_len"] = 2**70
        elif fault == "text_len_negative":
            kw["text_len"] = -(2**70)
        elif fault == "cache_dtypes_differ":
            v = v.to(torch.float64 if cache_dtype != torch.float64 else torch.float32)
        elif fault == "head_dim0_scale":
            kw["scale"] = 0.5
        elif fault == "huge_cache":  # BIG positions, a few elements of memory; only the first lengths are read
            k, v = _huge_cache(seed, batch, heads, dim, cache_dtype, layout)
            lengths = lengths.clamp(max=40)
        elif fault == "stale_beyond_lengths":  # garbage where no query looks must not matter
            k, v = k.clone(), v.clone()
            for b in range(batch):
                k[b, :, lengths[b]:] = float("nan")
                v[b, :, lengths[b]:] = float("inf")
        calls["lengths"] = lengths
        return ops.decode_attention(q, k, v, lengths, **kw)

    kernel, ref = _both(make, reference_too=fault != "huge_cache")
    assert kernel[0] == ("ok" if fault in DA_VALID else "error"), (fault, kernel)
    if fault == "huge_cache":  # the reference on the positions that can be seen (it builds dense logits)
        k, v = _huge_cache(seed, batch, heads, dim, cache_dtype, layout)
        q = _tensor(seed, (batch, heads, n, dim), q_dtype, layout, specials, (0, 1), big=False)
        with ops.force_reference():
            want = ops.decode_attention(q, k[:, :, :40], v[:, :, :40], calls["lengths"], text_len=text_len,
                                        text_bias=text_bias)
        _agree(kernel[1], want)
    elif kernel[0] == "ok":
        _agree(kernel[1], ref[1])


def _huge_cache(seed, batch, heads, dim, dtype, layout):
    """[batch, heads, BIG, dim] caches over a few elements: stride 0 along positions (and, for the
    "strided" layout, along head_dim too, which the kernel must copy without copying BIG positions)."""
    if layout == "strided":
        k = _values(seed + 5, (1, 1, 1, 1), dtype, False).expand(batch, heads, BIG, dim)
    else:
        k = _values(seed + 5, (batch, heads, 1, dim), dtype, False).expand(batch, heads, BIG, dim)
    v = _values(seed + 6, (batch, heads, dim), dtype, False).as_strided(
        (batch, heads, BIG, dim), (heads * dim, dim, 0, 1))
    return k, v


# ---------------------------------------------------------------------------------------------
# sample_tokens
# ---------------------------------------------------------------------------------------------

ST_FAULTS = ["none", "none", "none", "none", "range_reversed", "range_negative", "range_past_vocab",
             "range_floats", "range_three", "range_str", "logits_rank", "logits_int", "vocab0", "rows0",
             "temperature_negative", "temperature_nan", "temperature_inf", "temperature_tensor_nan",
             "temperature_tensor_int", "temperature_tensor_shape", "top_k_negative", "top_k_tensor_negative",
             "top_k_float", "top_k_huge", "top_p_nan", "top_p_above", "top_p_tensor_below", "seed_float",
             "seed_past_64_bits", "seed_two_elements", "seed_float_tensor", "offset_past_64_bits",
             "invalid_shape", "invalid_int", "invalid_expanded", "huge_vocab_range", "huge_vocab_no_range",
             "all_masked"]
ST_VALID = {"none", "rows0", "top_k_huge", "huge_vocab_range", "all_masked"}


@given(seed=st.integers(0, 2**31 - 1), fault=st.sampled_from(ST_FAULTS), dtype=st.sampled_from(FLOATS),
       layout=LAYOUTS, rows=st.integers(1, 5), vocab=st.integers(1, 70), specials=st.booleans(),
       temperature=st.sampled_from([0.0, 0.7, 1.0, 1e-30, 3e38]), top_k=st.sampled_from([0, 1, 5, 1000]),
       top_p=st.sampled_from([1.0, 0.5, 0.0]), sub_range=st.booleans(), with_invalid=st.booleans(),
       draw_seed=st.integers(-(2**63), 2**64 - 1), offset=st.integers(-(2**63), 2**64 - 1))
def test_sample_tokens_fuzz(seed, fault, dtype, layout, rows, vocab, specials, temperature, top_k, top_p, sub_range,
                            with_invalid, draw_seed, offset):
    rows = 0 if fault == "rows0" else rows
    assume(not fault.startswith("huge_vocab") or ops.has_kernel("sample_tokens", "cpu"))
    flags = {}

    def make():
        gen = torch.Generator().manual_seed(seed)
        logits = _tensor(seed, (rows, vocab), dtype, layout, specials, (0,))
        lo, hi = 0, vocab
        if sub_range and vocab > 1:
            lo = int(torch.randint(0, vocab - 1, (), generator=gen))
            hi = int(torch.randint(lo + 1, vocab + 1, (), generator=gen))
        kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, vocab_range=(lo, hi), seed=draw_seed,
                  offset=offset)
        invalid = torch.zeros(rows, dtype=torch.bool) if with_invalid else None
        if fault == "range_reversed":
            kw["vocab_range"] = (hi, lo)
        elif fault == "range_negative":
            kw["vocab_range"] = (-1, hi)
        elif fault == "range_past_vocab":
            kw["vocab_range"] = (lo, vocab + 1)
        elif fault == "range_floats":
            kw["vocab_range"] = (float(lo), hi + 0.5)
        elif fault == "range_three":
            kw["vocab_range"] = (lo, hi, hi)
        elif fault == "range_str":
            kw["vocab_range"] = "0:5"
        elif fault == "logits_rank":
            logits = logits[0]
        elif fault == "logits_int":
            logits = torch.zeros(rows, vocab, dtype=torch.int64)
        elif fault == "vocab0":
            logits, kw["vocab_range"] = torch.zeros(rows, 0, dtype=dtype), None
        elif fault == "temperature_negative":
            kw["temperature"] = -0.5
        elif fault == "temperature_nan":
            kw["temperature"] = float("nan")
        elif fault == "temperature_inf":
            kw["temperature"] = float("inf")
        elif fault == "temperature_tensor_nan":
            kw["temperature"] = torch.full((rows,), float("nan"))
        elif fault == "temperature_tensor_int":
            kw["temperature"] = torch.ones(rows, dtype=torch.int64)
        elif fault == "temperature_tensor_shape":
            kw["temperature"] = torch.ones(rows + 1)
        elif fault == "top_k_negative":
            kw["top_k"] = -1
        elif fault == "top_k_tensor_negative":
            kw["top_k"] = torch.full((rows,), -3)
        elif fault == "top_k_float":
            kw["top_k"] = 2.0
        elif fault == "top_k_huge":
            kw["top_k"] = 2**70
        elif fault == "top_p_nan":
            kw["top_p"] = float("nan")
        elif fault == "top_p_above":
            kw["top_p"] = 1.0001
        elif fault == "top_p_tensor_below":
            kw["top_p"] = torch.full((1,), -0.1)
        elif fault == "seed_float":
            kw["seed"] = 1.0
        elif fault == "seed_past_64_bits":
            kw["seed"] = 2**64
        elif fault == "seed_two_elements":
            kw["seed"] = torch.tensor([1, 2])
        elif fault == "seed_float_tensor":
            kw["seed"] = torch.tensor(1.0)
        elif fault == "offset_past_64_bits":
            kw["offset"] = -(2**63) - 1
        elif fault == "invalid_shape":
            invalid = torch.zeros(rows + 1, dtype=torch.bool)
        elif fault == "invalid_int":
            invalid = torch.zeros(rows, dtype=torch.int64)
        elif fault == "invalid_expanded":
            invalid = torch.zeros(1, dtype=torch.bool).expand(rows + 1)
            logits = torch.full((rows + 1, vocab), float("-inf"), dtype=dtype)
        elif fault == "all_masked":
            logits = torch.full((rows, vocab), float("nan"), dtype=dtype)
            logits[:, ::2] = float("-inf")
            invalid = torch.zeros(rows, dtype=torch.bool)
        elif fault.startswith("huge_vocab"):  # one logit expanded past 2^31 ids
            logits = _values(seed, (1, 1), dtype, specials).expand(rows, BIG)
            kw["vocab_range"] = (BIG - vocab, BIG) if fault == "huge_vocab_range" else None
        flags["invalid"] = invalid
        return ops.sample_tokens(logits, invalid=invalid, **kw), invalid

    kernel, ref = _both(make, reference_too=not fault.startswith("huge_vocab"))
    assert kernel[0] == ("ok" if fault in ST_VALID else "error"), (fault, kernel)
    if kernel[0] != "ok":
        return
    tokens, invalid = kernel[1]
    assert tokens.dtype == torch.int64 and tokens.shape == (rows,)
    if fault == "huge_vocab_range":
        assert bool(((tokens >= BIG - vocab) & (tokens < BIG)).all()), tokens
        return
    want, want_invalid = ref[1]
    assert torch.equal(tokens, want), (tokens, want)
    if invalid is not None:
        assert torch.equal(invalid, want_invalid)
    if fault == "all_masked":
        assert bool(invalid.all())


# ---------------------------------------------------------------------------------------------
# local_attention
# ---------------------------------------------------------------------------------------------

LA_FAULTS = ["none", "none", "none", "none", "window_even", "window_zero", "window_negative", "window_bool",
             "window_three", "window_huge", "grid_not_tokens", "grid_not_multiple", "grid_product_past_int64",
             "grid_kv_bigger", "causal_grids_differ", "causal_int", "dtype_mix", "q_rank", "k_heads", "v_shape",
             "head_dim0", "text_k_alone", "text_batch", "text_heads", "text_dtype", "scale_nan", "scale_str",
             "text_bias_inf", "batch0", "heads0", "text0", "k_meta", "q_int"]
LA_VALID = {"none", "window_huge", "batch0", "heads0", "text0"}


@st.composite
def _grids(draw):
    hk, wk = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    fh, fw = draw(st.sampled_from([1, 1, 2])), draw(st.sampled_from([1, 1, 2]))
    return (hk * fh, wk * fw), (hk, wk)


@given(seed=st.integers(0, 2**31 - 1), fault=st.sampled_from(LA_FAULTS), dtype=st.sampled_from(FLOATS),
       layout=LAYOUTS, grids=_grids(), window=st.tuples(st.sampled_from([1, 3, 5]), st.sampled_from([1, 3, 7])),
       batch=st.integers(1, 2), heads=st.integers(1, 2), dim=st.integers(1, 20), text=st.integers(-1, 4),
       causal=st.booleans(), specials=st.booleans(), text_bias=st.sampled_from([0.0, 2.0]),
       scale=st.sampled_from([None, 0.3, 50.0]))
def test_local_attention_fuzz(seed, fault, dtype, layout, grids, window, batch, heads, dim, text, causal, specials,
                              text_bias, scale):
    (hq, wq), (hk, wk) = grids
    causal = causal and (hq, wq) == (hk, wk)
    batch = 0 if fault == "batch0" else batch
    heads = 0 if fault == "heads0" else heads
    dim = 0 if fault == "head_dim0" else dim
    text = 0 if fault == "text0" else text

    def make():
        # Specials in q and keys only: the reference's dense matmul lets a NaN value outside a query's
        # window reach it as 0 * NaN, which the kernel rightly does not. No large values either: with
        # logits ~1e6 a rounding difference could flip which key dominates.
        q = _tensor(seed, (batch, heads, hq * wq, dim), dtype, layout, specials, (0,), big=False)
        kv_batch = 1 if seed % 2 else batch  # k and v broadcast over the batch, or not
        k = _tensor(seed + 1, (kv_batch, heads, hk * wk, dim), dtype, layout, specials, (1,), big=False)
        v = _tensor(seed + 2, (kv_batch, heads, hk * wk, dim), dtype, layout, False, (0, 1))
        tk = tv = None
        if text >= 0:
            text_batch = 1 if seed % 3 == 0 else batch
            tk = _tensor(seed + 3, (text_batch, heads, text, dim), dtype, layout, specials, (0,), big=False)
            tv = _tensor(seed + 4, (text_batch, heads, text, dim), dtype, layout, False, (1,))
        kw = dict(grid_q=(hq, wq), grid_kv=(hk, wk), window=window, causal=causal, text_k=tk, text_v=tv,
                  text_bias=text_bias, scale=scale)
        if fault == "window_even":
            kw["window"] = (window[0] + 1, window[1])
        elif fault == "window_zero":
            kw["window"] = (0, window[1])
        elif fault == "window_negative":
            kw["window"] = (window[0], -3)
        elif fault == "window_bool":
            kw["window"] = (True, True)
        elif fault == "window_three":
            kw["window"] = (*window, 1)
        elif fault == "window_huge":  # the same as the whole grid
            kw["window"] = (2**31 + 1, 2**65 + 1)
        elif fault == "grid_not_tokens":
            kw["grid_q"] = (hq + 1, wq)
        elif fault == "grid_not_multiple":
            kw["grid_kv"] = (hk, wk + 1) if wq % (wk + 1) else (hk + 1, wk + 1)
        elif fault == "grid_product_past_int64":
            kw["grid_q"] = (2**40, 2**40)
        elif fault == "grid_kv_bigger":
            kw["grid_kv"] = (hq * 2, wq)
        elif fault == "causal_grids_differ":
            kw["causal"], kw["grid_q"], kw["grid_kv"] = True, (hq, wq), (hk, wk)
            if (hq, wq) == (hk, wk):
                kw["grid_kv"] = (1, 1) if hq * wq > 1 else (1, 2)
        elif fault == "causal_int":
            kw["causal"] = 1
        elif fault == "dtype_mix":
            v = v.to(torch.float64 if dtype != torch.float64 else torch.float32)
        elif fault == "q_rank":
            q = q[0]
        elif fault == "k_heads":
            k = torch.zeros(kv_batch, heads + 1, hk * wk, dim, dtype=dtype)
        elif fault == "v_shape":
            v = torch.zeros(kv_batch, heads, hk * wk, dim + 1, dtype=dtype)
        elif fault == "text_k_alone":
            kw["text_k"], kw["text_v"] = torch.zeros(batch, heads, 2, dim, dtype=dtype), None
        elif fault == "text_batch":
            kw["text_k"] = kw["text_v"] = torch.zeros(batch + 2, heads, 2, dim, dtype=dtype)
        elif fault == "text_heads":
            kw["text_k"] = kw["text_v"] = torch.zeros(batch, heads + 1, 2, dim, dtype=dtype)
        elif fault == "text_dtype":
            kw["text_k"] = kw["text_v"] = torch.zeros(batch, heads, 2, dim, dtype=torch.int32)
        elif fault == "scale_nan":
            kw["scale"] = float("nan")
        elif fault == "scale_str":
            kw["scale"] = "0.1"
        elif fault == "text_bias_inf":
            kw["text_bias"] = float("inf")
        elif fault == "text0":
            kw["text_k"] = kw["text_v"] = torch.zeros(batch, heads, 0, dim, dtype=dtype)
        elif fault == "k_meta":
            k = k.to("meta")
        elif fault == "q_int":
            q = torch.zeros(batch, heads, hq * wq, dim, dtype=torch.int64)
        return ops.local_attention(q, k, v, **kw)

    kernel, ref = _both(make)
    assert kernel[0] == ("ok" if fault in LA_VALID else "error"), (fault, kernel)
    if kernel[0] == "ok":
        _agree(kernel[1][0], ref[1][0], "out")
        _agree(kernel[1][1], ref[1][1], "lse")  # (+inf there and NaN here both say "not finite")


# ---------------------------------------------------------------------------------------------
# sandwich_decode_step
# ---------------------------------------------------------------------------------------------

SD_FAULTS = ["none", "none", "none", "rows0", "tokens_int32", "tokens_shape", "tokens_past_vocab", "tokens_negative",
             "positions_shape", "positions_past_table", "start_overrun", "start_negative", "start_shape",
             "start_float", "params_missing", "param_shape", "param_dtype", "param_meta", "param_list",
             "cache_rows", "cache_dtype", "cache_rank", "v_cache_shape", "heads_mismatch", "num_heads_float",
             "scale_nan", "scale_str", "first_norm_shape", "first_norm_single", "places_width", "mlp0",
             "packed", "packed_count"]
SD_VALID = {"none", "rows0", "packed"}


@given(seed=st.integers(0, 2**31 - 1), fault=st.sampled_from(SD_FAULTS),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), layers=st.integers(1, 2),
       rows=st.integers(1, 5), heads=st.integers(1, 3), dim=st.integers(1, 6), mlp=st.integers(1, 12),
       max_len=st.integers(2, 9), specials=st.booleans(), layout=LAYOUTS)
def test_sandwich_decode_step_fuzz(seed, fault, dtype, layers, rows, heads, dim, mlp, max_len, specials, layout):
    hidden, vocab, table = heads * dim, 11, 13
    if fault == "rows0":
        rows = 0
    if fault == "mlp0":
        mlp = 0

    def make():
        gen = torch.Generator().manual_seed(seed)
        shapes = [(3 * hidden, hidden), (3 * hidden,), (hidden, hidden), (hidden,), (hidden,), (hidden,), (hidden,),
                  (hidden,), (mlp, hidden), (mlp,), (hidden, mlp), (hidden,), (hidden,), (hidden,), (hidden,),
                  (hidden,)]
        params = [_tensor(seed + 16 * layer + i, shape, dtype, layout, big=False) * 0.5
                  for layer in range(layers) for i, shape in enumerate(shapes)]
        words = _tensor(seed + 1000, (vocab, hidden), dtype, "contiguous", specials, big=False)
        places = _tensor(seed + 1001, (table, hidden), dtype, layout, big=False)
        first = (_tensor(seed + 1002, (hidden,), dtype, "contiguous"), _tensor(seed + 1003, (hidden,), dtype,
                                                                                 "contiguous"))
        cache_shape = (layers, rows, heads, max_len, dim)
        k_cache = _values(seed + 1004, cache_shape, dtype, False)
        v_cache = _values(seed + 1005, cache_shape, dtype, False)
        tokens = torch.randint(0, vocab, (rows, 1), generator=gen)
        positions = torch.randint(0, table, (rows, 1), generator=gen)
        start = torch.randint(0, max_len, (rows,), generator=gen)
        kw = dict(num_heads=heads, scale=dim ** -0.5, eps=1e-5, pb_relax=bool(seed % 2))
        if fault == "tokens_int32":
            tokens = tokens.int()
        elif fault == "tokens_shape":
            tokens = tokens.expand(rows, 2)
        elif fault == "tokens_past_vocab":
            tokens[-1] = vocab
        elif fault == "tokens_negative":
            tokens[0] = -1
        elif fault == "positions_shape":
            positions = positions[:, 0]
        elif fault == "positions_past_table":
            positions[0] = table
        elif fault == "start_overrun":
            start[-1] = max_len
        elif fault == "start_negative":
            start[0] = -3
        elif fault == "start_shape":
            start = start[None]
        elif fault == "start_float":
            start = start.float()
        elif fault == "params_missing":
            params = params[:-1]
        elif fault == "param_shape":
            params[16 * (layers - 1) + 2] = torch.zeros(hidden + 1, hidden, dtype=dtype)
        elif fault == "param_dtype":
            params[5] = params[5].to(torch.float16)
        elif fault == "param_meta":
            params[9] = params[9].to("meta")
        elif fault == "param_list":
            params[3] = params[3].tolist()
        elif fault == "cache_rows":
            k_cache = v_cache = torch.zeros(layers, rows + 1, heads, max_len, dim, dtype=dtype)
        elif fault == "cache_dtype":
            k_cache = k_cache.to(torch.float16)
        elif fault == "cache_rank":
            k_cache = k_cache[0]
        elif fault == "v_cache_shape":
            v_cache = torch.zeros(layers, rows, heads, max_len + 1, dim, dtype=dtype)
        elif fault == "heads_mismatch":
            kw["num_heads"] = heads + 1
        elif fault == "num_heads_float":
            kw["num_heads"] = float(heads)
        elif fault == "scale_nan":
            kw["scale"] = float("nan")
        elif fault == "scale_str":
            kw["scale"] = "0.5"
        elif fault == "first_norm_shape":
            first = (first[0][:-1], first[1])
        elif fault == "first_norm_single":
            first = first[0]
        elif fault == "places_width":
            places = torch.zeros(table, hidden + 1, dtype=dtype)
        elif fault == "packed":  # a speed hint (float32 with MKL); None otherwise, like no hint
            kw["packed_weights"] = ops.pack_projection_weights(params, rows)
            kw["packed_rows"] = rows
        elif fault == "packed_count":
            kw["packed_weights"] = [torch.zeros(1)] * (4 * layers - 1)
        return ops.sandwich_decode_step(tokens, positions, start, word_embeddings=words, position_embeddings=places,
                                        first_norm=first, layer_params=params, k_cache=k_cache, v_cache=v_cache,
                                        **kw), k_cache

    with torch.inference_mode():
        kernel, ref = _both(make)
    assert kernel[0] == ("ok" if fault in SD_VALID else "error"), (fault, kernel)
    if kernel[0] == "ok":
        _agree(kernel[1][0], ref[1][0], "hidden")
        _agree(kernel[1][1], ref[1][1], "k_cache")


# ---------------------------------------------------------------------------------------------
# direct op calls: the C++ checks behind the wrappers
# ---------------------------------------------------------------------------------------------

HAS_CPU_KERNELS = all(ops.has_kernel(op, "cpu") for op in PUBLIC_OPS)


def _f(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


_L = torch.ops.cogview if HAS_CPU_KERNELS else None
DIRECT_CALLS = {
    "layer_norm stats too short": lambda: _L.layer_norm_backward(_f(4, 8), _f(4, 8), _f(8), _f(3, 2)),
    "layer_norm stats one column": lambda: _L.layer_norm_backward(_f(4, 8), _f(4, 8), _f(8), _f(4, 1)),
    "layer_norm grad shape": lambda: _L.layer_norm_backward(_f(4, 7), _f(4, 8), _f(8), _f(4, 2)),
    "add_layer_norm backward next stats": lambda: _L.add_layer_norm_backward(
        _f(4, 8), _f(4, 8), _f(4, 8), _f(4, 8), _f(8), _f(8), _f(4, 2)),
    "local_attention grid product overflows int64": lambda: _L.local_attention(
        _f(1, 1, 16, 8), _f(1, 1, 16, 8), _f(1, 1, 16, 8), [2**62, 8], [4, 4], [3, 3], False, None, None, 0.0, 1.0),
    "local_attention kv grid overflows int64": lambda: _L.local_attention(
        _f(1, 1, 16, 8), _f(1, 1, 16, 8), _f(1, 1, 16, 8), [4, 4], [2**33, 2**33], [3, 3], False, None, None, 0.0,
        1.0),
    "local_attention negative grid": lambda: _L.local_attention(
        _f(1, 1, 16, 8), _f(1, 1, 16, 8), _f(1, 1, 16, 8), [-4, -4], [4, 4], [3, 3], False, None, None, 0.0, 1.0),
    "local_attention backward lse shape": lambda: _L.local_attention_backward(
        _f(1, 1, 16, 8), None, _f(1, 1, 16, 8), _f(1, 1, 16, 8), _f(1, 1, 16, 8), _f(1, 1, 16, 8), _f(1, 1, 15),
        [4, 4], [4, 4], [3, 3], False, None, None, 0.0, 1.0),
    "decode_attention lengths past max_len": lambda: _L.decode_attention(
        _f(2, 1, 1, 8), _f(2, 1, 4, 8), _f(2, 1, 4, 8), torch.tensor([4, 5]), 1.0, 0, 0.0),
    "decode_attention lengths int64 min": lambda: _L.decode_attention(
        _f(2, 1, 1, 8), _f(2, 1, 4, 8), _f(2, 1, 4, 8), torch.tensor([-(2**63), 1]), 1.0, 0, 0.0),
    "kv_cache_write start int64 max": lambda: _L.kv_cache_write(
        _f(2, 1, 4, 8), _f(2, 1, 4, 8), _f(2, 1, 2, 8), _f(2, 1, 2, 8), torch.tensor([2**63 - 1, 0])),
    "kv_cache_write expanded cache": lambda: _L.kv_cache_write(
        _f(1, 1, 1, 8).expand(2, 1, 4, 8), _f(2, 1, 4, 8), _f(2, 1, 1, 8), _f(2, 1, 1, 8), torch.tensor([0, 1])),
    "sandwich_decode_step missing layer_params": lambda: _L.sandwich_decode_step(
        torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
        _f(4, 8), _f(4, 8), _f(8), _f(8), [_f(8)] * 15, _f(1, 1, 2, 4, 4), _f(1, 1, 2, 4, 4), 2, 0.5, 1e-5, False),
    "sandwich_decode_step token past the vocabulary": lambda: _L.sandwich_decode_step(
        torch.full((1, 1), 4, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
        _f(4, 8), _f(4, 8), _f(8), _f(8),
        [_f(24, 8), _f(24), _f(8, 8), _f(8)] + [_f(8)] * 4 + [_f(16, 8), _f(16), _f(8, 16)] + [_f(8)] * 5,
        _f(1, 1, 2, 4, 4), _f(1, 1, 2, 4, 4), 2, 0.5, 1e-5, False),
    "gelu_tanh integer x": lambda: _L.gelu_tanh(torch.ones(3, dtype=torch.long)),
    "linear bad activation": lambda: _L.linear(_f(2, 8), _f(4, 8), None, "relu", None),
    "linear wrong packed weight": lambda: _L.linear(
        _f(2, 32, dtype=torch.bfloat16), _f(32, 32, dtype=torch.bfloat16), None, "none", _f(3, dtype=torch.bfloat16)),
    "pack_linear_weight odd features": lambda: _L.pack_linear_weight(_f(32, 20, dtype=torch.bfloat16)),
    "gelu_tanh_backward grad shape": lambda: _L.gelu_tanh_backward(_f(4), _f(3)),
    "sample_tokens vocab_hi past vocab": lambda: _L.sample_tokens(
        _f(2, 8), torch.tensor(1), torch.tensor(0), None, None, None, 1.0, 0, 1.0, 0, 9, None),
    "sample_tokens vocab_lo int64 min": lambda: _L.sample_tokens(
        _f(2, 8), torch.tensor(1), torch.tensor(0), None, None, None, 1.0, 0, 1.0, -(2**63), 8, None),
    "sample_tokens temperature too large for float32": lambda: _L.sample_tokens(
        _f(2, 8), torch.tensor(1), torch.tensor(0), None, None, None, 1e300, 0, 1.0, 0, 8, None),
    "sample_tokens per-row top_k wrong length": lambda: _L.sample_tokens(
        _f(2, 8), torch.tensor(1), torch.tensor(0), None, torch.tensor([1, 2, 3]), None, 1.0, 0, 1.0, 0, 8, None),
    "sample_tokens expanded invalid": lambda: _L.sample_tokens(
        _f(2, 8), torch.tensor(1), torch.tensor(0), None, None, None, 1.0, 0, 1.0, 0, 8,
        torch.zeros(1, dtype=torch.bool).expand(2)),
}


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="needs the CPU kernels of cogview._C")
@pytest.mark.parametrize("name", sorted(DIRECT_CALLS))
def test_direct_op_calls_are_checked_in_cpp(name):
    with pytest.raises((ValueError, TypeError)) as info:
        DIRECT_CALLS[name]()
    assert "cogview" in str(info.value)


def test_window_larger_than_the_grid_means_the_whole_grid():
    """Clamping an absurd window (the fix for a window-sized allocation) keeps the op's meaning."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 12, 8, generator=gen), torch.randn(1, 2, 12, 8, generator=gen)
    whole = reference.local_attention(q, k, k, grid_q=(3, 4), grid_kv=(3, 4), window=(5, 7))
    for window in ((5, 7), (7, 9), (2**40 + 1, 2**62 + 1), (2**70 + 1, 3**50)):
        out = ops.local_attention(q, k, k, grid_q=(3, 4), grid_kv=(3, 4), window=window)
        torch.testing.assert_close(out, whole)
    if HAS_CPU_KERNELS:  # the C++ side clamps too (a direct call with the largest int64 window)
        out = torch.ops.cogview.local_attention(q, k, k, [3, 4], [3, 4], [2**63 - 1, 2**63 - 1], False, None, None,
                                                0.0, 8**-0.5)
        torch.testing.assert_close(out, whole)


# ---------------------------------------------------------------------------------------------
# every fault at least twice, whatever hypothesis draws (25 examples cannot cover ~30 faults per op)
# ---------------------------------------------------------------------------------------------

SWEEPS = {
    "layer_norm": (test_layer_norm_fuzz, LN_FAULTS, [
        dict(seed=1, fused=False, dtype=torch.float32, param_f32=True, layout="contiguous", specials=False, lead=[3],
             hidden=8, pb_relax=False, with_next=False),
        dict(seed=2, fused=True, dtype=torch.bfloat16, param_f32=False, layout="strided", specials=True, lead=[2, 2],
             hidden=33, pb_relax=True, with_next=True)]),
    "kv_cache_write": (test_kv_cache_write_fuzz, KV_FAULTS, [
        dict(seed=3, cache_dtype=torch.float32, new_dtype=torch.float32, cache_layout="contiguous",
             new_layout="contiguous", batch=2, heads=2, max_len=6, dim=4, n=2, specials=False),
        dict(seed=4, cache_dtype=torch.bfloat16, new_dtype=torch.float64, cache_layout="transposed",
             new_layout="expanded", batch=3, heads=1, max_len=9, dim=5, n=1, specials=True)]),
    "decode_attention": (test_decode_attention_fuzz, DA_FAULTS, [
        dict(seed=5, q_dtype=torch.float32, cache_dtype=torch.float32, layout="contiguous", batch=2, heads=2,
             max_len=20, dim=16, n=1, specials=False, text_len=0, text_bias=0.0),
        dict(seed=6, q_dtype=torch.bfloat16, cache_dtype=torch.float16, layout="strided", batch=3, heads=1,
             max_len=33, dim=7, n=3, specials=True, text_len=5, text_bias=1.5)]),
    "sample_tokens": (test_sample_tokens_fuzz, ST_FAULTS, [
        dict(seed=7, dtype=torch.float32, layout="contiguous", rows=3, vocab=50, specials=False, temperature=1.0,
             top_k=0, top_p=1.0, sub_range=False, with_invalid=False, draw_seed=1, offset=0),
        dict(seed=8, dtype=torch.float16, layout="transposed", rows=4, vocab=37, specials=True, temperature=0.7,
             top_k=5, top_p=0.5, sub_range=True, with_invalid=True, draw_seed=-5, offset=2**63)]),
    "linear": (test_linear_fuzz, LIN_FAULTS, [
        dict(seed=15, dtype=torch.bfloat16, layout="contiguous", specials=False, lead=[37], features=64, out=32,
             bias=True, gelu=True),
        dict(seed=16, dtype=torch.float32, layout="transposed", specials=True, lead=[2, 5], features=7, out=5,
             bias=False, gelu=False)]),
    "gelu_tanh": (test_gelu_tanh_fuzz, GELU_FAULTS, [
        dict(seed=13, dtype=torch.float32, layout="contiguous", specials=False, shape=[3, 5], backward=True),
        dict(seed=14, dtype=torch.bfloat16, layout="strided", specials=True, shape=[2, 7, 3], backward=False)]),
    "sandwich_decode_step": (test_sandwich_decode_step_fuzz, SD_FAULTS, [
        dict(seed=11, dtype=torch.float32, layers=2, rows=2, heads=2, dim=4, mlp=12, max_len=6, specials=False,
             layout="contiguous"),
        dict(seed=12, dtype=torch.bfloat16, layers=1, rows=3, heads=3, dim=3, mlp=5, max_len=9, specials=True,
             layout="strided")]),
    "local_attention": (test_local_attention_fuzz, LA_FAULTS, [
        dict(seed=9, dtype=torch.float32, layout="contiguous", grids=((4, 4), (4, 4)), window=(3, 3), batch=1,
             heads=2, dim=8, text=2, causal=False, specials=False, text_bias=0.0, scale=None),
        dict(seed=10, dtype=torch.bfloat16, layout="expanded", grids=((4, 6), (2, 3)), window=(5, 7), batch=2,
             heads=1, dim=13, text=-1, causal=False, specials=True, text_bias=2.0, scale=0.3)]),
}


@pytest.mark.parametrize("op,fault", [(op, fault) for op, (_, faults, _) in SWEEPS.items()
                                      for fault in dict.fromkeys(faults)])
def test_every_fault_is_tried(op, fault):
    test, _, combos = SWEEPS[op]
    if fault.startswith("huge") and not ops.has_kernel(op, "cpu"):
        pytest.skip("huge views only on the kernel path (the reference would materialise them)")
    for combo in combos:
        test.hypothesis.inner_test(fault=fault, **combo)

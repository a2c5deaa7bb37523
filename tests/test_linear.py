"""cogview.ops.linear (AMX tile products for bf16 on CPUs that have them; F.linear + gelu_tanh
elsewhere) against a float64 reference, under the low-precision rule of tests/tolerance.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cogview import ops
from cogview.ops import reference
from tolerance import assert_within_rule

linear_module = __import__("sys").modules["cogview.ops.linear"]
needs_kernel = pytest.mark.skipif(not ops.has_kernel("linear", "cpu"), reason="needs the CPU kernel of cogview._C")
needs_tiles = pytest.mark.skipif(not ops.tile_linear_available(), reason="needs a CPU with AMX (and Linux's tile grant)")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _inputs(rows, features, out, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, features, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(out, features, generator=g, dtype=torch.float64) / features**0.5).to(dtype)
    b = torch.randn(out, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return x, w, b


def _exact(x, w, b, activation):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    return F.gelu(y, approximate="tanh") if activation == "gelu_tanh" else y


def _check(got, x, w, b, activation, what="output"):
    exact = _exact(x, w, b, activation)
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-12, msg=what)
    else:  # the yardstick: what a user writes in the same dtype
        assert_within_rule(got, reference.linear(x, w, b, activation), exact, got.dtype, what)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["none", "gelu_tanh"])
@pytest.mark.parametrize("rows,features,out", [(1, 32, 32), (17, 64, 96), (33, 128, 384), (100, 96, 64),
                                               (7, 40, 24)])
def test_forward_matches_the_reference(dtype, activation, rows, features, out):
    x, w, b = _inputs(rows, features, out, dtype)
    got = ops.linear(x, w, b, activation)
    assert got.shape == (rows, out) and got.dtype == dtype
    _check(got, x, w, b, activation)


@needs_kernel
@given(rows=st.integers(1, 70), k_blocks=st.integers(1, 5), n_blocks=st.integers(1, 4),
       bias=st.booleans(), gelu=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_tile_shapes_property(rows, k_blocks, n_blocks, bias, gelu, seed):
    """Every row count (partial last blocks included) and multiple-of-32 feature counts: the shapes
    the tile path takes on an AMX CPU (and the fallback takes elsewhere)."""
    activation = "gelu_tanh" if gelu else "none"
    x, w, b = _inputs(rows, 32 * k_blocks, 32 * n_blocks, torch.bfloat16, bias, seed)
    _check(ops.linear(x, w, b, activation), x, w, b, activation)


@needs_kernel
def test_leading_dimensions_and_non_contiguous_input():
    x, w, b = _inputs(2 * 3 * 40, 64, 96, torch.bfloat16)
    x3 = x.view(2, 3, 40, 64)
    got = ops.linear(x3, w, b, "gelu_tanh")
    assert got.shape == (2, 3, 40, 96)
    _check(got.reshape(-1, 96), x, w, b, "gelu_tanh")
    wide = torch.cat([x, x], dim=1)[:, :64]  # row stride 128: not contiguous
    _check(ops.linear(wide, w, b), x, w, b, "none")


@needs_tiles
def test_tile_path_agrees_with_the_other_kernels_and_rounds_once():
    """On the tiles the activation is applied before the one rounding: the result is the gelu kernel
    applied to the float32 product, rounded (identical up to the products' summation order)."""
    x, w, b = _inputs(64, 128, 256, torch.bfloat16)
    got = ops.linear(x, w, b, "gelu_tanh")
    product = F.linear(x.float(), w.float(), b.float())
    expected = ops.gelu_tanh(product).bfloat16()
    assert (got.float() - expected.float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * 4
    with ops.use_cpu_isa("avx2"):  # the tile code lives in the avx512 build: this runs F.linear + gelu
        assert not ops.tile_linear_available()
        _check(ops.linear(x, w, b, "gelu_tanh"), x, w, b, "gelu_tanh")


@needs_tiles
def test_packed_weights_are_cached_and_follow_in_place_updates():
    x, w, b = _inputs(40, 64, 64, torch.bfloat16)
    first = ops.linear(x, w, b)
    packed = linear_module._packed_weights[w]
    assert len(packed) == 1
    ops.linear(x, w, b)
    assert linear_module._packed_weights[w] is packed and len(packed) == 1  # reused, not repacked
    with torch.no_grad():
        w.mul_(-1)  # in place: the packing must follow
    second = ops.linear(x, w, b)
    _check(second, x, w, b, "none")
    assert not torch.equal(first, second)
    view = w[:32]  # a view of the weight is cached under the weight, by its layout
    _check(ops.linear(x, view, b[:32]), x, view, b[:32], "none")
    assert len(linear_module._packed_weights[w]) == 2


@needs_tiles
def test_large_products_take_f_linear_and_pack_nothing():
    """Above tile_linear_max_macs the product is at::linear (oneDNN's blocking wins there): same result,
    and no packed copy of the weight is made."""
    from cogview._native import _C
    features = out = 256
    rows = _C.tile_linear_max_macs() // (features * out) + 1
    x, w, b = _inputs(rows, features, out, torch.bfloat16)
    _check(ops.linear(x, w, b, "gelu_tanh"), x, w, b, "gelu_tanh")
    assert w not in linear_module._packed_weights
    _check(ops.linear(x[:64], w, b), x[:64], w, b, "none")  # a small call packs it
    assert w in linear_module._packed_weights


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["none", "gelu_tanh"])
def test_backward_matches_the_reference(dtype, activation):
    x0, w0, b0 = _inputs(37, 64, 96, dtype)
    grad = torch.randn(37, 96, dtype=torch.float64).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x0, w0, b0)]
    ops.linear(*leaves, activation).backward(grad)
    exact = [t.double().requires_grad_() for t in (x0, w0, b0)]
    _exact(*exact, activation).backward(grad.double())
    plain = [t.clone().requires_grad_() for t in (x0, w0, b0)]
    reference.linear(*plain, activation).backward(grad)
    for name, got, ref, ex in zip(("x", "weight", "bias"), leaves, plain, exact):
        assert got.grad.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got.grad, ex.grad.float(), rtol=1e-4, atol=1e-4, msg=name)
        else:
            assert_within_rule(got.grad, ref.grad, ex.grad, dtype, f"grad of {name}")


@needs_kernel
def test_gradcheck_float64():
    x, w, b = (t.requires_grad_() for t in _inputs(5, 8, 6, torch.float64))
    for activation in ("none", "gelu_tanh"):
        assert torch.autograd.gradcheck(lambda *a: ops.linear(*a, activation), (x, w, b))


@needs_kernel
def test_torch_compile():
    x, w, b = _inputs(48, 64, 96, torch.bfloat16)
    compiled = torch.compile(lambda x, w, b: ops.linear(x, w, b, "gelu_tanh") * 2, fullgraph=True)
    _check(compiled(x, w, b) / 2, x, w, b, "gelu_tanh")


@needs_kernel
def test_bad_arguments_raise_naming_the_argument():
    x, w, b = _inputs(4, 32, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="activation"):
        ops.linear(x, w, b, "relu")
    with pytest.raises(ValueError, match="in_features"):
        ops.linear(x[:, :16], w, b)
    with pytest.raises(ValueError, match="bias"):
        ops.linear(x, w, b[:16])
    with pytest.raises(TypeError, match="weight"):
        ops.linear(x, w.float(), b)
    with pytest.raises(TypeError, match="x"):
        ops.linear(x.long(), w, b)
    with pytest.raises(TypeError, match="weight"):
        ops.pack_linear_weight(w.float())
    with pytest.raises(ValueError, match="weight"):
        ops.pack_linear_weight(w[:, :16].contiguous())
    with pytest.raises(ValueError, match="packed_weight"):
        torch.ops.cogview.linear(x, w, b, "none", torch.zeros(3, dtype=torch.bfloat16))


@needs_kernel
def test_reference_path_matches():
    x, w, b = _inputs(9, 64, 32, torch.bfloat16)
    with ops.force_reference():
        got = ops.linear(x, w, b, "gelu_tanh")
    _check(got, x, w, b, "gelu_tanh")

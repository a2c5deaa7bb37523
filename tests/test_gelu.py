"""cogview.ops.gelu_tanh (CPU kernels; CUDA when a device is present) against the plain-PyTorch reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from cogview import ops
from cogview.models import CogViewTransformer, presets
from tolerance import assert_within_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]  # cuda: skipped without a device (conftest)
needs_kernel = pytest.mark.skipif(not ops.has_kernel("gelu_tanh", "cpu"), reason="needs the CPU kernel of cogview._C")


def _exact(x):
    return F.gelu(x.double(), approximate="tanh")


def _plain(x):  # what a user writes, in x's own dtype: the tolerance yardstick
    return F.gelu(x, approximate="tanh")


def _check(got, plain, exact, dtype, what="output"):
    """The low-precision rule (tests/tolerance.py); float64, where the plain composition IS the
    reference, to 1e-12 like the other kernels' float64 tests."""
    if dtype == torch.float64:
        torch.testing.assert_close(got, exact.to(got.device), rtol=1e-12, atol=1e-12, msg=what)
    else:
        assert_within_rule(got, plain, exact, dtype, what)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (5, 1023), (3, 4, 4097)])
def test_forward_matches_the_reference(device, dtype, shape):
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype).to(device)
    got = ops.gelu_tanh(x)
    assert got.shape == x.shape and got.dtype == dtype and got.device == x.device
    _check(got, _plain(x), _exact(x), dtype)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_the_reference(device, dtype):
    base = (torch.randn(6, 777, dtype=torch.float64) * 3).to(dtype).to(device)
    grad = torch.randn(6, 777, dtype=torch.float64).to(dtype).to(device)
    x = base.clone().requires_grad_()
    ops.gelu_tanh(x).backward(grad)
    plain = base.clone().requires_grad_()
    _plain(plain).backward(grad)
    exact = base.double().requires_grad_()
    _exact(exact).backward(grad.double())
    assert x.grad.dtype == dtype
    _check(x.grad, plain.grad, exact.grad, dtype, "grad")


@needs_kernel
def test_gradcheck():
    x = torch.randn(4, 33, dtype=torch.float64, requires_grad=True) * 3
    assert torch.autograd.gradcheck(ops.gelu_tanh, (x.detach().requires_grad_(),))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_like_the_reference(dtype):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 3e4, -3e4, 60.0, -60.0, 0.0, -0.0, 1e-30],
                     dtype=torch.float64).to(dtype)
    got = ops.gelu_tanh(x)
    with ops.force_reference():
        want = ops.gelu_tanh(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = ~torch.isnan(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=0, atol=0)


@needs_kernel
def test_layouts_and_threads_do_not_change_the_result():
    x = torch.randn(64, 300)
    want = ops.gelu_tanh(x)
    torch.testing.assert_close(ops.gelu_tanh(x.t().contiguous().t()), want, rtol=0, atol=0)
    row = torch.randn(1, 300).expand(64, 300)
    torch.testing.assert_close(ops.gelu_tanh(row), ops.gelu_tanh(row.contiguous()), rtol=0, atol=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.gelu_tanh(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, want)


@needs_kernel
@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=200))
def test_any_float32_values(values):
    x = torch.tensor(values, dtype=torch.float32)
    assert_within_rule(ops.gelu_tanh(x), _plain(x), _exact(x), torch.float32)


@needs_kernel
def test_compile_parity():
    def mlp(x):
        return ops.gelu_tanh(x) * 2

    x = torch.randn(8, 64, requires_grad=True)
    compiled = torch.compile(mlp, fullgraph=True)
    got = compiled(x)
    want = mlp(x)
    assert torch.equal(got, want)
    (g_got,) = torch.autograd.grad(got.sum(), x)
    (g_want,) = torch.autograd.grad(want.sum(), x)
    assert torch.equal(g_got, g_want)


@needs_kernel
def test_opcheck():
    torch.library.opcheck(torch.ops.cogview.gelu_tanh.default, (torch.randn(5, 9, requires_grad=True),))
    torch.library.opcheck(torch.ops.cogview.gelu_tanh_backward.default, (torch.randn(5, 9), torch.randn(5, 9)))


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="`x`"):
        ops.gelu_tanh(torch.ones(3, dtype=torch.long))
    with pytest.raises(TypeError, match="`x`"):
        ops.gelu_tanh([1.0, 2.0])
    with ops.force_reference(), pytest.raises(TypeError, match="`x`"):
        ops.gelu_tanh(torch.ones(3, dtype=torch.int32))


@needs_kernel
def test_direct_calls_are_checked_in_cpp():
    with pytest.raises(TypeError, match="`x`"):
        torch.ops.cogview.gelu_tanh(torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="`grad_out`"):
        torch.ops.cogview.gelu_tanh_backward(torch.ones(4), torch.ones(3))


@needs_kernel
def test_the_model_mlp_runs_the_op():
    """A transformer on the kernels and on the reference ops gives the same logits (the MLP included)."""
    torch.manual_seed(0)
    model = CogViewTransformer(presets["test-tiny"].transformer).eval()
    tokens = torch.randint(0, 64, (2, 12))
    with torch.inference_mode():
        got = model(tokens)
        with ops.force_reference():
            want = model(tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

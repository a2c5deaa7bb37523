"""CUDA kernels of the sandwich LayerNorm (csrc/cuda/layer_norm.cu) against cogview.ops.reference.

Every test here carries the `cuda` marker and is skipped without a GPU. The kernel paths covered:
vector packs (hidden a multiple of the pack), packs with a scalar head/tail per row (odd hidden),
scalar rows (misaligned or oddly strided inputs), the large-hidden kernels (hidden > 8192 forward,
> 4096 / 8192 backward), mixed dtypes, zero rows, PB-relax, and the deterministic weight grads.

`COGVIEW_LN_TEST_DEVICE=cpu pytest --noconftest tests/test_layer_norm_cuda.py` runs the same checks
against the CPU kernels (a check of the tests themselves on a machine without a GPU).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import cogview
from cogview.ops import reference
from tolerance import assert_within_rule, max_error, rounding_unit

DEVICE = os.environ.get("COGVIEW_LN_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.cuda

LOW = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ODD_HIDDEN = (1, 7, 1023, 2560, 4097)
EPS = 1e-5


@pytest.fixture(autouse=True)
def _needs_kernels():
    for op in ("layer_norm", "add_layer_norm"):
        if not cogview.ops.has_kernel(op, DEVICE):
            pytest.fail(f"cogview was built without a {DEVICE} kernel for {op} (rebuild with CUDA)")


# ---- inputs ---------------------------------------------------------------------------------


def _randn(shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(shape, dtype=torch.float64) * scale + shift).to(device=DEVICE, dtype=dtype)


def _params(hidden, dtype):
    return _randn((hidden,), dtype, 0.2, 1.0), _randn((hidden,), dtype, 0.2)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `t` in another memory layout (the kernels must not care)."""
    hidden = t.shape[-1]
    if layout == "contiguous":
        return t
    if layout in ("pad8", "pad3"):  # rows further apart: pad8 keeps the pack phase, pad3 breaks it
        big = t.new_zeros(*t.shape[:-1], hidden + int(layout[-1]))
        big[..., :hidden] = t
        return big[..., :hidden]
    if layout == "offset1":  # misaligned base pointer
        flat = t.new_zeros(t.numel() + 1)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(t.shape)
    if layout == "transposed":  # hidden is not the unit-stride dimension (the op copies)
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    raise ValueError(layout)


LAYOUTS = ("contiguous", "pad8", "pad3", "offset1", "transposed")


def _exact(*tensors):
    return [None if t is None else t.detach().double() for t in tensors]


# ---- plain-PyTorch compositions in the working dtype (the yardstick of the tolerance rule) ---


def _compose_ln(x, w, b, eps, pb_relax):
    if pb_relax:
        c = x.detach().abs().amax(dim=-1, keepdim=True) / 8
        c = torch.where((c > 0) & torch.isfinite(c), c, torch.ones_like(c))
        x = x / c
    return F.layer_norm(x, x.shape[-1:], w.to(x.dtype), b.to(x.dtype), eps)


def _compose_add(residual, branch, w_out, b_out, w_next, b_next, eps, pb_relax):
    new_residual = (residual + _compose_ln(branch, w_out, b_out, eps, pb_relax)).to(residual.dtype)
    if w_next is None:
        return new_residual, None
    return new_residual, _compose_ln(new_residual, w_next, b_next, eps, pb_relax).to(branch.dtype)


def _check(kernel, composition, exact, what):
    """float16/bfloat16: the project's tolerance rule (tests/tolerance.py). float32: that rule or
    torch.testing's float32 tolerance against float64 (for sums over rows the rule alone is a
    coin toss between two fp32 summation orders). float64: tight."""
    assert kernel.dtype == composition.dtype, what
    assert kernel.shape == exact.shape, what
    if kernel.dtype == torch.float64:
        torch.testing.assert_close(kernel, exact, rtol=1e-9, atol=1e-9, msg=what)
        return
    if kernel.dtype == torch.float32:
        diff = (kernel.double() - exact).abs()
        if bool((diff <= 1e-5 + 1.3e-6 * exact.abs()).all()):
            return
    assert_within_rule(kernel, composition, exact, kernel.dtype, what)


def _expected_stats(x, eps, pb_relax):
    """(mean, rstd) per row in float64, as the kernels define them."""
    x = x.detach().double().reshape(-1, x.shape[-1])
    mean = x.mean(dim=-1)
    var = x.var(dim=-1, unbiased=False)
    eps_eff = torch.full_like(mean, eps)
    if pb_relax:
        c = x.abs().amax(dim=-1) / 8
        ok = (c > 0) & torch.isfinite(c)
        eps_eff = torch.where(ok, eps * c * c, eps_eff)
    return mean, 1 / torch.sqrt(var + eps_eff)


def _check_stats(stats, x, eps, pb_relax, columns=(0, 1)):
    mean, rstd = _expected_stats(x, eps, pb_relax)
    tol = 1e-9 if stats.dtype == torch.float64 else 2e-5
    torch.testing.assert_close(stats[:, columns[0]].double(), mean, rtol=tol, atol=tol)
    torch.testing.assert_close(stats[:, columns[1]].double(), rstd, rtol=tol, atol=tol)


# ---- forward parity -------------------------------------------------------------------------


@pytest.mark.parametrize("pb_relax", [False, True])
@pytest.mark.parametrize("hidden", ODD_HIDDEN + (64, 8192, 9000))
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
def test_layer_norm_matches_reference(dtype, hidden, pb_relax):
    x = _randn((37, hidden), dtype, 3.0, 0.5)
    w, b = _params(hidden, dtype)
    out, stats = torch.ops.cogview.layer_norm(x, w, b, EPS, pb_relax)
    assert stats.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert stats.shape == (37, 2)
    exact = reference.layer_norm(*_exact(x, w, b), EPS, pb_relax)
    _check(out, _compose_ln(x, w, b, EPS, pb_relax), exact, f"layer_norm {dtype} hidden={hidden}")
    _check_stats(stats, x, EPS, pb_relax)


@pytest.mark.parametrize("hidden", (1, 7, 64, 1023, 2560, 4097, 20000))
@pytest.mark.parametrize(
    "branch_dtype,residual_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16),
        (torch.float64, torch.float64),
    ],
)
@pytest.mark.parametrize("with_next", [False, True])
def test_add_layer_norm_matches_reference(branch_dtype, residual_dtype, hidden, with_next):
    rows = 5 if hidden > 10000 else 29
    residual = _randn((rows, hidden), residual_dtype, 2.0)
    branch = _randn((rows, hidden), branch_dtype, 1.5, -0.3)
    w_out, b_out = _params(hidden, torch.float32)
    w_next, b_next = _params(hidden, branch_dtype) if with_next else (None, None)
    new_residual, normed, stats = torch.ops.cogview.add_layer_norm(
        residual, branch, w_out, b_out, w_next, b_next, EPS, False)
    assert new_residual.dtype == residual_dtype
    assert stats.shape == (rows, 4 if with_next else 2)
    exact_res, exact_normed = reference.add_layer_norm(
        *_exact(residual, branch, w_out, b_out, w_next, b_next), EPS, False)
    comp_res, _ = _compose_add(residual, branch, w_out, b_out, w_next, b_next, EPS, False)
    what = f"add_layer_norm {branch_dtype}/{residual_dtype} hidden={hidden}"
    _check(new_residual, comp_res, exact_res, what + " new_residual")
    _check_stats(stats, branch, EPS, False)
    if not with_next:
        assert normed.numel() == 0
        return
    assert normed.dtype == branch_dtype
    # The second LayerNorm reads the new residual as stored: compare with LN of the kernel's own
    # new_residual (exact in float64), the composition doing the same in the working dtype.
    exact_normed = reference.layer_norm(*_exact(new_residual, w_next, b_next), EPS).to(torch.float64)
    comp_normed = _compose_ln(new_residual, w_next, b_next, EPS, False).to(branch_dtype)
    _check(normed, comp_normed, exact_normed, what + " normed")
    _check_stats(stats, new_residual, EPS, False, columns=(2, 3))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("hidden", (7, 1024, 2560, 4097))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_non_contiguous_inputs(dtype, hidden, layout):
    residual = _randn((3, 7, hidden), torch.float32, 2.0)
    branch = _randn((3, 7, hidden), dtype, 1.0, 0.2)
    w_out, b_out = _params(hidden, dtype)
    w_next, b_next = _params(hidden, torch.float32)
    r_in, b_in = _layout(residual, layout), _layout(branch, "pad3" if layout == "pad8" else layout)
    assert torch.equal(r_in, residual) and torch.equal(b_in, branch)
    new_residual, normed = cogview.ops.add_layer_norm(r_in, b_in, w_out, b_out, w_next, b_next)
    expected_res, expected_normed = torch.ops.cogview.add_layer_norm(
        residual, branch, w_out, b_out, w_next, b_next, EPS, False)[:2]
    exact_res, _ = reference.add_layer_norm(*_exact(residual, branch, w_out, b_out, w_next, b_next))
    comp_res, _ = _compose_add(residual, branch, w_out, b_out, w_next, b_next, EPS, False)
    _check(new_residual, comp_res, exact_res, f"{layout} new_residual")
    exact_normed = reference.layer_norm(*_exact(new_residual, w_next, b_next))
    comp_normed = _compose_ln(new_residual, w_next, b_next, EPS, False).to(dtype)
    _check(normed, comp_normed, exact_normed, f"{layout} normed")
    # The same math on a differently laid out copy: at most a rounding step apart.
    assert max_error(normed, expected_normed) <= 2 * rounding_unit(dtype, expected_normed) + 1e-5
    out = cogview.ops.layer_norm(_layout(branch, layout), w_out, b_out)
    exact = reference.layer_norm(*_exact(branch, w_out, b_out))
    _check(out, _compose_ln(branch, w_out, b_out, EPS, False), exact, f"{layout} layer_norm")


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 7), (0, 4097)])
def test_zero_rows(shape):
    x = torch.zeros(shape, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    r = torch.zeros(shape, device=DEVICE, dtype=torch.float32, requires_grad=True)
    w, b = (p.requires_grad_() for p in _params(shape[-1], torch.float32))
    wn, bn = (p.requires_grad_() for p in _params(shape[-1], torch.bfloat16))
    out = cogview.ops.layer_norm(x, w, b)
    new_residual, normed = cogview.ops.add_layer_norm(r, x, w, b, wn, bn)
    assert out.shape == shape and new_residual.shape == shape and normed.shape == shape
    (out.sum() + new_residual.sum() + normed.float().sum()).backward()
    for p in (w, b, wn, bn):
        assert p.grad is not None and p.grad.shape == (shape[-1],) and not p.grad.any()
    assert x.grad.shape == shape and r.grad.shape == shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_pb_relax_special_rows(dtype):
    hidden = 1031
    x = _randn((6, hidden), torch.float32, 1.0)
    x[0] = 0  # all zeros: c = 0, eps unchanged
    x[1] *= 3e3  # large activations: eps * c^2 matters
    x[2, 5] = float("inf")  # non-finite c: eps unchanged (row is NaN anyway)
    x[3] = 7.0  # constant row: variance 0, only the relaxed eps remains
    x[4] *= 1e-3
    x = x.to(dtype)
    w, b = _params(hidden, torch.float32)
    eps = 1.0  # PB-relax makes eps relative to max|x|: a large eps makes the relaxation visible
    out, stats = torch.ops.cogview.layer_norm(x, w, b, eps, True)
    exact = reference.layer_norm(*_exact(x, w, b), eps, True)
    finite = torch.isfinite(exact).all(dim=-1)
    assert torch.equal(torch.isnan(out).any(dim=-1), ~finite)
    _check(out[finite], _compose_ln(x, w, b, eps, True)[finite], exact[finite], f"pb_relax {dtype}")
    _check_stats(stats[finite], x[finite], eps, True)
    # Without the relaxation the large row differs (the test would notice a missing pb_relax).
    plain = torch.ops.cogview.layer_norm(x, w, b, eps, False)[0]
    assert max_error(plain[1], exact[1]) > 4 * max(max_error(out[1], exact[1]), rounding_unit(dtype, exact[1]))


# ---- gradients --------------------------------------------------------------------------------


def _grads(outputs, inputs, cotangents):
    pairs = [(o, g) for o, g in zip(outputs, cotangents) if o is not None and g is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g.to(o.dtype) for o, g in pairs],
                                allow_unused=True)
    return grads


@pytest.mark.parametrize("pb_relax", [False, True])
@pytest.mark.parametrize("hidden", ODD_HIDDEN + (4096, 6000, 9000))
@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
def test_layer_norm_gradients(dtype, hidden, pb_relax):
    x = _randn((23, hidden), dtype, 2.0, 0.3).requires_grad_()
    w, b = (p.requires_grad_() for p in _params(hidden, dtype))
    g = _randn((23, hidden), torch.float64)
    grads = _grads([cogview.ops.layer_norm(x, w, b, EPS, pb_relax)], (x, w, b), [g])
    xe, we, be = (t.requires_grad_() for t in _exact(x, w, b))
    exact = _grads([reference.layer_norm(xe, we, be, EPS, pb_relax)], (xe, we, be), [g])
    comp = _grads([_compose_ln(x, w, b, EPS, pb_relax)], (x, w, b), [g])
    for name, k, c, e in zip(("x", "weight", "bias"), grads, comp, exact):
        _check(k, c, e, f"grad {name} {dtype} hidden={hidden} pb_relax={pb_relax}")


@pytest.mark.parametrize("which", ["both", "residual_only", "normed_only", "no_next"])
@pytest.mark.parametrize("hidden", (7, 1023, 2560, 4096, 4097, 9000))
@pytest.mark.parametrize(
    "branch_dtype,residual_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
     (torch.float32, torch.float32), (torch.float64, torch.float64)],
)
def test_add_layer_norm_gradients(branch_dtype, residual_dtype, hidden, which):
    rows = 19
    residual = _randn((rows, hidden), residual_dtype, 2.0).requires_grad_()
    branch = _randn((rows, hidden), branch_dtype, 1.0, 0.1).requires_grad_()
    w_out, b_out = (p.requires_grad_() for p in _params(hidden, torch.float32))
    with_next = which != "no_next"
    w_next, b_next = ((p.requires_grad_() for p in _params(hidden, branch_dtype)) if with_next
                      else (None, None))
    inputs = [t for t in (residual, branch, w_out, b_out, w_next, b_next) if t is not None]
    g_res = None if which == "normed_only" else _randn((rows, hidden), torch.float64)
    g_normed = None if which in ("residual_only", "no_next") else _randn((rows, hidden), torch.float64)

    out = cogview.ops.add_layer_norm(residual, branch, w_out, b_out, w_next, b_next, EPS, True)
    grads = _grads(out, inputs, [g_res, g_normed])
    exact_inputs = [t.requires_grad_() for t in _exact(*inputs)]
    exact_args = exact_inputs + [None, None] * (not with_next)
    exact = _grads(reference.add_layer_norm(*exact_args, EPS, True), exact_inputs, [g_res, g_normed])
    comp = _grads(_compose_add(residual, branch, w_out, b_out, w_next, b_next, EPS, True), inputs,
                  [g_res, g_normed])
    names = ("residual", "branch", "w_out", "b_out", "w_next", "b_next")
    for name, k, c, e, t in zip(names, grads, comp, exact, inputs):
        what = f"grad {name} {branch_dtype}/{residual_dtype} hidden={hidden} {which}"
        if e is None:  # no gradient reaches it (w_next/b_next with only grad_new_residual)
            assert k is None or not k.any(), what
            continue
        assert k is not None and k.dtype == t.dtype, what
        _check(k, c if c is not None else torch.zeros_like(k), e, what)


# ---- CPU and CUDA agree -----------------------------------------------------------------------


@pytest.mark.parametrize("hidden", (7, 2560, 4097))
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_and_cuda_agree(dtype, hidden):
    rows = 33
    torch.manual_seed(1)
    cpu = {
        "residual": torch.randn(rows, hidden).to(torch.float32) * 2,
        "branch": (torch.randn(rows, hidden) + 0.3).to(dtype),
        "w_out": (1 + 0.2 * torch.randn(hidden)).to(dtype),
        "b_out": (0.2 * torch.randn(hidden)).to(dtype),
        "w_next": 1 + 0.2 * torch.randn(hidden),
        "b_next": 0.2 * torch.randn(hidden),
    }
    g_res = torch.randn(rows, hidden)
    g_normed = torch.randn(rows, hidden)

    def run(device):
        t = {k: v.to(device).requires_grad_() for k, v in cpu.items()}
        new_residual, normed = cogview.ops.add_layer_norm(**t, pb_relax=True)
        out = cogview.ops.layer_norm(t["branch"], t["w_out"], t["b_out"])
        loss = ((new_residual * g_res.to(device)).sum() + (normed.float() * g_normed.to(device)).sum()
                + (out.float() * g_res.to(device)).sum())
        grads = torch.autograd.grad(loss, list(t.values()))
        return [v.detach().cpu() for v in (new_residual, normed, out, *grads)]

    names = ["new_residual", "normed", "out"] + [f"grad {k}" for k in cpu]
    for name, a, b in zip(names, run("cpu"), run(DEVICE)):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype in LOW:
            bound = 2 * rounding_unit(a.dtype, a)
        else:
            bound = 1e-4 * max(1.0, float(a.abs().max()))
        assert max_error(b, a) <= bound, f"{name}: CPU/{DEVICE} differ by {max_error(b, a):.3g} > {bound:.3g}"


# ---- determinism --------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", (2560, 4097, 9000))
def test_weight_grads_are_deterministic(hidden):
    rows = 4099 if hidden < 9000 else 300
    residual = _randn((rows, hidden), torch.bfloat16, 2.0).requires_grad_()
    branch = _randn((rows, hidden), torch.bfloat16).requires_grad_()
    params = [p.requires_grad_() for p in (*_params(hidden, torch.float32), *_params(hidden, torch.bfloat16))]
    x = _randn((rows, hidden), torch.float16).requires_grad_()
    g1, g2 = _randn((rows, hidden), torch.bfloat16), _randn((rows, hidden), torch.bfloat16)

    def run():
        new_residual, normed = cogview.ops.add_layer_norm(residual, branch, *params)
        out = cogview.ops.layer_norm(x, params[0], params[1])
        loss = (new_residual * g1).float().sum() + (normed * g2).float().sum() + (out * g1.half()).float().sum()
        return torch.autograd.grad(loss, [residual, branch, x, *params])

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---- torch.compile, opcheck, bad input ----------------------------------------------------------


def test_torch_compile_parity():
    torch._dynamo.reset()
    hidden = 2560

    def step(residual, branch, w_out, b_out, w_next, b_next):
        new_residual, normed = cogview.ops.add_layer_norm(residual, branch, w_out, b_out, w_next, b_next,
                                                          pb_relax=True)
        return new_residual, cogview.ops.layer_norm(normed, w_next, b_next)

    compiled = torch.compile(step, fullgraph=True)
    args = [_randn((2, 9, hidden), torch.bfloat16, 2.0), _randn((2, 9, hidden), torch.bfloat16),
            *_params(hidden, torch.float32), *_params(hidden, torch.bfloat16)]
    args = [a.requires_grad_() for a in args]
    eager_out = step(*args)
    compiled_out = compiled(*args)
    for a, b in zip(eager_out, compiled_out):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    g = [torch.randn_like(o) for o in eager_out]
    eager_grads = torch.autograd.grad(eager_out, args, g)
    compiled_grads = torch.autograd.grad(compiled_out, args, g)
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def _opcheck_inputs(hidden=1031):
    x = _randn((4, 5, hidden), torch.bfloat16).requires_grad_()
    residual = _randn((4, 5, hidden), torch.float32).requires_grad_()
    w, b = (p.requires_grad_() for p in _params(hidden, torch.float32))
    wn, bn = (p.requires_grad_() for p in _params(hidden, torch.bfloat16))
    return x, residual, w, b, wn, bn


def test_opcheck_forward_ops():
    x, residual, w, b, wn, bn = _opcheck_inputs()
    torch.library.opcheck(torch.ops.cogview.layer_norm.default, (x, w, b, EPS, True))
    torch.library.opcheck(torch.ops.cogview.add_layer_norm.default, (residual, x, w, b, wn, bn, EPS, False))
    torch.library.opcheck(torch.ops.cogview.add_layer_norm.default, (residual, x, w, b, None, None, EPS, True))


def test_opcheck_backward_ops():
    x, residual, w, b, wn, bn = (t.detach() for t in _opcheck_inputs())
    out, stats = torch.ops.cogview.layer_norm(x, w, b, EPS, False)
    new_residual, normed, stats4 = torch.ops.cogview.add_layer_norm(residual, x, w, b, wn, bn, EPS, False)
    _, _, stats2 = torch.ops.cogview.add_layer_norm(residual, x, w, b, None, None, EPS, False)
    torch.library.opcheck(torch.ops.cogview.layer_norm_backward.default, (torch.randn_like(out), x, w, stats))
    backward = torch.ops.cogview.add_layer_norm_backward.default
    torch.library.opcheck(
        backward, (torch.randn_like(new_residual), torch.randn_like(normed), x, new_residual, w, wn, stats4))
    torch.library.opcheck(backward, (None, torch.randn_like(normed), x, new_residual, w, wn, stats4))
    torch.library.opcheck(backward, (torch.randn_like(new_residual), None, x, new_residual, w, None, stats2))


def test_bad_inputs_raise_cleanly():
    x = _randn((4, 64), torch.float32)
    w, b = _params(64, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        cogview.ops.layer_norm(x, w.cpu() if DEVICE != "cpu" else w[:3], b)
    with pytest.raises(TypeError, match="weight"):
        cogview.ops.layer_norm(x.half(), w.bfloat16(), b)
    with pytest.raises(ValueError, match="w_out"):
        torch.ops.cogview.add_layer_norm(x, x, w[:10], b, None, None, EPS, False)
    if DEVICE == "cpu":
        return  # the CPU backward ops do not validate their arguments (yet)
    out, stats = torch.ops.cogview.layer_norm(x, w, b, EPS, False)
    with pytest.raises(ValueError, match="stats"):
        torch.ops.cogview.layer_norm_backward(out, x, w, stats[:2])
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.cogview.layer_norm_backward(out[:, :10], x, w, stats)
    with pytest.raises(ValueError, match="grad_normed"):
        torch.ops.cogview.add_layer_norm_backward(None, out[:2], x, x, w, w, torch.zeros(4, 4, device=DEVICE))


# ---- property test --------------------------------------------------------------------------------


@settings(deadline=None)
@given(
    rows=st.integers(0, 40),
    hidden=st.one_of(st.integers(1, 300), st.sampled_from([1023, 1024, 1031, 2560, 4095, 4096, 4097, 8191])),
    dtypes=st.sampled_from([(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                            (torch.float32, torch.float32), (torch.bfloat16, torch.float32)]),
    layout=st.sampled_from(LAYOUTS[:4]),
    with_next=st.booleans(),
    pb_relax=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_add_layer_norm(rows, hidden, dtypes, layout, with_next, pb_relax, seed):
    torch.manual_seed(seed)
    branch_dtype, residual_dtype = dtypes
    residual = _randn((rows, hidden), residual_dtype, 2.0)
    branch = _randn((rows, hidden), branch_dtype, 1.0, 0.5)
    w_out, b_out = _params(hidden, branch_dtype)
    w_next, b_next = _params(hidden, torch.float32) if with_next else (None, None)
    new_residual, normed = cogview.ops.add_layer_norm(
        _layout(residual, layout), _layout(branch, layout), w_out, b_out, w_next, b_next, pb_relax=pb_relax)
    exact_res, _ = reference.add_layer_norm(*_exact(residual, branch, w_out, b_out, None, None), EPS, pb_relax)
    comp_res, _ = _compose_add(residual, branch, w_out, b_out, None, None, EPS, pb_relax)
    _check(new_residual, comp_res, exact_res, "new_residual")
    if with_next:
        exact_normed = reference.layer_norm(*_exact(new_residual, w_next, b_next), EPS, pb_relax)
        comp_normed = _compose_ln(new_residual, w_next, b_next, EPS, pb_relax).to(branch_dtype)
        _check(normed, comp_normed, exact_normed, "normed")
    else:
        assert normed is None

"""cogview.ops.layer_norm / add_layer_norm (CPU kernels) against the plain-PyTorch reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from cogview import ops
from cogview.ops import reference
from tolerance import assert_within_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LOW_PRECISION = (torch.float16, torch.bfloat16)
HIDDEN_SIZES = [1, 7, 1023, 2560, 4097]


def _param(hidden, dtype=torch.float32, offset=0.0):
    return (torch.randn(hidden) * 0.5 + offset).to(dtype)


def _layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout: contiguous, row-strided or fully strided."""
    if kind == "contiguous":
        return x
    if kind == "row_strided":  # rows are a slice of wider rows: unit inner stride, larger row stride
        wide = torch.empty(*x.shape[:-1], x.shape[-1] + 3, dtype=x.dtype)
        wide[..., : x.shape[-1]] = x
        return wide[..., : x.shape[-1]]
    # Inner stride != 1: every element sits two apart.
    spread = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    spread[..., ::2] = x
    return spread[..., ::2]


def _plain_ln(x, w, b, eps, pb_relax):
    """LayerNorm as a user writes it in plain PyTorch, in x's own dtype (the tolerance yardstick)."""
    if pb_relax:
        c = x.detach().abs().amax(-1, keepdim=True) / 8
        x = x / torch.where(c > 0, c, torch.ones_like(c))
    return F.layer_norm(x, x.shape[-1:], w.to(x.dtype), b.to(x.dtype), eps)


def _exact(residual, branch, w_out, b_out, w_next, b_next, eps, pb_relax):
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    return reference.add_layer_norm(as64(residual), as64(branch), as64(w_out), as64(b_out), as64(w_next),
                                    as64(b_next), eps, pb_relax)


def _check_close(got, want, dtype, composition, exact, what):
    if dtype in LOW_PRECISION:
        assert_within_rule(got, composition, exact, dtype, what)
    else:
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        scale = float(want.abs().max()) if want.numel() else 1.0
        torch.testing.assert_close(got, want, atol=tol * max(1.0, scale), rtol=tol)


@given(
    hidden=st.one_of(st.sampled_from(HIDDEN_SIZES), st.integers(1, 300)),
    lead=st.sampled_from([(), (1,), (3,), (2, 5), (0,), (1, 1, 4)]),
    dtype=st.sampled_from(DTYPES),
    pb_relax=st.booleans(),
    layout=st.sampled_from(["contiguous", "row_strided", "strided"]),
    with_next=st.booleans(),
    fp32_residual=st.booleans(),
    fp32_weights=st.booleans(),
)
def test_add_layer_norm_matches_reference(hidden, lead, dtype, pb_relax, layout, with_next, fp32_residual,
                                          fp32_weights):
    residual_dtype = torch.float32 if fp32_residual and dtype != torch.float64 else dtype
    weight_dtype = torch.float32 if fp32_weights and dtype != torch.float64 else dtype
    shape = (*lead, hidden)
    residual = _layout((torch.randn(shape) * 3).to(residual_dtype), layout)
    branch = _layout((torch.randn(shape) * 2 + 0.5).to(dtype), layout)
    w_out, b_out = _param(hidden, weight_dtype, 1.0), _param(hidden, weight_dtype)
    w_next, b_next = (_param(hidden, weight_dtype, 1.0), _param(hidden, weight_dtype)) if with_next else (None, None)
    args = (residual, branch, w_out, b_out, w_next, b_next, 1e-5, pb_relax)

    new_residual, normed = ops.add_layer_norm(*args)
    want_residual, want_normed = reference.add_layer_norm(*args)
    comp_residual = residual + _plain_ln(branch, w_out, b_out, 1e-5, pb_relax).to(residual_dtype)
    exact_residual, _ = _exact(*args)

    assert new_residual.dtype == residual_dtype and new_residual.shape == shape
    _check_close(new_residual, want_residual, residual_dtype, comp_residual, exact_residual, "new_residual")
    if with_next:
        assert normed.dtype == dtype and normed.shape == shape
        # LN_next reads the rounded new residual: judge it against the exact LN of what was stored.
        exact_normed = reference.layer_norm(new_residual.double(), w_next.double(), b_next.double(), 1e-5,
                                            pb_relax)
        comp_normed = _plain_ln(new_residual, w_next, b_next, 1e-5, pb_relax).to(dtype)
        _check_close(normed, want_normed, dtype, comp_normed, exact_normed, "normed")
    else:
        assert normed is None


@given(
    hidden=st.one_of(st.sampled_from(HIDDEN_SIZES), st.integers(1, 300)),
    rows=st.integers(0, 6),
    dtype=st.sampled_from(DTYPES),
    pb_relax=st.booleans(),
    layout=st.sampled_from(["contiguous", "row_strided", "strided"]),
)
def test_layer_norm_matches_reference(hidden, rows, dtype, pb_relax, layout):
    x = _layout((torch.randn(rows, hidden) * 4 - 1).to(dtype), layout)
    weight, bias = _param(hidden, dtype, 1.0), _param(hidden, dtype)
    got = ops.layer_norm(x, weight, bias, 1e-5, pb_relax)
    want = reference.layer_norm(x, weight, bias, 1e-5, pb_relax)
    assert got.dtype == dtype and got.shape == x.shape
    exact = reference.layer_norm(x.double(), weight.double(), bias.double(), 1e-5, pb_relax)
    composition = _plain_ln(x, weight, bias, 1e-5, pb_relax)
    _check_close(got, want, dtype, composition, exact, "layer_norm")


@pytest.mark.parametrize("isa", ops.usable_cpu_isas())
@pytest.mark.parametrize("hidden", [1, 13, 64, 1023, 4097])
def test_every_usable_isa_matches_reference(isa, hidden):
    residual, branch = torch.randn(9, hidden), torch.randn(9, hidden) * 3
    w, b = _param(hidden, offset=1.0), _param(hidden)
    with ops.use_cpu_isa(isa):
        assert ops.cpu_isa() == isa
        got = ops.add_layer_norm(residual, branch, w, b, w, b, pb_relax=True)
        bf16 = ops.add_layer_norm(residual, branch.bfloat16(), w, b, w, b)
    want = reference.add_layer_norm(residual, branch, w, b, w, b, pb_relax=True)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=3e-5, rtol=3e-5)
    want_bf16 = reference.add_layer_norm(residual, branch.bfloat16(), w, b, w, b)
    torch.testing.assert_close(bf16[0], want_bf16[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bf16[1].float(), want_bf16[1].float(), atol=2e-2, rtol=2e-2)


def test_unknown_or_unusable_isa_is_rejected():
    with pytest.raises(ValueError, match="unknown CPU ISA"):
        with ops.use_cpu_isa("sse9"):
            pass


@pytest.mark.parametrize("pb_relax", [False, True])
def test_gradcheck_layer_norm(pb_relax):
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.layer_norm(*a, pb_relax=pb_relax), (x, w, b))


@pytest.mark.parametrize("with_next", [False, True])
@pytest.mark.parametrize("pb_relax", [False, True])
def test_gradcheck_add_layer_norm(with_next, pb_relax):
    make = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    residual, branch = make(3, 2, 5), make(3, 2, 5).transpose(0, 1)  # non-contiguous branch
    residual = residual.transpose(0, 1)
    params = [make(5), make(5)] + ([make(5), make(5)] if with_next else [])

    def fn(r, br, *p):
        out = ops.add_layer_norm(r, br, *p, pb_relax=pb_relax)
        return out if with_next else out[0]

    assert torch.autograd.gradcheck(fn, (residual, branch, *params))


def test_gradients_match_reference_in_float32():
    hidden = 1023
    leaves = [torch.randn(6, hidden), torch.randn(6, hidden), _param(hidden, offset=1.0), _param(hidden),
              _param(hidden, offset=1.0), _param(hidden)]
    grads_out = [torch.randn(6, hidden), torch.randn(6, hidden)]
    results = []
    for fn in (ops.add_layer_norm, reference.add_layer_norm):
        inputs = [t.clone().requires_grad_() for t in leaves]
        outputs = fn(*inputs, pb_relax=True)
        torch.autograd.backward(outputs, grads_out)
        results.append([t.grad for t in inputs])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_only_one_output_used_gets_the_right_gradient():
    residual, branch = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    w, b = _param(8, offset=1.0), _param(8)
    new_residual, normed = ops.add_layer_norm(residual, branch, w, b, w, b)
    (normed * torch.arange(8.0)).sum().backward()
    r2, b2 = residual.detach().clone().requires_grad_(), branch.detach().clone().requires_grad_()
    (reference.add_layer_norm(r2, b2, w, b, w, b)[1] * torch.arange(8.0)).sum().backward()
    torch.testing.assert_close(residual.grad, r2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(branch.grad, b2.grad, atol=1e-5, rtol=1e-5)


def test_weight_gradients_are_deterministic_across_thread_counts():
    x, g = torch.randn(301, 129), torch.randn(301, 129)
    w = _param(129, offset=1.0).requires_grad_()
    b = _param(129).requires_grad_()
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            w.grad = b.grad = None
            ops.layer_norm(x, w, b).backward(g)
            grads.append((w.grad.clone(), b.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        assert torch.equal(grads[0][0], other[0]) and torch.equal(grads[0][1], other[1])


def test_pb_relax_per_row_agrees_with_the_original_global_form():
    # Rows of similar magnitude: per-row and global max differ only through eps * c^2, far below
    # the variance. Stated tolerance: 1e-4 absolute on unit-scale outputs.
    x = torch.randn(16, 2560) * 40
    w, b = _param(2560, offset=1.0), _param(2560)
    per_row = ops.layer_norm(x, w, b, pb_relax=True)
    torch.testing.assert_close(per_row, reference.pb_relax_layer_norm_global(x, w, b), atol=1e-4, rtol=0)


def test_large_half_precision_activations_stay_finite():
    # Activations near fp16's limit: their squares overflow fp16, but statistics accumulate in fp32.
    x = (torch.randn(4, 64) * 1.5e4).clamp(-6e4, 6e4).half()
    w, b = torch.ones(64, dtype=torch.half), torch.zeros(64, dtype=torch.half)
    out = ops.layer_norm(x, w, b, pb_relax=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference.layer_norm(x.float(), w.float(), b.float(), pb_relax=True),
                               atol=2e-2, rtol=2e-2)


def test_zero_row_and_constant_rows():
    w, b = _param(5, offset=1.0), _param(5)
    assert ops.layer_norm(torch.empty(0, 5), w, b).shape == (0, 5)
    constant = torch.full((2, 5), 3.0)
    torch.testing.assert_close(ops.layer_norm(constant, w, b, pb_relax=True), b.expand(2, 5))
    torch.testing.assert_close(ops.layer_norm(torch.zeros(2, 5), w, b, pb_relax=True), b.expand(2, 5))


def test_autocast_keeps_input_dtypes_and_values():
    residual, branch = torch.randn(4, 33), torch.randn(4, 33).bfloat16()
    w, b = _param(33, offset=1.0), _param(33)
    outside = ops.add_layer_norm(residual, branch, w, b, w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ops.add_layer_norm(residual, branch, w, b, w, b)
        plain = ops.layer_norm(branch, w, b)
    assert inside[0].dtype == torch.float32 and inside[1].dtype == torch.bfloat16
    assert plain.dtype == torch.bfloat16
    assert torch.equal(inside[0], outside[0]) and torch.equal(inside[1], outside[1])


@pytest.mark.parametrize("with_next", [False, True])
def test_opcheck(with_next):
    residual, branch = torch.randn(3, 4, 17), torch.randn(3, 4, 17, requires_grad=True)
    w, b = _param(17, offset=1.0).requires_grad_(), _param(17).requires_grad_()
    nxt = (w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()) if with_next else (None, None)
    torch.library.opcheck(torch.ops.cogview.add_layer_norm.default, (residual, branch, w, b, *nxt, 1e-5, True))
    torch.library.opcheck(torch.ops.cogview.layer_norm.default, (branch, w, b, 1e-5, False))


def test_torch_compile_fullgraph_parity_forward_and_backward():
    def block(residual, branch, w, b):
        new_residual, normed = ops.add_layer_norm(residual, branch, w, b, w, b, pb_relax=True)
        return (ops.layer_norm(normed, w, b) * new_residual).sum()

    compiled = torch.compile(block, fullgraph=True)
    leaves = [torch.randn(5, 31), torch.randn(5, 31), _param(31, offset=1.0), _param(31)]
    eager_in = [t.clone().requires_grad_() for t in leaves]
    compiled_in = [t.clone().requires_grad_() for t in leaves]
    eager_out, compiled_out = block(*eager_in), compiled(*compiled_in)
    torch.testing.assert_close(compiled_out, eager_out)
    eager_out.backward()
    compiled_out.backward()
    for e, c in zip(eager_in, compiled_in):
        torch.testing.assert_close(c.grad, e.grad)


BAD_INPUTS = [
    ("residual", lambda x, w: dict(residual=x[:, :3]), ValueError, "`residual` has shape"),
    ("weight size", lambda x, w: dict(w_out=w[:-1]), ValueError, "`w_out` must be 1-D with 8"),
    ("weight dtype", lambda x, w: dict(b_out=w.long()), TypeError, "`b_out` must be float32"),
    ("weight wrong float", lambda x, w: dict(w_out=w.double()), TypeError, "`w_out` must be float32 or"),
    ("integer branch", lambda x, w: dict(branch=x.int()), TypeError, "`branch` must be float32"),
    ("mixed devices", lambda x, w: dict(w_out=w.to("meta")), ValueError, "`w_out` is on meta"),
    ("next without bias", lambda x, w: dict(w_next=w), ValueError, "given together"),
    ("negative eps", lambda x, w: dict(eps=-1.0), ValueError, "`eps` must be"),
    ("not a tensor", lambda x, w: dict(residual=[1.0]), TypeError, "`residual` must be a torch.Tensor"),
    ("f64 with f32", lambda x, w: dict(residual=x.double()), TypeError, "must both be float64"),
    ("scalar input", lambda x, w: dict(residual=x[0, 0], branch=x[0, 0]), ValueError, "last \\(hidden\\)"),
]


@pytest.mark.parametrize("case,change,error,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(case, change, error, message):
    x, w = torch.randn(4, 8), torch.ones(8)
    kwargs = dict(residual=x, branch=x.clone(), w_out=w, b_out=w.clone(), w_next=None, b_next=None, eps=1e-5)
    kwargs.update(change(x, w))
    with pytest.raises(error, match=message):
        ops.add_layer_norm(**kwargs)


def test_layer_norm_bad_inputs():
    with pytest.raises(ValueError, match="`weight` must be 1-D with 8"):
        ops.layer_norm(torch.randn(2, 8), torch.ones(2, 4), torch.zeros(8))
    with pytest.raises(TypeError, match="`x` must be float32"):
        ops.layer_norm(torch.ones(2, 8, dtype=torch.int64), torch.ones(8), torch.zeros(8))


def test_direct_op_calls_are_checked_in_cpp_too():
    with pytest.raises(ValueError, match="`weight` must be 1-D"):
        torch.ops.cogview.layer_norm(torch.randn(2, 8), torch.ones(7), torch.zeros(8), 1e-5, False)


@pytest.mark.parametrize("with_next", [False, True])
def test_opcheck_backward_ops(with_next):
    x, g = torch.randn(3, 4, 17), torch.randn(3, 4, 17)
    w = _param(17, offset=1.0)
    _, stats = torch.ops.cogview.layer_norm(x, w, w, 1e-5, False)
    torch.library.opcheck(torch.ops.cogview.layer_norm_backward.default, (g, x, w, stats))
    residual = torch.randn(3, 4, 17)
    nxt = (w, w) if with_next else (None, None)
    new_residual, _, stats = torch.ops.cogview.add_layer_norm(residual, x, w, w, *nxt, 1e-5, False)
    grad_normed = torch.randn(3, 4, 17) if with_next else None
    torch.library.opcheck(torch.ops.cogview.add_layer_norm_backward.default,
                          (g, grad_normed, x, new_residual, w, nxt[0], stats))


def test_direct_backward_calls_with_wrong_shapes_raise():
    x, w = torch.randn(4, 8), torch.ones(8)
    _, stats = torch.ops.cogview.layer_norm(x, w, w, 1e-5, False)
    with pytest.raises(ValueError, match="`stats` must have shape"):
        torch.ops.cogview.layer_norm_backward(x, x, w, stats[:2])
    with pytest.raises(ValueError, match="`grad_out` must have shape"):
        torch.ops.cogview.layer_norm_backward(x[:, :4], x, w, stats)
    with pytest.raises(ValueError, match="`stats` must have shape"):
        torch.ops.cogview.add_layer_norm_backward(x, x, x, x, w, w, stats)  # 2 columns, next needs 4


def test_hidden_one_gives_exactly_zero_input_gradient():
    x = torch.randn(5, 1, requires_grad=True)
    ops.layer_norm(x, torch.full((1,), 1.7), torch.zeros(1), pb_relax=True).backward(torch.randn(5, 1))
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("isa", ops.usable_cpu_isas())
def test_large_outputs_streamed_and_recycled(isa):
    # Outputs of several MiB take other paths in the CPU kernels: fp32 outputs are written with
    # non-temporal stores, and freed outputs are recycled for the next call of the same size.
    # Hidden 1000 is a multiple of the AVX2 width but not of AVX-512's (no streaming there).
    with ops.use_cpu_isa(isa):
        for hidden in (1024, 1000):
            for _ in range(2):  # the second round gets the recycled buffers of the first
                residual, branch = torch.randn(1100, hidden) * 3, torch.randn(1100, hidden) * 2 + 0.5
                w, b = _param(hidden, offset=1.0), _param(hidden)
                args = [t.requires_grad_() for t in (residual, branch, w, b)]
                got = ops.add_layer_norm(*args, w, b)
                want = reference.add_layer_norm(*args, w, b)
                for g, r in zip(got, want):
                    torch.testing.assert_close(g, r, atol=3e-5, rtol=3e-5)
                grads = [torch.randn(1100, hidden), torch.randn(1100, hidden)]
                for g, r in zip(torch.autograd.grad(got, args, grads), torch.autograd.grad(want, args, grads)):
                    torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-3)
                out = got[0].detach()
                out.resize_(2200, hidden).fill_(1.0)  # recycled storages stay resizable
                assert float(out.sum()) == 2200 * hidden
                del got, out

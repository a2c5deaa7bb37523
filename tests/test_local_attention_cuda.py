"""CUDA local attention (csrc/cuda/local_attention.cu) against the reference: forward and backward.

Every test here carries the `cuda` marker and is skipped without a GPU. They mirror
tests/test_local_attention.py (property tests, the named cases, gradcheck, opcheck, compile, bad
head sizes) with the kernel run on the GPU and the float64 reference (and the plain composition of
the low-precision rule) on the CPU; plus the benchmark's shapes, bitwise reproducibility, unaligned
rows (the scalar-load path) and a CUDA-vs-CPU-kernel comparison.

`COGVIEW_CUDA_TEST_DEVICE=cpu` runs them against the CPU kernels (checks the tests themselves).
"""
from __future__ import annotations

import zlib

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cogview
from cogview.ops import local_attention, reference
from test_local_attention import CASES, call, configs, lse_dtype, make_inputs, plain
from tolerance import assert_within_rule

# COGVIEW_CUDA_TEST_DEVICE=cpu runs the same checks against the CPU kernels (a check of the tests
# themselves on a machine without a GPU); the CUDA-only tests keep their own `cuda` mark.
DEVICE = os.environ.get("COGVIEW_CUDA_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.cuda if DEVICE == "cuda" else []


@pytest.fixture(autouse=True)
def _needs_kernel():
    if not cogview.ops.has_kernel("local_attention", DEVICE):
        pytest.fail("cogview was built without a CUDA kernel for local_attention (rebuild with CUDA)")


def _grads(fn, cfg, inputs, grad_out, grad_lse, backward=True):
    out, lse = call(fn, cfg, *inputs)
    if not backward:
        return (out, lse), ()
    loss = (out.double() * grad_out).sum() + (lse.double() * grad_lse).sum()
    return (out, lse), torch.autograd.grad(loss, [t for t in inputs if t is not None])


def check_on_device(cfg, dtype=torch.float32, seed=0, noncontiguous=False, backward=True, prepare=None):
    """Kernel on the GPU vs the float64 reference on the CPU (tolerances as in the CPU tests)."""
    base = make_inputs(cfg, dtype, seed=seed, noncontiguous=noncontiguous)
    dev = [t.to(DEVICE) if t is not None else None for t in base]
    if prepare is not None:
        dev = [prepare(t) if t is not None else None for t in dev]
    dev = [t.detach().requires_grad_(backward) if t is not None else None for t in dev]
    exact_inputs = [t.detach().double().requires_grad_(backward) if t is not None else None for t in base]
    plain_inputs = [t.detach().clone().requires_grad_(backward) if t is not None else None for t in base]
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(base[0].shape, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(base[0].shape[:-1], generator=gen, dtype=torch.float64)
    mine, my_grads = _grads(local_attention, cfg, dev, grad_out.to(DEVICE), grad_lse.to(DEVICE), backward)
    exact, exact_grads = _grads(reference.local_attention, cfg, exact_inputs, grad_out, grad_lse, backward)
    comp, comp_grads = _grads(plain, cfg, plain_inputs, grad_out, grad_lse, backward)
    assert mine[0].dtype == dtype and mine[0].shape == base[0].shape and mine[0].device.type == torch.device(DEVICE).type
    assert mine[1].dtype == lse_dtype(dtype) and mine[1].shape == base[0].shape[:-1]
    names = ["out", "lse"] + ["grad_" + n for n, t in zip("q k v text_k text_v".split(), base) if t is not None]
    for name, a, c, e in zip(names, (*mine, *my_grads), (*comp, *comp_grads), (*exact, *exact_grads)):
        a, c, e = a.detach().cpu(), c.detach(), e.detach()
        assert a.shape == e.shape, name
        if dtype == torch.float64:
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)
        elif dtype == torch.float32:
            torch.testing.assert_close(a.double(), e, rtol=1.3e-6, atol=1e-5, msg=lambda m: f"{name} {cfg}: {m}")
        else:
            assert_within_rule(a, c, e, dtype, what=f"{name} {cfg}")
    return mine, my_grads


@given(cfg=configs(), seed=st.integers(0, 2**16), noncontiguous=st.booleans())
def test_matches_reference_fp32(cfg, seed, noncontiguous):
    check_on_device(cfg, torch.float32, seed=seed, noncontiguous=noncontiguous)


@given(cfg=configs(), seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_matches_reference_low_precision(cfg, seed, dtype):
    check_on_device(cfg, dtype, seed=seed)


@settings(max_examples=10)
@given(cfg=configs(), seed=st.integers(0, 2**16))
def test_matches_reference_fp64(cfg, seed):
    check_on_device(cfg, torch.float64, seed=seed)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_named_case(name, dtype):
    if dtype == torch.float64 and name == "cross_resolution_20_to_60":
        pytest.skip("float64 adds nothing here over the float32 run (slow dense reference)")
    check_on_device(CASES[name], dtype, seed=zlib.crc32(name.encode()) % 1000)


BENCH_SHAPES = {
    "grid64_9x9": {"batch": 1, "heads": 2, "d": 64, "grid_q": (64, 64), "grid_kv": (64, 64), "window": (9, 9),
                   "text": 16, "bias": 1.0},
    "grid64_9x9_causal": {"batch": 1, "heads": 2, "d": 64, "grid_q": (64, 64), "grid_kv": (64, 64),
                          "window": (9, 9), "causal": True, "text": 16},
    "cross_60_20_5x5": {"batch": 2, "heads": 1, "d": 64, "grid_q": (60, 60), "grid_kv": (20, 20),
                        "window": (5, 5), "text": 16, "kv_broadcast": True, "text_broadcast": True},
    "self_60_9x5_d128": {"batch": 1, "heads": 1, "d": 128, "grid_q": (60, 60), "grid_kv": (60, 60),
                         "window": (9, 5), "text": 16},
}


@pytest.mark.parametrize("name", sorted(BENCH_SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_benchmark_shapes(name, dtype):
    if dtype == torch.float32 and name != "grid64_9x9_causal":
        pytest.skip("one float32 run of these shapes is enough (the dense float64 reference is slow)")
    check_on_device(BENCH_SHAPES[name], dtype, seed=4)


def test_unaligned_rows_take_the_scalar_path():
    # Every row one element off a 16-byte boundary: same values as the aligned call.
    cfg = {**CASES["window_9x5"], "batch": 2}

    def shift(t):
        flat = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(t.shape)

    for dtype in (torch.float32, torch.bfloat16):
        aligned = check_on_device(cfg, dtype, seed=2)
        shifted = check_on_device(cfg, dtype, seed=2, prepare=shift)
        for a, b in zip([*aligned[0], *aligned[1]], [*shifted[0], *shifted[1]]):
            assert torch.equal(a, b)


def test_backward_bitwise_reproducible():
    cfg = {**CASES["batch_broadcast_kv"], "d": 64}
    first = check_on_device(cfg, torch.bfloat16, seed=3)
    second = check_on_device(cfg, torch.bfloat16, seed=3)
    for a, b in zip([*first[0], *first[1]], [*second[0], *second[1]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["causal_with_text", "cross_resolution_20_to_60", "batch_broadcast_kv"])
def test_agrees_with_the_cpu_kernel(name):
    cfg = CASES[name]
    cpu = [t.requires_grad_() if t is not None else None for t in make_inputs(cfg, seed=7)]
    gpu = [t.detach().to(DEVICE).requires_grad_() if t is not None else None for t in cpu]
    for inputs in (cpu, gpu):
        out, lse = call(local_attention, cfg, *inputs)
        (out.sum() + lse.sum()).backward()
    for a, b in zip(cpu, gpu):
        if a is not None:
            torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["plain", "causal_text", "cross_broadcast"])
def test_gradcheck_fp64(variant):
    cfgs = {
        "plain": {"batch": 1, "heads": 1, "d": 3, "grid_q": (3, 4), "grid_kv": (3, 4), "window": (3, 3)},
        "causal_text": {"batch": 2, "heads": 1, "d": 4, "grid_q": (3, 3), "grid_kv": (3, 3), "window": (3, 5),
                        "causal": True, "text": 2, "bias": 0.4},
        "cross_broadcast": {"batch": 2, "heads": 2, "d": 2, "grid_q": (4, 2), "grid_kv": (2, 1),
                            "window": (3, 1), "kv_broadcast": True, "text": 1, "text_broadcast": True,
                            "scale": 0.7},
    }
    cfg = cfgs[variant]
    inputs = [t.to(DEVICE).requires_grad_() for t in make_inputs(cfg, torch.float64) if t is not None]
    has_text = len(inputs) == 5

    def fn(*args):
        tk, tv = (args[3], args[4]) if has_text else (None, None)
        return call(local_attention, cfg, args[0], args[1], args[2], tk, tv)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_opcheck_and_absent_gradients():
    cfg = CASES["causal_with_text"]
    q, k, v, tk, tv = [t.to(DEVICE) for t in make_inputs(cfg)]
    args = (q, k, v, list(cfg["grid_q"]), list(cfg["grid_kv"]), list(cfg["window"]), True, tk, tv, 0.7, 0.25)
    torch.library.opcheck(torch.ops.cogview.local_attention, args)
    out, lse = torch.ops.cogview.local_attention(*args)
    bwd = (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, *args[3:])
    torch.library.opcheck(torch.ops.cogview.local_attention_backward, bwd)
    dq, dk, dv, dtk, dtv = torch.ops.cogview.local_attention_backward(
        None, None, q, k, v, out, lse, *args[3:7], None, None, 0.7, 0.25)
    assert dq.abs().max() == 0 and dk.abs().max() == 0 and dv.abs().max() == 0
    assert dtk.numel() == 0 and dtv.numel() == 0


def test_only_lse_used():
    cfg = CASES["non_square"]
    q, k, v, tk, tv = [t.to(DEVICE).requires_grad_() for t in make_inputs(cfg)]
    _, lse = call(local_attention, cfg, q, k, v, tk, tv)
    (gq,) = torch.autograd.grad(lse.sum(), [q])
    exact = [t.double().requires_grad_() for t in make_inputs(cfg)]
    _, exact_lse = call(reference.local_attention, cfg, *exact)
    (eq,) = torch.autograd.grad(exact_lse.sum(), [exact[0]])
    torch.testing.assert_close(gq.cpu().double(), eq, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_parity():
    cfg = CASES["causal_with_text"]
    q, k, v, tk, tv = [t.to(DEVICE).requires_grad_() for t in make_inputs(cfg)]

    def fn(q, k, v, tk, tv):
        out, lse = local_attention(q, k, v, grid_q=(9, 7), grid_kv=(9, 7), window=(5, 9), causal=True,
                                   text_k=tk, text_v=tv, text_bias=0.7)
        return out * 2 + 1, lse

    compiled = torch.compile(fn, fullgraph=True)
    eager = fn(q, k, v, tk, tv)
    comp = compiled(q, k, v, tk, tv)
    for a, e in zip(comp, eager):
        torch.testing.assert_close(a, e)
    g = torch.randn_like(eager[0])
    eager_grads = torch.autograd.grad((eager[0] * g).sum() + eager[1].sum(), [q, k, v, tk, tv])
    comp_grads = torch.autograd.grad((comp[0] * g).sum() + comp[1].sum(), [q, k, v, tk, tv])
    for a, e in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, e)


@pytest.mark.cuda
def test_head_dim_limit():
    q = torch.zeros(1, 1, 4, 264, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        local_attention(q, q, q, grid_q=(2, 2), grid_kv=(2, 2), window=(3, 3))


@pytest.mark.parametrize("name", ["grid64_9x9_causal", "cross_60_20_5x5"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tensor_core_and_simt_forwards_agree(name, dtype, monkeypatch):
    # float16/bfloat16 with head_dim % 8 == 0 take the WMMA forward; the environment variable forces
    # the SIMT kernel. Both must meet the tolerance rule (checked inside), and agree closely.
    cfg = {**BENCH_SHAPES[name], "batch": 1}
    mma, _ = check_on_device(cfg, dtype, seed=9, backward=False)
    monkeypatch.setenv("COGVIEW_LOCAL_ATTENTION_SIMT", "1")
    simt, _ = check_on_device(cfg, dtype, seed=9, backward=False)
    torch.testing.assert_close(mma[1], simt[1], rtol=1e-3, atol=1e-3)  # lse (fp32)
    torch.testing.assert_close(mma[0].float(), simt[0].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("d", [8, 24, 40, 72, 128])
def test_tensor_core_head_dims_and_edges(d):
    # Grids that are no multiple of the 8 x 8 patch, windows wider than the grid, text keys beyond
    # one 64-key chunk, every head_dim multiple of 8 up to 128.
    cfg = {"batch": 2, "heads": 1, "d": d, "grid_q": (13, 11), "grid_kv": (13, 11), "window": (17, 3),
           "text": 70, "bias": -0.5, "kv_broadcast": True}
    check_on_device(cfg, torch.bfloat16, seed=d, backward=False)
    check_on_device({**cfg, "causal": True, "text": 0}, torch.float16, seed=d, backward=False)

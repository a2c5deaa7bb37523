"""CUDA sample_tokens (csrc/cuda/sampling.cu) against the reference definition, draw for draw.

Every test here carries the `cuda` marker and is skipped without a GPU. The kernel's paths: greedy;
at most 1024 kept ids (compacted, sorted in shared memory); more kept ids (top-p by a radix select
on the weights, the draw by ordered tiles of 4096 ids); ties cut by top-k and by top-p; per-row
parameters on the device; rows without finite logits or with bad device-side parameters; CUDA-graph
capture and replay with the seed/offset read from device tensors.

`COGVIEW_CUDA_TEST_DEVICE=cpu` runs them against the CPU kernels (checks the tests themselves).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cogview
from cogview.ops import reference, sample_tokens
from test_sampling import (DISTRIBUTION_CASES, _chi_square_p_value, _exact_distribution, _logits,
                           sampling_cases)

# COGVIEW_CUDA_TEST_DEVICE=cpu runs the same checks against the CPU kernels (a check of the tests
# themselves on a machine without a GPU); the CUDA-only tests keep their own `cuda` mark.
DEVICE = os.environ.get("COGVIEW_CUDA_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.cuda if DEVICE == "cuda" else []
NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def _needs_kernel():
    if not cogview.ops.has_kernel("sample_tokens", DEVICE):
        pytest.fail("cogview was built without a CUDA kernel for sample_tokens (rebuild with CUDA)")


def _on_device(value):
    return value.to(DEVICE) if isinstance(value, torch.Tensor) else value


def _check(logits, **kw):
    """CUDA tokens and invalid flags == the reference's (computed on the CPU)."""
    rows = logits.shape[0]
    inv_ref = torch.zeros(rows, dtype=torch.bool)
    expected = reference.sample_tokens(logits, invalid=inv_ref, **kw)
    inv = torch.zeros(rows, dtype=torch.bool, device=DEVICE)
    tokens = sample_tokens(logits.to(DEVICE), invalid=inv, **{k: _on_device(v) for k, v in kw.items()})
    assert tokens.device.type == torch.device(DEVICE).type and tokens.dtype == torch.int64
    mismatch = (tokens.cpu() != expected).nonzero().flatten().tolist()
    assert not mismatch, f"rows {mismatch[:10]}: cuda {tokens.cpu()[mismatch[:10]].tolist()} vs reference " \
                         f"{expected[mismatch[:10]].tolist()} ({kw})"
    assert torch.equal(inv.cpu(), inv_ref)
    return tokens


@given(sampling_cases())
def test_matches_reference(case):
    logits = case.pop("logits")
    _check(logits, **case)


@settings(max_examples=10)
@given(sampling_cases())
def test_parameters_as_device_tensors(case):
    logits = case.pop("logits")
    rows = logits.shape[0]
    for name, dtype in (("temperature", torch.float32), ("top_k", torch.int64), ("top_p", torch.float64)):
        if not isinstance(case[name], torch.Tensor):
            case[name] = torch.full((rows,), case[name], dtype=dtype)
    case["seed"] = torch.tensor(case["seed"])
    case["offset"] = torch.tensor(case["offset"])
    _check(logits, **case)


# Each config picks a kernel path at V = 58240, range (0, 8192) (CogView's image tokens).
PATH_CONFIGS = [
    dict(top_k=200, top_p=0.95),  # small: compact + sort + scans
    dict(top_k=20),
    dict(top_k=1024, top_p=0.5),  # small, at capacity
    dict(top_k=1025, top_p=0.9),  # large: top-k cut + nucleus radix
    dict(top_k=5000),  # large, no top-p: ordered draw
    dict(top_p=0.9),  # large, whole range + nucleus radix
    dict(top_p=0.0),  # nucleus of one
    dict(),  # whole range
    dict(temperature=0.0),
    dict(temperature=0.05, top_p=0.99),
    dict(temperature=30.0, top_p=0.5),  # flat: a nucleus of thousands
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", PATH_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_paths_match_reference(config, dtype):
    logits = _logits(7, 64, 58240, dtype=dtype, specials=True)
    _check(logits, vocab_range=(0, 8192), seed=42, offset=9, **config)


@pytest.mark.parametrize("config", [dict(top_k=3000, top_p=0.7), dict(top_p=0.6), dict(top_k=600, top_p=0.8),
                                    dict(top_k=5), dict()])
def test_heavy_ties_match_reference(config):
    # Integer logits in a narrow band: thousands of ties at the top-k and top-p cut keys.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randint(-4, 3, (16, 9000), generator=gen).float()
    logits[:, ::7] = NEG_INF
    _check(logits, seed=5, offset=1, **config)
    _check(logits.bfloat16(), vocab_range=(17, 8999), seed=6, offset=2, **config)


@pytest.mark.parametrize("vocab", [1, 2, 4095, 4096, 4097, 12289, 58240])
def test_tile_edges_match_reference(vocab):
    logits = _logits(11, 8, vocab, specials=True, ties=True)
    for config in (dict(), dict(top_p=0.9), dict(top_k=2000, top_p=0.97), dict(top_k=3), dict(temperature=0.0)):
        _check(logits, seed=3, offset=4, **config)


def test_all_equal_row():
    logits = torch.zeros(4, 20000)
    for config in (dict(), dict(top_p=0.5), dict(top_k=1500), dict(top_k=1500, top_p=0.3), dict(top_k=100)):
        _check(logits, seed=1, offset=0, **config)


def test_plus_infinity_and_extremes():
    logits = _logits(2, 6, 5000, specials=True)
    logits[0, [10, 20, 4000]] = float("inf")
    logits[1] = NEG_INF
    logits[2] = float("nan")
    logits[3, 100] = 3e38
    logits[4, :] = -3e38
    for config in (dict(), dict(top_p=0.5), dict(top_k=2), dict(top_k=2000, top_p=0.9), dict(temperature=1e-30)):
        _check(logits, seed=9, offset=0, **config)


def test_uniforms_are_the_cpu_stream():
    # Two equally likely tokens: token 1 exactly when u >= 1/2 (the top bit of each row's Philox word).
    rows = 4096
    tokens = sample_tokens(torch.zeros(rows, 2, device=DEVICE), seed=77, offset=5)
    u = reference.sampling_uniforms(77, 5, rows)
    assert torch.equal(tokens.cpu(), (u >= 0.5).long())


@pytest.mark.parametrize("case", DISTRIBUTION_CASES)
def test_distribution_chi_square(case):
    draws, vocab = 20_000, 60
    gen = torch.Generator().manual_seed(2024)
    row = torch.randn(vocab, generator=gen) * 1.5
    row[[3, 17, 30]] = NEG_INF
    row[8] = float("nan")
    row[20] = row[21]
    logits = row.expand(draws, vocab).to(DEVICE)
    tokens = sample_tokens(logits, seed=12345, offset=0, **case).cpu()
    probs = _exact_distribution(row.tolist(), *case["vocab_range"], case["temperature"], case["top_k"],
                                case["top_p"])
    counts = torch.bincount(tokens, minlength=vocab)
    assert int(counts[[i for i in range(vocab) if i not in probs]].sum()) == 0
    assert _chi_square_p_value(counts, probs, draws) > 1e-3


def test_deterministic_and_batch_independent():
    logits = _logits(5, 32, 8192).to(DEVICE)
    kw = dict(top_k=1500, top_p=0.9, seed=4, offset=7)
    a = sample_tokens(logits, **kw)
    b = sample_tokens(logits, **kw)
    assert torch.equal(a, b)
    # Row r draws with u(seed, offset, r): the same row at the same index gives the same token.
    part = sample_tokens(logits[:8].clone(), **kw)
    assert torch.equal(part, a[:8])


@pytest.mark.cuda
def test_bad_device_parameters_flag_the_row():
    logits = _logits(1, 4, 300, specials=False).to(DEVICE)
    inv = torch.zeros(4, dtype=torch.bool, device=DEVICE)
    temperature = torch.tensor([1.0, -1.0, float("nan"), 1.0], device=DEVICE)
    top_k = torch.tensor([0, 0, 0, -3], device=DEVICE)
    tokens = sample_tokens(logits, temperature=temperature, top_k=top_k, vocab_range=(10, 300), seed=0,
                           invalid=inv)
    assert inv.tolist() == [False, True, True, True]
    assert tokens[1:].tolist() == [10, 10, 10]
    top_p = torch.tensor([0.5, 1.5, 0.5, -0.1], device=DEVICE)
    inv.zero_()
    sample_tokens(logits, top_p=top_p, seed=0, invalid=inv)
    assert inv.tolist() == [False, True, False, True]


def test_host_parameter_values_raise():
    logits = torch.randn(3, 10, device=DEVICE)
    with pytest.raises(ValueError, match="top_k"):
        torch.ops.cogview.sample_tokens(logits, torch.tensor(0), torch.tensor(0), top_k=torch.tensor([1, -2, 3]))
    with pytest.raises(ValueError, match="temperature"):
        torch.ops.cogview.sample_tokens(logits, torch.tensor(0), torch.tensor(0), temperature=torch.tensor(-1.0))


def test_non_contiguous_inputs():
    base = _logits(8, 6, 2 * 700)
    logits = base[:, ::2]  # unit stride broken: the op makes it contiguous
    _check(logits, seed=1, offset=2, top_k=30)
    invalid = torch.zeros(12, dtype=torch.bool, device=DEVICE)[::2]
    rows = torch.full((6, 50), NEG_INF)
    sample_tokens(rows.to(DEVICE), seed=0, invalid=invalid)
    assert bool(invalid.all())


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    rows, vocab = 8, 8192
    logits = _logits(13, rows, vocab, specials=False).to(DEVICE)
    seed = torch.tensor(1234, device=DEVICE)
    offset = torch.tensor(0, device=DEVICE)
    temperature = torch.full((rows,), 0.9, device=DEVICE)
    top_k = torch.full((rows,), 200, device=DEVICE)
    top_p = torch.full((rows,), 0.95, dtype=torch.float64, device=DEVICE)
    invalid = torch.zeros(rows, dtype=torch.bool, device=DEVICE)

    def step():
        return sample_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, offset=offset,
                             invalid=invalid)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for step_offset in range(5):
        offset.fill_(step_offset)
        logits.add_(0.01 * step_offset)
        graph.replay()
        expected = reference.sample_tokens(logits.cpu(), temperature=0.9, top_k=200, top_p=0.95, seed=1234,
                                           offset=step_offset)
        assert torch.equal(out.cpu(), expected), step_offset
    assert not bool(invalid.any())

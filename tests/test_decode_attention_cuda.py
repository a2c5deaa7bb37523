"""CUDA decode_attention and kv_cache_write (csrc/cuda/decoding.cu) against the reference.

Every test here carries the `cuda` marker and is skipped without a GPU. decode_attention paths: the
16-byte vector kernel (fp32/fp16/bf16 caches with aligned rows and head_dim a multiple of 16 bytes,
up to 32 loads per key row), the scalar kernel (float64, odd head sizes, misaligned rows, float64
queries), one chunk (direct output) and several chunks (partials + merge), n > 1 queries, ragged
lengths, out-of-range lengths (NaN rows). kv_cache_write: vector copy, dtype conversion, strided and
misaligned tensors, out-of-range starts (sequence left untouched). Plus a CUDA-graph capture of a
decoding step.

`COGVIEW_CUDA_TEST_DEVICE=cpu` runs them against the CPU kernels (checks the tests themselves).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cogview
from cogview.ops import decode_attention, kv_cache_write, reference
from test_decoding import _composition, _exact
from tolerance import assert_within_rule

# COGVIEW_CUDA_TEST_DEVICE=cpu runs the same checks against the CPU kernels (a check of the tests
# themselves on a machine without a GPU); the CUDA-only tests keep their own `cuda` mark.
DEVICE = os.environ.get("COGVIEW_CUDA_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.cuda if DEVICE == "cuda" else []
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _needs_kernels():
    for op in ("decode_attention", "kv_cache_write"):
        if not cogview.ops.has_kernel(op, DEVICE):
            pytest.fail(f"cogview was built without a CUDA kernel for {op} (rebuild with CUDA)")


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def _check(q, k, v, lengths, scale, text_len, text_bias, q_dev=None, k_dev=None, v_dev=None):
    """CUDA output vs float64 reference under the project's tolerance rule (CPU tensors in)."""
    out = decode_attention(q.to(DEVICE) if q_dev is None else q_dev, k.to(DEVICE) if k_dev is None else k_dev,
                           v.to(DEVICE) if v_dev is None else v_dev, lengths.to(DEVICE), scale=scale,
                           text_len=text_len, text_bias=text_bias)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device.type == torch.device(DEVICE).type
    out = out.cpu()
    exact = _exact(q, k, v, lengths, scale, text_len, text_bias)
    if q.dtype == torch.float64:
        torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)
    elif q.dtype == k.dtype:
        assert_within_rule(out, _composition(q, k, v, lengths, scale, text_len, text_bias), exact, q.dtype)
    else:  # mixed dtypes: the composition in q's dtype over the cache converted to it
        comp = _composition(q, k.to(q.dtype), v.to(q.dtype), lengths, scale, text_len, text_bias)
        assert_within_rule(out, comp, exact, q.dtype)
    return out


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    heads=st.integers(1, 3),
    n=st.integers(1, 4),
    extra=st.sampled_from([0, 1, 5, 63, 64, 65, 300, 1500]),
    dim=st.sampled_from([1, 7, 8, 16, 40, 64, 72, 128, 200, 256]),
    text=st.sampled_from([(0, 0.0), (5, 1.4), (1000, -0.7)]),
    dtype=st.sampled_from(DTYPES + [torch.float64]),
)
def test_matches_reference(seed, batch, heads, n, extra, dim, text, dtype):
    gen = torch.Generator().manual_seed(seed)
    max_len = n + extra
    k = _randn(gen, batch, heads, max_len, dim, dtype=dtype)
    v = _randn(gen, batch, heads, max_len, dim, dtype=dtype)
    q = _randn(gen, batch, heads, n, dim, dtype=dtype)
    lengths = torch.randint(n, max_len + 1, (batch,), generator=gen)
    lengths[0] = max_len
    if batch > 1:
        lengths[1] = n
    _check(q, k, v, lengths, dim**-0.5, *text)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 8])
def test_cogview_4b_shape(dtype, batch):
    # The benchmark's shape: 40 heads x 64, context 1088, one new query; ragged lengths.
    gen = torch.Generator().manual_seed(4)
    k = _randn(gen, batch, 40, 1088, 64, dtype=dtype)
    v = _randn(gen, batch, 40, 1088, 64, dtype=dtype)
    q = _randn(gen, batch, 40, 1, 64, dtype=dtype)
    lengths = 1088 - torch.randint(0, 60, (batch,), generator=gen)
    _check(q, k, v, lengths, 0.125, 64, 1.4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_caches_split_and_merge(dtype):
    gen = torch.Generator().manual_seed(9)
    k = _randn(gen, 3, 4, 9000, 64, dtype=dtype)
    v = _randn(gen, 3, 4, 9000, 64, dtype=dtype)
    q = _randn(gen, 3, 4, 2, 64, dtype=dtype) * 2
    _check(q, k, v, torch.tensor([9000, 2, 4097]), 0.125, 64, 1.4)


def test_mixed_dtypes():
    gen = torch.Generator().manual_seed(5)
    k = _randn(gen, 2, 2, 500, 64, dtype=torch.bfloat16)
    v = _randn(gen, 2, 2, 500, 64, dtype=torch.bfloat16)
    lengths = torch.tensor([500, 77])
    _check(_randn(gen, 2, 2, 1, 64), k, v, lengths, 0.125, 0, 0.0)  # float32 q over a bf16 cache
    _check(_randn(gen, 2, 2, 1, 64, dtype=torch.float64), k.float(), v.float(), lengths, 0.125, 3, 0.5)


def test_misaligned_and_strided_caches():
    gen = torch.Generator().manual_seed(6)
    # [B, max_len, heads, d] viewed as [B, heads, max_len, d]: rows aligned, strides unusual.
    k = _randn(gen, 2, 300, 3, 64, dtype=torch.bfloat16).transpose(1, 2)
    v = _randn(gen, 2, 300, 3, 64, dtype=torch.bfloat16).transpose(1, 2)
    q = _randn(gen, 2, 3, 1, 64, dtype=torch.bfloat16)
    lengths = torch.tensor([300, 150])
    _check(q, k, v, lengths, 0.125, 10, 1.0, k_dev=k.to(DEVICE), v_dev=v.to(DEVICE))
    # Rows padded by one element (not 16-byte aligned): the scalar kernel.
    big_k = torch.zeros(2, 3, 300, 65, dtype=torch.bfloat16, device=DEVICE)
    big_v = torch.zeros_like(big_k)
    big_k[..., 1:] = k.to(DEVICE)
    big_v[..., 1:] = v.to(DEVICE)
    _check(q, k.contiguous(), v.contiguous(), lengths, 0.125, 10, 1.0, k_dev=big_k[..., 1:], v_dev=big_v[..., 1:])
    # q with head_dim strided (the op copies it) and int32 lengths.
    q_big = torch.zeros(2, 3, 1, 128, dtype=torch.bfloat16, device=DEVICE)
    q_big[..., ::2] = q.to(DEVICE)
    out = decode_attention(q_big[..., ::2], k.to(DEVICE), v.to(DEVICE), lengths.int().to(DEVICE), scale=0.125)
    assert torch.equal(out, decode_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), lengths.to(DEVICE),
                                             scale=0.125))


@pytest.mark.cuda
def test_out_of_range_lengths_give_nan_rows():
    gen = torch.Generator().manual_seed(7)
    k, v = _randn(gen, 4, 2, 100, 32), _randn(gen, 4, 2, 100, 32)
    q = _randn(gen, 4, 2, 2, 32)
    for max_len_seen in (100, 9000):  # one chunk and (with a longer cache) several
        kk = torch.cat([k, torch.zeros(4, 2, max_len_seen - 100, 32)], dim=2) if max_len_seen > 100 else k
        vv = torch.cat([v, torch.zeros(4, 2, max_len_seen - 100, 32)], dim=2) if max_len_seen > 100 else v
        lengths = torch.tensor([50, 1, max_len_seen + 1, 100])  # rows 1 and 2 out of range
        out = decode_attention(q.to(DEVICE), kk.to(DEVICE), vv.to(DEVICE), lengths.to(DEVICE)).cpu()
        assert bool(out[1].isnan().all()) and bool(out[2].isnan().all())
        good = torch.tensor([0, 3])
        expected = _exact(q[good], kk[good], vv[good], lengths[good], 32**-0.5, 0, 0.0).float()
        torch.testing.assert_close(out[good], expected, rtol=1e-5, atol=1e-5)


def test_deterministic():
    gen = torch.Generator().manual_seed(8)
    k = _randn(gen, 2, 8, 3000, 128, dtype=torch.bfloat16).to(DEVICE)
    v = _randn(gen, 2, 8, 3000, 128, dtype=torch.bfloat16).to(DEVICE)
    q = _randn(gen, 2, 8, 1, 128, dtype=torch.bfloat16).to(DEVICE)
    lengths = torch.tensor([3000, 1234], device=DEVICE)
    a = decode_attention(q, k, v, lengths, text_len=64, text_bias=1.4)
    b = decode_attention(q, k, v, lengths, text_len=64, text_bias=1.4)
    assert torch.equal(a, b)


@pytest.mark.cuda
def test_head_dim_limit():
    q = torch.zeros(1, 1, 1, 320, device=DEVICE)
    k = torch.zeros(1, 1, 4, 320, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        decode_attention(q, k, k, torch.tensor([4], device=DEVICE))


def test_opcheck():
    gen = torch.Generator().manual_seed(1)
    k, v = _randn(gen, 2, 2, 20, 16).to(DEVICE), _randn(gen, 2, 2, 20, 16).to(DEVICE)
    q = _randn(gen, 2, 2, 1, 16).to(DEVICE)
    torch.library.opcheck(torch.ops.cogview.decode_attention, (q, k, v, torch.tensor([20, 3], device=DEVICE),
                                                               0.25, 2, 1.0))
    torch.library.opcheck(torch.ops.cogview.kv_cache_write, (k.clone(), v.clone(), q, q,
                                                             torch.tensor([0, 5], device=DEVICE)))


# ---- kv_cache_write ------------------------------------------------------------------------------


@settings(max_examples=15)
@given(
    seed=st.integers(0, 2**20),
    cache_dtype=st.sampled_from(DTYPES + [torch.float64]),
    new_dtype=st.sampled_from(DTYPES + [torch.float64]),
    dim=st.sampled_from([1, 3, 8, 64, 72]),
    n=st.integers(1, 5),
)
def test_write_matches_reference(seed, cache_dtype, new_dtype, dim, n):
    gen = torch.Generator().manual_seed(seed)
    batch, heads, max_len = 3, 2, 12
    k_cache = _randn(gen, batch, heads, max_len, dim, dtype=cache_dtype)
    v_cache = _randn(gen, batch, heads, max_len, dim, dtype=cache_dtype)
    k_new = _randn(gen, batch, heads, n, dim, dtype=new_dtype)
    v_new = _randn(gen, batch, heads, n, dim, dtype=new_dtype)
    start = torch.randint(0, max_len - n + 1, (batch,), generator=gen)
    k_dev, v_dev = k_cache.to(DEVICE), v_cache.to(DEVICE)
    kv_cache_write(k_dev, v_dev, k_new.to(DEVICE), v_new.to(DEVICE), start.to(DEVICE))
    reference.kv_cache_write(k_cache, v_cache, k_new, v_new, start)
    assert torch.equal(k_dev.cpu(), k_cache) and torch.equal(v_dev.cpu(), v_cache)


def test_write_strided_and_misaligned():
    gen = torch.Generator().manual_seed(2)
    k_cache = torch.zeros(2, 3, 10, 64, dtype=torch.bfloat16)
    v_cache = torch.zeros(2, 3, 10, 64, dtype=torch.bfloat16)
    k_new = _randn(gen, 2, 3, 2, 64, dtype=torch.bfloat16)
    v_new = _randn(gen, 2, 3, 2, 64, dtype=torch.bfloat16)
    start = torch.tensor([0, 8])
    # Cache [B, max_len, heads, d] viewed as [B, heads, max_len, d]; sources misaligned by one element.
    k_dev = k_cache.transpose(1, 2).contiguous().to(DEVICE).transpose(1, 2)
    v_dev = v_cache.transpose(1, 2).contiguous().to(DEVICE).transpose(1, 2)
    flat = torch.zeros(k_new.numel() + 1, dtype=torch.bfloat16, device=DEVICE)
    flat[1:] = k_new.reshape(-1).to(DEVICE)
    kv_cache_write(k_dev, v_dev, flat[1:].view(k_new.shape), v_new.to(DEVICE), start.to(DEVICE))
    reference.kv_cache_write(k_cache, v_cache, k_new, v_new, start)
    assert torch.equal(k_dev.cpu(), k_cache) and torch.equal(v_dev.cpu(), v_cache)
    # A cache whose head_dim is not the unit-stride dimension.
    k2 = torch.zeros(2, 3, 64, 10, dtype=torch.bfloat16, device=DEVICE).transpose(2, 3)
    v2 = torch.zeros_like(k2)
    kv_cache_write(k2, v2, k_new.to(DEVICE), v_new.to(DEVICE), start.to(DEVICE))
    assert torch.equal(k2.cpu(), k_cache) and torch.equal(v2.cpu(), v_cache)


@pytest.mark.cuda
def test_write_out_of_range_start_leaves_that_sequence():
    k_cache = torch.zeros(3, 2, 10, 16, device=DEVICE)
    v_cache = torch.zeros(3, 2, 10, 16, device=DEVICE)
    new = torch.ones(3, 2, 4, 16, device=DEVICE)
    kv_cache_write(k_cache, v_cache, new, new, torch.tensor([6, 7, -1], device=DEVICE))
    assert bool((k_cache[0, :, 6:] == 1).all()) and int(k_cache[0].sum()) == 2 * 4 * 16
    assert int(k_cache[1:].abs().sum()) == 0 and int(v_cache[1:].abs().sum()) == 0


@pytest.mark.cuda
def test_cuda_graph_decoding_step():
    # kv_cache_write + decode_attention captured once, replayed with lengths advanced in place.
    gen = torch.Generator().manual_seed(12)
    batch, heads, max_len, dim = 2, 4, 64, 64
    k_cache = torch.zeros(batch, heads, max_len, dim, dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k_new = torch.zeros(batch, heads, 1, dim, dtype=torch.bfloat16, device=DEVICE)
    v_new, q = torch.zeros_like(k_new), torch.zeros_like(k_new)
    start = torch.zeros(batch, dtype=torch.long, device=DEVICE)
    lengths = torch.ones(batch, dtype=torch.long, device=DEVICE)

    def step():
        kv_cache_write(k_cache, v_cache, k_new, v_new, start)
        return decode_attention(q, k_cache, v_cache, lengths, text_len=4, text_bias=1.4)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    k_cache.zero_()
    v_cache.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    k_ref = torch.zeros(batch, heads, max_len, dim, dtype=torch.bfloat16)
    v_ref = torch.zeros_like(k_ref)
    for t in range(10):
        for tensor in (k_new, v_new, q):
            tensor.copy_(_randn(gen, batch, heads, 1, dim, dtype=torch.bfloat16))
        start.fill_(t)
        lengths.fill_(t + 1)
        graph.replay()
        reference.kv_cache_write(k_ref, v_ref, k_new.cpu(), v_new.cpu(), start.cpu())
        assert torch.equal(k_cache.cpu(), k_ref)
        expected = decode_attention(q, k_ref.to(DEVICE), v_ref.to(DEVICE), lengths, text_len=4, text_bias=1.4)
        assert torch.equal(out, expected), t

"""kv_cache_write and decode_attention: kernel vs reference, cached decoding vs a full forward,
opcheck, compile parity, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import cogview
from cogview.ops import decode_attention, kv_cache_write, reference
from tolerance import assert_within_rule

HAS_ATTENTION_KERNEL = cogview.ops.has_kernel("decode_attention", "cpu")
HAS_WRITE_KERNEL = cogview.ops.has_kernel("kv_cache_write", "cpu")
LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def _lengths(gen, batch, n, max_len):
    """Ragged lengths in [n, max_len], always including both ends when batch allows."""
    lengths = torch.randint(n, max_len + 1, (batch,), generator=gen)
    lengths[0] = max_len
    if batch > 1:
        lengths[1] = n
    return lengths


def _exact(q, k, v, lengths, scale, text_len, text_bias):
    return reference.decode_attention(q.double(), k.double(), v.double(), lengths, scale, text_len, text_bias)


def _composition(q, k, v, lengths, scale, text_len, text_bias):
    """The plain-PyTorch composition run in the inputs' own dtype (the tolerance yardstick)."""
    n, max_len = q.shape[2], k.shape[2]
    query_pos = lengths[:, None] - n + torch.arange(n)
    key_pos = torch.arange(max_len)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    logits = logits + (text_bias * (key_pos < text_len)).to(q.dtype)
    logits = logits.masked_fill(~(key_pos[None, None, :] <= query_pos[:, :, None])[:, None], float("-inf"))
    return torch.matmul(torch.softmax(logits, dim=-1), v)


def _check_attention(q, k, v, lengths, scale, text_len, text_bias):
    out = decode_attention(q, k, v, lengths, scale=scale, text_len=text_len, text_bias=text_bias)
    assert out.shape == q.shape and out.dtype == q.dtype
    exact = _exact(q, k, v, lengths, scale, text_len, text_bias)
    if q.dtype == torch.float64:
        torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)
    else:
        assert_within_rule(out, _composition(q, k, v, lengths, scale, text_len, text_bias), exact, q.dtype)


# ---- decode_attention vs reference --------------------------------------------------------------


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    heads=st.integers(1, 3),
    n=st.integers(1, 4),
    extra=st.integers(0, 90),
    dim=st.sampled_from([1, 7, 16, 32, 64, 128]),
    text=st.sampled_from([(0, 0.0), (5, 1.4), (1000, -0.7)]),
    dtype=st.sampled_from(LOW_PRECISION + [torch.float64]),
)
def test_matches_reference(seed, batch, heads, n, extra, dim, text, dtype):
    gen = torch.Generator().manual_seed(seed)
    max_len = n + extra
    k = _randn(gen, batch, heads, max_len, dim, dtype=dtype)
    v = _randn(gen, batch, heads, max_len, dim, dtype=dtype)
    q = _randn(gen, batch, heads, n, dim, dtype=dtype)
    lengths = _lengths(gen, batch, n, max_len)
    _check_attention(q, k, v, lengths, dim**-0.5, *text)


@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float64])
@pytest.mark.parametrize("n", [1, 3])
def test_long_caches_split_and_merge(dtype, n):
    # Lengths around and beyond the 512-key split, so sequences run as 1, 2 and 3 chunks.
    gen = torch.Generator().manual_seed(1)
    batch, heads, max_len, dim = 5, 2, 1300, 64
    k = _randn(gen, batch, heads, max_len, dim, dtype=dtype)
    v = _randn(gen, batch, heads, max_len, dim, dtype=dtype)
    q = _randn(gen, batch, heads, n, dim, dtype=dtype) * 2
    lengths = torch.tensor([1300, n, 512, 513, 1025])
    _check_attention(q, k, v, lengths, 0.125, 64, 1.4)


@pytest.mark.skipif(not HAS_ATTENTION_KERNEL, reason="no CPU kernel")
def test_results_do_not_depend_on_the_thread_count():
    # 6 (b, h) pairs: one thread runs them pair by pair, four threads spread the chunks and merge
    # afterwards. Both compute the same chunk partials and merge them in the same order.
    gen = torch.Generator().manual_seed(10)
    k, v = _randn(gen, 3, 2, 1500, 64), _randn(gen, 3, 2, 1500, 64)
    q = _randn(gen, 3, 2, 2, 64)
    lengths = torch.tensor([1500, 700, 2])
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_attention(q, k, v, lengths, text_len=64, text_bias=1.4)
        torch.set_num_threads(4)
        four = decode_attention(q, k, v, lengths, text_len=64, text_bias=1.4)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, four)


@pytest.mark.skipif(not HAS_ATTENTION_KERNEL, reason="no CPU kernel")
@pytest.mark.parametrize("isa", cogview.ops.usable_cpu_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_isa(isa, dtype):
    gen = torch.Generator().manual_seed(2)
    k = _randn(gen, 3, 2, 700, 24, dtype=dtype)
    v = _randn(gen, 3, 2, 700, 24, dtype=dtype)
    q = _randn(gen, 3, 2, 2, 24, dtype=dtype)
    lengths = torch.tensor([700, 2, 600])
    with cogview.ops.use_cpu_isa(isa):
        _check_attention(q, k, v, lengths, 0.3, 10, 1.0)


@pytest.mark.skipif(not HAS_ATTENTION_KERNEL, reason="no CPU kernel")
@pytest.mark.parametrize("isa", cogview.ops.usable_cpu_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("layout", ["contiguous", "positions_outer"])
def test_single_query_every_isa(isa, dtype, dim, layout):
    # n = 1 with the head dims that have a whole-chunk path (AVX-512): groups of 16 keys with
    # remainders, the text boost ending inside a group, split sequences; caches with row strides
    # other than d ([B, max_len, heads, d] viewed as [B, heads, max_len, d]).
    gen = torch.Generator().manual_seed(4)
    batch, heads, max_len = 6, 2, 700
    if layout == "contiguous":
        k = _randn(gen, batch, heads, max_len, dim, dtype=dtype)
        v = _randn(gen, batch, heads, max_len, dim, dtype=dtype)
    else:
        k = _randn(gen, batch, max_len, heads, dim, dtype=dtype).transpose(1, 2)
        v = _randn(gen, batch, max_len, heads, dim, dtype=dtype).transpose(1, 2)
    q = _randn(gen, batch, heads, 1, dim, dtype=dtype) * 2
    lengths = torch.tensor([1, 15, 16, 17, 530, 700])
    with cogview.ops.use_cpu_isa(isa):
        _check_attention(q, k, v, lengths, dim**-0.5, 21, 1.4)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(3)
    # Caches laid out [B, max_len, heads, d] and viewed as [B, heads, max_len, d]; q with d strided.
    k = _randn(gen, 2, 50, 3, 8).transpose(1, 2)
    v = _randn(gen, 2, 50, 3, 8).transpose(1, 2)
    q = _randn(gen, 2, 3, 8, 2).transpose(2, 3)  # [2, 3, 2, 8], stride 2 along d
    lengths = torch.tensor([50, 9])
    out = decode_attention(q, k, v, lengths, text_len=3, text_bias=0.5)
    expected = decode_attention(q.contiguous(), k.contiguous(), v.contiguous(), lengths, text_len=3, text_bias=0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_int32_lengths_and_default_scale():
    gen = torch.Generator().manual_seed(4)
    k, v = _randn(gen, 2, 2, 20, 16), _randn(gen, 2, 2, 20, 16)
    q = _randn(gen, 2, 2, 1, 16)
    lengths = torch.tensor([20, 7])
    a = decode_attention(q, k, v, lengths.int())
    b = reference.decode_attention(q, k, v, lengths, 16**-0.5)
    torch.testing.assert_close(a, b)


def test_reference_is_bottom_right_aligned():
    # Query i of sequence b attends to positions <= lengths[b] - n + i: SDPA on each sequence's
    # prefix with an explicit mask says the same.
    gen = torch.Generator().manual_seed(5)
    k, v = _randn(gen, 2, 2, 30, 8), _randn(gen, 2, 2, 30, 8)
    q = _randn(gen, 2, 2, 3, 8)
    lengths = torch.tensor([30, 11])
    out = reference.decode_attention(q, k, v, lengths, 0.4)
    for b, length in enumerate(lengths.tolist()):
        mask = torch.arange(length)[None, :] <= (length - 3 + torch.arange(3))[:, None]
        expected = F.scaled_dot_product_attention(q[b], k[b, :, :length], v[b, :, :length], attn_mask=mask, scale=0.4)
        torch.testing.assert_close(out[b], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_decoding_equals_full_causal_attention(dtype):
    # Prefill 5 positions, then decode one at a time with kv_cache_write + decode_attention: the
    # outputs equal causal attention over the whole sequence (text boost included).
    gen = torch.Generator().manual_seed(6)
    batch, heads, total, dim, text_len, bias = 2, 3, 23, 16, 4, 1.4
    k_all = _randn(gen, batch, heads, total, dim, dtype=dtype)
    v_all = _randn(gen, batch, heads, total, dim, dtype=dtype)
    q_all = _randn(gen, batch, heads, total, dim, dtype=dtype)
    pos = torch.arange(total)
    mask = torch.where(pos[None, :] <= pos[:, None], bias * (pos[None, :] < text_len), float("-inf"))
    full = F.scaled_dot_product_attention(q_all.float(), k_all.float(), v_all.float(), attn_mask=mask).to(dtype)

    k_cache = torch.zeros(batch, heads, total + 3, dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    outputs, written = [], 0
    for n in [5] + [1] * (total - 5):
        start = torch.full((batch,), written)
        kv_cache_write(k_cache, v_cache, k_all[:, :, written:written + n], v_all[:, :, written:written + n], start)
        written += n
        outputs.append(decode_attention(q_all[:, :, written - n:written], k_cache, v_cache,
                                        torch.full((batch,), written), text_len=text_len, text_bias=bias))
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=2e-2)
    torch.testing.assert_close(torch.cat(outputs, dim=2), full, **tol)


# ---- kv_cache_write -----------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    heads=st.integers(1, 3),
    n=st.integers(0, 5),
    max_len=st.integers(5, 40),
    dim=st.sampled_from([1, 5, 64]),
    cache_dtype=st.sampled_from(LOW_PRECISION + [torch.float64]),
    new_dtype=st.sampled_from(LOW_PRECISION + [torch.float64]),
    strided=st.booleans(),
)
def test_write_matches_indexing(seed, batch, heads, n, max_len, dim, cache_dtype, new_dtype, strided):
    gen = torch.Generator().manual_seed(seed)
    k_cache = _randn(gen, batch, heads, max_len, dim, dtype=cache_dtype)
    v_cache = _randn(gen, batch, heads, max_len, dim, dtype=cache_dtype)
    if strided:
        k_new = _randn(gen, batch, n, heads, dim, dtype=new_dtype).transpose(1, 2)
        v_new = _randn(gen, batch, heads, dim, n, dtype=new_dtype).transpose(2, 3)
    else:
        k_new = _randn(gen, batch, heads, n, dim, dtype=new_dtype)
        v_new = _randn(gen, batch, heads, n, dim, dtype=new_dtype)
    start = torch.randint(0, max_len - n + 1, (batch,), generator=gen)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    for b in range(batch):
        s = int(start[b])
        k_expected[b, :, s:s + n] = k_new[b].to(cache_dtype)
        v_expected[b, :, s:s + n] = v_new[b].to(cache_dtype)
    k_ptr = k_cache.data_ptr()
    assert kv_cache_write(k_cache, v_cache, k_new, v_new, start) is None
    assert k_cache.data_ptr() == k_ptr  # in place
    assert torch.equal(k_cache, k_expected)
    assert torch.equal(v_cache, v_expected)


def test_write_into_strided_cache():
    # A cache that is a view with a non-unit stride along d still gets written in place.
    storage = torch.zeros(2, 2, 10, 4, 2)
    k_cache, v_cache = storage[..., 0], storage[..., 1]
    k_new, v_new = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    kv_cache_write(k_cache, v_cache, k_new, v_new, torch.tensor([0, 7]))
    assert torch.equal(storage[0, :, 0:3, :, 0], k_new[0]) and torch.equal(storage[1, :, 7:10, :, 1], v_new[1])


@pytest.mark.parametrize("start", [[0, 8], [-1, 0], [9, 0]])
def test_write_out_of_range_raises_and_writes_nothing(start):
    k_cache, v_cache = torch.zeros(2, 2, 10, 4), torch.zeros(2, 2, 10, 4)
    k_new, v_new = torch.ones(2, 2, 3, 4), torch.ones(2, 2, 3, 4)
    with pytest.raises(ValueError, match="overruns the cache"):
        kv_cache_write(k_cache, v_cache, k_new, v_new, torch.tensor(start))
    assert not k_cache.any() and not v_cache.any()


@pytest.mark.skipif(not HAS_WRITE_KERNEL, reason="no CPU kernel")
def test_write_kernel_checks_direct_calls():
    k_cache, v_cache = torch.zeros(2, 2, 10, 4), torch.zeros(2, 2, 10, 4)
    k_new, v_new = torch.ones(2, 2, 3, 4), torch.ones(2, 2, 3, 4)
    with pytest.raises(ValueError, match="overruns the cache"):
        torch.ops.cogview.kv_cache_write(k_cache, v_cache, k_new, v_new, torch.tensor([0, 8]))
    assert not k_cache.any()
    with pytest.raises(TypeError, match="start"):
        torch.ops.cogview.kv_cache_write(k_cache, v_cache, k_new, v_new, torch.tensor([0.0, 1.0]))


# ---- torch.library / torch.compile --------------------------------------------------------------


@pytest.mark.skipif(not (HAS_ATTENTION_KERNEL and HAS_WRITE_KERNEL), reason="no CPU kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    gen = torch.Generator().manual_seed(7)
    k, v = _randn(gen, 2, 3, 600, 8, dtype=dtype), _randn(gen, 2, 3, 600, 8, dtype=dtype)
    k_new, v_new = _randn(gen, 2, 3, 2, 8), _randn(gen, 2, 3, 2, 8)
    torch.library.opcheck(torch.ops.cogview.kv_cache_write.default, (k, v, k_new, v_new, torch.tensor([3, 598])))
    q = _randn(gen, 2, 3, 2, 8, dtype=dtype)
    torch.library.opcheck(torch.ops.cogview.decode_attention.default, (q, k, v, torch.tensor([600, 5]), 0.3, 4, 1.0))


def test_compile_parity():
    def step(q, k_cache, v_cache, k_new, v_new, start, lengths):
        kv_cache_write(k_cache, v_cache, k_new, v_new, start)
        return decode_attention(q, k_cache, v_cache, lengths, text_len=4, text_bias=1.4)

    gen = torch.Generator().manual_seed(8)
    k, v = _randn(gen, 2, 3, 40, 8), _randn(gen, 2, 3, 40, 8)
    k_new, v_new, q = _randn(gen, 2, 3, 1, 8), _randn(gen, 2, 3, 1, 8), _randn(gen, 2, 3, 1, 8)
    start, lengths = torch.tensor([10, 39]), torch.tensor([11, 40])
    k2, v2 = k.clone(), v.clone()
    expected = step(q, k, v, k_new, v_new, start, lengths)
    got = torch.compile(step, fullgraph=True)(q, k2, v2, k_new, v_new, start, lengths)
    assert torch.equal(got, expected)
    assert torch.equal(k2, k) and torch.equal(v2, v)


# ---- bad input ----------------------------------------------------------------------------------


def _attention_args(**overrides):
    args = dict(q=torch.randn(2, 3, 2, 8), k_cache=torch.randn(2, 3, 20, 8), v_cache=torch.randn(2, 3, 20, 8),
                lengths=torch.tensor([20, 5]))
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(lengths=torch.tensor([21, 5])), ValueError, "lengths"),
        (dict(lengths=torch.tensor([20, 1])), ValueError, "lengths"),
        (dict(lengths=torch.tensor([20.0, 5.0])), TypeError, "lengths"),
        (dict(lengths=torch.tensor([20])), ValueError, "lengths"),
        (dict(q=torch.zeros(2, 3, 2, 8, dtype=torch.int32)), TypeError, "q"),
        (dict(q=torch.randn(2, 3, 2, 7)), ValueError, "q"),
        (dict(v_cache=torch.randn(2, 3, 20, 8, dtype=torch.float64)), TypeError, "v_cache"),
        (dict(k_cache=torch.randn(2, 3, 20)), ValueError, "k_cache"),
        (dict(v_cache=torch.randn(2, 3, 21, 8)), ValueError, "v_cache"),
    ],
)
def test_attention_bad_input(overrides, error, match):
    args = _attention_args(**overrides)
    with pytest.raises(error, match=match):
        decode_attention(**args)


def test_attention_bad_scalars():
    with pytest.raises(ValueError, match="scale"):
        decode_attention(**_attention_args(), scale=float("inf"))
    with pytest.raises(ValueError, match="text_bias"):
        decode_attention(**_attention_args(), text_bias=float("nan"))


@pytest.mark.skipif(not HAS_ATTENTION_KERNEL, reason="no CPU kernel")
def test_attention_kernel_checks_direct_calls():
    a = _attention_args()
    op = torch.ops.cogview.decode_attention
    with pytest.raises(ValueError, match="lengths"):
        op(a["q"], a["k_cache"], a["v_cache"], torch.tensor([21, 5]), 0.3, 0, 0.0)
    with pytest.raises(ValueError, match="lengths"):
        op(a["q"], a["k_cache"], a["v_cache"], torch.tensor([20, 1]), 0.3, 0, 0.0)
    with pytest.raises(TypeError, match="v_cache"):
        op(a["q"], a["k_cache"], a["v_cache"].half(), a["lengths"], 0.3, 0, 0.0)


def test_write_bad_input():
    k_cache, v_cache = torch.zeros(2, 2, 10, 4), torch.zeros(2, 2, 10, 4)
    new = torch.ones(2, 2, 3, 4)
    with pytest.raises(ValueError, match="k_new"):
        kv_cache_write(k_cache, v_cache, torch.ones(2, 2, 3, 5), new, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="v_new"):
        kv_cache_write(k_cache, v_cache, new, torch.ones(2, 2, 2, 4), torch.tensor([0, 0]))
    with pytest.raises(TypeError, match="k_new"):
        kv_cache_write(k_cache, v_cache, new.int(), new, torch.tensor([0, 0]))
    with pytest.raises(TypeError, match="start"):
        kv_cache_write(k_cache, v_cache, new, new, torch.tensor([0.0, 0.0]))
    with pytest.raises(TypeError, match="v_cache"):
        kv_cache_write(k_cache, v_cache.half(), new, new, torch.tensor([0, 0]))


# ---- CUDA (issue 7) -----------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    gen = torch.Generator().manual_seed(9)
    k = _randn(gen, 3, 4, 1300, 64, dtype=dtype)
    v = _randn(gen, 3, 4, 1300, 64, dtype=dtype)
    q = _randn(gen, 3, 4, 2, 64, dtype=dtype)
    lengths = torch.tensor([1300, 2, 700])
    out = decode_attention(q.cuda(), k.cuda(), v.cuda(), lengths.cuda(), text_len=64, text_bias=1.4).cpu()
    exact = _exact(q, k, v, lengths, 0.125, 64, 1.4)
    assert_within_rule(out, _composition(q, k, v, lengths, 0.125, 64, 1.4), exact, dtype)


@pytest.mark.cuda
def test_cuda_write_matches_indexing():
    k_cache, v_cache = torch.zeros(2, 2, 10, 4, device="cuda"), torch.zeros(2, 2, 10, 4, device="cuda")
    k_new, v_new = torch.randn(2, 2, 3, 4, device="cuda"), torch.randn(2, 2, 3, 4, device="cuda")
    kv_cache_write(k_cache, v_cache, k_new, v_new, torch.tensor([0, 7], device="cuda"))
    assert torch.equal(k_cache[0, :, 0:3], k_new[0]) and torch.equal(v_cache[1, :, 7:10], v_new[1])

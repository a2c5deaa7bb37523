"""sample_tokens: kernel vs reference draw for draw, distribution, invariants, compile, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cogview
from cogview.ops import reference, sample_tokens

HAS_CPU_KERNEL = cogview.ops.has_kernel("sample_tokens", "cpu")
NEG_INF = float("-inf")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _logits(seed: int, rows: int, vocab: int, dtype=torch.float32, scale=3.0, specials=True, ties=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=gen) * scale
    if ties:
        x = x.round()
    if specials:
        x[torch.rand(rows, vocab, generator=gen) < 0.15] = NEG_INF
        x[torch.rand(rows, vocab, generator=gen) < 0.03] = float("nan")
    return x.to(dtype)


def _both(logits, **kw):
    """(kernel tokens, kernel invalid, reference tokens, reference invalid)."""
    rows = logits.shape[0]
    inv_kernel = torch.zeros(rows, dtype=torch.bool)
    inv_ref = torch.zeros(rows, dtype=torch.bool)
    tokens = sample_tokens(logits, invalid=inv_kernel, **kw)
    expected = reference.sample_tokens(logits, invalid=inv_ref, **kw)
    return tokens, inv_kernel, expected, inv_ref


# ---- the random stream ------------------------------------------------------------------------


def test_philox_known_answer_vectors():
    # Random123's published known-answer vectors for philox4x32_10.
    counter = torch.tensor([[0, 0, 0, 0], [0xFFFFFFFF] * 4, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]])
    key = torch.tensor([[0, 0], [0xFFFFFFFF] * 2, [0xA4093822, 0x299F31D0]])
    expected = [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8],
                [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
                [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]]
    assert reference.philox4x32_10(counter, key).tolist() == expected


def test_uniforms_layout():
    # u(seed, offset, row) = philox(counter=(offset lo, offset hi, row lo, row hi), key=(seed lo, seed hi)).x / 2^32
    seed, offset = 0x0123456789ABCDEF, 0x00000007FFFFFFFF
    u = reference.sampling_uniforms(seed, offset, 3)
    counter = torch.tensor([[offset & 0xFFFFFFFF, offset >> 32, r, 0] for r in range(3)])
    key = torch.tensor([[seed & 0xFFFFFFFF, seed >> 32]])
    words = reference.philox4x32_10(counter, key)[:, 0]
    assert torch.equal(u, words.double() / 2**32)
    assert bool(((u >= 0) & (u < 1)).all())


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no CPU kernel")
def test_kernel_uses_the_same_uniforms():
    # Two equally likely tokens: the draw is token 1 exactly when u >= 1/2, so the kernel's draws
    # expose the top bit of every row's word.
    rows = 4096
    logits = torch.zeros(rows, 2)
    tokens = sample_tokens(logits, seed=77, offset=5)
    u = reference.sampling_uniforms(77, 5, rows)
    assert torch.equal(tokens, (u >= 0.5).long())


# ---- kernel == reference, draw for draw ---------------------------------------------------------


def _param(draw, rows, scalar_strategy, tensor_fn):
    kind = draw(st.sampled_from(["scalar", "tensor1", "rows"]))
    if kind == "scalar":
        return draw(scalar_strategy)
    if kind == "tensor1":
        return tensor_fn(1).reshape(())
    return tensor_fn(rows)


@st.composite
def sampling_cases(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rows = draw(st.integers(1, 9))
    vocab = draw(st.sampled_from([1, 2, 7, 63, 64, 65, 300, 1031]))
    lo = draw(st.integers(0, vocab - 1))
    hi = draw(st.integers(lo + 1, vocab))
    gen = torch.Generator().manual_seed(seed + 1)
    temperature = _param(draw, rows, st.sampled_from([0.0, 0.3, 1.0, 2.5]),
                         lambda n: torch.rand(n, generator=gen) * 2 * (torch.rand(n, generator=gen) > 0.2))
    top_k = _param(draw, rows, st.sampled_from([0, 1, 2, 5, 40, 5000]),
                   lambda n: torch.randint(0, 70, (n,), generator=gen))
    top_p = _param(draw, rows, st.sampled_from([1.0, 0.95, 0.5, 1e-9, 0.0]),
                   lambda n: torch.rand(n, generator=gen))
    return dict(
        logits=_logits(seed, rows, vocab, draw(st.sampled_from(DTYPES)), scale=draw(st.sampled_from([0.5, 3.0, 30.0])),
                       specials=draw(st.booleans()), ties=draw(st.booleans())),
        temperature=temperature, top_k=top_k, top_p=top_p, vocab_range=(lo, hi),
        seed=draw(st.integers(-(2**63), 2**63 - 1)), offset=draw(st.integers(0, 2**40)),
    )


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no CPU kernel")
@given(sampling_cases())
def test_kernel_matches_reference(case):
    logits = case.pop("logits")
    tokens, inv, expected, inv_ref = _both(logits, **case)
    assert torch.equal(tokens, expected)
    assert torch.equal(inv, inv_ref)
    lo, hi = case["vocab_range"]
    assert bool(((tokens >= lo) & (tokens < hi)).all())


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no CPU kernel")
@pytest.mark.parametrize("isa", cogview.ops.usable_cpu_isas())
@pytest.mark.parametrize("config", [dict(top_k=50), dict(top_k=50, top_p=0.9), dict(top_p=0.8), dict(),
                                    dict(temperature=0.0)])
def test_every_isa_matches_reference(isa, config):
    logits = _logits(3, 64, 4099, torch.bfloat16, ties=True)
    kw = {"vocab_range": (5, 4000), "seed": 11, "offset": 3, "temperature": 0.7, **config}
    expected = reference.sample_tokens(logits, **kw)
    with cogview.ops.use_cpu_isa(isa):
        assert torch.equal(sample_tokens(logits, **kw), expected)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no CPU kernel")
def test_many_draws_match_reference():
    # Large ranges and the benchmark's settings, over many rows (both top-k paths, the heap path).
    logits = _logits(5, 300, 9000, specials=False)
    for kw in (dict(top_k=200, top_p=0.95), dict(top_k=200), dict(top_p=0.9), dict()):
        tokens, _, expected, _ = _both(logits, vocab_range=(0, 8192), seed=99, offset=4, **kw)
        assert torch.equal(tokens, expected), kw


# ---- the distribution ---------------------------------------------------------------------------


def _exact_distribution(x: list[float], lo: int, hi: int, temperature: float, top_k: int, top_p: float) -> dict:
    """The definition in plain Python (float64), independent of both implementations."""
    ids = [i for i in range(lo, hi) if not math.isnan(x[i]) and x[i] != NEG_INF]
    ids.sort(key=lambda i: (-x[i], i))
    if 0 < top_k < len(ids):
        ids = ids[:top_k]
    t = torch.tensor(temperature, dtype=torch.float32).item()
    s = [torch.tensor(x[i] / t, dtype=torch.float32).item() for i in ids]  # float32 division
    weights = [math.exp(v - s[0]) for v in s]
    if top_p < 1:
        total, cum, keep = sum(weights), 0.0, 0
        while keep < len(weights):
            cum += weights[keep]
            keep += 1
            if cum >= top_p * total:
                break
        ids, weights = ids[:keep], weights[:keep]
    total = sum(weights)
    return {i: w / total for i, w in zip(ids, weights)}


def _chi_square_p_value(counts: torch.Tensor, probs: dict, draws: int) -> float:
    """Pearson's test; expected counts below 5 are pooled into one cell."""
    ids = sorted(probs)
    expected = torch.tensor([probs[i] * draws for i in ids], dtype=torch.float64)
    observed = counts[ids].double()
    small = expected < 5
    if small.any():
        expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
        observed = torch.cat([observed[~small], observed[small].sum().reshape(1)])
    stat = float(((observed - expected) ** 2 / expected).sum())
    dof = expected.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


DISTRIBUTION_CASES = [
    dict(temperature=0.8, top_k=12, top_p=0.9, vocab_range=(5, 45)),  # bounded top-k + nucleus
    dict(temperature=1.3, top_k=0, top_p=0.8, vocab_range=(0, 50)),  # whole range + nucleus (heap)
    dict(temperature=1.0, top_k=0, top_p=1.0, vocab_range=(2, 50)),  # whole range, block search
    dict(temperature=0.6, top_k=7, top_p=1.0, vocab_range=(0, 60)),  # bounded top-k only
]


@pytest.mark.parametrize("case", DISTRIBUTION_CASES)
def test_distribution_chi_square(case):
    # 20,000 independent draws (one per row: the row is part of the random counter) of the same
    # logits, against the exact distribution of the definition. Each case fails with probability
    # 1e-3 for a correct sampler at a random seed (4e-3 for the four cases together); the seed is
    # fixed, so the outcome is deterministic and a pass stays a pass.
    draws, vocab = 20_000, 60
    gen = torch.Generator().manual_seed(2024)
    row = torch.randn(vocab, generator=gen) * 1.5
    row[[3, 17, 30]] = NEG_INF
    row[8] = float("nan")
    row[20] = row[21]  # a tie
    logits = row.expand(draws, vocab)
    tokens = sample_tokens(logits, seed=12345, offset=0, **case)
    probs = _exact_distribution(row.tolist(), *case["vocab_range"], case["temperature"], case["top_k"],
                                case["top_p"])
    counts = torch.bincount(tokens, minlength=vocab)
    outside = [i for i in range(vocab) if i not in probs]
    assert int(counts[outside].sum()) == 0, "drew a token the definition excludes"
    assert _chi_square_p_value(counts, probs, draws) > 1e-3
    if HAS_CPU_KERNEL:
        assert torch.equal(tokens, reference.sample_tokens(logits, seed=12345, offset=0, **case))


# ---- invariants ---------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**20), lo=st.integers(0, 99), width=st.integers(1, 100), dtype=st.sampled_from(DTYPES))
def test_vocab_range_respected(seed, lo, width, dtype):
    hi = min(100, lo + width)
    logits = _logits(seed, 6, 100, dtype)
    logits[:, :lo] = 1e4  # the best logits lie outside the range
    logits[:, hi:] = 1e4
    for kw in (dict(), dict(top_k=3), dict(top_p=0.5), dict(temperature=0.0)):
        tokens = sample_tokens(logits.to(dtype), vocab_range=(lo, hi), seed=seed, **kw)
        assert bool(((tokens >= lo) & (tokens < hi)).all()), kw


@given(seed=st.integers(0, 2**20), dtype=st.sampled_from(DTYPES))
def test_greedy_settings_equal_argmax(seed, dtype):
    logits = _logits(seed, 8, 130, dtype, ties=True)
    lo, hi = 3, 120
    x = logits[:, lo:hi].float().nan_to_num(nan=NEG_INF)
    # argmax with the lowest id on ties (torch.argmax makes no promise about ties)
    best = x.max(dim=1, keepdim=True).values
    is_best = (x == best) & (best > NEG_INF)
    expected = torch.where(is_best.any(1), is_best.float().argmax(1), 0) + lo
    for kw in (dict(temperature=0.0), dict(top_k=1), dict(top_p=1e-12), dict(top_p=0.0),
               dict(temperature=0.0, top_k=50, top_p=0.5)):
        tokens = sample_tokens(logits, vocab_range=(lo, hi), seed=seed, offset=1, **kw)
        assert torch.equal(tokens, expected), kw


def test_same_row_same_token_in_other_batches():
    a = _logits(1, 8, 500)
    b = _logits(2, 20, 500)
    b[:8] = a  # rows 0..7 identical, the rest of the batch different and larger
    temperature_a = torch.linspace(0.5, 1.5, 8)
    temperature_b = torch.cat([temperature_a, torch.full((12,), 0.1)])
    kw = dict(top_k=40, top_p=0.9, vocab_range=(10, 490), seed=5, offset=17)
    tokens_a = sample_tokens(a, temperature=temperature_a, **kw)
    tokens_b = sample_tokens(b, temperature=temperature_b, **kw)
    assert torch.equal(tokens_a, tokens_b[:8])
    # A different offset is a different draw (for at least some of the 8 rows).
    assert not torch.equal(tokens_a, sample_tokens(a, temperature=temperature_a, **{**kw, "offset": 18}))


@pytest.mark.parametrize("config", [dict(), dict(top_k=5), dict(top_p=0.5), dict(temperature=0.0)])
def test_invalid_rows_flagged(config):
    logits = _logits(0, 6, 50, specials=False)
    lo, hi = 10, 40
    logits[1, lo:hi] = NEG_INF
    logits[3, lo:hi] = float("nan")
    logits[4, lo:hi:2] = NEG_INF
    logits[4, lo + 1:hi:2] = float("nan")
    invalid = torch.tensor([False, False, True, False, False, False])  # row 2 was flagged before
    tokens = sample_tokens(logits, vocab_range=(lo, hi), seed=3, invalid=invalid, **config)
    assert invalid.tolist() == [False, True, True, True, True, False]  # existing flags stay
    assert tokens[[1, 3, 4]].tolist() == [lo, lo, lo]
    assert bool(((tokens >= lo) & (tokens < hi)).all())
    # Without `invalid` the same tokens come back.
    assert torch.equal(tokens, sample_tokens(logits, vocab_range=(lo, hi), seed=3, **config))


def test_plus_infinity_shares_the_mass():
    logits = torch.zeros(4000, 10)
    logits[:, [2, 7]] = float("inf")
    tokens = sample_tokens(logits, seed=1, top_k=3)
    assert set(tokens.tolist()) == {2, 7}
    assert abs(int((tokens == 2).sum()) - 2000) < 200


def test_top_k_beyond_the_range_is_off():
    logits = _logits(9, 16, 300)
    kw = dict(vocab_range=(20, 120), seed=4, top_p=0.9)
    assert torch.equal(sample_tokens(logits, top_k=100, **kw), sample_tokens(logits, top_k=0, **kw))
    assert torch.equal(sample_tokens(logits, top_k=10**9, **kw), sample_tokens(logits, top_k=0, **kw))


def test_seed_forms_agree():
    logits = _logits(4, 16, 300)
    by_int = sample_tokens(logits, seed=2**64 - 5, offset=7)
    assert torch.equal(by_int, sample_tokens(logits, seed=-5, offset=torch.tensor(7)))
    assert torch.equal(by_int, sample_tokens(logits, seed=torch.tensor([-5]), offset=torch.tensor(7, dtype=torch.int32)))


def test_empty_batch():
    out = sample_tokens(torch.randn(0, 10), seed=0)
    assert out.shape == (0,) and out.dtype == torch.int64


def test_non_contiguous_logits():
    base = _logits(6, 40, 200)
    view = base.t().contiguous().t()[::2]  # column-major rows, every second one
    kw = dict(top_k=20, top_p=0.9, vocab_range=(3, 190), seed=8)
    assert torch.equal(sample_tokens(view, **kw), sample_tokens(view.contiguous(), **kw))


# ---- torch.library / torch.compile --------------------------------------------------------------


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no CPU kernel")
def test_opcheck():
    logits = _logits(0, 5, 100)
    invalid = torch.zeros(5, dtype=torch.bool)
    op = torch.ops.cogview.sample_tokens.default
    torch.library.opcheck(op, (logits, torch.tensor(3), torch.tensor(1)),
                          dict(top_k=torch.tensor([1, 2, 3, 4, 50]), top_p_value=0.9, vocab_lo=3, vocab_hi=90,
                               invalid=invalid))
    torch.library.opcheck(op, (logits.half(), torch.tensor(3), torch.tensor(1)),
                          dict(temperature=torch.tensor(0.5), top_p=torch.rand(5)))


def test_compile_parity():
    def step(logits, offset, invalid):
        return sample_tokens(logits, temperature=0.9, top_k=20, top_p=0.9, vocab_range=(2, 95), seed=7,
                             offset=offset, invalid=invalid)

    logits = _logits(1, 6, 100)
    logits[2, 2:95] = NEG_INF
    inv_eager = torch.zeros(6, dtype=torch.bool)
    inv_compiled = torch.zeros(6, dtype=torch.bool)
    offset = torch.tensor(3)
    expected = step(logits, offset, inv_eager)
    got = torch.compile(step, fullgraph=True)(logits, offset, inv_compiled)
    assert torch.equal(got, expected)
    assert torch.equal(inv_compiled, inv_eager) and bool(inv_eager[2])


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(logits=torch.zeros(2, 5, dtype=torch.int64)), TypeError, "logits"),
        (dict(logits=torch.zeros(2, 3, 5)), ValueError, "logits"),
        (dict(vocab_range=(3, 3)), ValueError, "vocab_range"),
        (dict(vocab_range=(0, 11)), ValueError, "vocab_range"),
        (dict(vocab_range=(-1, 5)), ValueError, "vocab_range"),
        (dict(vocab_range="abc"), TypeError, "vocab_range"),
        (dict(temperature=-0.5), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature=1e39), ValueError, "temperature"),
        (dict(temperature="hot"), TypeError, "temperature"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_k=2.5), TypeError, "top_k"),
        (dict(top_k=torch.tensor([1.0, 2.0])), TypeError, "top_k"),
        (dict(top_k=torch.tensor([1, 2, 3])), ValueError, "top_k"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_p=-0.1), ValueError, "top_p"),
        (dict(top_p=torch.tensor([1, 1])), TypeError, "top_p"),
        (dict(temperature=torch.tensor([1.0, -1.0])), ValueError, "temperature"),
        (dict(top_k=torch.tensor([3, -1])), ValueError, "top_k"),
        (dict(top_p=torch.tensor([0.5, 1.5])), ValueError, "top_p"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(seed=2**64), ValueError, "seed"),
        (dict(seed=torch.tensor([1, 2])), ValueError, "seed"),
        (dict(seed=torch.tensor(1.0)), TypeError, "seed"),
        (dict(offset=None), TypeError, "offset"),
        (dict(invalid=torch.zeros(2)), ValueError, "invalid"),
        (dict(invalid=torch.zeros(3, dtype=torch.bool)), ValueError, "invalid"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = dict(logits=torch.randn(2, 10), seed=0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sample_tokens(args.pop("logits"), **args)


def test_seed_is_required():
    with pytest.raises(TypeError):
        sample_tokens(torch.randn(2, 10))


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no CPU kernel")
def test_kernel_checks_direct_calls():
    op = torch.ops.cogview.sample_tokens
    x = torch.randn(3, 10)
    seed = torch.tensor(0)
    with pytest.raises(ValueError, match="top_k"):
        op(x, seed, seed, top_k=torch.tensor([1, -2, 3]))
    with pytest.raises(ValueError, match="temperature"):
        op(x, seed, seed, temperature=torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="top_p"):
        op(x, seed, seed, top_p_value=2.0)
    with pytest.raises(ValueError, match="vocab_range"):
        op(x, seed, seed, vocab_lo=5, vocab_hi=11)
    with pytest.raises(ValueError, match="seed"):
        op(x, torch.tensor([1, 2]), seed)


# ---- CUDA (issue 7): same definition, same draws ------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("config", [dict(top_k=200, top_p=0.95), dict(top_k=20), dict(top_p=0.9), dict(),
                                    dict(temperature=0.0)])
def test_cuda_matches_cpu_draw_for_draw(config):
    logits = _logits(7, 64, 58240, specials=True)
    kw = dict(vocab_range=(0, 8192), seed=42, offset=9, **config)
    cpu = reference.sample_tokens(logits, **kw)
    inv = torch.zeros(64, dtype=torch.bool, device="cuda")
    seed, offset = torch.tensor(42, device="cuda"), torch.tensor(9, device="cuda")
    got = sample_tokens(logits.cuda(), **{**kw, "seed": seed, "offset": offset}, invalid=inv)
    assert torch.equal(got.cpu(), cpu)


@pytest.mark.cuda
@pytest.mark.parametrize("case", DISTRIBUTION_CASES)
def test_cuda_distribution_chi_square(case):
    draws, vocab = 20_000, 60
    gen = torch.Generator().manual_seed(2024)
    row = torch.randn(vocab, generator=gen) * 1.5
    logits = row.expand(draws, vocab).cuda()
    tokens = sample_tokens(logits, seed=12345, offset=0, **case).cpu()
    probs = _exact_distribution(row.tolist(), *case["vocab_range"], case["temperature"], case["top_k"],
                                case["top_p"])
    counts = torch.bincount(tokens, minlength=vocab)
    assert _chi_square_p_value(counts, probs, draws) > 1e-3


# ---- the wrapper's kernel fast path (plain-number settings, tensor seed/offset) ------------------


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="no CPU kernel")
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(temperature=-0.5), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(seed=torch.tensor([1, 2])), ValueError, "seed"),
        (dict(seed=torch.tensor(1.0)), TypeError, "seed"),
        (dict(offset=torch.tensor([1, 2])), ValueError, "offset"),
        (dict(invalid=torch.zeros(2)), TypeError, "invalid"),
        (dict(invalid=torch.zeros(3, dtype=torch.bool)), ValueError, "invalid"),
        (dict(logits=torch.zeros(2, 5, dtype=torch.int64)), TypeError, "logits"),
        (dict(logits=torch.zeros(2, 3, 5)), ValueError, "logits"),
    ],
)
def test_fast_path_bad_input(kwargs, error, match):
    args = dict(logits=torch.randn(2, 10), seed=torch.tensor(0), offset=torch.tensor(0), temperature=1.0, top_k=0,
                top_p=1.0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sample_tokens(args.pop("logits"), **args)


def test_fast_path_equals_general_path():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(5))
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 20, 0.9), (0.0, 5, 1.0)):
        flags = torch.zeros(6, dtype=torch.bool)
        fast = sample_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=torch.tensor(11),
                             offset=torch.tensor(4), invalid=flags)
        general = sample_tokens(logits, temperature=torch.tensor(temperature), top_k=top_k, top_p=top_p, seed=11,
                                offset=4, vocab_range=(0, 300))
        assert torch.equal(fast, general)

"""sandwich_decode_step: the whole layer stack's decode step in one call, against the per-op module
path (the same kernels but for the projections, so the same numbers up to their rounding), the
plain-PyTorch reference in every ISA, torch.compile and opcheck."""
from __future__ import annotations

import pytest
import torch

from cogview import ops
from cogview.generation.sampler import lean_cpu_step, sample_image_codes, sandwich_layer_params
from cogview.models import CogViewTransformer, TransformerConfig

HAS_KERNEL = ops.has_kernel("sandwich_decode_step", "cpu")
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="no CPU kernel")


def _model(dtype=torch.float32, pb_relax=False, layers=3, hidden=64, heads=4, seed=0):
    torch.manual_seed(seed)
    config = TransformerConfig(num_layers=layers, hidden_size=hidden, num_heads=heads, max_positions=48,
                               image_tokens=32, text_tokens=64, vocab_pad_multiple=8, pb_relax=pb_relax)
    model = CogViewTransformer(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters and biases
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model.to(dtype)


def _prefilled(model, rows=3, prompt=9, max_len=40, seed=1):
    """A cache holding `prompt` positions per row (ragged: row r holds prompt - r)."""
    gen = torch.Generator().manual_seed(seed)
    cache = model.new_cache(rows, max_len)
    tokens = torch.randint(0, model.config.image_tokens, (rows, prompt), generator=gen)
    positions = torch.arange(prompt).expand(rows, -1).contiguous()
    with torch.inference_mode():
        model.decode_step(tokens, positions, cache, torch.zeros(rows, dtype=torch.long))
    start = torch.tensor([prompt - r for r in range(rows)])
    new = torch.randint(0, model.config.image_tokens, (rows, 1), generator=gen)
    return cache, new, start[:, None].clone(), start


def _layer_params(model):
    return [p.detach() for p in sandwich_layer_params(model)]


def _clone(cache):
    return type(cache)(cache.k.clone(), cache.v.clone())


# Per dtype: how far the fused step may drift from the per-op loop, whose projections round
# differently (MKL or oneDNN there, cogview's matrix-vector kernel or packed MKL here). For bfloat16
# one projection output rounded the other way moves a hidden state by about one bf16 step.
ROUNDING = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-12}


@needs_kernel
@pytest.mark.parametrize("dtype,pb_relax", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False),
                                            (torch.float64, False)])
@pytest.mark.parametrize("rows", [1, 3, 4, 6])
def test_matches_the_per_op_module_path(dtype, pb_relax, rows):
    model = _model(dtype, pb_relax)
    cache, tokens, positions, start = _prefilled(model, rows=rows)
    module_cache = _clone(cache)
    with torch.inference_mode():
        want = model.decode_step(tokens, positions, module_cache, start, return_hidden=True)[:, 0]
        step = lean_cpu_step(model, cache, pack=False)
        assert step is not None
        got = step(tokens, positions, start)
    assert got.dtype == dtype and got.shape == want.shape
    tol = ROUNDING[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(cache.k, module_cache.k, rtol=tol, atol=tol)
    torch.testing.assert_close(cache.v, module_cache.v, rtol=tol, atol=tol)
    written = torch.ones_like(cache.k, dtype=torch.bool)  # every slot but the new one is untouched
    for r in range(rows):
        written[:, r, :, start[r]] = False
    assert torch.equal(cache.k[written], module_cache.k[written])


@needs_kernel
@pytest.mark.parametrize("isa", ops.usable_cpu_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_a_row_does_not_depend_on_the_others(isa, dtype):
    # Up to 4 rows every kernel of the step (the projections included) computes each row alone, in
    # one fixed order: a row's hidden state is bit for bit the same in a batch as on its own.
    model = _model(dtype, hidden=42, heads=6)  # head_dim 7, MLP 168: vector tails everywhere
    cache, tokens, positions, start = _prefilled(model, rows=4)
    with ops.use_cpu_isa(isa), torch.inference_mode():
        batch = lean_cpu_step(model, _clone(cache), pack=False)(tokens, positions, start)
        for r in range(4):
            alone = type(cache)(cache.k[:, r:r + 1].clone(), cache.v[:, r:r + 1].clone())
            got = lean_cpu_step(model, alone, pack=False)(tokens[r:r + 1], positions[r:r + 1], start[r:r + 1])
            assert torch.equal(got[0], batch[r]), (r, (got[0] - batch[r]).abs().max())


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3])
def test_packed_weights_change_rounding_only(rows):
    model = _model()
    cache, tokens, positions, start = _prefilled(model, rows=rows)
    module_cache = _clone(cache)
    with torch.inference_mode():
        want = model.decode_step(tokens, positions, module_cache, start, return_hidden=True)[:, 0]
        got = lean_cpu_step(model, cache, pack=True)(tokens, positions, start)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.k, module_cache.k, rtol=1e-5, atol=1e-5)
    packed = ops.pack_projection_weights(_layer_params(model), rows)
    if torch.backends.mkl.is_available():
        assert packed is not None and len(packed) == 4 * len(model.layers)
    assert ops.pack_projection_weights([p.bfloat16() for p in _layer_params(model)], rows) is None


@pytest.mark.parametrize("isa", ops.usable_cpu_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,hidden,heads", [(1, 64, 4), (2, 42, 6), (4, 42, 6), (5, 64, 4)])
def test_matches_the_reference(isa, dtype, rows, hidden, heads):
    # hidden 42: every ISA's products end in a partial vector
    model = _model(dtype, pb_relax=True, hidden=hidden, heads=heads)
    cache, tokens, positions, start = _prefilled(model, rows=rows)
    ref_cache = _clone(cache)
    args = dict(word_embeddings=model.word_embeddings.weight, position_embeddings=model.position_embeddings.weight,
                first_norm=(model.layers[0].input_layernorm.weight, model.layers[0].input_layernorm.bias),
                num_heads=model.config.num_heads, scale=model.config.head_dim ** -0.5,
                eps=model.config.layernorm_eps, pb_relax=True)
    params = _layer_params(model)
    with torch.inference_mode():
        with ops.force_reference():
            want = ops.sandwich_decode_step(tokens, positions, start, layer_params=params, k_cache=ref_cache.k,
                                            v_cache=ref_cache.v, **args)
        with ops.use_cpu_isa(isa):
            got = ops.sandwich_decode_step(tokens, positions, start, layer_params=params, k_cache=cache.k,
                                           v_cache=cache.v, **args)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(cache.k, ref_cache.k, rtol=tol, atol=tol)


@needs_kernel
def test_generation_is_the_same_with_and_without_the_fused_step():
    model = _model()
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11]]
    kw = dict(num_new=16, image_tokens=model.config.image_tokens, pad_id=0, top_k=8)
    fused, _ = sample_image_codes(model, prompts, [0, 1, 2], lean=True, **kw)
    modules, _ = sample_image_codes(model, prompts, [0, 1, 2], lean=False, **kw)
    assert torch.equal(fused, modules)


@needs_kernel
def test_compile_parity():
    model = _model()
    cache, tokens, positions, start = _prefilled(model)
    compiled_cache = _clone(cache)
    eager = lean_cpu_step(model, cache, pack=False)  # (packed MKL weights are eager-only)
    compiled = torch.compile(lean_cpu_step(model, compiled_cache, pack=False), fullgraph=True)
    with torch.inference_mode():
        want = eager(tokens, positions, start)
        got = compiled(tokens, positions, start)
    assert torch.equal(got, want)
    assert torch.equal(cache.k, compiled_cache.k)


@needs_kernel
def test_opcheck():
    model = _model(layers=2)
    cache, tokens, positions, start = _prefilled(model, rows=2)
    first = model.layers[0].input_layernorm
    torch.library.opcheck(torch.ops.cogview.sandwich_decode_step.default, (
        tokens, positions, start, model.word_embeddings.weight.detach(), model.position_embeddings.weight.detach(),
        first.weight.detach(), first.bias.detach(), _layer_params(model), cache.k, cache.v, 4, 0.25, 1e-5, False))


def test_a_non_standard_model_keeps_the_module_path():
    model = _model()
    model.layers[1].attention.attention_fn = lambda module, q, k, v, ctx: v
    assert lean_cpu_step(model, model.new_cache(1, 8)) is None
    mixed = _model()
    mixed.layers[0].eps = 1e-3
    assert lean_cpu_step(mixed, mixed.new_cache(1, 8)) is None


def test_bound_step_checks_once_and_falls_back_with_the_full_checks():
    model = _model(layers=2)
    cache, tokens, positions, start = _prefilled(model, rows=2)
    first = model.layers[0].input_layernorm
    bound = dict(word_embeddings=model.word_embeddings.weight.detach(),
                 position_embeddings=model.position_embeddings.weight.detach(),
                 first_norm=(first.weight.detach(), first.bias.detach()), layer_params=_layer_params(model),
                 num_heads=4, scale=0.25)
    with pytest.raises(ValueError, match="`scale`"):
        ops.bind_sandwich_decode_step(**{**bound, "scale": float("nan")}, k_cache=cache.k, v_cache=cache.v)
    with pytest.raises(TypeError, match="`first_norm`"):
        ops.bind_sandwich_decode_step(**{**bound, "first_norm": first.weight}, k_cache=cache.k, v_cache=cache.v)
    caches = [_clone(cache) for _ in range(3)]
    steps = [ops.bind_sandwich_decode_step(**bound, k_cache=c.k, v_cache=c.v) for c in caches]
    with torch.inference_mode():
        with pytest.raises(TypeError, match="`tokens`"):
            steps[0](tokens.tolist(), positions, start)
        with ops.force_reference():  # honoured per call, by steps bound before it too
            want = ops.sandwich_decode_step(tokens, positions, start, **bound, k_cache=caches[1].k,
                                            v_cache=caches[1].v)
            assert torch.equal(steps[2](tokens, positions, start), want)
        got = steps[0](tokens, positions, start)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(caches[0].k, caches[1].k, rtol=2e-5, atol=2e-5)

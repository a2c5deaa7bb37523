"""The CogView transformer: layout and presets, kernels vs reference ops, cached decoding, hooks."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cogview import ops
from cogview.models import (
    CogViewConfig,
    CogViewTransformer,
    TransformerConfig,
    causal_attention,
    presets,
    transformer_from_preset,
)
from cogview.models.transformer import SelfAttention
from tests.tolerance import assert_within_rule

TINY = presets["test-tiny"].transformer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: on a shared 2-core machine the intra-op thread hand-off costs ~100x the work.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(**overrides) -> CogViewTransformer:
    return CogViewTransformer(TINY.replace(**overrides) if overrides else TINY).eval()


def random_tokens(config: TransformerConfig, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, seq), generator=g)


# ---------------------------------------------------------------------------------------------
# Presets, configs and the parameter layout
# ---------------------------------------------------------------------------------------------


def test_cogview_4b_on_meta_has_the_original_parameter_count():
    model = transformer_from_preset("cogview-4b", device="meta")
    assert model.num_parameters() == 3_928_849_920
    assert model.config.num_parameters() == 3_928_849_920
    assert all(p.device.type == "meta" for p in model.parameters())
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.mlp_size, c.max_positions, c.vocab_rows) == (
        48, 2560, 40, 10240, 1089, 58240)
    assert c.pb_relax and not c.attention_pb_relax
    sd = model.state_dict()
    assert sd["word_embeddings.weight"].shape == (58240, 2560)
    assert sd["position_embeddings.weight"].shape == (1089, 2560)
    assert sd["layers.47.attention.query_key_value.weight"].shape == (7680, 2560)
    assert sd["layers.0.mlp.dense_4h_to_h.weight"].shape == (2560, 10240)


def test_parameter_names_follow_the_original_release():
    model = tiny()
    per_layer = {f"{m}.{p}" for m in ("input_layernorm", "attention.query_key_value", "attention.dense",
                                      "third_layernorm", "post_attention_layernorm", "mlp.dense_h_to_4h",
                                      "mlp.dense_4h_to_h", "fourth_layernorm") for p in ("weight", "bias")}
    expected = {"word_embeddings.weight", "position_embeddings.weight", "final_layernorm.weight",
                "final_layernorm.bias"}
    expected |= {f"layers.{i}.{name}" for i in range(TINY.num_layers) for name in per_layer}
    assert set(model.state_dict()) == expected
    assert model.num_parameters() == TINY.num_parameters()


def test_cogview_vocabulary_layout():
    c = presets["cogview-4b"].transformer
    assert c.vocab_size == 58219 and c.vocab_rows == 58240
    assert c.text_offset == 8192 and c.command_offset == 58192
    ids = {name: c.command_id(name) for name in ("[PAD]", "[BOI1]", "[EOI1]", "[ROI1]", "[ROI2]", "[SEP]",
                                                 "[BASE]", "[POS0]", "[POS8]")}
    assert ids == {"[PAD]": 58192, "[BOI1]": 58193, "[EOI1]": 58196, "[ROI1]": 58199, "[ROI2]": 58200,
                   "[SEP]": 58202, "[BASE]": 58208, "[POS0]": 58210, "[POS8]": 58218}
    with pytest.raises(KeyError, match="unknown command token"):
        c.command_id("[NOPE]")


@pytest.mark.parametrize("name", sorted(presets))
def test_presets_round_trip_through_json(name):
    config = presets[name]
    again = CogViewConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert config.vqvae.codebook_size == config.transformer.image_tokens
    assert config.max_text_len > 0


def test_small_vocabulary_and_replace_rederives_rows():
    c = TINY.replace(image_tokens=16, text_tokens=10)
    assert c.vocab_size == 16 + 10 + 27 and c.vocab_rows == 56  # padded to a multiple of 8
    assert TINY.replace(hidden_size=32).mlp_size == 128
    assert TINY.replace(vocab_rows=200).vocab_rows == 200


@pytest.mark.parametrize("bad, match", [
    (dict(hidden_size=30), "multiple of num_heads"),
    (dict(vocab_rows=10), "smaller than the vocabulary"),
    (dict(num_layers=0), "num_layers"),
    (dict(command_tokens=("[A]", "[A]")), "distinct"),
])
def test_bad_transformer_configs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**bad)
    with pytest.raises(ValueError, match="unknown field"):
        TransformerConfig.from_dict({**TINY.to_dict(), "hiden_size": 3})


def test_cogview_init():
    config = TINY.replace(num_layers=8, hidden_size=128, num_heads=4)
    model = CogViewTransformer(config)
    std, out_std = 0.02, 0.02 / math.sqrt(16)
    layer = model.layers[3]
    for w, expected in ((model.word_embeddings.weight, std), (model.position_embeddings.weight, std),
                        (layer.attention.query_key_value.weight, std), (layer.mlp.dense_h_to_4h.weight, std),
                        (layer.attention.dense.weight, out_std), (layer.mlp.dense_4h_to_h.weight, out_std)):
        w = w.detach()
        assert abs(float(w.std()) / expected - 1) < 0.1
        assert abs(float(w.mean())) < 0.1 * expected
    assert torch.all(layer.attention.dense.bias == 0) and torch.all(layer.mlp.dense_h_to_4h.bias == 0)
    assert torch.all(layer.third_layernorm.weight == 1) and torch.all(layer.fourth_layernorm.bias == 0)


def plain_cogview_forward(state: dict, config: TransformerConfig, tokens: torch.Tensor, global_pb_relax: bool):
    """A straightforward re-implementation of the facts' layer from a state dict: unfused LayerNorms
    (optionally CogView's literal PB-relax with one global max), q pre-scaled before QK^T, masked
    scores set to -10000, explicit softmax."""
    from cogview.ops.reference import pb_relax_layer_norm_global

    def ln(x, prefix):
        w, b = state[prefix + ".weight"], state[prefix + ".bias"]
        if global_pb_relax:
            return pb_relax_layer_norm_global(x, w, b, config.layernorm_eps)
        return torch.nn.functional.layer_norm(x, x.shape[-1:], w, b, config.layernorm_eps)

    def linear(x, prefix):
        return torch.nn.functional.linear(x, state[prefix + ".weight"], state[prefix + ".bias"])

    batch, seq = tokens.shape
    heads, d = config.num_heads, config.head_dim
    x = state["word_embeddings.weight"][tokens] + state["position_embeddings.weight"][:seq]
    mask = torch.tril(torch.ones(seq, seq))
    for i in range(config.num_layers):
        p = f"layers.{i}."
        qkv = linear(ln(x, p + "input_layernorm"), p + "attention.query_key_value")
        q, k, v = (t.view(batch, seq, heads, d).transpose(1, 2) for t in qkv.split(config.hidden_size, dim=-1))
        scores = torch.matmul(q / math.sqrt(d), k.transpose(-1, -2))
        scores = scores * mask - 10000.0 * (1.0 - mask)
        context = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(batch, seq, -1)
        x = x + ln(linear(context, p + "attention.dense"), p + "third_layernorm")
        h = linear(ln(x, p + "post_attention_layernorm"), p + "mlp.dense_h_to_4h")
        h = torch.nn.functional.gelu(h, approximate="tanh")
        x = x + ln(linear(h, p + "mlp.dense_4h_to_h"), p + "fourth_layernorm")
    return torch.nn.functional.linear(ln(x, "final_layernorm"), state["word_embeddings.weight"])


@pytest.mark.parametrize("pb_relax", [False, True])
@torch.no_grad()
def test_matches_a_plain_reimplementation_of_the_cogview_layer(pb_relax):
    model = tiny(pb_relax=pb_relax)
    with torch.no_grad():  # non-trivial LayerNorm affines and biases, so every parameter matters
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    tokens = random_tokens(TINY, 2, 16, seed=11)
    expected = plain_cogview_forward(model.state_dict(), TINY, tokens, global_pb_relax=pb_relax)
    # PB-relax: the model's per-row max and the original's global max differ only through eps (~1e-7
    # here; PB-relax on vs off differs by ~3e-4 on these weights, so the tolerance tells them apart).
    torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Kernels vs reference ops
# ---------------------------------------------------------------------------------------------


def greedy(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(steps):
        nxt = model(tokens)[:, -1, : model.config.vocab_size].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens[:, prompt.shape[1]:]


def greedy_cached(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    batch, n = prompt.shape
    cache = model.new_cache(batch, n + steps)
    start = torch.zeros(batch, dtype=torch.long)
    positions = torch.arange(n + steps)[None, :].expand(batch, -1)
    logits = model.decode_step(prompt, positions[:, :n], cache, start)
    out = []
    for i in range(steps):
        nxt = logits[:, -1, : model.config.vocab_size].argmax(-1, keepdim=True)
        out.append(nxt)
        start = start + (n if i == 0 else 1)
        if i + 1 < steps:
            logits = model.decode_step(nxt, positions[:, n + i: n + i + 1], cache, start)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("pb_relax", [False, True])
@torch.no_grad()
def test_kernels_and_reference_ops_give_the_same_model_fp32(pb_relax):
    assert ops.has_kernel("add_layer_norm", "cpu"), "the CPU LayerNorm kernels should be built"
    model = tiny(pb_relax=pb_relax)
    tokens = random_tokens(TINY, 3, 24)
    logits = model(tokens, text_len=5, text_bias=1.4)
    with ops.force_reference():
        assert not ops.has_kernel("add_layer_norm", "cpu")
        reference = model(tokens, text_len=5, text_bias=1.4)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    prompt = tokens[:, :6]
    kernel_tokens = greedy(model, prompt, 12)
    with ops.force_reference():
        reference_tokens = greedy(model, prompt, 12)
        reference_cached = greedy_cached(model, prompt, 12)
    assert torch.equal(kernel_tokens, reference_tokens)
    assert torch.equal(greedy_cached(model, prompt, 12), reference_cached)
    assert torch.equal(kernel_tokens, reference_cached)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_kernels_within_the_low_precision_rule(dtype):
    """Whole model in low precision on kernels vs on reference ops, both against a float64 model."""
    model = tiny(pb_relax=True)
    tokens = random_tokens(TINY, 2, 20, seed=1)
    exact = model.double()(tokens)
    low = model.to(dtype)
    kernel_logits = low(tokens)
    with ops.force_reference():
        reference_logits = low(tokens)
    assert kernel_logits.dtype == dtype
    assert_within_rule(kernel_logits, reference_logits, exact, dtype, what=f"logits in {dtype}")


# ---------------------------------------------------------------------------------------------
# Cached decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [[1] * 20, [7, 1, 1, 4, 2, 5], [20]], ids=["token-by-token", "chunks", "prefill"])
@pytest.mark.parametrize("boost", [0.0, 1.8])
@torch.no_grad()
def test_cached_decoding_equals_full_forward(chunks, boost):
    model = tiny(pb_relax=True)
    tokens = random_tokens(TINY, 3, 20, seed=2)
    positions = torch.arange(20)[None, :].expand(3, -1)
    full = model(tokens, text_len=6, text_bias=boost)
    cache = model.new_cache(3, 24)
    start = torch.zeros(3, dtype=torch.long)
    pieces, at = [], 0
    for n in chunks:
        pieces.append(model.decode_step(tokens[:, at: at + n], positions[:, at: at + n], cache, start,
                                        text_len=6, text_bias=boost))
        at += n
        start = start + n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cached_decoding_with_ragged_right_padded_prompts():
    """Rows with prompts of different lengths share one padded prefill; each row then continues from its
    own length (overwriting its padding) and matches the full forward of its own sequence."""
    model = tiny()
    batch, total = 3, 18
    tokens = random_tokens(TINY, batch, total, seed=3)
    lengths = torch.tensor([3, 9, 6])
    full = model(tokens)
    padded = tokens[:, :9].clone()
    for b in range(batch):
        padded[b, lengths[b]:] = TINY.command_id("[PAD]")
    cache = model.new_cache(batch, 32)
    prefill = model.decode_step(padded, torch.arange(9)[None, :], cache, torch.zeros(batch, dtype=torch.long))
    for b in range(batch):
        n = int(lengths[b])
        torch.testing.assert_close(prefill[b, :n], full[b, :n], rtol=1e-5, atol=1e-5)
    start = lengths.clone()
    for _ in range(total - 9):
        step_tokens = tokens.gather(1, start[:, None])
        logits = model.decode_step(step_tokens, start[:, None], cache, start)
        expected = full[torch.arange(batch), start]
        torch.testing.assert_close(logits[:, 0], expected, rtol=1e-5, atol=1e-5)
        start = start + 1


@torch.no_grad()
def test_decode_step_hidden_and_cache_shapes():
    model = tiny()
    cache = model.new_cache(2, 10, dtype=torch.float64)
    assert cache.k.shape == (TINY.num_layers, 2, TINY.num_heads, 10, TINY.head_dim) and cache.dtype == torch.float64
    assert cache.nbytes() == 2 * cache.k.numel() * 8
    hidden = model.decode_step(random_tokens(TINY, 2, 4), torch.arange(4)[None, :], cache,
                               torch.zeros(2, dtype=torch.long), return_hidden=True)
    assert hidden.shape == (2, 4, TINY.hidden_size)
    assert cache.k[:, :, :, 4:].abs().sum() == 0 and cache.k[:, :, :, :4].abs().sum() > 0
    assert model.logits(hidden).shape == (2, 4, TINY.vocab_rows)


@torch.no_grad()
def test_decode_step_compiles_without_graph_breaks():
    model = tiny()
    tokens = random_tokens(TINY, 2, 5, seed=4)
    positions = torch.arange(5)[None, :].expand(2, -1)
    start = torch.zeros(2, dtype=torch.long)
    eager_cache, compiled_cache = model.new_cache(2, 8), model.new_cache(2, 8)
    expected = model.decode_step(tokens, positions, eager_cache, start)
    step = torch.compile(model.decode_step, fullgraph=True)
    torch.testing.assert_close(step(tokens, positions, compiled_cache, start), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_cache.k, eager_cache.k)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_cuda_cached_decoding_equals_full_forward(dtype):
    model = tiny(pb_relax=True).to("cuda", dtype)
    tokens = random_tokens(TINY, 3, 20, seed=12).cuda()
    positions = torch.arange(20, device="cuda")[None, :].expand(3, -1)
    full = model(tokens, text_len=6, text_bias=1.4)
    cache = model.new_cache(3, 24)
    start = torch.zeros(3, dtype=torch.long, device="cuda")
    pieces = []
    for at, n in ((0, 7), (7, 1), (8, 5), (13, 7)):
        pieces.append(model.decode_step(tokens[:, at: at + n], positions[:, at: at + n], cache, start,
                                        text_len=6, text_bias=1.4))
        start = start + n
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(torch.cat(pieces, dim=1).float(), full.float(), rtol=tol, atol=tol)


@pytest.mark.cuda
@torch.no_grad()
def test_cuda_decode_step_replays_from_a_cuda_graph():
    """One decode step captured once, replayed token by token, equals the full forward."""
    model = tiny().cuda()
    batch, total, prompt = 2, 16, 4
    tokens = random_tokens(TINY, batch, total, seed=13).cuda()
    full = model(tokens)
    cache = model.new_cache(batch, total)
    start = torch.zeros(batch, dtype=torch.long, device="cuda")
    model.decode_step(tokens[:, :prompt], torch.arange(prompt, device="cuda")[None, :], cache, start)
    static_token = tokens[:, prompt: prompt + 1].clone()
    static_start = torch.full((batch,), prompt, dtype=torch.long, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (writes slot `prompt`, rewritten below)
        model.decode_step(static_token, static_start[:, None], cache, static_start)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = model.decode_step(static_token, static_start[:, None], cache, static_start)
    for i in range(prompt, total):
        static_token.copy_(tokens[:, i: i + 1])
        static_start.fill_(i)
        graph.replay()
        torch.testing.assert_close(static_logits[:, 0], full[:, i], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Attention variants and hooks
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_pb_relax_attention_is_the_same_function():
    plain = tiny()
    relaxed = tiny(attention_pb_relax=True)
    relaxed.load_state_dict(plain.state_dict())
    assert relaxed.layers[0].attention.pb_relax_alpha == 32.0
    tokens = random_tokens(TINY, 2, 16, seed=5)
    torch.testing.assert_close(relaxed(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(relaxed(tokens, text_len=4, text_bias=1.4), plain(tokens, text_len=4, text_bias=1.4),
                               rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_text_boost_changes_only_queries_after_the_text():
    model = tiny()
    tokens = random_tokens(TINY, 2, 12, seed=6)
    plain, boosted = model(tokens), model(tokens, text_len=5, text_bias=1.8)
    torch.testing.assert_close(boosted[:, :5], plain[:, :5], rtol=1e-5, atol=1e-5)
    assert (boosted[:, 5:] - plain[:, 5:]).abs().max() > 1e-3


@torch.no_grad()
def test_pluggable_attention_per_layer():
    model = tiny()
    tokens = random_tokens(TINY, 2, 10, seed=7)
    baseline = model(tokens)
    calls = []

    def recording(module, q, k, v, ctx):
        calls.append((module.layer_index, ctx.decoding, tuple(q.shape)))
        return causal_attention(module, q, k, v, ctx)

    model.set_attention_fn(recording)
    torch.testing.assert_close(model(tokens), baseline)
    assert calls == [(i, False, (2, TINY.num_heads, 10, TINY.head_dim)) for i in range(TINY.num_layers)]
    calls.clear()
    cache = model.new_cache(2, 10)
    model.decode_step(tokens, torch.arange(10)[None, :], cache, torch.zeros(2, dtype=torch.long))
    assert [c[:2] for c in calls] == [(i, True) for i in range(TINY.num_layers)]

    # Layer 1 only: every token attends to itself alone (a 1-key "local" window).
    model.set_attention_fn(None)
    model.set_attention_fn(lambda module, q, k, v, ctx: v, layers=[1])
    local = model(tokens)
    assert model.layers[0].attention.attention_fn is None
    assert (local - baseline).abs().max() > 1e-3
    torch.testing.assert_close(local[:, 0], baseline[:, 0], rtol=1e-5, atol=1e-5)  # position 0 sees itself anyway


@torch.no_grad()
def test_attention_module_can_be_replaced():
    """A replacement module with extra weights for some tokens (as the super-resolution stage needs), told
    which tokens through `extra`."""
    model = tiny()
    tokens = random_tokens(TINY, 2, 8, seed=8)
    baseline = model(tokens)

    class WithExtraWeights(SelfAttention):
        def __init__(self, config):
            super().__init__(config, layer_index=0)
            self.extra_dense = torch.nn.Linear(config.hidden_size, config.hidden_size)

        def forward(self, hidden, ctx):
            special = (ctx.position_ids >= ctx.extra["first_special"])[..., None]
            return super().forward(hidden, ctx) + special * self.extra_dense(hidden)

    replacement = WithExtraWeights(model.config)
    replacement.load_state_dict(model.layers[0].attention.state_dict(), strict=False)
    torch.nn.init.zeros_(replacement.extra_dense.weight)
    torch.nn.init.zeros_(replacement.extra_dense.bias)
    model.layers[0].attention = replacement
    torch.testing.assert_close(model(tokens, extra={"first_special": 4}), baseline)
    torch.nn.init.normal_(replacement.extra_dense.weight, std=0.1)
    changed = model(tokens, extra={"first_special": 4})
    torch.testing.assert_close(changed[:, :4], baseline[:, :4])
    assert (changed[:, 4:] - baseline[:, 4:]).abs().max() > 1e-2
    assert "layers.0.attention.extra_dense.weight" in model.state_dict()


# ---------------------------------------------------------------------------------------------
# Training-side behaviour
# ---------------------------------------------------------------------------------------------


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny().train()
    tokens = random_tokens(TINY, 2, 12, seed=9)

    def grads(checkpointing: bool):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = checkpointing
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_a, grads_a = grads(False)
    loss_b, grads_b = grads(True)
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7, msg=name)
    assert transformer_from_preset("test-tiny", checkpoint_activations=True).gradient_checkpointing


def test_bf16_autocast_with_fp32_weights():
    model = tiny().train()
    tokens = random_tokens(TINY, 2, 12, seed=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    tokens = random_tokens(TINY, 2, 6)
    with pytest.raises(ValueError, match="tokens"):
        model(tokens.float())
    with pytest.raises(ValueError, match="position_ids"):
        model(tokens, torch.arange(5)[None, :])
    with pytest.raises(ValueError, match="max_positions"):
        model(random_tokens(TINY, 1, TINY.max_positions + 1))
    cache = model.new_cache(3, 8)
    with pytest.raises(ValueError, match="3 sequences"):
        model.decode_step(tokens, torch.arange(6)[None, :], cache, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="overruns"):
        model.decode_step(tokens, torch.arange(6)[None, :], model.new_cache(2, 8), torch.full((2,), 4))
    with pytest.raises(KeyError, match="unknown model preset"):
        transformer_from_preset("cogview-5b")

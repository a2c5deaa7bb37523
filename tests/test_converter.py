"""The release converter: miniature releases written here in the original key layout and shapes (the
Megatron/DeepSpeed CogView variant and the SwissArmyTransformer one), converted, and compared with a
plain re-implementation of the original forward pass and of the original VQ-VAE on the same weights."""
from __future__ import annotations

import argparse
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cogview.checkpoint import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    SafetensorsFile,
)
from cogview.cli import main as cli_main
from cogview.convert import convert_release, convert_transformer_state, load_release_state
from cogview.models import COGVIEW_PIXEL_MEAN, COGVIEW_PIXEL_STD
from cogview.pipeline import CogView
from tests._captions import tiny_text_model

LAYERS, HIDDEN, HEADS, POSITIONS = 2, 48, 4, 40
IMAGE_TOKENS, TEXT_TOKENS, COMMANDS = 32, 420, 27
ROWS = 480  # > 32 + 420 + 27 = 479: padded like the release's 58240 rows
VQ_HIDDEN, VQ_DIM = 16, 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Miniature releases in the original layout
# ---------------------------------------------------------------------------------------------


def release_transformer_state(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp16 weights under the original names (facts: "Transformer release checkpoint")."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.02, mean=0.0):
        return (mean + std * torch.randn(*shape, generator=g)).half()

    h, m = HIDDEN, 4 * HIDDEN
    sd = {("transformer." if variant == "swissarmy" else "") + "word_embeddings.weight": rand(ROWS, h, std=0.5)}
    sd["transformer.position_embeddings.weight"] = rand(POSITIONS, h, std=0.5)
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm", "third_layernorm", "fourth_layernorm"):
            sd[p + ln + ".weight"] = rand(h, std=0.1, mean=1.0)
            sd[p + ln + ".bias"] = rand(h, std=0.1)
        sd[p + "attention.query_key_value.weight"] = rand(3 * h, h, std=0.3)
        sd[p + "attention.query_key_value.bias"] = rand(3 * h, std=0.1)
        sd[p + "attention.dense.weight"] = rand(h, h, std=0.2)
        sd[p + "attention.dense.bias"] = rand(h, std=0.1)
        sd[p + "mlp.dense_h_to_4h.weight"] = rand(m, h, std=0.2)
        sd[p + "mlp.dense_h_to_4h.bias"] = rand(m, std=0.1)
        sd[p + "mlp.dense_4h_to_h.weight"] = rand(h, m, std=0.1)
        sd[p + "mlp.dense_4h_to_h.bias"] = rand(h, std=0.1)
    sd["transformer.final_layernorm.weight"] = rand(h, std=0.1, mean=1.0)
    sd["transformer.final_layernorm.bias"] = rand(h, std=0.1)
    return sd


def release_vqvae_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """CogView's VQ-VAE layout (x8, no residual blocks) at miniature width, `module.`-prefixed, with the
    codebook stored [dim, n]."""
    g = torch.Generator().manual_seed(seed)

    def conv(out_c, in_c, k):
        return 0.3 * torch.randn(out_c, in_c, k, k, generator=g), 0.05 * torch.randn(out_c, generator=g)

    sd = {}
    for index, (o, i, k) in zip((0, 2, 4, 6), ((VQ_HIDDEN, 3, 4), (VQ_HIDDEN, VQ_HIDDEN, 4), (VQ_HIDDEN, VQ_HIDDEN, 4),
                                             (VQ_DIM, VQ_HIDDEN, 1))):
        sd[f"module.enc_b.blocks.{index}.weight"], sd[f"module.enc_b.blocks.{index}.bias"] = conv(o, i, k)
    # ConvTranspose2d weights are [in, out, k, k]
    for index, (i, o, k) in zip((0, 2, 4), ((VQ_DIM, VQ_HIDDEN, 4), (VQ_HIDDEN, VQ_HIDDEN, 4), (VQ_HIDDEN, VQ_HIDDEN, 4))):
        sd[f"module.dec.blocks.{index}.weight"] = 0.3 * torch.randn(i, o, k, k, generator=g)
        sd[f"module.dec.blocks.{index}.bias"] = 0.05 * torch.randn(o, generator=g)
    sd["module.dec.blocks.6.weight"], sd["module.dec.blocks.6.bias"] = conv(3, VQ_HIDDEN, 1)
    embed = torch.randn(VQ_DIM, IMAGE_TOKENS, generator=g)
    sd["module.quantize_t.embed"] = embed
    sd["module.quantize_t.cluster_size"] = torch.rand(IMAGE_TOKENS, generator=g) * 10
    sd["module.quantize_t.embed_avg"] = embed * 3
    return sd


def write_release(root, variant: str, *, with_extras: bool = True):
    """Write a miniature release folder (+ the VQ-VAE file and the SentencePiece model) under root.
    Returns (transformer folder, vqvae file, tokenizer file, original transformer state)."""
    folder = root / f"release-{variant}"
    iteration = "1000" if variant == "cogview" else "20"
    (folder / iteration).mkdir(parents=True, exist_ok=True)
    state = release_transformer_state(variant)
    checkpoint = {"module": state, "iteration": int(iteration)}
    if with_extras:  # what DeepSpeed saves next to the weights: plain data, numpy RNG state, arguments
        rng = np.random.RandomState(0)
        checkpoint.update({"np_rng_state": rng.get_state(), "random_rng_state": random.Random(0).getstate(),
                           "torch_rng_state": torch.get_rng_state(), "args": argparse.Namespace(lr=1e-4, fp16=True)})
    torch.save(checkpoint, folder / iteration / "mp_rank_00_model_states.pt")
    if variant == "cogview":
        (folder / "latest_checkpointed_iteration.txt").write_text(iteration)
    else:
        (folder / "latest").write_text(iteration + "\n")
        (folder / "model_config.json").write_text(json.dumps({
            "model_class": "CachedAutoregressiveModel", "num_layers": LAYERS, "hidden_size": HIDDEN,
            "num_attention_heads": HEADS, "vocab_size": ROWS, "max_sequence_length": POSITIONS}))
    vqvae = root / "vqvae.pt"
    if not vqvae.exists():
        torch.save(release_vqvae_state(), vqvae)
    tokenizer = root / "tok.model"
    if not tokenizer.exists():
        tokenizer.write_bytes(tiny_text_model())
    return folder, vqvae, tokenizer, state


def convert(tmp_path, variant="cogview", out_name="out", **kwargs):
    folder, vqvae, tokenizer, state = write_release(tmp_path, variant)
    kwargs.setdefault("image_tokens", IMAGE_TOKENS)
    kwargs.setdefault("text_tokens", TEXT_TOKENS)
    kwargs.setdefault("image_size", 32)
    if variant == "cogview":
        kwargs.setdefault("num_heads", HEADS)
    out = convert_release(folder, vqvae, tokenizer, tmp_path / out_name, **kwargs)
    return out, state


# ---------------------------------------------------------------------------------------------
# The original computations, written out plainly
# ---------------------------------------------------------------------------------------------


def original_layer_norm(x, weight, bias, pb_relax):
    if pb_relax:  # CogView's PB-relax LayerNorm: one detached max over the WHOLE tensor
        x = x / (x.abs().max().detach() / 8)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, 1e-5)


def original_gelu(x):
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def original_forward(sd, variant, tokens, pb_relax=True):
    """CogView1's forward (sandwich LayerNorm, -10000 causal masking, tied head) in float32."""
    w = {k: v.float() for k, v in sd.items()}
    emb = w[("transformer." if variant == "swissarmy" else "") + "word_embeddings.weight"]
    batch, seq = tokens.shape
    x = emb[tokens] + w["transformer.position_embeddings.weight"][torch.arange(seq)][None]
    d = HIDDEN // HEADS
    mask = torch.tril(torch.ones(seq, seq))
    for i in range(LAYERS):
        def p(name):
            return w[f"transformer.layers.{i}.{name}"]

        h = original_layer_norm(x, p("input_layernorm.weight"), p("input_layernorm.bias"), pb_relax)
        qkv = h @ p("attention.query_key_value.weight").t() + p("attention.query_key_value.bias")
        q, k, v = (t.reshape(batch, seq, HEADS, d).transpose(1, 2) for t in qkv.split(HIDDEN, dim=-1))
        scores = (q / math.sqrt(d)) @ k.transpose(-1, -2)
        scores = scores * mask - 10000.0 * (1.0 - mask)
        context = torch.softmax(scores, dim=-1) @ v
        attn = context.transpose(1, 2).reshape(batch, seq, HIDDEN) @ p("attention.dense.weight").t() \
            + p("attention.dense.bias")
        x = x + original_layer_norm(attn, p("third_layernorm.weight"), p("third_layernorm.bias"), pb_relax)
        h = original_layer_norm(x, p("post_attention_layernorm.weight"), p("post_attention_layernorm.bias"), pb_relax)
        h = original_gelu(h @ p("mlp.dense_h_to_4h.weight").t() + p("mlp.dense_h_to_4h.bias"))
        h = h @ p("mlp.dense_4h_to_h.weight").t() + p("mlp.dense_4h_to_h.bias")
        x = x + original_layer_norm(h, p("fourth_layernorm.weight"), p("fourth_layernorm.bias"), pb_relax)
    x = original_layer_norm(x, w["transformer.final_layernorm.weight"], w["transformer.final_layernorm.bias"], pb_relax)
    return x @ emb.t()


def original_vqvae_encode(sd, images):
    mean = torch.tensor(COGVIEW_PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(COGVIEW_PIXEL_STD).view(1, 3, 1, 1)
    x = (images - mean) / std
    for i in (0, 2, 4):
        x = F.relu(F.conv2d(x, sd[f"module.enc_b.blocks.{i}.weight"], sd[f"module.enc_b.blocks.{i}.bias"], stride=2,
                            padding=1))
    x = F.conv2d(x, sd["module.enc_b.blocks.6.weight"], sd["module.enc_b.blocks.6.bias"]).permute(0, 2, 3, 1)
    flat = x.reshape(-1, VQ_DIM)
    embed = sd["module.quantize_t.embed"]  # [dim, n]
    dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ embed + embed.pow(2).sum(0, keepdim=True)
    return (-dist).max(1).indices.view(*x.shape[:3])


def original_vqvae_decode(sd, codes):
    x = F.embedding(codes, sd["module.quantize_t.embed"].t()).permute(0, 3, 1, 2)
    for i in (0, 2, 4):
        x = F.relu(F.conv_transpose2d(x, sd[f"module.dec.blocks.{i}.weight"], sd[f"module.dec.blocks.{i}.bias"],
                                      stride=2, padding=1))
    x = F.conv2d(x, sd["module.dec.blocks.6.weight"], sd["module.dec.blocks.6.bias"])
    mean = torch.tensor(COGVIEW_PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(COGVIEW_PIXEL_STD).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def sample_tokens(batch=2, seq=POSITIONS - 1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, IMAGE_TOKENS + TEXT_TOKENS + COMMANDS, (batch, seq), generator=g)


def assert_logits_close(ours, reference):
    scale = float(reference.abs().max())
    error = float((ours - reference).abs().max())
    assert error <= 2e-5 * scale, f"max |ours - original| = {error:.3g} (logit scale {scale:.3g})"


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["cogview", "swissarmy"])
def test_converted_release_matches_the_original_forward(tmp_path, variant):
    out, state = convert(tmp_path, variant)
    model = CogView.from_pretrained(out, dtype=torch.float32)
    t = model.config.transformer
    assert (t.num_layers, t.hidden_size, t.num_heads, t.mlp_size, t.max_positions, t.vocab_rows) == (
        LAYERS, HIDDEN, HEADS, 4 * HIDDEN, POSITIONS, ROWS)
    assert t.pb_relax and (t.image_tokens, t.text_tokens) == (IMAGE_TOKENS, TEXT_TOKENS)
    tokens = sample_tokens()
    with torch.no_grad():
        ours = model.transformer(tokens)
    reference = original_forward(state, variant, tokens, pb_relax=True)
    assert ours.shape == reference.shape == (2, POSITIONS - 1, ROWS)
    assert_logits_close(ours, reference)
    # the global max of the original couples the two batch rows; ours is per row: same logits anyway
    with torch.no_grad():
        alone = model.transformer(tokens[1:])
    assert_logits_close(alone, original_forward(state, variant, tokens[1:], pb_relax=True))


def test_plain_layer_norm_conversion_matches_the_plain_original(tmp_path):
    out, state = convert(tmp_path, pb_relax=False)
    model = CogView.from_pretrained(out, dtype=torch.float32)
    assert not model.config.transformer.pb_relax
    tokens = sample_tokens(seed=3)
    with torch.no_grad():
        ours = model.transformer(tokens)
    assert_logits_close(ours, original_forward(state, "cogview", tokens, pb_relax=False))


def test_converted_weights_are_the_release_bits_in_fp16(tmp_path):
    out, state = convert(tmp_path)
    with SafetensorsFile(out / "model.safetensors") as st:
        assert st.dtype("word_embeddings.weight") == torch.float16
        assert torch.equal(st.read("word_embeddings.weight"), state["word_embeddings.weight"])
        assert torch.equal(st.read("layers.1.attention.query_key_value.weight"),
                           state["transformer.layers.1.attention.query_key_value.weight"])
    info = json.loads((out / "config.json").read_text())
    assert info["metadata"]["converted_from"]["stored_dtype"] == "float16"
    bf16, _ = convert(tmp_path, out_name="bf16", dtype="bf16")
    with SafetensorsFile(bf16 / "model.safetensors") as st:
        assert torch.equal(st.read("final_layernorm.weight"), state["transformer.final_layernorm.weight"].bfloat16())


def test_converted_vqvae_gives_the_original_codes_and_images(tmp_path):
    out, _ = convert(tmp_path)
    sd = release_vqvae_state()
    model = CogView.from_pretrained(out)
    vq = model.vqvae.config
    assert (vq.downsample, vq.hidden_channels, vq.embed_dim, vq.codebook_size, vq.num_res_blocks) == (
        8, VQ_HIDDEN, VQ_DIM, IMAGE_TOKENS, 0)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    codes = model.vqvae.encode(images)
    expected = original_vqvae_encode(sd, images)
    assert codes.shape == (3, 4, 4) and torch.equal(codes, expected)
    assert len(codes.unique()) > 3  # a meaningful comparison, not one code everywhere
    with torch.no_grad():
        decoded = model.vqvae.decode(codes)
    torch.testing.assert_close(decoded, original_vqvae_decode(sd, codes), atol=1e-5, rtol=1e-5)
    assert torch.equal(model.vqvae.quantizer.embed, sd["module.quantize_t.embed"].t())
    assert torch.equal(model.vqvae.quantizer.embed_avg, sd["module.quantize_t.embed_avg"].t())


def test_tokenizer_of_the_converted_model(tmp_path):
    out, _ = convert(tmp_path)
    model = CogView.from_pretrained(out)
    assert model.tokenizer.image_tokens == IMAGE_TOKENS and model.tokenizer.text_tokens == TEXT_TOKENS
    assert model.tokenizer["[PAD]"] == IMAGE_TOKENS + TEXT_TOKENS
    assert model.tokenizer.model_bytes == tiny_text_model()
    layout = model.tokenizer.text_to_image("a red circle")
    assert layout.image_span[1] - layout.image_span[0] == 16 and layout.text_budget == POSITIONS - 16 - 4


def test_cli_convert(tmp_path, capsys):
    folder, vqvae, tokenizer, state = write_release(tmp_path, "swissarmy")
    out = tmp_path / "cli-out"
    code = cli_main(["convert", "--transformer", str(folder), "--vqvae", str(vqvae), "--tokenizer", str(tokenizer),
                     "--out", str(out), "--image-tokens", str(IMAGE_TOKENS), "--text-tokens", str(TEXT_TOKENS),
                     "--image-size", "32"])
    assert code == 0, capsys.readouterr().err
    assert f"{LAYERS} layers, hidden {HIDDEN}, {HEADS} heads" in capsys.readouterr().out
    model = CogView.from_pretrained(out, dtype=torch.float32)
    tokens = sample_tokens(batch=1, seed=5)
    with torch.no_grad():
        assert_logits_close(model.transformer(tokens), original_forward(state, "swissarmy", tokens))
    # refuses to write into it again without --force
    assert cli_main(["convert", "--transformer", str(folder), "--vqvae", str(vqvae), "--tokenizer", str(tokenizer),
                     "--out", str(out), "--image-tokens", str(IMAGE_TOKENS), "--text-tokens", str(TEXT_TOKENS)]) == 1
    assert "not empty" in capsys.readouterr().err


def test_release_paths_iteration_folder_and_file(tmp_path):
    folder, vqvae, tokenizer, state = write_release(tmp_path, "cogview")
    kwargs = dict(num_heads=HEADS, image_tokens=IMAGE_TOKENS, text_tokens=TEXT_TOKENS, image_size=32)
    a = convert_release(folder / "1000", vqvae, tokenizer, tmp_path / "a", **kwargs)
    b = convert_release(folder / "1000" / "mp_rank_00_model_states.pt", vqvae, tokenizer, tmp_path / "b", **kwargs)
    with SafetensorsFile(a / "model.safetensors") as x, SafetensorsFile(b / "model.safetensors") as y:
        assert all(torch.equal(x.read(k), y.read(k)) for k in x.keys())


def test_release_errors(tmp_path):
    folder, vqvae, tokenizer, _ = write_release(tmp_path, "cogview")
    kwargs = dict(num_heads=HEADS, image_tokens=IMAGE_TOKENS, text_tokens=TEXT_TOKENS, image_size=32)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="latest_checkpointed_iteration.txt or latest"):
        convert_release(empty, vqvae, tokenizer, tmp_path / "o1", **kwargs)
    (empty / "latest").write_text("999")
    with pytest.raises(CheckpointNotFoundError, match="iteration '999'"):
        convert_release(empty, vqvae, tokenizer, tmp_path / "o2", **kwargs)
    with pytest.raises(CheckpointNotFoundError):
        convert_release(folder, tmp_path / "nope.pt", tokenizer, tmp_path / "o3", **kwargs)

    # a truncated download
    pt = folder / "1000" / "mp_rank_00_model_states.pt"
    data = pt.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointCorruptError, match="truncated or damaged"):
        convert_release(truncated, vqvae, tokenizer, tmp_path / "o4", **kwargs)

    # heads that do not divide the width; a vocabulary larger than the embedding
    with pytest.raises(CheckpointMismatchError, match="not a multiple of num_heads"):
        convert_release(folder, vqvae, tokenizer, tmp_path / "o5", **{**kwargs, "num_heads": 5})
    with pytest.raises(CheckpointMismatchError, match="vocab_rows"):
        convert_release(folder, vqvae, tokenizer, tmp_path / "o6", **{**kwargs, "text_tokens": ROWS})
    # a tokenizer with more pieces than text ids; a codebook that does not match the image ids
    with pytest.raises(CheckpointMismatchError, match="text_tokens"):
        convert_release(folder, vqvae, tokenizer, tmp_path / "o7", **{**kwargs, "text_tokens": 100})
    with pytest.raises(CheckpointMismatchError, match="codebook has 32 codes"):
        convert_release(folder, vqvae, tokenizer, tmp_path / "o8", **{**kwargs, "image_tokens": 16,
                                                                          "text_tokens": 436})
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 9))  # nothing half-written


def test_model_config_json_must_agree_with_the_weights(tmp_path):
    folder, vqvae, tokenizer, _ = write_release(tmp_path, "swissarmy")
    config = json.loads((folder / "model_config.json").read_text())
    (folder / "model_config.json").write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(CheckpointMismatchError, match="num_layers=3"):
        convert_release(folder, vqvae, tokenizer, tmp_path / "o", image_tokens=IMAGE_TOKENS, text_tokens=TEXT_TOKENS)


def test_shape_and_key_errors_name_the_tensor():
    state = release_transformer_state("cogview")
    bad = dict(state)
    bad["transformer.layers.1.mlp.dense_4h_to_h.weight"] = torch.zeros(HIDDEN, 3 * HIDDEN, dtype=torch.float16)
    with pytest.raises(CheckpointMismatchError, match=r"layers\.1\.mlp\.dense_4h_to_h\.weight is \(48, 144\)"):
        convert_transformer_state(bad, num_heads=HEADS, image_tokens=IMAGE_TOKENS, text_tokens=TEXT_TOKENS)
    bad = dict(state)
    del bad["transformer.layers.0.third_layernorm.bias"]
    bad["transformer.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match="missing: layers.0.third_layernorm.bias.*unexpected: "
                                                      "layers.0.extra.weight"):
        convert_transformer_state(bad, num_heads=HEADS, image_tokens=IMAGE_TOKENS, text_tokens=TEXT_TOKENS)
    with pytest.raises(CheckpointMismatchError, match="no word_embeddings"):
        convert_transformer_state({"foo": torch.zeros(1)})


class NotAllowed:
    """A class a weights_only load must refuse."""

    def __init__(self):
        self.x = 1


def test_pickles_with_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"module": release_transformer_state("cogview"), "payload": NotAllowed()}, path)
    with pytest.raises(CheckpointCorruptError, match="NotAllowed"):
        load_release_state(path)
    # plain numpy / argparse extras are fine (write_release adds them)
    folder, *_ = write_release(tmp_path, "cogview")
    state = load_release_state(folder / "1000" / "mp_rank_00_model_states.pt")
    assert "word_embeddings.weight" in state and all(isinstance(v, torch.Tensor) for v in state.values())


def test_the_4b_release_shapes_give_the_cogview_4b_preset():
    """The real release's key layout and shapes (as meta tensors: no memory) convert with the default
    arguments into exactly the `cogview-4b` preset, and its VQ-VAE into the `cogview` VQ-VAE."""
    from cogview.models import presets, vqvae_presets

    h, layers = 2560, 48
    meta = dict(device="meta", dtype=torch.float16)
    sd = {"word_embeddings.weight": torch.empty(58240, h, **meta),
          "transformer.position_embeddings.weight": torch.empty(1089, h, **meta),
          "transformer.final_layernorm.weight": torch.empty(h, **meta),
          "transformer.final_layernorm.bias": torch.empty(h, **meta)}
    for i in range(layers):
        p = f"transformer.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm", "third_layernorm", "fourth_layernorm"):
            sd[p + ln + ".weight"] = torch.empty(h, **meta)
            sd[p + ln + ".bias"] = torch.empty(h, **meta)
        for name, out_f, in_f in (("attention.query_key_value", 3 * h, h), ("attention.dense", h, h),
                                  ("mlp.dense_h_to_4h", 4 * h, h), ("mlp.dense_4h_to_h", h, 4 * h)):
            sd[p + name + ".weight"] = torch.empty(out_f, in_f, **meta)
            sd[p + name + ".bias"] = torch.empty(out_f, **meta)
    state, config, variant = convert_transformer_state(sd)
    assert variant == "cogview" and config == presets["cogview-4b"].transformer
    assert sum(v.numel() for v in state.values()) == 3_928_849_920

    from cogview.convert import convert_vqvae_state

    vq = {"module.quantize_t.embed": torch.empty(256, 8192, device="meta"),
          "module.quantize_t.embed_avg": torch.empty(256, 8192, device="meta"),
          "module.quantize_t.cluster_size": torch.empty(8192, device="meta")}
    for i, (o, c, k) in zip((0, 2, 4, 6), ((512, 3, 4), (512, 512, 4), (512, 512, 4), (256, 512, 1))):
        vq[f"module.enc_b.blocks.{i}.weight"] = torch.empty(o, c, k, k, device="meta")
        vq[f"module.enc_b.blocks.{i}.bias"] = torch.empty(o, device="meta")
    for i, (c, o, k) in zip((0, 2, 4), ((256, 512, 4), (512, 512, 4), (512, 512, 4))):
        vq[f"module.dec.blocks.{i}.weight"] = torch.empty(c, o, k, k, device="meta")
        vq[f"module.dec.blocks.{i}.bias"] = torch.empty(o, device="meta")
    vq["module.dec.blocks.6.weight"] = torch.empty(3, 512, 1, 1, device="meta")
    vq["module.dec.blocks.6.bias"] = torch.empty(3, device="meta")
    vq_state, vq_config = convert_vqvae_state(vq)
    assert vq_config == vqvae_presets["cogview"]
    assert vq_state["quantizer.embed"].shape == (8192, 256)


def test_legacy_non_zip_pickles_are_read(tmp_path):
    """Files from torch < 1.6 (no zip container, cannot be memory-mapped) load the same way."""
    state = release_vqvae_state()
    torch.save({"module": {k[len("module."):]: v for k, v in state.items()}, "np": np.random.RandomState(1).get_state()},
               tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    loaded = load_release_state(tmp_path / "legacy.pt")
    assert sorted(loaded) == sorted(k[len("module."):] for k in state)
    assert all(torch.equal(loaded[k[len("module."):]], v) for k, v in state.items())

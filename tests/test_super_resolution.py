"""The super-resolution stage (cogview.models.super_resolution, cogview.generation.super_resolution, the
trainer, the model-directory SR stage and the CLI) on tiny random-weight models: kernels against the
reference ops, the attention against a dense masked softmax, the LoPAR schedule, determinism, size
errors, save/load, and the commands end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from cogview import ops
from cogview.checkpoint import CheckpointMismatchError, CheckpointNotFoundError
from cogview.cli import main as cli_main
from cogview.generation.super_resolution import (
    SuperResolutionPipeline,
    evaluate_super_resolution,
    super_resolve_codes,
    upscale,
    upscale_codes,
)
from cogview.models import CogViewConfig, VQVAE, presets
from cogview.models.super_resolution import (
    SuperResolutionConfig,
    SuperResolutionTransformer,
    build_text_tokens,
    refinement_masks,
    sr_presets,
    tile_order,
)
from cogview.ops.reference import local_attention_mask
from cogview.pipeline import (
    CogView,
    attach_super_resolution,
    load_super_resolution,
    read_model_directory,
    save_model_dir,
)
from tests._captions import tiny_text_model

TINY = presets["test-tiny"]
BASE = CogViewConfig(TINY.transformer.replace(text_tokens=400), TINY.vqvae, "tiny-test")
SR = sr_presets["test-4to12"].replace(
    transformer=sr_presets["test-4to12"].transformer.replace(text_tokens=400))  # the base's vocabulary
IMAGE_TOKENS = SR.transformer.image_tokens
SR_PIXELS = SR.replace(pixel_hint=4)  # reads the decoded low-res image: 4x4 patches (the tiny VQ-VAE's x4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_sr(config: SuperResolutionConfig = SR, seed: int = 0, dtype=torch.float32) -> SuperResolutionTransformer:
    torch.manual_seed(seed)
    model = SuperResolutionTransformer(config)
    with torch.no_grad():  # sharper, input-dependent logits than the N(0, 0.02) init gives
        model.word_embeddings.weight.mul_(20)
        model.position_embeddings.weight.mul_(20)
        for p in model.parameters():
            if p.dim() == 2 and p.shape[0] != model.word_embeddings.weight.shape[0]:
                p.mul_(5)
            elif p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def random_inputs(config: SuperResolutionConfig, batch: int = 2, seed: int = 0, mask_every: int = 3):
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, IMAGE_TOKENS, (batch, config.low_res, config.low_res), generator=g)
    high = torch.randint(0, IMAGE_TOKENS, (batch, config.high_len), generator=g)
    high[:, ::mask_every] = config.transformer.command_id("[MASK]")
    text = None
    if config.text_positions:
        t = config.transformer
        text = torch.randint(t.text_offset, t.text_offset + t.text_tokens, (batch, config.text_positions),
                             generator=g)
        text[:, 0] = t.command_id("[ROI1]")
        text[0, -2:] = t.command_id("[PAD]")
    return low, high, text


def random_pixels(config: SuperResolutionConfig, batch: int = 2, seed: int = 0, dtype=torch.float32):
    """A decoded low-res image for a pixel-hint stage (None without one)."""
    if not config.pixel_hint:
        return None
    side = config.low_res * config.pixel_hint
    return torch.rand(batch, config.image_channels, side, side, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [SR, SR.replace(max_text_len=0), SR.replace(parent_hint=False, scale=2, tile=(4, 4),
                                                                                schedule=(9, 4)), SR_PIXELS],
                         ids=["text", "no-text", "scale2", "pixels"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernels_match_reference_ops(config, dtype):
    model = make_sr(config, dtype=dtype)
    low, high, text = random_inputs(config)
    pixels = random_pixels(config)
    with torch.no_grad():
        fast = model(low, high, text, pixels)
        with ops.force_reference():
            slow = model(low, high, text, pixels)
    assert fast.shape == (2, config.high_len, IMAGE_TOKENS)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(fast, slow, atol=tol * slow.abs().max().item(), rtol=0)
    assert fast.std() > 0.5  # the test is not comparing near-constant outputs


def dense_high_res_attention(layer, normed, context_k, context_v, config):
    """The high-res attention of one layer as one dense masked softmax over [text, high-res window,
    cross window] keys (what the two local_attention calls + the lse merge must equal)."""
    attention = layer.high_res_attention
    q, k, v = attention.split_heads(normed)
    n_text = config.text_positions
    high, low = (config.high_res,) * 2, (config.low_res,) * 2
    self_mask = local_attention_mask(high, high, config.window)
    cross_mask = local_attention_mask(high, low, config.cross_window)
    keys = torch.cat([context_k[:, :, :n_text], k, context_k[:, :, n_text:]], dim=2)
    values = torch.cat([context_v[:, :, :n_text], v, context_v[:, :, n_text:]], dim=2)
    mask = torch.cat([torch.ones(config.high_len, n_text, dtype=torch.bool), self_mask, cross_mask], dim=1)
    scores = (q @ keys.transpose(-1, -2)) * attention.scale
    out = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ values
    return attention.merge_heads(out)


def test_high_res_attention_is_one_softmax_over_all_its_keys():
    config = SR
    model = make_sr(config, dtype=torch.float64)
    low, high, text = random_inputs(config)
    captured = {}

    def hook(module, args, output):
        captured.setdefault("out", output)

    layer = model.layers[0]
    with torch.no_grad():
        context = model.encode_context(low, text)
        residual = model.word_embeddings(high) + context.cell_inputs
        normed = layer.input_layernorm(residual)
        handle = layer.high_res_attention.dense.register_forward_hook(hook)
        layer.high_res_forward(residual, normed, model.layers[1].input_layernorm, context.kv[0],
                               context.text_positions)
        handle.remove()
        expected = dense_high_res_attention(layer, normed, *context.kv[0], config)
    torch.testing.assert_close(captured["out"], expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("config", [SR, SR_PIXELS, SR_PIXELS.replace(parent_hint=False)],
                         ids=["parent", "parent+pixels", "pixels"])
def test_cell_inputs_are_position_parent_code_and_pixel_patch(config):
    """A high-res cell's shared input: its position, its parent's code embedding, and the projection of
    the p x p patch under it in the bicubically upsampled decoded image."""
    model = make_sr(config, dtype=torch.float64)
    low, _, text = random_inputs(config)
    pixels = random_pixels(config, dtype=torch.float64)
    with torch.no_grad():
        cells = model.encode_context(low, text, pixels).cell_inputs
        s, p, side = config.scale, config.pixel_hint, config.high_res
        up = F.interpolate(pixels * 2 - 1, scale_factor=s, mode="bicubic", align_corners=False) if p else None
        for b in range(2):
            for r in range(side):
                for c in range(side):
                    i = r * side + c
                    expected = model.position_embeddings.weight[config.text_positions + config.low_len + i].clone()
                    if config.parent_hint:
                        expected += model.word_embeddings.weight[low[b, r // s, c // s]]
                    if p:
                        expected += model.pixel_projection(up[b, :, r * p: (r + 1) * p, c * p: (c + 1) * p].reshape(-1))
                    torch.testing.assert_close(cells[b, i], expected, rtol=1e-12, atol=1e-12)
    if p:  # the pixels matter
        assert not torch.allclose(model(low, None, text, pixels), model(low, None, text, pixels.flip(0)))


def test_pixel_hint_inputs_raise_clear_errors():
    model = make_sr(SR_PIXELS)
    low, high, text = random_inputs(SR_PIXELS)
    with pytest.raises(ValueError, match=r"pixel_hint 4.*low_pixels.*\[2, 3, 16, 16\]"):
        model(low, high, text)
    with pytest.raises(ValueError, match=r"`low_pixels` must be a float tensor \[2, 3, 16, 16\].*\(2, 3, 12, 12\)"):
        model(low, high, text, torch.rand(2, 3, 12, 12))
    with pytest.raises(ValueError, match="`low_pixels` must be a float"):
        model(low, high, text, torch.zeros(2, 3, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="reads no pixels"):
        make_sr()(low, high, text, torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="pixel_hint"):
        SR.replace(pixel_hint=-1)


def test_context_is_independent_of_the_high_res_part_and_reused():
    model = make_sr(dtype=torch.float64)
    low, high, text = random_inputs(SR)
    with torch.no_grad():
        a = model.encode_context(low, text)
        logits = model(low, high, text)
        torch.testing.assert_close(model.high_res_logits(a, high), logits)
        # a different text changes the high-res logits (the text keys are seen)
        other = text.clone()
        other[:, 1:3] = other[:, 1:3].flip(0)
        assert not torch.allclose(model(low, high, other), logits)
        # the low-res grid too
        assert not torch.allclose(model(low.flip(0), high, text), logits)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hidden_of_some_cells_equals_the_full_pass_at_those_cells(dtype):
    """`only`: a refinement pass's last layer runs for the re-masked cells alone, with the same result."""
    model = make_sr(dtype=dtype)
    low, high, text = random_inputs(SR)
    only = torch.zeros(SR.high_len, dtype=torch.bool)
    only[torch.randperm(SR.high_len, generator=torch.Generator().manual_seed(1))[: SR.high_len // 3]] = True
    with torch.no_grad():
        context = model.encode_context(low, text)
        full = model.high_res_hidden(context, high)
        some = model.high_res_hidden(context, high, only=only)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(some, full[:, only], rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="`only`"):
        model.high_res_hidden(context, high, only=only.long())
    with pytest.raises(ValueError, match="`only`"):
        model.high_res_hidden(context, high, only=only[1:])


@pytest.mark.parametrize("config", [SR, SR_PIXELS], ids=["codes", "pixels"])
def test_gradients_reach_every_parameter_and_training_reduces_the_loss(config):
    from cogview.training.sr_trainer import SRBatch, SRLoss

    model = make_sr(config, seed=1).train()
    low, high, text = random_inputs(config, batch=3, mask_every=1)
    targets = torch.randint(0, IMAGE_TOKENS, high.shape)
    mask = torch.ones_like(high, dtype=torch.bool)
    batch = SRBatch(low.view(3, -1), high, targets, mask, text, torch.ones(3, dtype=torch.bool),
                    random_pixels(config, batch=3))
    loss_module = SRLoss(model)
    loss, metrics = loss_module(batch)
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unused == []  # (DDP needs every parameter used)
    assert model.layers[-1].attention.dense is None  # the last layer's context output is never read
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = float(loss.detach())
    for _ in range(15):
        optimizer.zero_grad()
        loss, _ = loss_module(batch)
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.7 * first, (first, float(loss.detach()))


def test_config_round_trip_and_validation():
    data = json.loads(json.dumps(SR.to_dict()))
    assert SuperResolutionConfig.from_dict(data) == SR
    assert SR.transformer.max_positions == SR.num_positions == 7 + 16 + 144
    with pytest.raises(ValueError, match="tile"):
        SR.replace(tile=(5, 5))
    with pytest.raises(ValueError, match="odd"):
        SR.replace(window=(4, 5))
    with pytest.raises(ValueError, match="not increase"):
        SR.replace(schedule=(3, 5))
    with pytest.raises(ValueError, match=r"lie in \[1, 9\]"):
        SR.replace(schedule=(10,))
    with pytest.raises(ValueError, match="unknown field"):
        SuperResolutionConfig.from_dict({**data, "windw": [3, 3]})


def test_grid_sizes_that_do_not_match_raise_clear_errors():
    model = make_sr()
    low, high, text = random_inputs(SR)
    with pytest.raises(ValueError, match=r"\[batch, 4, 4\].*4x4 to 12x12 codes.*\(2, 5, 5\)"):
        model(torch.zeros(2, 5, 5, dtype=torch.long), high, text)
    with pytest.raises(ValueError, match=r"high_tokens.*\[batch, 12, 12\]"):
        model(low, high[:, :100], text)
    with pytest.raises(ValueError, match="text_tokens"):
        model(low, high, text[:, :3])
    with pytest.raises(ValueError, match="outside the image codes"):
        model(low + IMAGE_TOKENS, high, text)
    stage = SuperResolutionPipeline(model, VQVAE(BASE.vqvae).eval())
    with pytest.raises(ValueError, match=r"20x20 pixels but the SR stage takes 16x16.*makes 48x48"):
        upscale(stage, torch.rand(3, 20, 20))
    with pytest.raises(ValueError, match=r"code grid 0 must be \[4, 4\]"):
        upscale(stage, torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no super-resolution stage"):
        upscale(CogView.from_config(BASE, tiny_text_model()), torch.rand(3, 16, 16))


# ---------------------------------------------------------------------------------------------
# The schedule and the sampling loop
# ---------------------------------------------------------------------------------------------


def test_tile_order_and_masks_follow_the_schedule():
    rank = tile_order((6, 6))
    assert sorted(rank.tolist()) == list(range(36))
    config = sr_presets["shapes-8to24"]
    masks = refinement_masks(config)
    assert masks.shape == (6, 576)
    tiles = masks.view(6, 4, 6, 4, 6).permute(0, 1, 3, 2, 4).reshape(6, 16, 36)
    for k, n in enumerate(config.schedule):
        assert (tiles[k].sum(-1) == n).all()  # exactly n cells in every tile
        assert (tiles[k] == tiles[k, :1]).all()  # the same cells in every tile
        assert (tiles[k] == (rank >= 36 - n)).all()  # the n highest-ranked cells
    assert (masks[1:] <= masks[:-1]).all()  # nested: each pass commits more cells
    # the first cells committed are spread: the 4 lowest ranks sit at the tile's quarter points
    assert set((rank < 4).nonzero().flatten().tolist()) == {0, 3, 18, 21}


def test_refinement_remasks_exactly_the_planned_cells():
    model = make_sr()
    low, _, text = random_inputs(SR)
    seen, drawn = [], []
    original = model.high_res_hidden

    def recording(context, tokens, only=None):
        seen.append(tokens.clone())
        drawn.append(only.clone())
        return original(context, tokens, only=only)

    model.high_res_hidden = recording
    history = []
    codes = super_resolve_codes(model, low, text, temperature=1.0, top_k=8, seeds=[5, 9], history=history)
    masks = refinement_masks(SR)
    assert len(seen) == 1 + len(SR.schedule)
    assert (seen[0] == model.mask_id).all()  # direct SR: every cell masked
    # each pass draws only what it commits: its cells minus those the next pass re-masks
    predicted = [torch.ones(SR.high_len, dtype=torch.bool)] + list(masks)
    for k in range(len(predicted)):
        later = masks[k] if k < len(masks) else torch.zeros(SR.high_len, dtype=torch.bool)
        assert torch.equal(drawn[k], predicted[k] & ~later)
        after = history[k][2]
        assert (after[:, later] == model.mask_id).all() and (after[:, ~later] != model.mask_id).all()
    previous = history[0][2]
    for k, mask in enumerate(masks, start=1):
        is_mask = seen[k] == model.mask_id
        assert torch.equal(is_mask, mask[None].expand_as(is_mask))  # exactly the planned cells
        assert torch.equal(seen[k][~is_mask], previous[~is_mask])  # the rest is the current image
        step, recorded_mask, after = history[k]
        assert step == k and torch.equal(recorded_mask, mask)
        assert torch.equal(after[:, ~mask], previous[:, ~mask])  # only planned cells can change
        previous = after
    assert torch.equal(codes.view(2, -1), previous)
    assert ((codes >= 0) & (codes < IMAGE_TOKENS)).all()


def test_drawing_only_committed_cells_changes_nothing_at_temperature_zero():
    """The loop skips draws the next pass would discard; the full computation gives the same codes."""
    model = make_sr(dtype=torch.float64)
    low, _, text = random_inputs(SR, batch=2)
    codes = super_resolve_codes(model, low, text, temperature=0.0)
    with torch.no_grad():
        context = model.encode_context(low, text)
        full = model.high_res_logits(context, model.masked_input(2)).argmax(-1)
        for mask in refinement_masks(SR):
            tokens = full.masked_fill(mask[None], model.mask_id)
            full = torch.where(mask[None], model.high_res_logits(context, tokens).argmax(-1), full)
    assert torch.equal(codes.view(2, -1), full)


def test_temperature_zero_is_greedy_and_sampling_is_batch_invariant():
    model = make_sr()
    low, _, text = random_inputs(SR, batch=3)
    direct = super_resolve_codes(model, low, text, schedule=(), temperature=0.0)
    with torch.no_grad():
        expected = model(low, None, text).argmax(-1)
    assert torch.equal(direct.view(3, -1), expected)
    greedy = super_resolve_codes(model, low, text, temperature=0.0)
    assert torch.equal(greedy, super_resolve_codes(model, low, text, temperature=0.0, seeds=123))
    # refinement changes something in a random-weight model (it sees its own draft)
    assert not torch.equal(greedy, direct)
    sampled = super_resolve_codes(model, low, text, temperature=1.0, seeds=[1, 2, 3])
    alone = super_resolve_codes(model, low[1:2], text[1:2], temperature=1.0, seeds=[2])
    assert torch.equal(sampled[1:2], alone)
    other = super_resolve_codes(model, low, text, temperature=1.0, seeds=[4, 5, 6])
    assert not torch.equal(sampled, other)


def test_text_tokens_layout():
    tok = tiny_text_model()
    from cogview.tokenizer import CogViewTokenizer

    tokenizer = CogViewTokenizer.for_config(tok, BASE)
    text = build_text_tokens(tokenizer, ["a red circle", ""], SR, warn=False)
    t = SR.transformer
    assert text.shape == (2, SR.text_positions)
    assert (text[:, 0] == t.command_id("[ROI1]")).all()
    assert (text[1, 1:] == t.command_id("[PAD]")).all()
    ids = tokenizer.encode_text("a red circle", SR.max_text_len, warn=False)
    assert text[0, 1: 1 + len(ids)].tolist() == ids
    assert build_text_tokens(tokenizer, "x", SR.replace(max_text_len=0)) is None


# ---------------------------------------------------------------------------------------------
# Model directories
# ---------------------------------------------------------------------------------------------


def base_model(seed: int = 0) -> CogView:
    torch.manual_seed(seed)
    return CogView.from_config(BASE, tiny_text_model()).eval()


def test_save_load_round_trip(tmp_path):
    model = base_model()
    sr = make_sr(seed=3)
    model.super_resolution = sr
    model.super_resolution_metadata = {"note": "x"}
    model.save_pretrained(tmp_path / "m")
    directory = read_model_directory(tmp_path / "m")
    assert directory.super_resolution == SR and directory.super_resolution_metadata == {"note": "x"}
    loaded = CogView.from_pretrained(tmp_path / "m")
    assert loaded.super_resolution is not None
    for (name, a), (_, b) in zip(sr.state_dict().items(), loaded.super_resolution.state_dict().items()):
        assert torch.equal(a, b), name
    low, high, text = random_inputs(SR)
    with torch.no_grad():
        torch.testing.assert_close(loaded.super_resolution(low, high, text), sr(low, high, text))
    # re-saving without the stage removes it; attaching adds it back and keeps every other file
    save_model_dir(tmp_path / "m", vqvae=model.vqvae, transformer=model.transformer, tokenizer=model.tokenizer)
    assert read_model_directory(tmp_path / "m").super_resolution is None
    assert not (tmp_path / "m" / "super_resolution.safetensors").exists()
    with pytest.raises(CheckpointNotFoundError, match="no super-resolution stage"):
        load_super_resolution(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    attach_super_resolution(tmp_path / "m", sr, metadata={"n": 1})
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    again = CogView.from_pretrained(tmp_path / "m")
    assert torch.equal(again.super_resolution.layers[1].high_res_attention.dense.weight,
                       sr.layers[1].high_res_attention.dense.weight)
    assert again.super_resolution_metadata == {"n": 1}
    # a half-precision export stores the stage in float16; the upscaler loads it as float32
    again.save_pretrained(tmp_path / "half", dtype=torch.float16)
    assert load_super_resolution(tmp_path / "half").word_embeddings.weight.dtype == torch.float16
    stage = SuperResolutionPipeline.from_pretrained(tmp_path / "half")
    assert stage.super_resolution.word_embeddings.weight.dtype == torch.float32
    assert stage.tokenizer is not None  # the stage reads text: the directory's tokenizer comes along


def test_stage_must_fit_the_model(tmp_path):
    model = base_model()
    model.save_pretrained(tmp_path / "m")
    wrong_grid = make_sr(SR.replace(low_res=3, tile=(3, 3)))
    with pytest.raises(CheckpointMismatchError, match="takes 3x3 codes but the base model makes 4x4"):
        attach_super_resolution(tmp_path / "m", wrong_grid)
    wrong_codes = make_sr(SR.replace(transformer=SR.transformer.replace(image_tokens=64)))
    with pytest.raises(CheckpointMismatchError, match="64 image codes but the VQ-VAE has 32"):
        attach_super_resolution(tmp_path / "m", wrong_codes)
    wrong_text = make_sr(SR.replace(transformer=SR.transformer.replace(text_tokens=300)))
    with pytest.raises(CheckpointMismatchError, match="text vocabulary"):
        attach_super_resolution(tmp_path / "m", wrong_text)
    wrong_patch = make_sr(SR.replace(pixel_hint=8))
    with pytest.raises(CheckpointMismatchError, match="3-channel 8x8 patches but the VQ-VAE decodes 3 channels at x4"):
        attach_super_resolution(tmp_path / "m", wrong_patch)
    # a damaged stage is caught by its checksum
    attach_super_resolution(tmp_path / "m", make_sr())
    path = tmp_path / "m" / "super_resolution.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_super_resolution(tmp_path / "m")


def test_vqvae_only_directory_with_a_stage(tmp_path):
    torch.manual_seed(0)
    vqvae = VQVAE(BASE.vqvae).eval()
    save_model_dir(tmp_path / "v", vqvae=vqvae)
    sr = make_sr(SR.replace(max_text_len=0))
    attach_super_resolution(tmp_path / "v", sr)
    stage = SuperResolutionPipeline.from_pretrained(tmp_path / "v")
    assert stage.tokenizer is None
    results = stage.upscale(torch.rand(2, 3, 16, 16), seed=1)
    assert [r.image.size for r in results] == [(48, 48)] * 2
    assert results[0].codes.shape == (12, 12)
    save_model_dir(tmp_path / "w", vqvae=vqvae)
    with pytest.raises(CheckpointNotFoundError, match="no super-resolution stage"):
        SuperResolutionPipeline.from_pretrained(tmp_path / "w")


def test_upscale_codes_and_evaluation_report():
    model = base_model()
    model.super_resolution = make_sr()
    low = torch.randint(0, IMAGE_TOKENS, (3, 4, 4))
    a = upscale_codes(model, low, ["a red circle", "", "x"], temperature=0.0)
    b = upscale_codes(model, low, ["a red circle", "", "x"], temperature=0.0, batch_size=1)
    assert torch.equal(a, b) and a.shape == (3, 12, 12)
    report = evaluate_super_resolution(model, num_images=3, batch_size=2)
    for key in ("psnr_sr", "psnr_direct", "psnr_bicubic", "psnr_vq"):
        assert math.isfinite(report[key]) and 0 < report[key] < 100
    assert report["high_res_px"] == 48 and report["low_res_px"] == 16
    assert report["sr_minus_bicubic"] == pytest.approx(report["psnr_sr"] - report["psnr_bicubic"])


# ---------------------------------------------------------------------------------------------
# Training and the commands
# ---------------------------------------------------------------------------------------------


def test_cli_train_upscale_evaluate_generate(tmp_path, capsys):
    from PIL import Image

    from cogview.data.shapes import ShapesDataset

    base_model().save_pretrained(tmp_path / "base")
    out = tmp_path / "sr"
    assert cli_main(["train-sr", "--base", str(tmp_path / "base"), "--output", str(out), "--model", "test-4to12",
                     "--model-overrides", '{"pixel_hint": 1}', "--steps", "2", "--batch-size", "4",
                     "--warmup-steps", "1", "--data", '{"name": "shapes", "num_samples": 12}', "--eval-images", "2",
                     "--grid-images", "2", "--no-progress", "--no-tensorboard"]) == 0
    directory = read_model_directory(out)
    assert directory.super_resolution.high_res == 12 and directory.config is not None
    assert directory.super_resolution.pixel_hint == 4  # on: the VQ-VAE's own patch size
    assert directory.super_resolution_metadata["evaluation"]["num_images"] == 2
    assert (out / "training" / "samples" / "sr-00000002.png").is_file()
    # the tokens cover both resolutions of the same scenes
    low_header = json.loads((out / "training" / "sr-tokens" / "low" / "header.json").read_text())
    assert low_header["code_shape"] == [4, 4] and low_header["num_items"] == 12
    # resume: a finished run continues from its checkpoint (and reuses the tokens)
    assert cli_main(["train-sr", "--base", str(tmp_path / "base"), "--output", str(out), "--model", "test-4to12",
                     "--steps", "3", "--batch-size", "4", "--warmup-steps", "1", "--data",
                     '{"name": "shapes", "num_samples": 12}', "--eval-images", "0", "--grid-images", "0",
                     "--no-progress", "--no-tensorboard", "--resume"]) == 0
    summary = json.loads((out / "training" / "summary.json").read_text())
    assert summary["step"] == 3 and summary["steps_run"] == 1
    capsys.readouterr()

    ShapesDataset(num_samples=1, resolution=16, seed=7).image(0).save(tmp_path / "small.png")
    ShapesDataset(num_samples=1, resolution=20, seed=7).image(0).save(tmp_path / "other.png")
    assert cli_main(["upscale", str(tmp_path / "small.png"), "--out", str(tmp_path / "big.png"), "--model",
                     str(out)]) == 0
    assert Image.open(tmp_path / "big.png").size == (48, 48)
    assert cli_main(["upscale", str(tmp_path / "other.png"), "--out", str(tmp_path / "x.png"), "--model",
                     str(out)]) == 1
    assert "--resize" in capsys.readouterr().err
    assert cli_main(["upscale", str(tmp_path / "other.png"), str(tmp_path / "small.png"), "--resize", "--out",
                     str(tmp_path / "ups"), "--model", str(out), "--temperature", "1", "--top-k", "4",
                     "--prompt", "a red circle", "--schedule", "4,2", "--dtype", "bf16"]) == 0
    assert sorted(p.name for p in (tmp_path / "ups").iterdir()) == ["other-sr.png", "small-sr.png"]
    assert cli_main(["evaluate-sr", "--model", str(out), "--num-images", "2", "--no-progress", "--json",
                     str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["num_images"] == 2 and "psnr_bicubic" in report
    assert cli_main(["generate", "a red circle", "-n", "2", "--out", str(tmp_path / "gen"), "--model", str(out),
                     "--super-resolution", "--no-progress", "--sr-schedule", "none"]) == 0
    assert Image.open(tmp_path / "gen" / "0001.png").size == (48, 48)
    assert json.loads((tmp_path / "gen" / "results.json").read_text())["settings"]["super_resolution"] is True
    capsys.readouterr()
    assert cli_main(["upscale", str(tmp_path / "small.png"), "--out", str(tmp_path / "y.png"), "--model",
                     str(tmp_path / "base")]) == 1
    assert "no super-resolution stage" in capsys.readouterr().err

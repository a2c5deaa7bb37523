"""The VQ-VAE: architectures and shapes, the EMA quantizer's math, dead-code restarts, a tiny overfit."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cogview.models import VQVAE, EMAQuantizer, VQVAEConfig, vqvae_from_preset, vqvae_presets


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions: on a shared 2-core machine the intra-op thread hand-off dominates.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


X8_SMALL = VQVAEConfig(image_size=32, downsample=8, hidden_channels=16, embed_dim=8, codebook_size=16,
                       num_res_blocks=1, pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5))


def square_images(n: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    """A coloured square on a plain background per image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.empty(n, 3, size, size)
    side = size * 3 // 8
    for i in range(n):
        images[i] = torch.rand(3, generator=g)[:, None, None]
        x, y = torch.randint(0, size - side, (2,), generator=g).tolist()
        images[i, :, y: y + side, x: x + side] = torch.rand(3, generator=g)[:, None, None]
    return images


# ---------------------------------------------------------------------------------------------
# Architecture and shapes
# ---------------------------------------------------------------------------------------------


def test_cogview_preset_is_the_original_architecture():
    vqvae = vqvae_from_preset("cogview", device="meta")
    c = vqvae.config
    assert (c.downsample, c.codebook_size, c.embed_dim, c.hidden_channels, c.num_res_blocks) == (8, 8192, 256, 512, 0)
    assert c.pixel_mean == (0.79093, 0.76271, 0.75340) and c.pixel_std == (0.30379, 0.32279, 0.32800)
    assert (c.decay, c.eps) == (0.99, 1e-5)
    shapes = {k: tuple(v.shape) for k, v in vqvae.state_dict().items()}
    assert shapes == {
        "encoder.blocks.0.weight": (512, 3, 4, 4), "encoder.blocks.0.bias": (512,),
        "encoder.blocks.2.weight": (512, 512, 4, 4), "encoder.blocks.2.bias": (512,),
        "encoder.blocks.4.weight": (512, 512, 4, 4), "encoder.blocks.4.bias": (512,),
        "encoder.blocks.6.weight": (256, 512, 1, 1), "encoder.blocks.6.bias": (256,),
        "quantizer.embed": (8192, 256), "quantizer.cluster_size": (8192,), "quantizer.embed_avg": (8192, 256),
        "decoder.blocks.0.weight": (256, 512, 4, 4), "decoder.blocks.0.bias": (512,),
        "decoder.blocks.2.weight": (512, 512, 4, 4), "decoder.blocks.2.bias": (512,),
        "decoder.blocks.4.weight": (512, 512, 4, 4), "decoder.blocks.4.bias": (512,),
        "decoder.blocks.6.weight": (3, 512, 1, 1), "decoder.blocks.6.bias": (3,),
    }
    assert isinstance(vqvae.decoder.blocks[0], torch.nn.ConvTranspose2d)
    assert vqvae.encode(torch.empty(2, 3, 256, 256, device="meta")).shape == (2, 32, 32)


@pytest.mark.parametrize("config", [vqvae_presets["test-x4"], X8_SMALL], ids=["x4", "x8-res"])
def test_encode_decode_shapes(config):
    vqvae = VQVAE(config).eval()
    f = config.downsample
    for h, w in ((config.image_size, config.image_size), (2 * f, 3 * f)):
        images = torch.rand(2, 3, h, w)
        codes = vqvae.encode(images)
        assert codes.shape == (2, h // f, w // f) and codes.dtype == torch.int64
        assert 0 <= int(codes.min()) and int(codes.max()) < config.codebook_size
        decoded = vqvae.decode(codes)
        assert decoded.shape == (2, 3, h, w)
        assert float(decoded.min()) >= 0.0 and float(decoded.max()) <= 1.0
        out = vqvae(images)
        assert out.reconstruction.shape == images.shape and torch.equal(out.codes, codes)
        # decode(encode(x)) is the forward's reconstruction, clamped to [0, 1]
        torch.testing.assert_close(decoded, out.reconstruction.clamp(0, 1), rtol=1e-5, atol=1e-6)


def test_small_presets_grids():
    assert vqvae_presets["small-x4"].code_size == 16 and vqvae_presets["small-x8"].code_size == 8
    for name in ("small-x4", "small-x8"):
        vqvae = vqvae_from_preset(name).eval()
        assert vqvae.encode(torch.rand(1, 3, 64, 64)).shape[1:] == (vqvae.config.code_size,) * 2
    assert vqvae_from_preset("small-16x16").config == vqvae_presets["small-x4"]  # full-model names work too


def test_bad_inputs_and_configs():
    vqvae = VQVAE(vqvae_presets["test-x4"]).eval()
    with pytest.raises(ValueError, match="multiple of the down-sampling factor 4"):
        vqvae.encode(torch.rand(1, 3, 18, 16))
    with pytest.raises(ValueError, match="expected 3 channels"):
        vqvae.encode(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="float tensor"):
        vqvae.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"must lie in \[0, 32\)"):
        vqvae.decode(torch.full((1, 4, 4), 32))
    with pytest.raises(ValueError, match="int64"):
        vqvae.decode(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="power of two"):
        VQVAEConfig(downsample=6, image_size=240)
    with pytest.raises(ValueError, match="one per channel"):
        VQVAEConfig(pixel_mean=(0.5,))
    with pytest.raises(KeyError, match="unknown VQ-VAE preset"):
        vqvae_from_preset("dall-e")


def test_config_round_trips_through_json():
    for config in (*vqvae_presets.values(), X8_SMALL):
        assert VQVAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# ---------------------------------------------------------------------------------------------
# The quantizer
# ---------------------------------------------------------------------------------------------


def quantizer_with(embed, **kw) -> EMAQuantizer:
    q = EMAQuantizer(len(embed), len(embed[0]), **kw)
    q.embed.copy_(torch.tensor(embed))
    q.embed_avg.copy_(q.embed)
    return q


def test_ema_update_matches_a_hand_computation():
    decay, eps = 0.9, 1e-5
    embed = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    q = quantizer_with(embed, decay=decay, eps=eps, restart_window=0).train()
    vectors = [[0.1, 0.1], [0.9, 0.2], [1.1, -0.1], [0.1, -0.2]]  # nearest codes 0, 1, 1, 0; code 2 unused
    z = torch.tensor(vectors).view(1, 2, 2, 2).permute(0, 3, 1, 2)  # [B, dim, h, w], raster order = list order
    out = q(z)
    assert out.codes.flatten().tolist() == [0, 1, 1, 0]

    # By hand, code by code.
    assign = [0, 1, 1, 0]
    cluster, avg = [], []
    for k in range(3):
        members = [v for v, c in zip(vectors, assign) if c == k]
        cluster.append(decay * 1.0 + (1 - decay) * len(members))
        avg.append([decay * embed[k][d] + (1 - decay) * sum(m[d] for m in members) for d in range(2)])
    n = sum(cluster)
    expected = [[avg[k][d] / ((cluster[k] + eps) / (n + 3 * eps) * n) for d in range(2)] for k in range(3)]
    torch.testing.assert_close(q.cluster_size, torch.tensor(cluster), rtol=1e-6, atol=0)
    torch.testing.assert_close(q.embed_avg, torch.tensor(avg), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(q.embed, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    # The unused code kept its vector up to the normalisation (no division by ~eps).
    assert abs(float(q.embed[2, 1]) - 1.0) < 0.01


def test_quantizer_losses_straight_through_and_stats():
    q = quantizer_with([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], restart_window=0).eval()
    z = torch.tensor([[0.1, 0.1], [0.9, 0.2], [1.1, -0.1], [0.2, 0.8]]).view(1, 2, 2, 2).permute(0, 3, 1, 2)
    z.requires_grad_(True)
    out = q(z)
    codes = out.codes.flatten()
    assert codes.tolist() == [0, 1, 1, 2]
    looked_up = q.embed[codes].view(1, 2, 2, 2).permute(0, 3, 1, 2)
    torch.testing.assert_close(out.quantized, looked_up)
    torch.testing.assert_close(out.commitment_loss, F.mse_loss(z, looked_up))
    (out.quantized * torch.arange(8.0).view(1, 2, 2, 2)).sum().backward()
    torch.testing.assert_close(z.grad, torch.arange(8.0).view(1, 2, 2, 2))  # straight-through: identity
    probs = torch.tensor([0.25, 0.5, 0.25])
    torch.testing.assert_close(out.perplexity, torch.exp(-(probs * probs.log()).sum()))
    assert float(out.usage) == 0.75 and out.restarted == 0


def test_eval_mode_and_encode_leave_the_codebook_alone():
    vqvae = VQVAE(vqvae_presets["test-x4"])
    before = {k: v.clone() for k, v in vqvae.quantizer.state_dict().items()}
    images = square_images(4)
    vqvae.train()
    vqvae.encode(images)
    vqvae.eval()
    vqvae(images)
    for k, v in vqvae.quantizer.state_dict().items():
        assert torch.equal(v, before[k]), k
    vqvae.train()
    vqvae(images)
    assert not torch.equal(vqvae.quantizer.cluster_size, before["cluster_size"])


def test_dead_codes_are_restarted_from_recent_encoder_outputs():
    embed = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]] + [[100.0, 100.0]] * 4  # codes 4..7 never win
    q = quantizer_with(embed, restart_window=1.0, restart_min_usage=1.0, restart_buffer=64).train()
    g = torch.Generator().manual_seed(0)
    corners = torch.tensor(embed[:4]).repeat(2, 1)
    batch = corners + 0.05 * torch.randn(8, 2, generator=g)  # 2 vectors near each used code; 8 = window
    z = batch.view(1, 2, 4, 2).permute(0, 3, 1, 2)
    out = q(z)
    assert out.restarted == 4
    for k in range(4, 8):  # each re-seeded code is one of the recent encoder outputs, with fresh EMA state
        assert (batch - q.embed[k]).abs().amax(1).min() == 0
        assert float(q.cluster_size[k]) == 1.0 and torch.equal(q.embed_avg[k], q.embed[k])
    assert (q.embed[4:] - 100).abs().max() > 50
    # The window restarted: half a window of data triggers nothing.
    assert q(z[..., :2]).restarted == 0  # 4 of the 8 vectors
    # Codes used often enough are never restarted, and restarts can be disabled.
    q2 = quantizer_with(embed[:4], restart_window=1.0, restart_buffer=64).train()
    assert q2(z).restarted == 0
    q3 = quantizer_with(embed, restart_window=0.0, restart_buffer=64).train()
    assert q3(z).restarted == 0 and (q3.embed[4:] > 50).all()


def test_training_state_makes_restarts_resumable():
    images = square_images(8)
    torch.manual_seed(3)
    a = VQVAE(vqvae_presets["test-x4"]).train()
    a(images[:3])  # a partly filled usage window and ring buffer
    saved_weights = {k: v.clone() for k, v in a.state_dict().items()}
    saved_state = a.quantizer.training_state()
    rng = torch.get_rng_state()
    restarts = sum(a(images).restarted for _ in range(3))
    assert restarts > 0
    resumed = VQVAE(vqvae_presets["test-x4"]).train()
    resumed.load_state_dict(saved_weights)
    resumed.quantizer.load_training_state(saved_state)
    torch.set_rng_state(rng)
    assert sum(resumed(images).restarted for _ in range(3)) == restarts
    for k, v in a.quantizer.state_dict().items():
        assert torch.equal(resumed.quantizer.state_dict()[k], v), k


def test_restarts_keep_the_codebook_in_use_during_training():
    """From a random codebook (all vectors mapped to one code at first) the usage climbs."""
    vqvae = VQVAE(vqvae_presets["test-x4"]).train()
    images = square_images(16)
    first = vqvae(images)
    for _ in range(5):
        last = vqvae(images)
    assert float(first.usage) <= 2 / 32
    assert float(last.usage) > 0.5 and float(last.perplexity) > 8


# ---------------------------------------------------------------------------------------------
# Training end to end
# ---------------------------------------------------------------------------------------------


def test_tiny_overfit_reconstruction_error_falls():
    torch.manual_seed(0)
    vqvae = vqvae_from_preset("test-x4", hidden_channels=32, embed_dim=16).train()
    images = square_images(8)
    opt = torch.optim.Adam(vqvae.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        out = vqvae(images)
        torch.testing.assert_close(out.loss, out.reconstruction_loss + 0.25 * out.commitment_loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.reconstruction_loss))
    assert losses[-1] < 0.25 * losses[0], losses[::10]
    vqvae.eval()
    error = F.mse_loss(vqvae.decode(vqvae.encode(images)), images)
    assert float(error) < 0.25 * float(F.mse_loss(torch.full_like(images, 0.5), images))
    assert float(vqvae(images).usage) > 0.5

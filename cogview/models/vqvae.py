"""The VQ-VAE image tokenizer: convolutional encoder/decoder and an EMA vector quantizer.

CogView1's architecture is the `cogview` preset (x8: 256x256 images -> 32x32 codes, 8192 x 256
codebook, 512 channels, its pixel normalisation); other presets change the down-sampling (x4, x8, ...),
codebook size, width and add residual blocks.

    codes = vqvae.encode(images)   # images [B, C, H, W] in [0, 1] -> codes [B, H/f, W/f] int64
    images = vqvae.decode(codes)   # -> [B, C, H, W] in [0, 1]
    out = vqvae(images)            # training: reconstruction, loss terms, codebook stats

Module names: encoder.blocks.N (CogView's enc_b.blocks.N), quantizer.{embed [n, dim], cluster_size [n],
embed_avg [n, dim]} (CogView's quantize_t stores embed and embed_avg transposed, [dim, n]), decoder.blocks.N
(CogView's dec.blocks.N). With num_res_blocks = 0 the block indices match CogView's (0, 2, 4, 6).

Quantizer (EMA, "VQ-VAE-2" style). For a training batch of encoder outputs z_e (N vectors) with nearest
codes c(i):
    counts_k = #{i : c(i) = k};  sums_k = sum_{i : c(i) = k} z_e(i)
    cluster_size <- decay * cluster_size + (1 - decay) * counts
    embed_avg    <- decay * embed_avg    + (1 - decay) * sums
    n = sum(cluster_size);  smoothed_k = (cluster_size_k + eps) / (n + K * eps) * n
    embed_k = embed_avg_k / smoothed_k
The codebook gets no gradient. The encoder gets the commitment loss ||z_e - sg(z_q)||^2 and, through
the straight-through estimator z_e + sg(z_q - z_e), the decoder's gradient. cluster_size starts at 1 and
embed_avg at the initial codebook, so unused codes keep their vectors (instead of dividing by ~eps).

Dead-code restart: in training the quantizer counts how often each code is chosen; once it has seen
`restart_window * K` vectors, codes chosen fewer than `restart_min_usage` times are re-seeded with
randomly drawn encoder outputs from a ring buffer of recent ones (their EMA state reset to one hit at
that vector), and the counts start over. Under torch.distributed the EMA statistics are all-reduced
and restarts are drawn on rank 0 and broadcast, so every rank keeps the same codebook. The usage counts
and the ring buffer are not in the state dict (not model weights); a trainer that wants bit-exact resumes
saves `quantizer.training_state()` and restores it with `load_training_state` (restarts draw from the
global torch RNG, which the trainer saves anyway).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from cogview.models.config import VQVAEConfig

__all__ = ["VQVAE", "VQVAEOutput", "EMAQuantizer", "QuantizerOutput", "ResBlock"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ResBlock(nn.Module):
    """x + Conv1x1(ReLU(Conv3x3(ReLU(x))))."""

    def __init__(self, channels: int, res_channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, res_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(res_channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class Encoder(nn.Module):
    """log2(f) x [Conv k4 s2 p1 -> ReLU] (+ res blocks, ReLU), then Conv1x1 -> embed_dim.

    With no residual blocks this is exactly CogView's: blocks 0, 2, 4 convs (ReLU between), 6 the 1x1."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        c = config.hidden_channels
        blocks: list[nn.Module] = []
        for i in range(config.num_downsamples):
            blocks += [nn.Conv2d(config.in_channels if i == 0 else c, c, 4, stride=2, padding=1)]
            if config.num_res_blocks == 0 or i + 1 < config.num_downsamples:
                blocks += [nn.ReLU()]
        if config.num_res_blocks:
            blocks += [ResBlock(c, config.res_channels) for _ in range(config.num_res_blocks)]
            blocks += [nn.ReLU()]
        blocks += [nn.Conv2d(c, config.embed_dim, 1)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """Mirror of the encoder: (Conv3x3 -> res blocks -> ReLU), log2(f) x [ConvTranspose k4 s2 p1 -> ReLU],
    Conv1x1 -> in_channels. With no residual blocks this is exactly CogView's: blocks 0, 2, 4 the
    transposed convs (the first from embed_dim), 6 the 1x1 to pixels."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        c = config.hidden_channels
        blocks: list[nn.Module] = []
        first_in = config.embed_dim
        if config.num_res_blocks:
            blocks += [nn.Conv2d(config.embed_dim, c, 3, padding=1)]
            blocks += [ResBlock(c, config.res_channels) for _ in range(config.num_res_blocks)]
            blocks += [nn.ReLU()]
            first_in = c
        for i in range(config.num_downsamples):
            blocks += [nn.ConvTranspose2d(first_in if i == 0 else c, c, 4, stride=2, padding=1), nn.ReLU()]
        blocks += [nn.Conv2d(c, config.in_channels, 1)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # [B, dim, h, w]: straight-through (value = codebook vector, gradient -> z_e)
    codes: torch.Tensor  # [B, h, w] int64
    commitment_loss: torch.Tensor  # mean ||z_e - sg(z_q)||^2 (unweighted)
    perplexity: torch.Tensor  # exp(entropy of this batch's code histogram)
    usage: torch.Tensor  # fraction of the codebook used by this batch
    restarted: int  # codes re-seeded by this call


class EMAQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with an EMA codebook and dead-code restarts (see module doc)."""

    def __init__(self, codebook_size: int, dim: int, *, decay: float = 0.99, eps: float = 1e-5,
                 restart_window: float = 4.0, restart_min_usage: float = 1.0, restart_buffer: int = 4096):
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.decay = decay
        self.eps = eps
        self.restart_window = restart_window
        self.restart_min_usage = restart_min_usage
        self.restart_buffer = restart_buffer
        embed = torch.randn(codebook_size, dim)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        # Transient training state (not in the state dict; rebuilt lazily on the right device).
        self._usage: torch.Tensor | None = None
        self._seen = 0.0
        self._recent: torch.Tensor | None = None
        self._recent_filled = 0
        self._recent_pos = 0

    def extra_repr(self) -> str:
        return f"{self.codebook_size} x {self.dim}, decay={self.decay}, eps={self.eps}"

    # ---- lookups ----
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared L2, float32) for each row of flat [N, dim]."""
        flat = flat.float()
        embed = self.embed.float()
        distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ embed.t() + embed.pow(2).sum(1)[None, :])
        return distances.argmin(dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> codebook vectors [B, dim, h, w]."""
        if codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"EMAQuantizer.lookup: `codes` must be int64, got {codes.dtype}")
        return F.embedding(codes, self.embed).permute(0, 3, 1, 2)

    # ---- EMA update and restarts ----
    @torch.no_grad()
    def ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        """One EMA step for encoder outputs flat [N, dim] assigned to codes [N] (see module doc)."""
        flat = flat.float()
        onehot = F.one_hot(codes, self.codebook_size).to(flat.dtype)
        counts = onehot.sum(0)
        sums = onehot.t() @ flat
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_avg / smoothed[:, None])
        self._track_usage(counts)

    def _track_usage(self, counts: torch.Tensor) -> None:
        if self._usage is None or self._usage.device != counts.device:
            self._usage = torch.zeros_like(counts)
            self._seen = 0.0
        self._usage += counts
        self._seen += float(counts.sum())

    def _remember(self, flat: torch.Tensor) -> None:
        """Keep the latest encoder outputs in a ring buffer (a random subset when a batch is larger)."""
        flat = flat.detach().float()
        size = self.restart_buffer
        if self._recent is None or self._recent.device != flat.device:
            self._recent = torch.empty(size, self.dim, device=flat.device)
            self._recent_filled = self._recent_pos = 0
        if flat.shape[0] > size:
            flat = flat[torch.randperm(flat.shape[0], device=flat.device)[:size]]
        m = flat.shape[0]
        idx = (self._recent_pos + torch.arange(m, device=flat.device)) % size
        self._recent[idx] = flat
        self._recent_pos = (self._recent_pos + m) % size
        self._recent_filled = min(size, self._recent_filled + m)

    @torch.no_grad()
    def restart_dead_codes(self, force: bool = False) -> int:
        """Re-seed the codes used fewer than `restart_min_usage` times in the current window, once the
        window is full (or now, with force=True). Returns how many were re-seeded."""
        if self._usage is None or self._recent is None or self._recent_filled == 0:
            return 0
        if not force and (self.restart_window <= 0 or self._seen < self.restart_window * self.codebook_size):
            return 0
        dead = self._usage < self.restart_min_usage
        num_dead = int(dead.sum())
        if num_dead:
            pool = self._recent[: self._recent_filled]
            pick = torch.randint(0, pool.shape[0], (num_dead,), device=pool.device)
            fresh = pool[pick]
            if _distributed():
                dist.broadcast(fresh, src=0)
            self.embed[dead] = fresh.to(self.embed.dtype)
            self.embed_avg[dead] = fresh.to(self.embed_avg.dtype)
            self.cluster_size[dead] = 1.0
        self._usage.zero_()
        self._seen = 0.0
        return num_dead

    # ---- transient training state (for exact resumes; not part of the model weights) ----
    def training_state(self) -> dict[str, torch.Tensor]:
        """The restart bookkeeping (usage window, ring buffer of recent encoder outputs) as tensors, for a
        trainer's checkpoint, so an interrupted + resumed run restarts the same codes at the same steps."""
        state = {"seen": torch.tensor(self._seen, dtype=torch.float64),
                 "recent_filled": torch.tensor(self._recent_filled), "recent_pos": torch.tensor(self._recent_pos)}
        if self._usage is not None:
            state["usage"] = self._usage.clone()
        if self._recent is not None:
            state["recent"] = self._recent.clone()
        return state

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        device = self.embed.device
        self._seen = float(state["seen"])
        self._recent_filled = int(state["recent_filled"])
        self._recent_pos = int(state["recent_pos"])
        self._usage = state["usage"].to(device).clone() if "usage" in state else None
        self._recent = state["recent"].to(device).clone() if "recent" in state else None

    # ---- forward ----
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z [B, dim, h, w] -> QuantizerOutput. In training mode also updates the codebook (EMA) and
        restarts dead codes."""
        batch, dim, h, w = z.shape
        if dim != self.dim:
            raise ValueError(f"EMAQuantizer: expected {self.dim} channels, got {dim}")
        flat = z.permute(0, 2, 3, 1).reshape(-1, dim)
        codes = self.nearest(flat.detach())
        restarted = 0
        if self.training:
            self.ema_update(flat.detach(), codes)
            self._remember(flat)
            restarted = self.restart_dead_codes()
        quantized = self.lookup(codes.view(batch, h, w)).to(z.dtype)
        commitment = F.mse_loss(z, quantized.detach())
        straight_through = z + (quantized - z).detach()
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        probs = counts / counts.sum().clamp_min(1)
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())
        usage = (counts > 0).float().mean()
        return QuantizerOutput(straight_through, codes.view(batch, h, w), commitment, perplexity, usage, restarted)


@dataclass
class VQVAEOutput:
    reconstruction: torch.Tensor  # [B, C, H, W], in image space ([0, 1] for a perfect model; not clamped)
    codes: torch.Tensor  # [B, h, w]
    loss: torch.Tensor  # reconstruction_loss + commitment * commitment_loss
    reconstruction_loss: torch.Tensor  # MSE in normalised pixel space (what CogView trained)
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor
    restarted: int


class VQVAE(nn.Module):
    """Image tokenizer: `encode(images in [0, 1]) -> codes`, `decode(codes) -> images in [0, 1]`,
    `forward(images) -> VQVAEOutput` for training."""

    def __init__(self, config: VQVAEConfig, *, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, VQVAEConfig):
            raise TypeError(f"VQVAE: `config` must be a VQVAEConfig, got {type(config).__name__}")
        self.config = config
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.encoder = Encoder(config)
            self.quantizer = EMAQuantizer(config.codebook_size, config.embed_dim, decay=config.decay, eps=config.eps,
                                          restart_window=config.restart_window,
                                          restart_min_usage=config.restart_min_usage,
                                          restart_buffer=config.restart_buffer)
            self.decoder = Decoder(config)
        if dtype is not None:  # the convolutions only: the codebook statistics stay float32
            self.encoder.to(dtype=dtype)
            self.decoder.to(dtype=dtype)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def _check_images(self, images: torch.Tensor, what: str) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"VQVAE.{what}: `images` must be a float tensor [batch, channels, height, width], got "
                             f"{images.dtype if isinstance(images, torch.Tensor) else type(images).__name__} "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else ''}")
        _, c, h, w = images.shape
        f = self.config.downsample
        if c != self.config.in_channels:
            raise ValueError(f"VQVAE.{what}: expected {self.config.in_channels} channels, got {c}")
        if h % f or w % f or h == 0 or w == 0:
            raise ValueError(f"VQVAE.{what}: image size {h}x{w} must be a positive multiple of the down-sampling "
                             f"factor {f} (e.g. {self.config.image_size}x{self.config.image_size})")

    def _pixel_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Built from the config on each call (not buffers), so a model built on the meta device and
        # loaded by assignment has nothing left unloaded.
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.config.pixel_mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.config.pixel_std, dtype=x.dtype, device=x.device).view(shape)
        return mean, std

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the encoder's input space: (images - pixel_mean) / pixel_std."""
        mean, std = self._pixel_stats(images)
        return (images - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's output space -> pixels (unclamped)."""
        mean, std = self._pixel_stats(x)
        return x * std + mean

    def _param_dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] in [0, 1] -> codes [B, H/f, W/f] int64 (the codebook is not updated)."""
        self._check_images(images, "encode")
        z = self.encoder(self.normalize(images.to(self._param_dtype())))
        batch, dim, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, dim)).view(batch, h, w)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Quantized latents [B, dim, h, w] -> images in normalised pixel space (unclamped)."""
        return self.decoder(z)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> images [B, C, h*f, w*f] in [0, 1] (clamped)."""
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"VQVAE.decode: `codes` must be an int64 tensor [batch, h, w], got "
                             f"{codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__}")
        if codes.numel() and not codes.is_cuda:
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self.config.codebook_size:
                raise ValueError(f"VQVAE.decode: codes must lie in [0, {self.config.codebook_size}), got "
                                 f"values in [{lo}, {hi}]")
        z = self.quantizer.lookup(codes.long()).to(self._param_dtype())
        return self.denormalize(self.decode_latents(z)).clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        """Training/evaluation pass on images [B, C, H, W] in [0, 1]. In training mode the EMA codebook
        is updated and dead codes are restarted; `loss` is what to back-propagate."""
        self._check_images(images, "forward")
        target = self.normalize(images.to(self._param_dtype()))
        z = self.encoder(target)
        q = self.quantizer(z)
        out = self.decode_latents(q.quantized)
        reconstruction_loss = F.mse_loss(out.float(), target.float())
        loss = reconstruction_loss + self.config.commitment * q.commitment_loss.float()
        return VQVAEOutput(self.denormalize(out), q.codes, loss, reconstruction_loss, q.commitment_loss,
                           q.perplexity, q.usage, q.restarted)

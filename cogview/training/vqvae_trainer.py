"""VQ-VAE training: reconstruction (L2 or L1, in normalised pixel space) + commitment loss, EMA codebook.

Logged per step (means over the global batch): loss, recon, commitment, psnr (of the clamped
reconstruction in [0, 1]), batch perplexity and usage; per log interval: codebook usage and perplexity
over every code chosen in the interval (all processes), codes restarted. Reconstruction grids (originals
above, reconstructions below) go to OUTPUT/training/samples/recon-STEP.png every --sample-every steps and
at the end. The result is a VQ-VAE-only model directory (config.json + vqvae.safetensors) that
`cogview tokenize-images --vqvae` and `cogview train --vqvae` read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from cogview.data.loader import build_dataset
from cogview.models import VQVAE, vqvae_from_preset
from cogview.training.config import VQVAETrainConfig
from cogview.training.distributed import all_reduce_sum, barrier
from cogview.training.engine import Trainer
from cogview.training.images import save_grid
from cogview.training.state import full_model_state_dict

__all__ = ["VQVAETrainer", "VQVAELoss", "train_vqvae"]


class VQVAELoss(nn.Module):
    """forward(images) -> (loss, metrics); forward(images, reconstruct=True) -> reconstructions in [0, 1]."""

    def __init__(self, vqvae: VQVAE, loss: str = "l2", channels_last: bool = False):
        super().__init__()
        if loss not in ("l2", "l1"):
            raise ValueError(f"VQVAELoss: `loss` must be 'l2' or 'l1', got {loss!r}")
        self.vqvae = vqvae
        self.loss = loss
        self.channels_last = channels_last
        if channels_last:
            vqvae.encoder.to(memory_format=torch.channels_last)
            vqvae.decoder.to(memory_format=torch.channels_last)
        self.last_codes: torch.Tensor | None = None
        self.last_restarted = 0

    def forward(self, images: torch.Tensor, reconstruct: bool = False):
        vq = self.vqvae
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = vq.normalize(images)
        z = vq.encoder(target)
        q = vq.quantizer(z)
        out = vq.decode_latents(q.quantized)
        if reconstruct:
            return vq.denormalize(out.float()).clamp(0.0, 1.0)
        out32, target32 = out.float(), target.float()
        recon = F.mse_loss(out32, target32) if self.loss == "l2" else F.l1_loss(out32, target32)
        commitment = q.commitment_loss.float()
        loss = recon + vq.config.commitment * commitment
        with torch.no_grad():
            pixels = vq.denormalize(out32).clamp(0.0, 1.0)
            mse = F.mse_loss(pixels, images.float())
            psnr = -10.0 * torch.log10(mse.clamp_min(1e-10))
        self.last_codes = q.codes.detach()
        self.last_restarted = int(q.restarted)
        metrics = {"loss": loss.detach(), "recon": recon.detach(), "commitment": commitment.detach(),
                   "psnr": psnr, "batch_perplexity": q.perplexity.detach(), "batch_usage": q.usage.detach()}
        return loss, metrics


@dataclass
class _Images:
    images: torch.Tensor
    count: int


class VQVAETrainer(Trainer):
    unit = "img"
    log_name = "train-vqvae"

    def __init__(self, config: VQVAETrainConfig, **kwargs):
        if not isinstance(config, VQVAETrainConfig):
            raise TypeError("VQVAETrainer needs a VQVAETrainConfig")
        super().__init__(config, **kwargs)

    def setup(self) -> None:
        c = self.config
        if c.init:
            from cogview.pipeline import load_vqvae

            if c.model_overrides:
                raise ValueError("--model-overrides cannot change a model loaded with --init")
            vqvae = load_vqvae(c.init, channels_last=False)  # trains in the layout a preset run trains in
            self.log(f"initialised from {c.init}")
        else:
            overrides = dict(c.model_overrides)
            if c.resolution:
                overrides["image_size"] = int(c.resolution)
            vqvae = vqvae_from_preset(c.model, **overrides)
        self.resolution = int(c.resolution or vqvae.config.image_size)
        if self.resolution % vqvae.config.downsample:
            raise ValueError(f"--resolution {self.resolution} is not a multiple of the VQ-VAE's down-sampling "
                             f"factor {vqvae.config.downsample}")
        self.dataset = build_dataset(c.data, resolution=self.resolution, default_seed=c.seed)
        first = self._first_items(1)
        if not first:
            raise ValueError(f"the dataset {c.data!r} yielded no readable image among its first items")
        if "image" not in first[0]:
            raise ValueError("train-vqvae needs an image dataset, not a token file")
        if tuple(first[0]["image"].shape[-2:]) != (self.resolution, self.resolution):
            raise ValueError(f"the dataset's images are {tuple(first[0]['image'].shape[-2:])}, not "
                             f"{self.resolution}x{self.resolution}: set the dataset's resolution")
        self.vqvae = vqvae
        # FSDP2 cannot shard channels-last (non-contiguous) parameters.
        fsdp = self.env.distributed and c.distributed == "fsdp"
        self.module = VQVAELoss(vqvae, c.loss, channels_last=c.channels_last and not fsdp)
        self.shard_units = [vqvae.encoder, vqvae.decoder]
        self.grid = torch.stack([it["image"] for it in self._first_items(c.grid_images)]) if c.grid_images else None
        self.code_counts = torch.zeros(vqvae.config.codebook_size, dtype=torch.float64)
        self.restarted = 0
        n = sum(p.numel() for p in vqvae.parameters())
        self.log(f"VQ-VAE {c.model if not c.init else c.init}: {n:,} parameters, x{vqvae.config.downsample}, "
                 f"{vqvae.config.codebook_size} codes; {len(self.dataset)} images at {self.resolution}px; "
                 f"{self.env.world_size} process(es) on {self.device}")

    def _first_items(self, n: int) -> list[dict]:
        items = []
        for i in range(min(len(self.dataset), max(n * 4, n + 16))):
            item = self.dataset[i]
            if item is not None:
                items.append(item)
            if len(items) == n:
                break
        return items

    # ---- batches ----
    def prepare(self, batch: dict) -> _Images:
        images = batch.get("image")
        if images is None:
            return _Images(torch.zeros(0, 3, self.resolution, self.resolution, device=self.device), 0)
        return _Images(images.to(self.device, non_blocking=True), int(images.shape[0]))

    def batch_weight(self, prepared: _Images) -> float:
        return prepared.count

    def dummy(self, prepared: _Images) -> _Images:
        # Every process must run the forward (the EMA codebook update all-reduces); its loss gets weight 0.
        return _Images(torch.full((1, 3, self.resolution, self.resolution), 0.5, device=self.device), 1)

    def forward_loss(self, prepared: _Images):
        loss, metrics = self.forward_model(prepared.images)
        codes = self.module.last_codes
        if codes is not None:
            self.code_counts += torch.bincount(codes.reshape(-1).cpu(), minlength=self.code_counts.numel()).double()
        self.restarted += self.module.last_restarted
        return loss, metrics

    def log_extra(self, step: int) -> dict[str, Any]:
        counts = all_reduce_sum(self.code_counts.clone(), self.env)
        total = counts.sum()
        probs = counts / total.clamp_min(1)
        perplexity = math.exp(-float((probs * probs.clamp_min(1e-12).log()).sum())) if total > 0 else 0.0
        record = {"codebook_usage": float((counts > 0).double().mean()), "codebook_perplexity": perplexity,
                  "codes_restarted": self.restarted}
        self.code_counts.zero_()
        self.restarted = 0
        return record

    # ---- state ----
    def rank_state(self) -> dict[str, Any]:
        state = {f"quantizer.{k}": v for k, v in self.vqvae.quantizer.training_state().items()}
        state["code_counts"] = self.code_counts.clone()
        state["restarted"] = torch.tensor(self.restarted)
        return state

    def load_rank_state(self, state: dict[str, Any]) -> None:
        q = {k[len("quantizer."):]: v for k, v in state.items() if k.startswith("quantizer.")}
        if q:
            self.vqvae.quantizer.load_training_state(q)
        if "code_counts" in state:
            self.code_counts = state["code_counts"].clone().double()
            self.restarted = int(state["restarted"])

    # ---- grids and export ----
    @torch.no_grad()
    def periodic(self, step: int, final: bool) -> None:
        if self.grid is None:
            return
        self.model.eval()
        images = self.grid.to(self.device)
        with self.autocast():
            recon = self.model(images, reconstruct=True)
        self.model.train()
        if self.env.is_main:
            path = save_grid([images.cpu(), recon.float().cpu()], self.train_dir / "samples" / f"recon-{step:08d}.png",
                             scale=max(1, 128 // self.resolution))
            self.log(f"reconstruction grid {path}")
        barrier(self.env)

    def export(self) -> Path:
        from cogview.pipeline import save_model_dir

        state = full_model_state_dict(self.model, self.env)
        if self.env.is_main:
            prefix = "vqvae."
            vqvae_state = {k[len(prefix):]: v.contiguous() for k, v in state.items() if k.startswith(prefix)}
            c = self.config
            describe = self.dataset.describe() if hasattr(self.dataset, "describe") else {}
            metadata = {"training": {"trainer": "vqvae", "steps": c.steps, "batch_size": c.batch_size,
                                     "loss": c.loss, "resolution": self.resolution, "data": describe,
                                     "seed": c.seed, "precision": c.precision}}
            save_model_dir(self.output, vqvae=vqvae_state, config=self.vqvae.config.replace(
                image_size=self.resolution), metadata=metadata)
        barrier(self.env)
        return self.output


def train_vqvae(config: VQVAETrainConfig | None = None, **settings) -> dict[str, Any]:
    """Train a VQ-VAE (in this process, or this torchrun process) and return the run summary.

        train_vqvae(output="runs/vq", steps=2000, batch_size=64, data={"name": "shapes", "num_samples": 20000})
    """
    from cogview.training.config import make_config

    if config is None:
        config = make_config(VQVAETrainConfig, settings)
    elif settings:
        raise TypeError("train_vqvae: pass either a config or settings, not both")
    return VQVAETrainer(config).run()

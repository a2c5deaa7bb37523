"""Training the super-resolution stage (`cogview train-sr`).

Data: every scene is rendered (the built-in `shapes`) or loaded (an image folder / manifest, then
box-filtered down) at BOTH resolutions, low = the base model's image size and high = scale x that, and
both are tokenized by the SAME VQ-VAE (the base model's), once, into two token files under
OUTPUT/training/sr-tokens/{low,high} (reused when a run resumes).

Each training sequence is one of (decided per item and epoch by a private RNG, like the transformer
trainer's choices):
- direct super-resolution (a --direct-ratio share): every high-res cell is [MASK];
- a refinement pass k (uniform over the schedule): the cells `refinement_masks(config)[k]` are masked,
  the rest hold the true codes (optionally a --corrupt share of them replaced by random codes, so the
  model learns to live with the imperfect codes an earlier pass leaves).
The caption is dropped with probability --caption-dropout (so the stage also upscales without text).
Loss: cross-entropy of the masked cells (mean over all masked cells of the global batch).

The base: --base DIR, a full model directory (its VQ-VAE, tokenizer and vocabulary; the output is that
model plus the SR stage) or a VQ-VAE-only directory (no text part; the output is the VQ-VAE plus the SR
stage). The output OUTPUT is a model directory: the base's files copied (hard-linked when possible) and
the SR stage attached (`cogview.pipeline.attach_super_resolution`). At the end a PSNR evaluation on
held-out scenes (shapes only) is logged and stored in the stage's metadata.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cogview.models.super_resolution import (
    SuperResolutionConfig,
    SuperResolutionTransformer,
    build_text_tokens,
    refinement_masks,
    sr_presets,
)
from cogview.training.config import TrainConfig, setting
from cogview.training.distributed import barrier, unwrap_model
from cogview.training.engine import Trainer
from cogview.training.images import save_grid
from cogview.training.state import full_model_state_dict

__all__ = ["SRTrainConfig", "SRTrainer", "SRLoss", "SRBatch", "train_super_resolution", "tokenize_pairs"]


@dataclass
class SRTrainConfig(TrainConfig):
    """`cogview train-sr`: the super-resolution stage on pairs of low- and high-resolution codes."""

    model: str = setting("shapes-8to24", "SR stage preset (cogview.models.super_resolution.sr_presets); the "
                                         "vocabulary and low-res grid follow --base")
    model_overrides: dict = setting({}, "JSON object of SR config fields (low_res, scale, max_text_len, window, "
                                        "cross_window, tile, schedule, parent_hint, pixel_hint: 0 or 1 = on) or "
                                        "trunk fields (num_layers, "
                                        "hidden_size, num_heads, mlp_size, ...) changed from the preset")
    base: Any = setting(None, "model directory the SR stage serves: a full model (VQ-VAE, tokenizer; the output "
                              "is it plus the SR stage) or a VQ-VAE-only directory (no text)")
    data: Any = setting("shapes", "'shapes' or a JSON shapes spec (rendered at both resolutions), or an image "
                                  "folder / manifest (loaded at the high resolution, box-filtered down)")
    scale: int = setting(0, "high-res side / low-res side (0: the preset's)")
    direct_ratio: float = setting(0.5, "share of sequences trained as direct super-resolution (all cells masked); "
                                       "the rest as one refinement pass of the schedule")
    corrupt: float = setting(0.05, "share of the unmasked input codes of refinement sequences replaced by random "
                                   "codes")
    caption_dropout: float = setting(0.3, "probability of training a sequence without its caption")
    eval_images: int = setting(64, "held-out shapes scenes of the final PSNR evaluation (0: none)")
    grid_images: int = setting(6, "images in the sample grids (low-res bicubic / SR / true high-res)")


# ---------------------------------------------------------------------------------------------
# Paired tokens
# ---------------------------------------------------------------------------------------------


def _pair_sources(spec, low_px: int, high_px: int, seed: int):
    """(low dataset or None, high dataset): shapes render both; other data load high and pool down."""
    from cogview.data.loader import build_dataset

    if spec == "shapes" or (isinstance(spec, dict) and spec.get("name") == "shapes"):
        args = {} if spec == "shapes" else {k: v for k, v in spec.items() if k not in ("name", "resolution")}
        return (build_dataset({"name": "shapes", **args}, resolution=low_px, default_seed=seed),
                build_dataset({"name": "shapes", **args}, resolution=high_px, default_seed=seed))
    return None, build_dataset(spec, resolution=high_px, default_seed=seed)


@torch.no_grad()
def tokenize_pairs(spec, vqvae, low_px: int, high_px: int, output: Path, *, seed: int = 0, batch_size: int = 64,
                   progress: bool = True, log=print) -> tuple[Path, Path]:
    """Encode every item at both resolutions with `vqvae` into token files output/low and output/high
    (same item order; items unreadable at either size are skipped in both). Returns the two paths."""
    from tqdm import tqdm

    from cogview.data.tokens import TokenFileWriter

    low_set, high_set = _pair_sources(spec, low_px, high_px, seed)
    n = len(high_set)
    down = vqvae.config.downsample
    source = high_set.describe() if hasattr(high_set, "describe") else {"name": type(high_set).__name__}
    source = dict(source, low_px=low_px, high_px=high_px)
    output.mkdir(parents=True, exist_ok=True)
    writers = [TokenFileWriter(output / name, n, (px // down, px // down), vqvae.config.codebook_size,
                               vqvae.config.to_dict(), source, overwrite=True)
               for name, px in (("low", low_px), ("high", high_px))]
    device = vqvae.quantizer.embed.device
    bar = tqdm(total=n, desc="tokenize pairs", unit="img", disable=not progress, dynamic_ncols=True)
    skipped = 0
    try:
        for start in range(0, n, batch_size):
            lows, highs, captions = [], [], []
            for i in range(start, min(n, start + batch_size)):
                high = high_set[i]
                low = low_set[i] if low_set is not None else high
                if high is None or low is None:
                    skipped += 1
                    continue
                highs.append(high["image"])
                lows.append(low["image"] if low_set is not None else None)
                captions.append(high.get("captions", []))
            bar.update(min(n, start + batch_size) - start)
            if not highs:
                continue
            high_images = torch.stack(highs).to(device)
            if low_set is not None:
                low_images = torch.stack(lows).to(device)
            else:  # box filter: the mean of each scale x scale block
                low_images = F.avg_pool2d(high_images, high_px // low_px)
            writers[0].append(vqvae.encode(low_images), captions)
            writers[1].append(vqvae.encode(high_images), captions)
        for w in writers:
            w.close(num_skipped=skipped)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        bar.close()
    if log:
        log(f"tokenized {n - skipped} scenes at {low_px} and {high_px} px into {output} ({skipped} skipped)")
    return output / "low", output / "high"


class SRTokenPairs(torch.utils.data.Dataset):
    """Two token files of the same items: item i = {codes: [low_len + high_len], captions, index}."""

    def __init__(self, low_path: str | os.PathLike, high_path: str | os.PathLike):
        from cogview.data.tokens import TokenDataset

        self.low = TokenDataset(low_path)
        self.high = TokenDataset(high_path)
        if len(self.low) != len(self.high):
            raise ValueError(f"SRTokenPairs: {len(self.low)} low-res but {len(self.high)} high-res items")
        self.low_len = self.low.code_shape[0] * self.low.code_shape[1]

    def __len__(self) -> int:
        return len(self.high)

    def captions(self, index: int) -> list[str]:
        return self.high.captions(index)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        codes = np.concatenate([self.low.codes(index), self.high.codes(index)])
        return {"codes": torch.from_numpy(codes), "captions": self.high.captions(index), "index": index}

    def describe(self) -> dict:
        return {"name": "sr-pairs", "low": self.low.describe(), "high": self.high.describe(),
                "source": self.high.header.get("source", {})}


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


@dataclass
class SRBatch:
    low: torch.Tensor  # [B, low_len]
    inputs: torch.Tensor  # [B, high_len]: codes, [MASK] where masked
    targets: torch.Tensor  # [B, high_len]: the true codes
    mask: torch.Tensor  # [B, high_len] bool: the cells to predict
    text: torch.Tensor | None  # [B, text_positions]
    direct: torch.Tensor  # [B] bool: direct-SR sequences
    low_pixels: torch.Tensor | None = None  # [B, C, h p, w p]: the decoded low-res image (pixel-hint stages)

    def to(self, device) -> "SRBatch":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=True)
                                            for f in dataclasses.fields(self) if getattr(self, f.name) is not None})


class SRLoss(nn.Module):
    """forward(SRBatch) -> (mean cross-entropy over the masked cells, metrics)."""

    def __init__(self, model: SuperResolutionTransformer):
        super().__init__()
        self.model = model

    def forward(self, batch: SRBatch):
        model = self.model
        context = model.encode_context(batch.low, batch.text, batch.low_pixels)
        hidden = model.high_res_hidden(context, batch.inputs)
        logits = model.logits(hidden[batch.mask]).float()
        targets = batch.targets[batch.mask]
        losses = F.cross_entropy(logits, targets, reduction="none")
        loss = losses.mean()
        with torch.no_grad():
            direct = batch.direct[:, None].expand_as(batch.mask)[batch.mask].float()
            correct = (logits.argmax(-1) == targets).float()
            metrics = {"loss": loss.detach(), "accuracy": correct.mean(),
                       "direct_accuracy": (correct * direct).sum() / direct.sum().clamp_min(1),
                       "refine_accuracy": (correct * (1 - direct)).sum() / (1 - direct).sum().clamp_min(1)}
        return loss, metrics


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([int(seed), 0x5125, int(epoch), int(index)]))


def build_sr_batch(codes: torch.Tensor, captions, epochs, indices, config: SuperResolutionConfig, tokenizer, *,
                   seed: int, direct_ratio: float, corrupt: float, caption_dropout: float) -> SRBatch:
    """The training sequences of one micro-batch (choices per item and epoch; see the module docstring)."""
    low = codes[:, : config.low_len].long()
    targets = codes[:, config.low_len:].long()
    plans = refinement_masks(config)
    mask_id = config.transformer.command_id("[MASK]")
    masks, inputs, direct, texts = [], [], [], []
    for row, caps, epoch, index in zip(targets, captions, epochs, indices):
        rng = item_rng(seed, epoch, index)
        is_direct = rng.random() < direct_ratio
        k = int(rng.integers(len(plans)))
        caption = caps[int(rng.integers(len(caps)))] if caps else ""
        if rng.random() < caption_dropout:
            caption = ""
        noise = torch.from_numpy(rng.random(config.high_len) < corrupt)
        random_codes = torch.from_numpy(rng.integers(0, config.transformer.image_tokens, config.high_len))
        mask = torch.ones(config.high_len, dtype=torch.bool) if is_direct else plans[k]
        x = torch.where(noise & ~mask, random_codes, row)
        masks.append(mask)
        inputs.append(x.masked_fill(mask, mask_id))
        direct.append(is_direct)
        texts.append(caption)
    # captions longer than the text part are cut silently (the stage reads their first max_text_len pieces)
    text = (build_text_tokens(tokenizer, texts, config, warn=False)
            if (tokenizer is not None and config.text_positions) else None)
    if text is None and config.text_positions:  # no tokenizer: every text part is [ROI1] + padding
        t = config.transformer
        text = torch.full((len(texts), config.text_positions), t.command_id("[PAD]"), dtype=torch.long)
        text[:, 0] = t.command_id("[ROI1]")
    return SRBatch(low, torch.stack(inputs), targets, torch.stack(masks), text, torch.tensor(direct))


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def sr_config_for(preset: str, overrides: dict, *, image_tokens: int, base_transformer=None, low_res=None,
                  scale: int = 0, vqvae_config=None) -> SuperResolutionConfig:
    """The SR config of a preset, fitted to a VQ-VAE (image_tokens; with `vqvae_config`, a pixel hint
    reads patches of its down-sampling factor and channels), a base model's vocabulary and code grid (or no
    text without one), with overrides of SR or trunk fields."""
    if preset not in sr_presets:
        raise ValueError(f"--model: unknown SR preset {preset!r}; known: {sorted(sr_presets)}")
    config = sr_presets[preset]
    sr_fields = {f.name for f in dataclasses.fields(SuperResolutionConfig)} - {"transformer"}
    trunk_fields = {f.name for f in dataclasses.fields(type(config.transformer))}
    unknown = sorted(set(overrides) - sr_fields - trunk_fields)
    if unknown:
        raise ValueError(f"--model-overrides: unknown field(s) {unknown}; SR fields {sorted(sr_fields)}, trunk "
                         f"fields {sorted(trunk_fields)}")
    trunk = {"image_tokens": image_tokens}
    if base_transformer is not None:
        trunk.update(text_tokens=base_transformer.text_tokens, command_tokens=base_transformer.command_tokens,
                     vocab_pad_multiple=base_transformer.vocab_pad_multiple)
    trunk.update({k: v for k, v in overrides.items() if k in trunk_fields})
    sr = {k: v for k, v in overrides.items() if k in sr_fields}
    if low_res is not None:
        sr.setdefault("low_res", low_res)
    if scale:
        sr["scale"] = int(scale)
    if base_transformer is None:
        trunk.setdefault("text_tokens", 0)
        sr["max_text_len"] = 0
    if vqvae_config is not None and sr.get("pixel_hint", config.pixel_hint):  # on: the VQ-VAE's patch
        sr.update(pixel_hint=vqvae_config.downsample, image_channels=vqvae_config.in_channels)
    return config.replace(transformer=config.transformer.replace(**trunk), **sr)


class SRTrainer(Trainer):
    unit = "img"
    log_name = "train-sr"

    def __init__(self, config: SRTrainConfig, **kwargs):
        if not isinstance(config, SRTrainConfig):
            raise TypeError("SRTrainer needs an SRTrainConfig")
        super().__init__(config, **kwargs)

    def setup(self) -> None:
        from cogview.pipeline import (
            load_super_resolution,
            load_tokenizer,
            load_vqvae,
            read_model_directory,
        )

        c = self.config
        if not c.base:
            raise ValueError("--base is required: the model directory (full, or VQ-VAE-only) the SR stage serves")
        base = read_model_directory(c.base)
        if base.path.resolve() == self.output.resolve():
            raise ValueError("--output must differ from --base (the output is a new model directory)")
        if not (0 <= c.direct_ratio <= 1 and 0 <= c.corrupt < 1 and 0 <= c.caption_dropout <= 1):
            raise ValueError("--direct-ratio and --caption-dropout must lie in [0, 1], --corrupt in [0, 1)")
        self.base = base
        self.vqvae = load_vqvae(base).eval().to(self.device)
        for p in self.vqvae.parameters():
            p.requires_grad_(False)
        self.tokenizer = load_tokenizer(base) if base.config is not None else None
        if c.init:
            if c.model_overrides or c.scale:
                raise ValueError("--model-overrides / --scale cannot change an SR stage loaded with --init")
            model = load_super_resolution(c.init)
            model.train()
        else:
            low_res = base.config.code_size if base.config is not None else None
            config = sr_config_for(c.model, c.model_overrides, image_tokens=self.vqvae.config.codebook_size,
                                   base_transformer=base.config.transformer if base.config is not None else None,
                                   low_res=low_res, scale=c.scale, vqvae_config=self.vqvae.config)
            model = SuperResolutionTransformer(config)
        from cogview.pipeline import check_super_resolution_fits

        check_super_resolution_fits(model.config, self.vqvae.config, base.config, "train-sr")
        self.sr = model
        config = model.config
        down = self.vqvae.config.downsample
        self.low_px, self.high_px = config.image_sizes(down)
        self.dataset = self._tokens()
        self.module = SRLoss(model)
        self.shard_units = list(model.layers)
        t = config.transformer
        self.log(f"SR stage {c.model if not c.init else c.init}: {model.num_parameters():,} parameters ({t.num_layers} "
                 f"layers x {t.hidden_size}, {t.num_heads} heads); {config.low_res}x{config.low_res} -> "
                 f"{config.high_res}x{config.high_res} codes ({self.low_px} -> {self.high_px} px), text "
                 f"{config.max_text_len} pieces, windows {config.window} + {config.cross_window}, schedule "
                 f"{list(config.schedule)} on {config.tile} tiles; {len(self.dataset)} pairs; "
                 f"{self.env.world_size} process(es) on {self.device}")

    def _tokens(self) -> SRTokenPairs:
        c = self.config
        folder = self.train_dir / "sr-tokens"
        from cogview.data.tokens import is_token_file

        def usable() -> bool:
            if not (is_token_file(folder / "low") and is_token_file(folder / "high")):
                return False
            header = json.loads((folder / "high" / "header.json").read_text())
            source = header.get("source", {})
            return (header.get("vqvae") == self.vqvae.config.to_dict() and source.get("low_px") == self.low_px
                    and source.get("high_px") == self.high_px and source.get("data_spec") == c.data)

        if self.env.is_main and not usable():
            low, high = tokenize_pairs(c.data, self.vqvae, self.low_px, self.high_px, folder, seed=c.seed,
                                       progress=c.progress, log=self.log)
            for path in (low, high):  # remember the spec, to know when the cache can be reused
                header_path = path / "header.json"
                header = json.loads(header_path.read_text())
                header["source"]["data_spec"] = c.data
                header_path.write_text(json.dumps(header, indent=2, ensure_ascii=False) + "\n")
        barrier(self.env)
        return SRTokenPairs(folder / "low", folder / "high")

    # ---- batches ----
    def prepare(self, batch: dict) -> SRBatch:
        c = self.config
        prepared = build_sr_batch(batch["codes"], batch["captions"], batch["epoch"], batch["index"], self.sr.config,
                                  self.tokenizer, seed=c.seed, direct_ratio=c.direct_ratio, corrupt=c.corrupt,
                                  caption_dropout=c.caption_dropout).to(self.device)
        if self.sr.config.pixel_hint:  # the frozen VQ-VAE's decode of the low-res codes
            side = self.sr.config.low_res
            with torch.no_grad():
                prepared.low_pixels = self.vqvae.decode(prepared.low.view(-1, side, side))
        return prepared

    def batch_weight(self, prepared: SRBatch) -> float:
        return float(prepared.mask.sum())

    def batch_items(self, prepared: SRBatch) -> float:
        return prepared.low.shape[0]

    # ---- samples, evaluation, export ----
    def _plain(self) -> SuperResolutionTransformer | None:
        if self.config.distributed == "fsdp" and self.env.distributed:
            state = full_model_state_dict(self.model, self.env)
            if not self.env.is_main:
                return None
            plain = SuperResolutionTransformer(self.sr.config, init=False)
            plain.load_state_dict({k[len("model."):]: v for k, v in state.items()})
            return plain.to(self.device)
        return unwrap_model(self.model).model if self.env.is_main else None

    def periodic(self, step: int, final: bool) -> None:
        from cogview.generation.super_resolution import SuperResolutionPipeline, evaluate_super_resolution, upscale

        model = self._plain()
        if model is not None:
            was_training = model.training
            model.eval()
            stage = SuperResolutionPipeline(model, self.vqvae.to(self.device), self.tokenizer)
            c = self.config
            if c.grid_images:
                n = min(c.grid_images, len(self.dataset))
                items = [self.dataset[i] for i in range(n)]
                codes = torch.stack([it["codes"] for it in items])
                low = codes[:, : model.config.low_len].view(n, model.config.low_res, model.config.low_res)
                high = codes[:, model.config.low_len:].view(n, model.config.high_res, model.config.high_res)
                results = upscale(stage, low.to(self.device), seed=c.seed)
                with torch.no_grad():
                    low_px = self.vqvae.decode(low.to(self.device)).cpu()
                    bicubic = F.interpolate(low_px, scale_factor=model.config.scale, mode="bicubic",
                                            align_corners=False).clamp(0, 1)
                    truth = self.vqvae.decode(high.to(self.device)).cpu()
                from cogview.generation.images import pil_to_tensor

                sr_px = torch.stack([pil_to_tensor(r.image) for r in results])
                path = save_grid([bicubic, sr_px, truth], self.train_dir / "samples" / f"sr-{step:08d}.png")
                self.log(f"sample grid {path} (rows: bicubic of the low-res codes, SR, high-res codes)")
            if final and c.eval_images and self._is_shapes():
                report = evaluate_super_resolution(stage, {"name": "shapes", "seed": 1_000_003},
                                                   num_images=c.eval_images)
                self.evaluation = report
                self.log(f"held-out PSNR: SR {report['psnr_sr']:.2f} dB (direct only {report['psnr_direct']:.2f}), "
                         f"bicubic {report['psnr_bicubic']:.2f} dB, VQ-VAE ceiling {report['psnr_vq']:.2f} dB "
                         f"({report['num_images']} scenes)")
                (self.train_dir / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
            if was_training:
                model.train()
        barrier(self.env)

    def _is_shapes(self) -> bool:
        d = self.config.data
        return d == "shapes" or (isinstance(d, dict) and d.get("name") == "shapes")

    def export(self) -> Path:
        from cogview.pipeline import CONFIG_FILE, attach_super_resolution

        state = full_model_state_dict(self.model, self.env)
        if self.env.is_main:
            sr_state = {k[len("model."):]: v.contiguous() for k, v in state.items() if k.startswith("model.")}
            c = self.config
            self.output.mkdir(parents=True, exist_ok=True)
            names = [CONFIG_FILE] + [n for n in self.base.files if (self.base.path / n).is_file()]
            from cogview.pipeline import SR_FILE

            for name in names:
                if name == SR_FILE:
                    continue  # the base's own SR stage (if any) is replaced
                _link_or_copy(self.base.path / name, self.output / name)
            metadata = {"training": {"trainer": "super-resolution", "steps": c.steps, "batch_size": c.batch_size,
                                     "lr": c.lr, "direct_ratio": c.direct_ratio, "corrupt": c.corrupt,
                                     "caption_dropout": c.caption_dropout, "data": self.dataset.describe(),
                                     "base": str(self.base.path), "init": c.init, "seed": c.seed,
                                     "precision": c.precision}}
            if getattr(self, "evaluation", None):
                metadata["evaluation"] = self.evaluation
            attach_super_resolution(self.output, sr_state, config=self.sr.config,
                                    metadata=json.loads(json.dumps(metadata, default=str)))
        barrier(self.env)
        return self.output


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link of source at target (a copy when linking fails); config.json is always copied (it is
    rewritten when the SR stage is attached)."""
    if target.exists() or target.is_symlink():
        target.unlink()
    if source.name != "config.json":
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copyfile(source, target)


def train_super_resolution(config: SRTrainConfig | None = None, **settings) -> dict[str, Any]:
    """Train the SR stage (in this process, or this torchrun process); returns the run summary.

        train_super_resolution(output="runs/sr", base="runs/cv", steps=2000, batch_size=16)
    """
    from cogview.training.config import make_config

    if config is None:
        config = make_config(SRTrainConfig, settings)
    elif settings:
        raise TypeError("train_super_resolution: pass either a config or settings, not both")
    return SRTrainer(config).run()

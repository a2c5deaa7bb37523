"""Super-resolution with the SR stage: direct super-resolution + LoPAR refinement, upscaling images, and the
quality evaluation (PSNR against the true high-resolution image, next to bicubic).

    stage = SuperResolutionPipeline.from_pretrained(DIR)          # VQ-VAE + SR stage (+ tokenizer)
    results = stage.upscale(images, prompts="a red circle")      # PIL images / tensors of the low-res size
    results[0].image.save("big.png")
    model = CogView.from_pretrained(DIR); model.upscale(...)      # the same on a full model directory

The sampling loop (`super_resolve_codes`):
  pass 0 (direct SR): every high-res cell is [MASK]; one forward pass; every cell is predicted.
  pass k = 1..len(schedule): the cells `refinement_masks(config)[k-1]` (per tile, the schedule[k-1]
  cells of highest rank) are re-masked and re-predicted in parallel from one forward pass; every other
  cell keeps its code. (A pass draws only the cells the next one does not re-mask: the others' draws
  would never be read.) The text + low-res part is encoded once (its keys/values are reused by every pass).
Draws use `cogview.ops.sample_tokens` per image with that image's seed and offset = the pass index, so
an image's result does not depend on the batch it is in. temperature 0 is greedy (argmax).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cogview import ops
from cogview.models.super_resolution import (
    SuperResolutionTransformer,
    build_text_tokens,
    refinement_masks,
)

__all__ = [
    "SR_DEFAULTS",
    "SuperResolutionPipeline",
    "UpscaleResult",
    "super_resolve_codes",
    "low_res_pixels",
    "upscale",
    "upscale_codes",
    "upscale_results",
    "evaluate_super_resolution",
    "psnr",
]

# Sampling defaults of `upscale` / `cogview upscale` / `cogview generate --super-resolution`.
SR_DEFAULTS = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}


def _check_sampling(what: str, temperature, top_k, top_p) -> tuple[float, int, float]:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"{what}: `temperature` must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"{what}: `top_k` must be an int >= 0 (0 = off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"{what}: `top_p` must lie in [0, 1], got {top_p!r}")
    return float(temperature), int(top_k), float(top_p)


def _draw(logits: torch.Tensor, seeds: Sequence[int], offset: int, temperature: float, top_k: int,
          top_p: float) -> torch.Tensor:
    """logits [B, n, V] -> codes [B, n]; image b uses its own seed, offset = the pass index. (The op reads
    fp16/bf16 logits itself, exactly as their fp32 copies: no conversion pass over [n, V].)"""
    return torch.stack([ops.sample_tokens(logits[b], temperature=temperature, top_k=top_k, top_p=top_p,
                                          seed=int(seeds[b]), offset=int(offset)) for b in range(logits.shape[0])])


@torch.inference_mode()
def super_resolve_codes(model: SuperResolutionTransformer, low_codes: torch.Tensor,
                        text_tokens: torch.Tensor | None = None, *, schedule: Sequence[int] | None = None,
                        temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seeds=0,
                        history: list | None = None, low_pixels: torch.Tensor | None = None) -> torch.Tensor:
    """Low-res codes [B, h, w] -> high-res codes [B, H, W] (int64, on the model's device): direct SR, then
    one refinement pass per entry of `schedule` (default: the config's; () = direct SR only).

    seeds: an int (image b uses seed + b) or one int per image. history: if a list is given, it receives
    (pass index, mask [H*W] bool or None for the direct pass, codes [B, H*W] after the pass) per pass;
    cells the next pass re-masks hold [MASK] there (they are not drawn, see below).
    low_pixels: the VQ-VAE's decode of low_codes [B, C, h p, w p], for a stage with a pixel hint
    (`low_res_pixels` makes it).

    Each pass computes logits and draws only the cells it COMMITS: those it predicts minus those the next
    pass re-masks (the masks are nested, and a re-masked cell's code is never read: the next pass predicts
    it again from [MASK]). Over the 6 passes that is every cell once instead of 3 times (CogView2's
    schedule), with the same result at temperature 0 and the same distribution otherwise.
    """
    what = "super_resolve_codes"
    temperature, top_k, top_p = _check_sampling(what, temperature, top_k, top_p)
    config = model.config
    context = model.encode_context(low_codes, text_tokens, low_pixels)
    batch = context.batch_size
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds + b for b in range(batch)]
    seeds = list(seeds)
    if len(seeds) != batch or any(not isinstance(s, int) or isinstance(s, bool) for s in seeds):
        raise ValueError(f"{what}: `seeds` must be an int or {batch} ints, got {seeds!r}")
    # (pass index, the cells it predicts): the direct pass predicts every cell
    everything = torch.ones(config.high_len, dtype=torch.bool, device=model.device)
    passes = [(0, everything)] + [(k, mask) for k, mask in
                                  enumerate(refinement_masks(config, schedule).to(model.device), start=1)
                                  if bool(mask.any())]
    codes = model.masked_input(batch)
    for i, (k, predicted) in enumerate(passes):
        remasked = passes[i + 1][1] if i + 1 < len(passes) else None
        commit = predicted if remasked is None else predicted & ~remasked
        if bool(commit.any()):  # (a pass whose cells the next re-masks all would change nothing)
            hidden = model.high_res_hidden(context, codes, only=commit)
            codes = codes.clone()
            codes[:, commit] = _draw(model.logits(hidden), seeds, k, temperature, top_k, top_p)
        if history is not None:
            history.append((k, None if k == 0 else predicted.clone(), codes.clone()))
        if remasked is not None:
            codes = codes.masked_fill(remasked[None], model.mask_id)
    side = config.high_res
    return codes.view(batch, side, side)


# ---------------------------------------------------------------------------------------------
# The SR stage with its VQ-VAE (and tokenizer)
# ---------------------------------------------------------------------------------------------


@dataclass
class UpscaleResult:
    """One upscaled image: `image` (PIL, high-res), `codes` ([H, W] int64, CPU), `low_codes` ([h, w]),
    the `prompt` it was conditioned on and its `seed`."""

    image: Any = field(repr=False)
    codes: torch.Tensor
    low_codes: torch.Tensor
    prompt: str = ""
    seed: int = 0

    def save(self, path) -> None:
        self.image.save(path)


class SuperResolutionPipeline:
    """An SR stage with the VQ-VAE whose codes it maps (and the tokenizer for text, when it has a text
    part): what `cogview upscale` loads from a model directory, without the base transformer."""

    def __init__(self, super_resolution: SuperResolutionTransformer, vqvae, tokenizer=None, *, metadata=None):
        if not isinstance(super_resolution, SuperResolutionTransformer):
            raise TypeError(f"SuperResolutionPipeline: `super_resolution` must be a SuperResolutionTransformer, got "
                            f"{type(super_resolution).__name__}")
        if vqvae.config.codebook_size != super_resolution.config.transformer.image_tokens:
            raise ValueError(f"SuperResolutionPipeline: the VQ-VAE has {vqvae.config.codebook_size} codes but the SR "
                             f"stage reads {super_resolution.config.transformer.image_tokens}")
        self.super_resolution = super_resolution
        self.vqvae = vqvae
        self.tokenizer = tokenizer
        self.metadata = dict(metadata or {})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device=None, dtype=torch.float32,
                        verify: bool = True) -> "SuperResolutionPipeline":
        """The SR stage, VQ-VAE and (when the SR stage reads text) tokenizer of a model directory. dtype:
        the SR stage's weights (default float32, whatever the directory stores; None: as stored)."""
        from cogview.checkpoint import CheckpointNotFoundError
        from cogview.pipeline import load_super_resolution, load_tokenizer, load_vqvae, read_model_directory

        directory = read_model_directory(path)
        if directory.super_resolution is None:
            raise CheckpointNotFoundError(f"{directory.path} has no super-resolution stage (train one with "
                                          f"`cogview train-sr`)")
        sr = load_super_resolution(directory, device=device, dtype=dtype, verify=verify)
        vqvae = load_vqvae(directory, device=device, verify=verify)
        tokenizer = None
        if sr.config.text_positions and directory.config is not None:
            tokenizer = load_tokenizer(directory)
        return cls(sr, vqvae, tokenizer, metadata=directory.super_resolution_metadata)

    @property
    def device(self) -> torch.device:
        return self.super_resolution.device

    def eval(self) -> "SuperResolutionPipeline":
        self.super_resolution.eval()
        self.vqvae.eval()
        return self

    upscale = None  # set below (the module-level functions, as methods)
    upscale_codes = None


def _stage(model, what: str):
    """(sr transformer, vqvae, tokenizer or None) of a CogView or SuperResolutionPipeline."""
    sr = getattr(model, "super_resolution", None)
    if sr is None:
        raise ValueError(f"{what}: this model has no super-resolution stage (train one with `cogview train-sr`)")
    return sr, model.vqvae, getattr(model, "tokenizer", None)


def low_res_pixels(sr: SuperResolutionTransformer, vqvae, low_codes: torch.Tensor) -> torch.Tensor | None:
    """What a stage with a pixel hint reads besides the codes: the VQ-VAE's decode of the low-res codes,
    on the stage's device (None for a stage without one)."""
    if not sr.config.pixel_hint:
        return None
    side = sr.config.low_res
    with torch.inference_mode():
        pixels = vqvae.decode(low_codes.reshape(-1, side, side).to(vqvae.quantizer.embed.device))
    return pixels.to(sr.device)


def _texts(prompts, n: int, what: str) -> list[str]:
    if prompts is None:
        return [""] * n
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n or any(not isinstance(p, str) for p in prompts):
        raise ValueError(f"{what}: give one prompt (str) for every image, or one for all ({n} images)")
    return prompts


def _text_tokens(sr, tokenizer, texts: list[str], what: str):
    if not sr.config.text_positions:
        return None
    if tokenizer is None:
        if any(t.strip() for t in texts):
            raise ValueError(f"{what}: the SR stage reads text but no tokenizer is loaded; pass no prompt")
        return None  # [ROI1] + padding
    return build_text_tokens(tokenizer, texts, sr.config).to(sr.device)


def _low_codes(model, sr, images, what: str) -> torch.Tensor:
    """Images of the low-res size (PIL / float tensors in [0, 1]) or low-res code grids -> codes [B, h, w]."""
    from cogview.generation.images import _is_pil, pil_to_tensor

    low, down = sr.config.low_res, model.vqvae.config.downsample
    size = low * down
    if _is_pil(images) or (isinstance(images, torch.Tensor) and images.dim() in (2, 3) and
                           (images.is_floating_point() or images.dim() == 2)):
        items = [images]
    elif isinstance(images, torch.Tensor):
        items = list(images)
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        items = list(images)
    else:
        raise TypeError(f"{what}: images must be PIL images, float tensors [3, {size}, {size}] in [0, 1] or code "
                        f"grids [{low}, {low}], got {type(images).__name__}")
    if not items:
        raise ValueError(f"{what}: no images given")
    pixels, codes = [], []
    for i, item in enumerate(items):
        if _is_pil(item):
            item = pil_to_tensor(item)
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"{what}: image {i} must be a PIL image or a tensor, got {type(item).__name__}")
        if item.is_floating_point():
            if item.dim() != 3 or item.shape[0] != 3:
                raise ValueError(f"{what}: image {i} must be [3, H, W], got shape {tuple(item.shape)}")
            if tuple(item.shape[1:]) != (size, size):
                raise ValueError(f"{what}: image {i} is {item.shape[2]}x{item.shape[1]} pixels but the SR stage takes "
                                 f"{size}x{size} ({low}x{low} codes of a x{down} VQ-VAE) and makes "
                                 f"{size * sr.config.scale}x{size * sr.config.scale}; resize it first")
            pixels.append(item.float())
        else:
            if tuple(item.shape) != (low, low):
                raise ValueError(f"{what}: code grid {i} must be [{low}, {low}], got shape {tuple(item.shape)}")
            codes.append(item.long())
    if pixels and codes:
        raise ValueError(f"{what}: mix of images and code grids; pass one kind")
    if codes:
        return torch.stack(codes).to(sr.device)
    with torch.inference_mode():
        return model.vqvae.encode(torch.stack(pixels).to(model.vqvae.quantizer.embed.device)).to(sr.device)


@torch.inference_mode()
def upscale_codes(model, low_codes: torch.Tensor, prompts=None, *, schedule: Sequence[int] | None = None,
                  temperature: float = SR_DEFAULTS["temperature"], top_k: int = SR_DEFAULTS["top_k"],
                  top_p: float = SR_DEFAULTS["top_p"], seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """Low-res codes [B, h, w] -> high-res codes [B, H, W] (CPU int64). prompts: None/"" (no text), one
    str for all or one per image. Image b uses seed `seed + b`."""
    what = "upscale_codes"
    sr, vqvae, tokenizer = _stage(model, what)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{what}: `seed` must be an int, got {seed!r}")
    low_codes = low_codes.to(sr.device)
    n = low_codes.shape[0]
    texts = _texts(prompts, n, what)
    size = batch_size or (8 if sr.device.type == "cpu" else 32)
    out = []
    for i in range(0, n, size):
        text = _text_tokens(sr, tokenizer, texts[i: i + size], what)
        low = low_codes[i: i + size]
        out.append(super_resolve_codes(sr, low, text, schedule=schedule, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seeds=[seed + j for j in range(i, min(n, i + size))],
                                       low_pixels=low_res_pixels(sr, vqvae, low)).cpu())
    return torch.cat(out)


@torch.inference_mode()
def upscale(model, images, prompts=None, *, schedule: Sequence[int] | None = None,
            temperature: float = SR_DEFAULTS["temperature"], top_k: int = SR_DEFAULTS["top_k"],
            top_p: float = SR_DEFAULTS["top_p"], seed: int = 0, batch_size: int | None = None) -> list[UpscaleResult]:
    """Images of the SR stage's low-res size (PIL images, float tensors [3, h, w] in [0, 1], or low-res
    code grids) -> `UpscaleResult`s with the high-res images (scale x the side). Sizes that do not match
    the SR stage's grid are an error naming the size it takes."""
    from cogview.generation.images import tensor_to_pil

    what = "upscale"
    sr, vqvae, _ = _stage(model, what)
    low = _low_codes(model, sr, images, what)
    texts = _texts(prompts, low.shape[0], what)
    high = upscale_codes(model, low, texts, schedule=schedule, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=seed, batch_size=batch_size)
    results = []
    size = batch_size or 8
    device = vqvae.quantizer.embed.device
    for i in range(0, high.shape[0], size):
        pixels = vqvae.decode(high[i: i + size].to(device)).cpu()
        for j, image in enumerate(pixels):
            results.append(UpscaleResult(tensor_to_pil(image), high[i + j], low[i + j].cpu(), texts[i + j],
                                         seed + i + j))
    return results


SuperResolutionPipeline.upscale = upscale
SuperResolutionPipeline.upscale_codes = upscale_codes


@torch.inference_mode()
def upscale_results(model, results, *, schedule: Sequence[int] | None = None,
                    temperature: float = SR_DEFAULTS["temperature"], top_k: int = SR_DEFAULTS["top_k"],
                    top_p: float = SR_DEFAULTS["top_p"], batch_size: int | None = None) -> list:
    """`generate` results -> the same results with high-res images and codes (each conditioned on its
    prompt and drawn with its own seed, so an image's upscale does not depend on the batch)."""
    import dataclasses

    from cogview.generation.images import tensor_to_pil

    what = "upscale_results"
    sr, vqvae, tokenizer = _stage(model, what)
    if not results:
        return []
    low = torch.stack([r.codes for r in results]).to(sr.device)
    size = batch_size or (8 if sr.device.type == "cpu" else 32)
    out = []
    device = vqvae.quantizer.embed.device
    for i in range(0, len(results), size):
        chunk = results[i: i + size]
        text = _text_tokens(sr, tokenizer, [r.prompt for r in chunk], what)
        high = super_resolve_codes(sr, low[i: i + size], text, schedule=schedule, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seeds=[int(r.seed) for r in chunk],
                                   low_pixels=low_res_pixels(sr, vqvae, low[i: i + size]))
        pixels = vqvae.decode(high.to(device)).cpu()
        out += [dataclasses.replace(r, codes=h.cpu(), image=tensor_to_pil(p)) for r, h, p in zip(chunk, high, pixels)]
    return out


# ---------------------------------------------------------------------------------------------
# Quality: PSNR against the true high-resolution image, next to bicubic
# ---------------------------------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images [B, C, H, W] in [0, 1]."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


@torch.inference_mode()
def evaluate_super_resolution(model, data=None, *, num_images: int = 64, schedule: Sequence[int] | None = None,
                              seed: int = 0, batch_size: int = 16, captions: bool = False,
                              progress: bool = False) -> dict[str, Any]:
    """PSNR (dB, mean over images) of upscaled images against the TRUE high-res image, with
    temperature-0 refinement, next to a bicubic upscale of the low-res image.

    data: a `shapes` spec (dict of ShapesDataset arguments, or "shapes"); the scenes are rendered at both
    resolutions (low = the SR stage's low-res size in pixels, high = scale x that). Default: shapes with
    seed 1_000_003, whose scenes no training run with the default seed has seen. captions: condition on
    each scene's English caption (default: no text, as `cogview upscale`).

    Returns psnr_sr (direct SR + refinement), psnr_direct (direct SR only), psnr_bicubic, psnr_vq (the
    VQ-VAE's own reconstruction of the true high-res image: the ceiling of any code-level SR),
    sr_minus_bicubic, and the counts."""
    from tqdm.auto import tqdm

    from cogview.data.shapes import ShapesDataset

    what = "evaluate_super_resolution"
    sr, vqvae, tokenizer = _stage(model, what)
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"{what}: `num_images` must be an int >= 1, got {num_images!r}")
    spec = {"name": "shapes", "seed": 1_000_003} if data in (None, "shapes") else dict(data)
    if spec.pop("name", "shapes") != "shapes":
        raise ValueError(f"{what}: `data` must describe a shapes dataset (it is rendered at both resolutions)")
    spec.pop("resolution", None)
    spec.setdefault("num_samples", num_images)
    spec["num_samples"] = max(int(spec["num_samples"]), num_images)
    down = vqvae.config.downsample
    low_px, high_px = sr.config.image_sizes(down)
    low_set = ShapesDataset(resolution=low_px, language="en", **spec)
    high_set = ShapesDataset(resolution=high_px, language="en", **spec)
    device = vqvae.quantizer.embed.device
    sums = {"psnr_sr": 0.0, "psnr_direct": 0.0, "psnr_bicubic": 0.0, "psnr_vq": 0.0}
    bar = tqdm(total=num_images, disable=not progress, desc="evaluate-sr", leave=False)
    for start in range(0, num_images, batch_size):
        idx = range(start, min(num_images, start + batch_size))
        low = torch.stack([low_set[i]["image"] for i in idx])
        high = torch.stack([high_set[i]["image"] for i in idx])
        texts = [low_set[i]["captions"][0] if captions else "" for i in idx]
        low_codes = vqvae.encode(low.to(device)).to(sr.device)
        text = _text_tokens(sr, tokenizer if captions else None, texts, what)
        pixels = low_res_pixels(sr, vqvae, low_codes)
        refined = super_resolve_codes(sr, low_codes, text, schedule=schedule, temperature=0.0, seeds=seed + start,
                                      low_pixels=pixels)
        direct = super_resolve_codes(sr, low_codes, text, schedule=(), temperature=0.0, seeds=seed + start,
                                     low_pixels=pixels)
        images = {"psnr_sr": vqvae.decode(refined.to(device)).cpu(),
                  "psnr_direct": vqvae.decode(direct.to(device)).cpu(),
                  "psnr_vq": vqvae.decode(vqvae.encode(high.to(device))).cpu(),
                  "psnr_bicubic": F.interpolate(low, scale_factor=sr.config.scale, mode="bicubic",
                                                align_corners=False).clamp(0, 1)}
        for key, image in images.items():
            sums[key] += float(psnr(image, high).sum())
        bar.update(len(idx))
    bar.close()
    report = {key: value / num_images for key, value in sums.items()}
    report["sr_minus_bicubic"] = report["psnr_sr"] - report["psnr_bicubic"]
    report.update({"num_images": num_images, "low_res_px": low_px, "high_res_px": high_px,
                   "schedule": list(sr.config.schedule if schedule is None else schedule), "captions": captions,
                   "data": {"name": "shapes", **spec}})
    return report

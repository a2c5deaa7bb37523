"""Images in and out of the generator: PIL images, tensors and VQ-VAE codes, grids, files.

The API takes images as PIL images, float tensors [3, H, W] / [B, 3, H, W] in [0, 1], or integer code
tensors [h, w] / [B, h, w] (already tokenized). Sizes are checked, not silently changed: an image of
the wrong size is an error naming the size the model wants (`load_image_file(..., resize=True)` is the
explicit way to fit a photo: shorter side resized, centre crop).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "codes_from_images",
    "image_grid",
    "load_image_file",
    "pil_to_tensor",
    "tensor_to_pil",
]

def tensor_to_pil(image: torch.Tensor):
    """float [3, H, W] in [0, 1] -> RGB PIL image (rounded to 8 bits)."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def pil_to_tensor(image) -> torch.Tensor:
    """PIL image (any mode) -> float32 [3, H, W] in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def load_image_file(path: str | os.PathLike, size: int, *, resize: bool = True) -> torch.Tensor:
    """The image file at `path` as float32 [3, size, size] in [0, 1]. resize: shorter side to `size`
    (bicubic) and centre crop; without it a file of another size is an error."""
    from PIL import Image, ImageOps

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, SyntaxError) as error:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not a readable image ({error})") from None
    if resize:
        from cogview.data import resize_center_crop

        image = resize_center_crop(image, size)
    elif image.size != (size, size):
        raise ValueError(f"{path}: the image is {image.size[0]}x{image.size[1]}, the model takes {size}x{size}")
    return pil_to_tensor(image)


def _is_pil(x) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, Image.Image)


def codes_from_images(model, images, what: str) -> torch.Tensor:
    """Images (PIL, float tensors in [0, 1]) or codes (integer tensors) -> codes [B, side, side] int64
    on the model's device. One image or a sequence; a sequence must be all images or all codes."""
    side, size = model.config.code_size, model.config.image_size
    if _is_pil(images):
        items = [images]
    elif isinstance(images, torch.Tensor):
        single = 3 if images.is_floating_point() else 2  # one image [3, H, W] / one code grid [h, w]
        if images.dim() == single:
            items = [images]
        elif images.dim() == single + 1:
            items = list(images)
        else:
            raise ValueError(f"{what}: expected {'images [B, 3, H, W]' if single == 3 else 'codes [B, h, w]'} or one "
                             f"of them, got shape {tuple(images.shape)}")
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        items = list(images)
    else:
        raise TypeError(f"{what}: images must be PIL images, float tensors [3, H, W] in [0, 1] or code tensors "
                        f"[{side}, {side}], got {type(images).__name__}")
    if not items:
        raise ValueError(f"{what}: no images given")
    device = model.device
    pixels, codes = [], []
    for i, item in enumerate(items):
        if _is_pil(item):
            if item.size != (size, size):
                raise ValueError(f"{what}: image {i} is {item.size[0]}x{item.size[1]}, the model takes {size}x{size} "
                                 f"(resize it, e.g. with cogview.generation.load_image_file)")
            pixels.append(pil_to_tensor(item))
        elif isinstance(item, torch.Tensor) and item.is_floating_point():
            if item.dim() != 3 or item.shape[0] != 3:
                raise ValueError(f"{what}: image {i} must be a float tensor [3, H, W], got shape {tuple(item.shape)}")
            if tuple(item.shape[1:]) != (size, size):
                raise ValueError(f"{what}: image {i} is {item.shape[2]}x{item.shape[1]}, the model takes "
                                 f"{size}x{size}")
            pixels.append(item)
        elif isinstance(item, torch.Tensor) and item.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            if tuple(item.shape) not in ((side, side), (side * side,)):
                raise ValueError(f"{what}: code grid {i} must be [{side}, {side}], got shape {tuple(item.shape)}")
            if item.numel() and (int(item.min()) < 0 or int(item.max()) >= model.config.vqvae.codebook_size):
                raise ValueError(f"{what}: code grid {i} has codes outside [0, {model.config.vqvae.codebook_size})")
            codes.append(item.reshape(side, side).long())
        else:
            raise TypeError(f"{what}: image {i} must be a PIL image, a float tensor [3, H, W] in [0, 1] or an integer "
                            f"code tensor [{side}, {side}], got "
                            f"{item.dtype if isinstance(item, torch.Tensor) else type(item).__name__}")
    if pixels and codes:
        raise ValueError(f"{what}: mix of images and code grids; pass one kind")
    if codes:
        return torch.stack(codes).to(device)
    batch = torch.stack([p.float() for p in pixels]).to(device)
    with torch.inference_mode():
        return model.vqvae.encode(batch)


def image_grid(images: Sequence, columns: int | None = None, padding: int = 2):
    """PIL images of one size -> one PIL image, `columns` per row (default ~square), white padding."""
    from PIL import Image

    if not images:
        raise ValueError("image_grid: no images")
    width, height = images[0].size
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = Image.new("RGB", (columns * width + (columns + 1) * padding, rows * height + (rows + 1) * padding),
                     (255, 255, 255))
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid.paste(image, (padding + c * (width + padding), padding + r * (height + padding)))
    return grid

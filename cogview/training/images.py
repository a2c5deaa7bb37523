"""Image grids for reconstructions and samples."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["make_grid", "save_grid"]


def make_grid(rows: list[torch.Tensor], pad: int = 2) -> Image.Image:
    """rows: tensors [N, 3, H, W] in [0, 1] (one per grid row, the same H, W) -> one RGB image."""
    if not rows:
        raise ValueError("make_grid: no rows")
    h, w = rows[0].shape[-2:]
    cols = max(r.shape[0] for r in rows)
    canvas = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        pixels = (row.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for j in range(pixels.shape[0]):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y: y + h, x: x + w] = pixels[j]
    return Image.fromarray(canvas)


def save_grid(rows: list[torch.Tensor], path: str | os.PathLike, scale: int = 1) -> Path:
    image = make_grid(rows)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path

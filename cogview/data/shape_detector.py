"""A small colour/shape detector for `shapes` images: what a generated picture actually contains.

    found = detect_shapes(image)            # [DetectedShape(color="red", shape="circle", area=52, ...), ...]
    contains(image, "red", "circle")        # True when a red blob shaped like a circle is present

Used to measure text->image quality of models trained on the built-in `shapes` data. It works on the
palette of `cogview.data.shapes`: every pixel is assigned to its nearest palette colour (objects and
backgrounds) when it is close enough, the pixels of each object colour are split into 4-connected
blobs, and each blob large enough to matter is classified by three scale-free features of its mask:

- taper, the width of the blob's top quarter over the width of its bottom quarter: ~1 for squares and
  circles, well below 1 for an upward triangle;
- corners, the share of the bounding box that the blob covers OUTSIDE the box's inscribed ellipse: ~0.21
  for a square (still ~0.15 when a decoder rounds its corners), ~0 for a circle;
- fill, the blob's area over its bounding box's area (a circle ~pi/4, a triangle ~1/2).

A pixel counts towards a blob when the object colour covers at least half of it (edge pixels are
blends of object and background colours), so blurred edges sit where the sharp ones were.

It is deliberately simple and has no learned parts, so a score cannot be gamed by the model under test;
on true renders it is checked to be exact (tests/test_shape_detector.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cogview.data.shapes import BACKGROUNDS, COLORS

__all__ = ["DetectedShape", "detect_shapes", "contains", "classify_mask"]

_OBJECT_PALETTE = np.array([rgb for rgb, _ in COLORS.values()], dtype=np.float32)
_BACKGROUND_PALETTE = np.array([rgb for rgb, _ in BACKGROUNDS.values()], dtype=np.float32)


@dataclass(frozen=True)
class DetectedShape:
    color: str
    shape: str  # "circle", "square", "triangle", or "blob" when the mask fits none of them
    area: int  # pixels
    box: tuple[int, int, int, int]  # (top, left, bottom, right), inclusive
    fill: float
    taper: float
    corners: float


def _as_rgb_array(image) -> np.ndarray:
    """uint8-scaled float32 [H, W, 3] from a PIL image, a [3, H, W] tensor in [0, 1], or an [H, W, 3] array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"detect_shapes: `image` tensor must be [3, H, W] in [0, 1], got {tuple(image.shape)}")
        return image.detach().float().clamp(0, 1).mul(255).permute(1, 2, 0).cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"detect_shapes: `image` array must be [H, W, 3], got {array.shape}")
    return array.astype(np.float32)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an [N, 2] array of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    found = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        stack, pixels = [(r0, c0)], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < height and 0 <= cc < width and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        found.append(np.array(pixels))
    return found


def classify_mask(mask: np.ndarray) -> tuple[str, float, float, float]:
    """(shape, fill, taper, corners) of one blob's boolean mask cropped to its bounding box."""
    height, width = mask.shape
    fill = float(mask.sum()) / float(height * width)
    band = max(1, height // 4)
    top = mask[:band].sum(axis=1).max()
    bottom = mask[height - band:].sum(axis=1).max()
    taper = float(top) / float(max(bottom, 1))
    rows, cols = np.mgrid[0:height, 0:width]
    outside_ellipse = ((rows - (height - 1) / 2) / (height / 2)) ** 2 + ((cols - (width - 1) / 2) / (width / 2)) ** 2 > 1
    corners = float((mask & outside_ellipse).sum()) / float(height * width)
    if not (0.6 <= width / height <= 1.6):
        return "blob", fill, taper, corners
    if taper < 0.5 and fill < 0.75:
        return "triangle", fill, taper, corners
    if corners >= 0.1:  # a square, even with blurred corners, keeps mass outside its inscribed circle
        return "square", fill, taper, corners
    if fill >= 0.55:
        return "circle", fill, taper, corners
    return "blob", fill, taper, corners


def _background(rgb: np.ndarray) -> np.ndarray:
    """The palette background nearest to the median of the image's border pixels."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    median = np.median(border, axis=0)
    return _BACKGROUND_PALETTE[np.linalg.norm(_BACKGROUND_PALETTE - median, axis=1).argmin()]


def _coverage(rgb: np.ndarray, background: np.ndarray, max_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the object colour it shows (index into COLORS) and how much of the pixel it covers.

    An edge pixel is a blend of an object colour and the background, so each pixel is explained as
    background + alpha * (colour - background) for every object colour; the colour whose blend line
    passes closest wins, with its alpha clipped to [0, 1]. Pixels no line passes within `max_distance`
    of (noise, other content) get coverage 0. Thresholding coverage at 1/2 puts a blurred edge where
    the sharp one was, so shapes keep their corners.
    """
    direction = _OBJECT_PALETTE - background  # [C, 3]
    offset = rgb[:, :, None, :] - background  # [H, W, 1, 3]
    alpha = np.clip((offset * direction).sum(-1) / (direction * direction).sum(-1), 0.0, 1.0)  # [H, W, C]
    residual = np.linalg.norm(offset - alpha[..., None] * direction, axis=-1)
    # a pixel at the background itself fits every line with alpha 0: it covers nothing whatever wins
    best = residual.argmin(axis=-1)
    coverage = np.take_along_axis(alpha, best[..., None], axis=-1)[..., 0]
    coverage[np.take_along_axis(residual, best[..., None], axis=-1)[..., 0] > max_distance] = 0.0
    return best, coverage


def detect_shapes(image, *, min_area: int | None = None, max_distance: float = 60.0) -> list[DetectedShape]:
    """The coloured objects in a `shapes`-style image, largest first.

    min_area: smallest blob counted, in pixels (default: 0.6% of the image, 6 pixels at 32x32);
    max_distance: how far (RGB, 0..255 scale) a pixel may lie from every object-colour/background blend.
    """
    rgb = _as_rgb_array(image)
    height, width = rgb.shape[:2]
    if min_area is None:
        min_area = max(4, round(0.006 * height * width))
    colour, coverage = _coverage(rgb, _background(rgb), max_distance)
    covered = coverage >= 0.5
    found = []
    for index, name in enumerate(COLORS):
        mask = covered & (colour == index)
        if mask.sum() < min_area:
            continue
        for pixels in _components(mask):
            if len(pixels) < min_area:
                continue
            (top, left), (bottom, right) = pixels.min(axis=0), pixels.max(axis=0)
            crop = np.zeros((bottom - top + 1, right - left + 1), dtype=bool)
            crop[pixels[:, 0] - top, pixels[:, 1] - left] = True
            shape, fill, taper, corners = classify_mask(crop)
            found.append(DetectedShape(name, shape, len(pixels), (int(top), int(left), int(bottom),
                                                                            int(right)), fill, taper, corners))
    return sorted(found, key=lambda d: -d.area)


def contains(image, color: str, shape: str, **kwargs) -> bool:
    """Whether `image` holds a `color` blob classified as `shape` (see `detect_shapes` for kwargs)."""
    if color not in COLORS:
        raise ValueError(f"contains: unknown colour {color!r}; known: {list(COLORS)}")
    if shape not in ("circle", "square", "triangle"):
        raise ValueError(f"contains: unknown shape {shape!r}; known: circle, square, triangle")
    return any(d.color == color and d.shape == shape for d in detect_shapes(image, **kwargs))

"""Caption-loss evaluation over an image-caption folder.

    report = evaluate_captions(model, "data/val/")

The folder holds images (png, jpg/jpeg, webp, bmp; searched recursively) each with a same-name `.txt`
caption file (several lines = several captions of that image, each scored). This is a minimal reader
of its own (resize the shorter side + centre crop to the model's size, EXIF orientation applied); the
training data reader (cogview.data, issue 10) reads the same layout with manifests as well, and can
replace it once it is on main.

Reported: `caption_loss`, the mean negative log-likelihood per caption token in nats (CogView's
caption loss with the image ids masked out of the softmax; lower is better), its `perplexity`, and the
mean caption `score` (summed log-probability per caption, what self-reranking ranks by). Classifier-
or reference-set metrics (e.g. FID) are not computed here.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch

from cogview.generation.api import caption_log_probs
from cogview.generation.images import IMAGE_EXTENSIONS, codes_from_images, load_image_file

__all__ = ["evaluate_captions", "read_caption_folder"]


def read_caption_folder(path: str | os.PathLike) -> tuple[list[tuple[Path, list[str]]], int]:
    """[(image path, captions)] sorted by path, and the number of images without a caption file."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image-caption folder not found: {root}")
    items, missing = [], 0
    for file in sorted(root.rglob("*")):
        if not file.is_file() or file.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        text_file = file.with_suffix(".txt")
        if not text_file.is_file():
            missing += 1
            continue
        captions = [" ".join(line.split()) for line in text_file.read_text(encoding="utf-8", errors="replace")
                    .splitlines() if line.strip()]
        if captions:
            items.append((file, captions))
        else:
            missing += 1
    return items, missing


def evaluate_captions(model, data: str | os.PathLike, *, batch_size: int | None = None, limit: int | None = None,
                      progress: bool = True) -> dict:
    """Caption loss of `model` over the image-caption folder `data` (see the module docstring)."""
    from tqdm.auto import tqdm

    items, missing = read_caption_folder(data)
    if limit is not None:
        items = items[: int(limit)]
    if not items:
        raise ValueError(f"{data}: no images with a caption (.txt of the same name) found")
    size = model.config.image_size
    chunk = batch_size or 8
    total_logp, total_tokens, scores, skipped = 0.0, 0, [], 0
    with tqdm(total=len(items), disable=not progress, desc="evaluate", unit="img", leave=False) as bar:
        for i in range(0, len(items), chunk):
            pixels, texts, owners = [], [], []
            for path, captions in items[i: i + chunk]:
                try:
                    image = load_image_file(path, size, resize=True)
                except ValueError as error:
                    warnings.warn(f"skipped: {error}", RuntimeWarning, stacklevel=2)
                    skipped += 1
                    continue
                pixels.append(image)
                owners.extend([len(pixels) - 1] * len(captions))
                texts.extend(captions)
            bar.update(len(items[i: i + chunk]))
            if not pixels:
                continue
            codes = codes_from_images(model, torch.stack(pixels), "evaluate")
            sums, counts = caption_log_probs(model, codes[owners], texts, batch_size=batch_size, what="evaluate")
            total_logp += float(sums.double().sum())
            total_tokens += int(counts.sum())
            scores.extend(sums.tolist())
    loss = -total_logp / max(total_tokens, 1)
    return {"data": str(data), "images": len(items) - skipped, "captions": len(scores),
            "skipped_unreadable": skipped, "without_caption": missing, "text_tokens": total_tokens,
            "caption_loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "mean_score": sum(scores) / max(len(scores), 1)}

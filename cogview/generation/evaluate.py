"""Caption-loss evaluation over an image-caption dataset.

    report = evaluate_captions(model, "data/val/")          # or a .jsonl/.tsv manifest, "shapes", a token file

The data is read by `cogview.data.build_dataset` at the model's image size: a folder of images with
same-name `.txt` captions (several lines = several captions, each scored), a JSONL/TSV manifest, the
built-in "shapes" scenes (or a JSON spec such as '{"name": "shapes", "num_samples": 500, "split":
"holdout"}'), or a pre-tokenized token file (its codes are used as they are). Unreadable images are
skipped and counted.

Reported: `caption_loss`, the mean negative log-likelihood per caption token in nats (CogView's caption
loss with the image ids masked out of the softmax; lower is better), its `perplexity`, and the mean
caption `score` (summed log-probability per caption, what self-reranking ranks by). Classifier- or
reference-set metrics (e.g. FID) are not computed here.
"""
from __future__ import annotations

import json
import math
import os

import torch

from cogview.generation.api import caption_log_probs
from cogview.generation.images import codes_from_images

__all__ = ["evaluate_captions"]


def _dataset(model, data):
    from cogview.data import build_dataset

    if isinstance(data, torch.utils.data.Dataset):
        return data
    spec = data
    if isinstance(data, str) and data.lstrip().startswith("{"):
        try:
            spec = json.loads(data)
        except json.JSONDecodeError as error:
            raise ValueError(f"evaluate: the data spec is not valid JSON: {error}") from None
    elif isinstance(data, (str, os.PathLike)) and str(data) != "shapes" and not os.path.exists(data):
        raise FileNotFoundError(f"evaluate: no such image-caption folder, manifest or token file: {data}")
    return build_dataset(spec, resolution=model.config.image_size)


def evaluate_captions(model, data, *, batch_size: int | None = None, limit: int | None = None,
                      progress: bool = True) -> dict:
    """Caption loss of `model` over `data` (a dataset, or a spec for cogview.data.build_dataset; see the
    module docstring). limit: the first N items only."""
    from tqdm.auto import tqdm

    dataset = _dataset(model, data)
    count = len(dataset) if limit is None else min(int(limit), len(dataset))
    if count < 1:
        raise ValueError(f"evaluate: {data} holds no items")
    chunk = batch_size or 8
    side = model.config.code_size
    total_logp, total_tokens, scores, skipped, used = 0.0, 0, [], 0, 0
    with tqdm(total=count, disable=not progress, desc="evaluate", unit="img", leave=False) as bar:
        for start in range(0, count, chunk):
            images, texts, owners = [], [], []
            for index in range(start, min(start + chunk, count)):
                item = dataset[index]
                if item is None:  # unreadable image
                    skipped += 1
                    continue
                captions = [c for c in item["captions"] if c.strip()]
                if not captions:
                    continue
                images.append(item["codes"].view(side, side) if "codes" in item else item["image"])
                owners.extend([len(images) - 1] * len(captions))
                texts.extend(captions)
            bar.update(min(start + chunk, count) - start)
            if not images:
                continue
            used += len(images)
            codes = codes_from_images(model, images, "evaluate")
            sums, counts = caption_log_probs(model, codes[owners], texts, batch_size=batch_size, what="evaluate")
            total_logp += float(sums.double().sum())
            total_tokens += int(counts.sum())
            scores.extend(sums.tolist())
    if not scores:
        raise ValueError(f"evaluate: no readable captioned images in {data}")
    loss = -total_logp / max(total_tokens, 1)
    return {"data": str(data), "images": used, "captions": len(scores), "skipped_unreadable": skipped,
            "without_caption": int(getattr(dataset, "missing_captions", 0)), "text_tokens": total_tokens,
            "caption_loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "mean_score": sum(scores) / len(scores)}

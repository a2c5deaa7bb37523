"""Encode an image dataset once with a VQ-VAE into a token file (`cogview tokenize-images`)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from cogview.data.loader import DataOrder, MicroBatchSampler, SkipTally, make_loader
from cogview.data.tokens import TokenFileWriter

__all__ = ["tokenize_dataset"]


@torch.no_grad()
def tokenize_dataset(dataset, vqvae, output: str | os.PathLike, *, batch_size: int = 64, num_workers: int = 0,
                     device: str | torch.device = "cpu", dtype: torch.dtype | None = None, overwrite: bool = False,
                     progress: bool = True, log=print, vqvae_path: str | os.PathLike | None = None) -> dict:
    """Encode every image of `dataset` (items with "image" and "captions") with `vqvae.encode`, in index
    order, into the token file `output`. Items whose image is missing or unreadable are skipped and
    counted. `vqvae_path` (the VQ-VAE's model directory) is recorded in the header, so `cogview train`
    finds the VQ-VAE by itself. Returns a summary dict (items, skipped, seconds, images_per_s, path)."""
    from tqdm import tqdm

    n = len(dataset)
    vqvae = vqvae.eval().to(device)
    code = vqvae.config.image_size // vqvae.config.downsample
    source = dataset.describe() if hasattr(dataset, "describe") else {"name": type(dataset).__name__}
    writer = TokenFileWriter(output, n, (code, code), vqvae.config.codebook_size, vqvae.config.to_dict(),
                             source, overwrite=overwrite)
    num_batches = -(-n // batch_size)
    # Index order; the last batch may be short (a sampler over exactly n positions).
    sampler = MicroBatchSampler(DataOrder(n, shuffle=False), batch_size, num_steps=n // batch_size)
    batches = [sampler.micro_items(s, 0) for s in range(n // batch_size)]
    if n % batch_size:
        batches.append([(0, i) for i in range(n - n % batch_size, n)])
    loader = make_loader(dataset, batches, num_workers=num_workers)
    tally = SkipTally()
    describe = getattr(dataset, "path", None)
    start = time.perf_counter()
    bar = tqdm(total=n, desc="tokenize", unit="img", disable=not progress, dynamic_ncols=True)
    shape_checked = False
    try:
        for batch in loader:
            tally.add(batch["skipped"], describe)
            bar.update(len(batch["index"]) + len(batch["skipped"]))
            if "image" not in batch:
                continue
            images = batch["image"].to(device)
            if not shape_checked:
                if images.shape[-1] != vqvae.config.image_size or images.shape[-2] != vqvae.config.image_size:
                    raise ValueError(f"tokenize: the dataset's images are {images.shape[-2]}x{images.shape[-1]} but "
                                     f"the VQ-VAE expects {vqvae.config.image_size}x{vqvae.config.image_size}; set "
                                     f"the dataset resolution to {vqvae.config.image_size}")
                shape_checked = True
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
                codes = vqvae.encode(images)
            writer.append(codes, batch["captions"])
        seconds = time.perf_counter() - start
        writer.close(num_skipped=tally.count, skipped_examples=[str(e) for e in tally.examples],
                     vqvae_path=str(Path(vqvae_path).resolve()) if vqvae_path else None)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    summary = {"path": str(writer.path), "items": writer.count, "skipped": tally.count, "seconds": seconds,
               "images_per_s": (writer.count + tally.count) / max(seconds, 1e-9), "batches": num_batches}
    if log:
        log(f"tokenize: wrote {writer.count} items to {writer.path} ({summary['images_per_s']:.1f} images/s); "
            f"{tally.report()}")
    return summary

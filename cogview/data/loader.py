"""Deterministic data order, micro-batch sampling for any number of processes, and skip-tolerant collation.

Order. Epoch e visits the items in a permutation seeded by (seed, e) (`DataOrder`); the stream of all
epochs back to back is numbered by a global *position* (samples consumed since the start). A training
step consumes `global_batch` consecutive positions; with `accumulation` micro-batches and `world_size`
processes, micro-batch m of rank r at step s takes positions

    s * global_batch + (m * world_size + r) * micro_batch + [0, micro_batch)

so a run with the same global batch covers the same samples per step however it is split across
processes and micro-batches, and resuming from a saved position continues the stream exactly.

Items travel as (epoch, index) pairs (`EpochItems` hands the epoch to the item) so per-item random
choices (which caption, caption dropout, ...) can depend on the epoch without any shared RNG.

`collate` drops None items (missing or unreadable images) and reports them in the batch under
"skipped", for the trainer to count and report at the end.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["DataOrder", "MicroBatchSampler", "EpochItems", "collate", "SkipTally", "build_dataset",
           "make_loader"]


class DataOrder:
    """Epoch permutations of range(num_items) seeded by (seed, epoch) (identity order when shuffle=False)."""

    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True):
        if num_items < 1:
            raise ValueError(f"DataOrder: the dataset is empty (num_items={num_items})")
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.shuffle = shuffle
        self._cached: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        if self.shuffle:
            perm = np.random.Generator(np.random.PCG64([self.seed, 0x5EED, int(epoch)])).permutation(self.num_items)
        else:
            perm = np.arange(self.num_items)
        self._cached = (epoch, perm)
        return perm

    def items(self, position: int, count: int) -> list[tuple[int, int]]:
        """The (epoch, index) pairs at global positions position .. position+count-1."""
        out = []
        while count > 0:
            epoch, offset = divmod(position, self.num_items)
            take = min(count, self.num_items - offset)
            perm = self.permutation(epoch)
            out += [(epoch, int(i)) for i in perm[offset: offset + take]]
            position += take
            count -= take
        return out


class MicroBatchSampler:
    """Yields the (epoch, index) lists of this rank's micro-batches, step after step, from `start_step`
    (see the module docstring for the layout). Infinite unless `num_steps` is given."""

    def __init__(self, order: DataOrder, global_batch: int, accumulation: int = 1, rank: int = 0,
                 world_size: int = 1, start_step: int = 0, num_steps: int | None = None, base_position: int = 0):
        if global_batch % (accumulation * world_size):
            raise ValueError(f"global batch {global_batch} is not divisible by accumulation {accumulation} x "
                             f"world size {world_size}")
        self.order = order
        self.global_batch = global_batch
        self.accumulation = accumulation
        self.rank = rank
        self.world_size = world_size
        self.micro_batch = global_batch // (accumulation * world_size)
        self.start_step = start_step
        self.num_steps = num_steps
        self.base_position = base_position

    def position(self, step: int) -> int:
        """Global position of the first sample of `step`."""
        return self.base_position + step * self.global_batch

    def micro_items(self, step: int, micro: int) -> list[tuple[int, int]]:
        start = self.position(step) + (micro * self.world_size + self.rank) * self.micro_batch
        return self.order.items(start, self.micro_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            for micro in range(self.accumulation):
                yield self.micro_items(step, micro)
            step += 1


class EpochItems(torch.utils.data.Dataset):
    """Wraps a dataset so it is indexed by (epoch, index) pairs; items get an "epoch" entry."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        item = self.dataset[index]
        if item is None:
            return {"skipped": int(index)}
        item = dict(item)
        item["epoch"] = int(epoch)
        return item


def collate(items: list[dict]) -> dict:
    """Stack images / codes of the good items; list captions, indices and epochs; "skipped" lists the
    indices of items that could not be loaded."""
    good = [it for it in items if "skipped" not in it]
    batch: dict = {"skipped": [it["skipped"] for it in items if "skipped" in it],
                   "captions": [it.get("captions", []) for it in good],
                   "index": [it["index"] for it in good], "epoch": [it.get("epoch", 0) for it in good]}
    for key in ("image", "codes"):
        if good and key in good[0]:
            batch[key] = torch.stack([it[key] for it in good])
    return batch


@dataclass
class SkipTally:
    """Counts items skipped because their image was missing or unreadable."""

    count: int = 0
    examples: list = field(default_factory=list)

    def add(self, skipped: list, describe=None) -> None:
        self.count += len(skipped)
        for index in skipped:
            if len(self.examples) < 10:
                self.examples.append(describe(index) if describe else index)

    def report(self) -> str:
        if not self.count:
            return "no images skipped"
        more = f" (first: {', '.join(map(str, self.examples))})" if self.examples else ""
        return f"skipped {self.count} missing or unreadable image(s){more}"


def build_dataset(spec, resolution: int | None = None, default_seed: int = 0):
    """A dataset from a spec: "shapes" or {"name": "shapes", ...ShapesDataset arguments}; a folder or a
    .jsonl/.tsv manifest path (or {"name": "folder", "path": ..., "resolution": ...}); a token file
    directory (or {"name": "tokens", "path": ...}). `resolution` fills in a missing resolution."""
    from cogview.data.folder import ImageCaptionFolder
    from cogview.data.shapes import ShapesDataset
    from cogview.data.tokens import TokenDataset, is_token_file

    if isinstance(spec, (str, os.PathLike)):
        text = str(spec)
        if text == "shapes":
            spec = {"name": "shapes"}
        elif is_token_file(text):
            spec = {"name": "tokens", "path": text}
        else:
            spec = {"name": "folder", "path": text}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"data: expected 'shapes', a path, or a dict with a 'name', got {spec!r}")
    args = dict(spec)
    name = args.pop("name")
    if name == "shapes":
        if resolution is not None:
            args.setdefault("resolution", resolution)
        args.setdefault("seed", default_seed)
        return ShapesDataset(**args)
    if name == "folder":
        if "path" not in args:
            raise ValueError("data: a folder dataset needs a 'path'")
        return ImageCaptionFolder(args.pop("path"), resolution=args.pop("resolution", resolution or 256), **args)
    if name == "tokens":
        if "path" not in args:
            raise ValueError("data: a token dataset needs a 'path'")
        return TokenDataset(args.pop("path"), **args)
    raise ValueError(f"data: unknown dataset name {name!r}; known: shapes, folder, tokens")


def make_loader(dataset, sampler: MicroBatchSampler, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset` (wrapped in EpochItems) drawing `sampler`'s micro-batches in order."""
    # A private generator: creating the iterator draws a base seed from it, never from the global RNG
    # (which a resumed run restores and must not see consumed).
    return torch.utils.data.DataLoader(EpochItems(dataset), batch_sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers, persistent_workers=False,
                                       prefetch_factor=4 if num_workers > 0 else None,
                                       generator=torch.Generator().manual_seed(0))

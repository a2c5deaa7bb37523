"""Image-caption datasets on disk: a folder of images with same-name `.txt` captions, or a manifest.

    ImageCaptionFolder("photos/", resolution=256)          # photos/**/x.jpg + photos/**/x.txt
    ImageCaptionFolder("data/train.jsonl", resolution=256)  # {"path": "img/1.jpg", "caption": "..."} per line
    ImageCaptionFolder("data/train.tsv", resolution=256)    # path<TAB>caption per line (header optional)

Images: png, jpg/jpeg, webp (any case). A caption file may hold several captions, one per line (each
an alternative; a trainer picks one per item and epoch); a manifest's caption may be a string or a list.
Paths in a manifest are relative to the manifest's folder unless absolute.

Each image is opened with Pillow (EXIF orientation applied, converted to RGB), its shorter side resized
to `resolution` (bicubic), and centre-cropped to resolution x resolution. An image that is missing or
cannot be decoded yields None instead of an item: loaders skip it and count it (`collate_skipping`), and
the trainer reports the count at the end, so a bad file never stops an epoch. Images without a caption
file are left out when the folder is scanned and counted in `missing_captions`.
"""
from __future__ import annotations

import csv
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["IMAGE_EXTENSIONS", "ImageCaptionFolder", "load_image", "image_to_tensor", "resize_center_crop"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` (bicubic), then crop the centre square."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def load_image(path: str | os.PathLike, resolution: int) -> torch.Tensor | None:
    """The image at `path` resized and centre-cropped to [3, resolution, resolution] in [0, 1], or None
    when the file is missing or not a readable image."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. DecompressionBombWarning, truncated-file warnings
            with Image.open(io.BytesIO(data)) as image:
                if image.format == "JPEG":
                    image.draft("RGB", (resolution, resolution))  # decode at reduced size when much larger
                image = ImageOps.exif_transpose(image).convert("RGB")
        return image_to_tensor(resize_center_crop(image, resolution))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _read_caption_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def _as_captions(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [str(value).strip()]


class ImageCaptionFolder(torch.utils.data.Dataset):
    """Images with captions from a folder or a JSONL/TSV manifest (see the module docstring).

    `ds[i]` is a dict {image: float32 [3, R, R] in [0, 1], captions: list of str, index: i}, or None
    when the image is missing or unreadable. `missing_captions` counts images of a folder that have no
    caption file; `bad_manifest_lines` counts manifest lines that could not be parsed.
    """

    def __init__(self, root: str | os.PathLike, resolution: int = 256):
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"ImageCaptionFolder: `resolution` must be an int >= 1, got {resolution!r}")
        self.root = Path(root)
        self.resolution = resolution
        self.missing_captions = 0
        self.bad_manifest_lines = 0
        if self.root.is_dir():
            self.items = self._scan_folder(self.root)
        elif self.root.is_file():
            suffix = self.root.suffix.lower()
            if suffix in (".jsonl", ".json"):
                self.items = self._read_jsonl(self.root)
            elif suffix in (".tsv", ".txt", ".csv"):
                self.items = self._read_tsv(self.root)
            else:
                raise ValueError(f"ImageCaptionFolder: {self.root} is neither a folder nor a .jsonl/.tsv manifest")
        else:
            raise FileNotFoundError(f"ImageCaptionFolder: no such folder or manifest: {self.root}")
        if not self.items:
            raise ValueError(f"ImageCaptionFolder: found no captioned images in {self.root}")

    def _scan_folder(self, root: Path) -> list[tuple[str, list[str]]]:
        items = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = Path(dirpath) / name
                captions = _read_caption_file(path.with_suffix(".txt"))
                if not captions:
                    self.missing_captions += 1
                    continue
                items.append((str(path), captions))
        return items

    def _resolve(self, manifest: Path, path: str) -> str:
        p = Path(path)
        return str(p if p.is_absolute() else manifest.parent / p)

    def _read_jsonl(self, manifest: Path) -> list[tuple[str, list[str]]]:
        items = []
        with open(manifest, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    path = record.get("path", record.get("image", record.get("file")))
                    captions = _as_captions(record.get("caption", record.get("captions", record.get("text"))))
                except (json.JSONDecodeError, AttributeError):
                    self.bad_manifest_lines += 1
                    continue
                if not isinstance(path, str) or not captions:
                    self.bad_manifest_lines += 1
                    continue
                items.append((self._resolve(manifest, path), captions))
        return items

    def _read_tsv(self, manifest: Path) -> list[tuple[str, list[str]]]:
        items = []
        delimiter = "," if manifest.suffix.lower() == ".csv" else "\t"
        with open(manifest, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.reader(f, delimiter=delimiter)):
                if not row or not any(cell.strip() for cell in row):
                    continue
                if n == 0 and [c.strip().lower() for c in row[:2]] in (["path", "caption"], ["image", "caption"],
                                                                         ["path", "text"], ["image", "text"]):
                    continue  # header
                if len(row) < 2 or not row[0].strip() or not row[1].strip():
                    self.bad_manifest_lines += 1
                    continue
                items.append((self._resolve(manifest, row[0].strip()), _as_captions(row[1:])))
        return items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict | None:
        path, captions = self.items[int(index)]
        image = load_image(path, self.resolution)
        if image is None:
            return None
        return {"image": image, "captions": list(captions), "index": int(index)}

    def path(self, index: int) -> str:
        return self.items[int(index)][0]

    def captions(self, index: int) -> list[str]:
        return list(self.items[int(index)][1])

    def describe(self) -> dict:
        return {"name": "folder", "root": str(self.root), "resolution": self.resolution, "num_items": len(self.items),
                "missing_captions": self.missing_captions, "bad_manifest_lines": self.bad_manifest_lines}

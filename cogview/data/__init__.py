"""Datasets: the built-in `shapes` scenes, image-caption folders/manifests, and pre-tokenized token files.

    from cogview.data import ShapesDataset, ImageCaptionFolder, TokenDataset, build_dataset
    ds = ShapesDataset(10000, resolution=64, holdout=["red circle"])   # ds[i]: image, captions, index
    ds = build_dataset("photos/", resolution=256)                     # folder or .jsonl/.tsv manifest

Every dataset item is a dict with "captions" (a list of alternative captions) and "index", plus "image"
(float32 [3, H, W] in [0, 1]) or "codes" (int64 [h*w], token files). Folder items are None when the
image is missing or unreadable; the loaders skip and count those (see `cogview.data.loader`).
"""
from cogview.data.folder import IMAGE_EXTENSIONS, ImageCaptionFolder, image_to_tensor, load_image, resize_center_crop
from cogview.data.loader import (
    DataOrder,
    EpochItems,
    MicroBatchSampler,
    SkipTally,
    build_dataset,
    collate,
    make_loader,
)
from cogview.data.shapes import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesDataset,
    caption_scene,
    parse_pairs,
    render_scene,
)
from cogview.data.tokens import TokenDataset, TokenFileWriter, is_token_file

__all__ = [
    "ShapesDataset", "Scene", "ShapeObject", "render_scene", "caption_scene", "parse_pairs",
    "COLORS", "BACKGROUNDS", "SHAPES", "SIZES", "POSITIONS",
    "ImageCaptionFolder", "load_image", "image_to_tensor", "resize_center_crop", "IMAGE_EXTENSIONS",
    "TokenDataset", "TokenFileWriter", "is_token_file",
    "DataOrder", "MicroBatchSampler", "EpochItems", "collate", "SkipTally", "build_dataset", "make_loader",
]

"""The built-in `shapes` dataset: seeded synthetic scenes of coloured shapes with English and Chinese captions.

Each scene has one to three objects on a plain background. An object has a colour, a shape, a size
(small / large) and a position on a 3 x 3 grid (top left ... bottom right); the caption names all four
for every object and the background colour:

    en: "a large red circle in the top left and a small blue square on the right, on a gray background"
    zh: "灰色背景上，左上方有一个大的红色圆形，右边有一个小的蓝色正方形"

Scene `i` of a dataset is a pure function of (seed, split, i): it is drawn from its own
`numpy.random.Generator` seeded by those three numbers, so any index can be produced on its own, in any
order, by any worker or rank, with the same result on every machine.

Hold-out: `holdout=[("red", "circle"), ...]` names colour-shape pairs. With split="train" and
holdout_mode="scenes" (the default) no scene contains a held-out pair (neither in the picture nor in the
caption). holdout_mode="captions" holds the pairs out of the captions only: a held-out object is drawn
like any other, but its caption names its colour or its shape, never both ("a green shape", "a square");
ordinary objects are named that way too, with probability `naming_dropout` (default: attribute_dropout),
so such captions do not mark held-out pictures. A model must then bind the two words itself when a prompt names both.
split="holdout" makes every scene contain at least one held-out pair (drawn from a separate seed
stream), fully captioned, for measuring generalisation; split="all" ignores the hold-out list.

Rendering uses Pillow at `supersample` times the resolution, then a box filter down to the resolution
(anti-aliased edges). The palettes (`COLORS`, `BACKGROUNDS`) are public so detectors can use them.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = [
    "COLORS",
    "BACKGROUNDS",
    "SHAPES",
    "SIZES",
    "POSITIONS",
    "ShapeObject",
    "Scene",
    "ShapesDataset",
    "render_scene",
    "caption_scene",
    "parse_pairs",
]

# name -> (RGB, Chinese name)
COLORS: dict[str, tuple[tuple[int, int, int], str]] = {
    "red": ((220, 30, 30), "红色"),
    "green": ((40, 180, 60), "绿色"),
    "blue": ((40, 70, 225), "蓝色"),
    "yellow": ((240, 220, 40), "黄色"),
    "orange": ((245, 135, 20), "橙色"),
    "purple": ((145, 45, 195), "紫色"),
    "white": ((245, 245, 245), "白色"),
}
# Backgrounds are far from every object colour.
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], str]] = {
    "black": ((15, 15, 15), "黑色"),
    "gray": ((120, 120, 120), "灰色"),
    "brown": ((95, 60, 35), "棕色"),
}
SHAPES: dict[str, str] = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
# name -> (radius as a fraction of the image side, Chinese)
SIZES: dict[str, tuple[float, str]] = {"small": (0.105, "小"), "large": (0.19, "大")}
# 3 x 3 grid, row-major: name -> (row, col, English phrase, Chinese)
POSITIONS: dict[str, tuple[int, int, str, str]] = {
    "top left": (0, 0, "in the top left", "左上方"),
    "top": (0, 1, "at the top", "上方"),
    "top right": (0, 2, "in the top right", "右上方"),
    "left": (1, 0, "on the left", "左边"),
    "center": (1, 1, "in the center", "中间"),
    "right": (1, 2, "on the right", "右边"),
    "bottom left": (2, 0, "in the bottom left", "左下方"),
    "bottom": (2, 1, "at the bottom", "下方"),
    "bottom right": (2, 2, "in the bottom right", "右下方"),
}
LANGUAGES = ("en", "zh")
_SPLITS = {"train": 1, "holdout": 2, "all": 3}
HOLDOUT_MODES = ("scenes", "captions")
# What a caption names of an object: both colour and shape, or one of them ("a red shape", "a circle").
_NAMINGS = ("both", "color", "shape")


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    size: str
    position: str
    # centre offset from the grid cell's centre, as a fraction of the image side (jitter)
    dx: float = 0.0
    dy: float = 0.0


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str


def parse_pairs(pairs: Iterable) -> tuple[tuple[str, str], ...]:
    """Colour-shape pairs from ("red", "circle") tuples or "red circle" / "red-circle" strings, checked."""
    out = []
    for pair in pairs or ():
        if isinstance(pair, str):
            parts = pair.replace("-", " ").replace(":", " ").split()
        else:
            parts = list(pair)
        if len(parts) != 2:
            raise ValueError(f"holdout: expected a colour-shape pair like 'red circle', got {pair!r}")
        color, shape = str(parts[0]).lower(), str(parts[1]).lower()
        if color not in COLORS:
            raise ValueError(f"holdout: unknown colour {color!r}; known: {list(COLORS)}")
        if shape not in SHAPES:
            raise ValueError(f"holdout: unknown shape {shape!r}; known: {list(SHAPES)}")
        out.append((color, shape))
    return tuple(dict.fromkeys(out))


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _object_geometry(obj: ShapeObject, side: float) -> tuple[float, float, float]:
    """(cx, cy, r) in pixels of a `side`-pixel canvas; the shape stays inside the canvas."""
    row, col = POSITIONS[obj.position][:2]
    r = SIZES[obj.size][0] * side
    cx = (col + 0.5) / 3.0 * side + obj.dx * side
    cy = (row + 0.5) / 3.0 * side + obj.dy * side
    margin = r * 1.05 + 1.0
    cx = min(max(cx, margin), side - margin)
    cy = min(max(cy, margin), side - margin)
    return cx, cy, r


def render_scene(scene: Scene, resolution: int = 64, supersample: int = 2) -> Image.Image:
    """The scene as an RGB PIL image of resolution x resolution (anti-aliased by supersampling)."""
    side = resolution * max(1, int(supersample))
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background][0])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = _object_geometry(obj, side)
        fill = COLORS[obj.color][0]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape == "square":
            h = r * 0.9  # a square of about the circle's area
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif obj.shape == "triangle":
            # upward equilateral triangle whose circumradius is 1.15 r, centred on its centroid
            R = r * 1.15
            pts = [(cx, cy - R), (cx - R * 0.8660254, cy + R * 0.5), (cx + R * 0.8660254, cy + R * 0.5)]
            draw.polygon(pts, fill=fill)
        else:  # pragma: no cover - guarded by the dataclass users
            raise ValueError(f"unknown shape {obj.shape!r}")
    if side != resolution:
        image = image.reduce(side // resolution)  # box filter, exact average of ss x ss blocks
    return image


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def _join_en(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _object_words(obj: ShapeObject, naming: str, language: str) -> tuple[str, str]:
    """(colour word, shape word) of `obj` under `naming`; an unnamed one is "" / the generic noun."""
    if language == "en":
        return (obj.color if naming != "shape" else "",
                obj.shape if naming != "color" else "shape")
    return (COLORS[obj.color][1] if naming != "shape" else "",
            SHAPES[obj.shape] if naming != "color" else "图形")


def caption_scene(scene: Scene, language: str = "en", *, size: bool = True, position: bool = True,
                  background: bool = True, naming: Sequence[str] | None = None) -> str:
    """The caption of `scene` in "en" or "zh"; size/position/background=False leave that attribute out
    (for every object), e.g. `caption_scene(Scene((ShapeObject("red", "circle", "large", "center"),),
    "black"), size=False, position=False, background=False)` == "a red circle". naming: per object,
    "both" (default), "color" ("a red shape") or "shape" ("a circle")."""
    naming = ("both",) * len(scene.objects) if naming is None else tuple(naming)
    if len(naming) != len(scene.objects) or any(n not in _NAMINGS for n in naming):
        raise ValueError(f"caption_scene: `naming` must give one of {list(_NAMINGS)} per object, got {naming!r}")
    if language == "en":
        parts = []
        for obj, how in zip(scene.objects, naming):
            color, shape = _object_words(obj, how, language)
            words = [obj.size] if size else []
            words += [w for w in (color, shape) if w]
            words.insert(0, "an" if words[0][0] in "aeiou" else "a")
            if position:
                words.append(POSITIONS[obj.position][2])
            parts.append(" ".join(words))
        text = _join_en(parts)
        if background:
            text += f", on a {scene.background} background"
        return text
    if language == "zh":
        parts = []
        for obj, how in zip(scene.objects, naming):
            color, shape = _object_words(obj, how, language)
            thing = "一个" + (SIZES[obj.size][1] + "的" if size else "") + color + shape
            parts.append((POSITIONS[obj.position][3] + "有" + thing) if position else thing)
        if not background:
            return "，".join(parts) if position else "、".join(parts)
        lead = BACKGROUNDS[scene.background][1] + "背景上"
        if position:  # 黑色背景上，左上方有一个大的红色圆形，右边有一个小的蓝色正方形
            return lead + "，" + "，".join(parts)
        return lead + "有" + "、".join(parts)  # 黑色背景上有一个红色圆形、一个蓝色正方形
    raise ValueError(f"caption_scene: `language` must be one of {LANGUAGES}, got {language!r}")


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


class ShapesDataset(torch.utils.data.Dataset):
    """Seeded synthetic scenes with captions (see the module docstring).

    Args:
        num_samples: number of scenes (indices 0 .. num_samples-1).
        resolution: image side in pixels (default 64).
        seed: dataset seed; scene i depends only on (seed, split, i).
        holdout: colour-shape pairs kept out of split="train" (("red", "circle") or "red circle").
        holdout_mode: "scenes" (held-out pairs are in no picture or caption) or "captions" (in
            pictures, but no caption names both their colour and shape); see the module docstring.
        split: "train", "holdout" (every scene contains a held-out pair) or "all".
        language: "en", "zh" or "both": which captions each item carries (as `captions`, a list of
            alternatives; a trainer picks one per item and epoch).
        min_objects, max_objects: objects per scene (1..3 by default; at most 9).
        attribute_dropout: probability with which a scene's caption leaves out each of size, position
            and background (decided per scene, the same for all its objects and both languages).
        naming_dropout: with holdout_mode="captions", the probability that an ordinary object is named
            by colour or shape only (default: attribute_dropout).
        jitter: maximal random offset of an object from its grid cell's centre (fraction of the side).
        supersample: rendering oversampling factor for anti-aliasing (1 = hard edges).

    `ds[i]` is a dict: image (float32 [3, H, W] in [0, 1]), captions (list of str), index, scene.
    """

    def __init__(self, num_samples: int = 10000, resolution: int = 64, seed: int = 0, holdout: Iterable = (),
                 split: str = "train", language: str = "both", min_objects: int = 1, max_objects: int = 3,
                 attribute_dropout: float = 0.0, jitter: float = 0.04, supersample: int = 2,
                 holdout_mode: str = "scenes", naming_dropout: float | None = None):
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"ShapesDataset: `num_samples` must be an int >= 1, got {num_samples!r}")
        if not isinstance(resolution, int) or resolution < 8:
            raise ValueError(f"ShapesDataset: `resolution` must be an int >= 8, got {resolution!r}")
        if split not in _SPLITS:
            raise ValueError(f"ShapesDataset: `split` must be one of {list(_SPLITS)}, got {split!r}")
        if holdout_mode not in HOLDOUT_MODES:
            raise ValueError(f"ShapesDataset: `holdout_mode` must be one of {list(HOLDOUT_MODES)}, got {holdout_mode!r}")
        if language not in ("en", "zh", "both"):
            raise ValueError(f"ShapesDataset: `language` must be 'en', 'zh' or 'both', got {language!r}")
        if not (1 <= min_objects <= max_objects <= len(POSITIONS)):
            raise ValueError(f"ShapesDataset: need 1 <= min_objects <= max_objects <= {len(POSITIONS)}, got "
                             f"{min_objects}, {max_objects}")
        if not (0.0 <= attribute_dropout <= 1.0):
            raise ValueError(f"ShapesDataset: `attribute_dropout` must lie in [0, 1], got {attribute_dropout!r}")
        if naming_dropout is not None and not (0.0 <= naming_dropout <= 1.0):
            raise ValueError(f"ShapesDataset: `naming_dropout` must lie in [0, 1], got {naming_dropout!r}")
        if not (0.0 <= jitter <= 0.1):
            raise ValueError(f"ShapesDataset: `jitter` must lie in [0, 0.1], got {jitter!r}")
        self.num_samples = num_samples
        self.resolution = resolution
        self.seed = int(seed)
        self.holdout = parse_pairs(holdout)
        self.split = split
        self.holdout_mode = holdout_mode
        self.language = language
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.attribute_dropout = float(attribute_dropout)
        self.naming_dropout = self.attribute_dropout if naming_dropout is None else float(naming_dropout)
        self.jitter = float(jitter)
        self.supersample = int(supersample)
        pairs = [(c, s) for c in COLORS for s in SHAPES]
        held = set(self.holdout)
        hidden_in_pictures = split == "train" and holdout_mode == "scenes"
        self._allowed = [p for p in pairs if p not in held] if hidden_in_pictures else pairs
        if not self._allowed:
            raise ValueError("ShapesDataset: the hold-out list leaves no colour-shape pair for training")
        if split == "holdout" and not self.holdout:
            raise ValueError("ShapesDataset: split='holdout' needs a non-empty `holdout` list")

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64([self.seed, _SPLITS[self.split], int(index)]))

    def scene(self, index: int) -> tuple[Scene, dict[str, bool]]:
        """The scene of item `index` and which caption attributes it names (size/position/background)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"ShapesDataset: index {index} out of range [0, {self.num_samples})")
        rng = self._rng(index)
        count = int(rng.integers(self.min_objects, self.max_objects + 1))
        cells = rng.permutation(len(POSITIONS))[:count]
        position_names = list(POSITIONS)
        size_names = list(SIZES)
        objects = []
        for k in range(count):
            if self.split == "holdout" and k == 0:
                color, shape = self.holdout[int(rng.integers(len(self.holdout)))]
            else:
                color, shape = self._allowed[int(rng.integers(len(self._allowed)))]
            size = size_names[int(rng.integers(len(size_names)))]
            dx, dy = (rng.uniform(-self.jitter, self.jitter, 2) if self.jitter else (0.0, 0.0))
            objects.append(ShapeObject(color, shape, size, position_names[int(cells[k])], float(dx), float(dy)))
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        keep = rng.random(3) >= self.attribute_dropout
        attributes = {"size": bool(keep[0]), "position": bool(keep[1]), "background": bool(keep[2])}
        if self.split == "train" and self.holdout_mode == "captions":
            attributes["naming"] = self._naming(objects, rng)
        return Scene(tuple(objects), background), attributes

    def _naming(self, objects, rng: np.random.Generator) -> tuple[str, ...]:
        """Per object: a held-out pair is named by colour or shape only, others also with probability
        naming_dropout (drawn after everything else in the scene)."""
        held = set(self.holdout)
        naming = []
        for obj in objects:
            partial, which = rng.random(), _NAMINGS[1 + int(rng.integers(2))]
            naming.append(which if (obj.color, obj.shape) in held or partial < self.naming_dropout else "both")
        return tuple(naming)

    def captions(self, index: int) -> list[str]:
        scene, attributes = self.scene(index)
        languages = LANGUAGES if self.language == "both" else (self.language,)
        return [caption_scene(scene, lang, **attributes) for lang in languages]

    def image(self, index: int) -> Image.Image:
        return render_scene(self.scene(index)[0], self.resolution, self.supersample)

    def __getitem__(self, index: int) -> dict:
        scene, attributes = self.scene(int(index))
        array = np.asarray(render_scene(scene, self.resolution, self.supersample), dtype=np.uint8)
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        languages = LANGUAGES if self.language == "both" else (self.language,)
        return {"image": image, "captions": [caption_scene(scene, lang, **attributes) for lang in languages],
                "index": int(index)}

    def describe(self) -> dict:
        """The constructor arguments (for headers and logs)."""
        return {"name": "shapes", "num_samples": self.num_samples, "resolution": self.resolution, "seed": self.seed,
                "holdout": [" ".join(p) for p in self.holdout], "holdout_mode": self.holdout_mode,
                "split": self.split, "language": self.language,
                "min_objects": self.min_objects, "max_objects": self.max_objects,
                "attribute_dropout": self.attribute_dropout, "naming_dropout": self.naming_dropout,
                "jitter": self.jitter, "supersample": self.supersample}

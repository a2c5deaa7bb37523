"""The colour/shape detector that measures the default model's quality must be exact on true renders."""
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from cogview.data.shape_detector import contains, detect_shapes
from cogview.data.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Scene, ShapeObject, ShapesDataset, render_scene


@pytest.mark.parametrize("resolution", [32, 64])
def test_every_single_object_render_is_detected_exactly(resolution):
    rng = np.random.default_rng(resolution)
    for color, shape, size, background in itertools.product(COLORS, SHAPES, SIZES, BACKGROUNDS):
        position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
        dx, dy = rng.uniform(-0.04, 0.04, 2)
        image = render_scene(Scene((ShapeObject(color, shape, size, position, dx, dy),), background), resolution)
        found = detect_shapes(image)
        assert [(d.color, d.shape) for d in found] == [(color, shape)], (color, shape, size, background, found)


def test_two_object_scenes_are_mostly_detected():
    # Large objects in neighbouring cells overlap at 32x32 (the later one occludes the earlier, or two of
    # one colour merge into one blob), so this is a rate, not exactness: 188 of these 200 are clean.
    data = ShapesDataset(200, resolution=32, seed=3, min_objects=2, max_objects=2)
    hits = 0
    for index in range(len(data)):
        scene = data.scene(index)[0]
        image = data[index]["image"]
        hits += all(contains(image, o.color, o.shape) for o in scene.objects)
    assert hits >= 0.9 * len(data)


def test_input_forms_agree_and_empty_images_hold_nothing():
    scene = Scene((ShapeObject("blue", "triangle", "large", "center"),), "gray")
    pil = render_scene(scene, 32)
    array = np.asarray(pil)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255
    assert contains(pil, "blue", "triangle") and contains(array, "blue", "triangle")
    assert contains(tensor, "blue", "triangle")
    assert not contains(pil, "blue", "circle") and not contains(pil, "red", "triangle")
    assert detect_shapes(Image.new("RGB", (32, 32), BACKGROUNDS["black"][0])) == []


def test_bad_arguments_name_themselves():
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="colour"):
        contains(image, "teal", "circle")
    with pytest.raises(ValueError, match="shape"):
        contains(image, "red", "hexagon")
    with pytest.raises(ValueError, match="image"):
        detect_shapes(torch.zeros(1, 32, 32))

"""Datasets: shapes scenes and captions, hold-out, folders/manifests with bad files, token files, data order."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from cogview.data import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    DataOrder,
    ImageCaptionFolder,
    MicroBatchSampler,
    Scene,
    ShapeObject,
    ShapesDataset,
    SkipTally,
    TokenDataset,
    TokenFileWriter,
    build_dataset,
    caption_scene,
    is_token_file,
    make_loader,
    parse_pairs,
    render_scene,
)
from cogview.data.tokenize import tokenize_dataset

# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------


def test_shapes_is_deterministic_per_index_and_seed():
    a = ShapesDataset(50, seed=3)
    b = ShapesDataset(50, seed=3)
    for i in (7, 0, 49, 7):  # any order, repeated
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["captions"] == y["captions"] and x["index"] == i
    c = ShapesDataset(50, seed=4)
    assert any(a.captions(i) != c.captions(i) for i in range(10))
    item = a[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert ShapesDataset(4, resolution=32)[0]["image"].shape == (3, 32, 32)
    with pytest.raises(IndexError):
        a.scene(50)


def test_shapes_vocabulary_and_both_languages():
    assert {"red", "green", "blue", "yellow", "orange", "purple", "white"} <= set(COLORS)
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    ds = ShapesDataset(300, seed=1)
    seen_colors, seen_shapes, counts = set(), set(), set()
    for i in range(len(ds)):
        scene, attrs = ds.scene(i)
        assert all(attrs.values())  # attribute_dropout 0: everything named
        en, zh = ds.captions(i)
        counts.add(len(scene.objects))
        assert 1 <= len(scene.objects) <= 3
        assert len({o.position for o in scene.objects}) == len(scene.objects)  # one object per grid cell
        assert en.endswith(f"on a {scene.background} background")
        assert zh.startswith(BACKGROUNDS[scene.background][1] + "背景上")
        for obj in scene.objects:
            assert f"{obj.size} {obj.color} {obj.shape} {POSITIONS[obj.position][2]}" in en
            assert POSITIONS[obj.position][3] + "有一个" + SIZES[obj.size][1] + "的" + COLORS[obj.color][1] + \
                SHAPES[obj.shape] in zh
            seen_colors.add(obj.color)
            seen_shapes.add(obj.shape)
        assert not re.search(r"[a-z]", zh)
    assert seen_colors == set(COLORS) and seen_shapes == set(SHAPES) and counts == {1, 2, 3}
    assert len(ShapesDataset(5, language="en")[0]["captions"]) == 1
    assert re.search("[\u4e00-\u9fff]", ShapesDataset(5, language="zh")[0]["captions"][0])


def test_caption_attributes_can_be_left_out():
    scene = Scene((ShapeObject("orange", "circle", "large", "center"), ShapeObject("blue", "square", "small", "top")),
                  "black")
    assert caption_scene(scene, "en") == \
        "a large orange circle in the center and a small blue square at the top, on a black background"
    assert caption_scene(scene, "en", size=False, position=False, background=False) == \
        "an orange circle and a blue square"
    assert caption_scene(scene, "zh") == "黑色背景上，中间有一个大的橙色圆形，上方有一个小的蓝色正方形"
    assert caption_scene(scene, "zh", size=False, position=False) == "黑色背景上有一个橙色圆形、一个蓝色正方形"
    assert caption_scene(scene, "zh", background=False, size=False) == "中间有一个橙色圆形，上方有一个蓝色正方形"
    ds = ShapesDataset(200, attribute_dropout=0.5)
    dropped = [ds.scene(i)[1] for i in range(200)]
    for key in ("size", "position", "background"):
        assert 50 < sum(not d[key] for d in dropped) < 150


def test_rendered_colours_and_positions_match_the_scene():
    for shape in SHAPES:
        for pos in ("top left", "center", "bottom right"):
            scene = Scene((ShapeObject("red", shape, "large", pos),), "gray")
            img = np.asarray(render_scene(scene, 64), dtype=np.int32)
            mask = np.all(np.abs(img - np.array(COLORS["red"][0])) < 8, axis=-1)
            assert mask.sum() > 150  # a large shape: hundreds of pixels
            ys, xs = np.nonzero(mask)
            row, col = POSITIONS[pos][:2]
            assert int(ys.mean() // (64 / 3)) == row and int(xs.mean() // (64 / 3)) == col
            corner = img[32, 0] if pos != "center" else img[0, 0]
            assert np.abs(corner - np.array(BACKGROUNDS["gray"][0])).max() <= 1


def test_holdout_pairs_never_reach_training():
    held = parse_pairs(["red circle", ("blue", "triangle")])
    assert held == (("red", "circle"), ("blue", "triangle"))
    train = ShapesDataset(400, seed=2, holdout=held, split="train")
    for i in range(len(train)):
        scene, _ = train.scene(i)
        en, zh = train.captions(i)
        assert all((o.color, o.shape) not in held for o in scene.objects)
        assert "red circle" not in en and "blue triangle" not in en
        assert "红色圆形" not in zh and "蓝色三角形" not in zh
    test = ShapesDataset(100, seed=2, holdout=held, split="holdout")
    for i in range(len(test)):
        assert (test.scene(i)[0].objects[0].color, test.scene(i)[0].objects[0].shape) in held
    with pytest.raises(ValueError, match="unknown colour"):
        parse_pairs(["pink circle"])
    with pytest.raises(ValueError, match="holdout"):
        ShapesDataset(10, split="holdout")


def test_caption_holdout_shows_the_pairs_but_never_names_both():
    held = parse_pairs(["red circle", "green square"])
    train = ShapesDataset(600, seed=3, holdout=held, split="train", holdout_mode="captions", max_objects=2,
                          attribute_dropout=0.3)
    seen_held, partial_ordinary = 0, 0
    for i in range(len(train)):
        scene, attributes = train.scene(i)
        en, zh = train.captions(i)
        assert "red circle" not in en and "green square" not in en
        assert "红色圆形" not in zh and "绿色正方形" not in zh
        for obj, how in zip(scene.objects, attributes["naming"]):
            if (obj.color, obj.shape) in held:
                seen_held += 1
                assert how in ("color", "shape")
                word_en, word_zh = (obj.color, COLORS[obj.color][1]) if how == "color" else (obj.shape, SHAPES[obj.shape])
                assert word_en in en and word_zh in zh
            else:
                partial_ordinary += how != "both"
    assert seen_held > 60  # ~2/21 of ~900 objects
    assert partial_ordinary > 100  # ordinary objects are named partially too (~30%)
    single = Scene((ShapeObject("green", "square", "large", "center"),), "black")
    assert caption_scene(single, "en", naming=["color"], position=False) == "a large green shape, on a black background"
    assert caption_scene(single, "zh", naming=["shape"], background=False, position=False) == "一个大的正方形"
    with pytest.raises(ValueError, match="naming"):
        caption_scene(single, "en", naming=["colour"])
    with pytest.raises(ValueError, match="holdout_mode"):
        ShapesDataset(10, holdout=held, holdout_mode="pictures")
    with pytest.raises(ValueError, match="naming_dropout"):
        ShapesDataset(10, holdout=held, holdout_mode="captions", naming_dropout=1.5)
    # naming_dropout=0: only the held-out objects are named partially
    strict = ShapesDataset(200, seed=3, holdout=held, holdout_mode="captions", attribute_dropout=0.3,
                           naming_dropout=0.0)
    for i in range(len(strict)):
        scene, attributes = strict.scene(i)
        for obj, how in zip(scene.objects, attributes["naming"]):
            assert (how != "both") == ((obj.color, obj.shape) in held)
    # the measurement split still captions every object fully
    test = ShapesDataset(50, seed=3, holdout=held, split="holdout", holdout_mode="captions")
    assert all("naming" not in test.scene(i)[1] for i in range(50))


# ---------------------------------------------------------------------------------------------
# folders and manifests
# ---------------------------------------------------------------------------------------------


def _write_image(path, size, color, fmt=None):
    Image.new("RGB", size, color).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    _write_image(root / "a.png", (40, 20), (255, 0, 0))
    (root / "a.txt").write_text("a red picture\n")
    _write_image(root / "sub" / "b.jpg", (20, 30), (0, 255, 0))
    (root / "sub" / "b.txt").write_text("green one\nanother caption\n")
    _write_image(root / "c.webp", (16, 16), (0, 0, 255))
    (root / "c.txt").write_text("blue")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "broken.txt").write_text("unreadable")
    _write_image(root / "nocaption.png", (16, 16), (9, 9, 9))
    (root / "notes.md").write_text("ignored")
    return root


def test_folder_resizes_crops_and_skips_bad_images(folder):
    ds = ImageCaptionFolder(folder, resolution=16)
    assert len(ds) == 4 and ds.missing_captions == 1
    names = [p.split("/")[-1] for p, _ in ds.items]
    assert names == ["a.png", "broken.png", "c.webp", "b.jpg"]  # sorted walk, sub-folders after files
    a = ds[0]
    assert a["image"].shape == (3, 16, 16) and a["captions"] == ["a red picture"]
    assert torch.allclose(a["image"][:, 8, 8], torch.tensor([1.0, 0.0, 0.0]))
    assert ds[1] is None  # unreadable: None, never an exception
    assert ds[3]["captions"] == ["green one", "another caption"]
    # A loader over the dataset skips and counts the bad image and keeps going (two epochs).
    order = DataOrder(len(ds), seed=0)
    tally = SkipTally()
    seen = 0
    for batch in make_loader(ds, MicroBatchSampler(order, 2, num_steps=4)):
        tally.add(batch["skipped"], ds.path)
        seen += len(batch["index"])
        if "image" in batch:
            assert batch["image"].shape[1:] == (3, 16, 16)
    assert tally.count == 2 and seen == 6 and "broken.png" in tally.report()


def test_resize_center_crop_keeps_the_middle(tmp_path):
    img = Image.new("RGB", (90, 30), (0, 0, 0))
    img.paste((255, 255, 255), (30, 0, 60, 30))  # white middle third
    img.save(tmp_path / "wide.png")
    from cogview.data import load_image
    x = load_image(tmp_path / "wide.png", 12)
    assert x.shape == (3, 12, 12) and x.min() > 0.9  # only the white middle survives the crop
    assert load_image(tmp_path / "missing.png", 12) is None


def test_manifests_jsonl_and_tsv(folder, tmp_path):
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join([
        json.dumps({"path": "imgs/a.png", "caption": "red"}),
        json.dumps({"image": str(folder / "c.webp"), "captions": ["blue", "azure"]}),
        json.dumps({"path": "imgs/missing.png", "caption": "gone"}),
        "{not json",
        json.dumps({"path": "imgs/a.png"}),
    ]) + "\n")
    ds = ImageCaptionFolder(jsonl, resolution=8)
    assert len(ds) == 3 and ds.bad_manifest_lines == 2
    assert ds[0]["captions"] == ["red"] and ds[1]["captions"] == ["blue", "azure"] and ds[2] is None
    tsv = tmp_path / "m.tsv"
    tsv.write_text("path\tcaption\nimgs/a.png\tred square\nimgs/sub/b.jpg\tgreen\nonly-a-path\n")
    ds = ImageCaptionFolder(tsv, resolution=8)
    assert len(ds) == 2 and ds.bad_manifest_lines == 1 and ds[1]["captions"] == ["green"]
    assert isinstance(build_dataset(str(tsv), resolution=8), ImageCaptionFolder)
    assert isinstance(build_dataset({"name": "shapes", "num_samples": 3}, resolution=16), ShapesDataset)
    with pytest.raises(FileNotFoundError):
        ImageCaptionFolder(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# data order
# ---------------------------------------------------------------------------------------------


def test_order_is_seeded_and_covers_every_epoch():
    order = DataOrder(10, seed=5)
    items = order.items(0, 30)
    for e in range(3):
        assert sorted(i for ep, i in items if ep == e) == list(range(10))
    assert items[:10] != items[10:20]
    assert DataOrder(10, seed=5).items(7, 9) == items[7:16]
    assert DataOrder(10, seed=6).items(0, 10) != items[:10]


@pytest.mark.parametrize("accumulation,world_size", [(1, 2), (2, 1), (2, 2), (4, 1)])
def test_micro_batches_partition_the_global_batch(accumulation, world_size):
    order = DataOrder(7, seed=1)
    single = MicroBatchSampler(order, 8, num_steps=3)
    for step in range(3):
        reference = single.micro_items(step, 0)
        split = []
        for rank in range(world_size):
            sampler = MicroBatchSampler(order, 8, accumulation, rank, world_size)
            for micro in range(accumulation):
                split += sampler.micro_items(step, micro)
        assert sorted(split) == sorted(reference)
    # Resuming at a step continues the same stream.
    full = list(MicroBatchSampler(order, 8, accumulation, 0, world_size, num_steps=3))
    resumed = list(MicroBatchSampler(order, 8, accumulation, 0, world_size, start_step=1, num_steps=2))
    assert resumed == full[accumulation:]
    with pytest.raises(ValueError, match="divisible"):
        MicroBatchSampler(order, 6, 4, 0, 1)


# ---------------------------------------------------------------------------------------------
# token files and tokenize-images
# ---------------------------------------------------------------------------------------------


def test_token_file_round_trip_and_atomicity(tmp_path):
    path = tmp_path / "tok"
    with TokenFileWriter(path, 5, (2, 3), 300, {"downsample": 4}, {"name": "test"}) as w:
        w.append(torch.arange(18).view(3, 2, 3) * 16, [["a"], ["b", "bb"], ["中文"]])
        w.append(np.full((1, 6), 299), [["d"]])
    assert is_token_file(path) and not (tmp_path / "tok.tmp").exists()
    ds = TokenDataset(path)
    assert len(ds) == 4 and ds.code_shape == (2, 3) and ds.header["dtype"] == "uint16"
    assert torch.equal(ds[1]["codes"], torch.arange(6, 12) * 16) and ds[1]["codes"].dtype == torch.int64
    assert ds[2]["captions"] == ["中文"] and ds[3]["codes"].tolist() == [299] * 6
    with pytest.raises(FileExistsError):
        TokenFileWriter(path, 1, (2, 3), 300)
    with pytest.raises(ValueError, match="outside"):
        with TokenFileWriter(tmp_path / "bad", 2, (1, 1), 4) as w:
            w.append(np.array([[4]]), [["x"]])
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.tmp").exists()
    with pytest.raises(ValueError, match="not a token file"):
        TokenDataset(tmp_path)


def test_tokenize_images_matches_encode_and_skips_bad_files(folder, tmp_path):
    from cogview.models import vqvae_from_preset

    torch.manual_seed(0)
    vqvae = vqvae_from_preset("test-x4")  # 16x16 images -> 4x4 codes
    ds = ImageCaptionFolder(folder, resolution=16)
    summary = tokenize_dataset(ds, vqvae, tmp_path / "tok", batch_size=3, progress=False, log=None)
    assert summary["items"] == 3 and summary["skipped"] == 1
    tok = TokenDataset(tmp_path / "tok")
    assert tok.header["num_skipped"] == 1 and tok.header["vqvae"]["downsample"] == 4
    assert tok.header["source"]["name"] == "folder"
    good = [i for i in range(len(ds)) if ds[i] is not None]
    expected = vqvae.encode(torch.stack([ds[i]["image"] for i in good])).view(3, -1)
    assert torch.equal(torch.stack([tok[k]["codes"] for k in range(3)]), expected)
    assert [tok.captions(k) for k in range(3)] == [ds.captions(i) for i in good]
    with pytest.raises(ValueError, match="resolution"):
        tokenize_dataset(ShapesDataset(4, resolution=32), vqvae, tmp_path / "t2", progress=False, log=None)
    assert not (tmp_path / "t2").exists()

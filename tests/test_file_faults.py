"""Damaged files: a clear error that names the file, or a counted skip, never a crash or silent garbage
(issue 14). Complements the model-directory tests in test_checkpoint.py (truncated and damaged weights,
damaged config.json, a config that does not fit the weights) and test_tokenizer.py's loading errors with
exhaustive byte-level damage, damaged training checkpoints, token files and image folders."""
from __future__ import annotations

import io
import json
import random
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cogview.checkpoint import CheckpointCorruptError, CheckpointError, SafetensorsFile, save_safetensors

# ---------------------------------------------------------------------------------------------
# safetensors: every single-bit flip and every truncation
# ---------------------------------------------------------------------------------------------


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {"weight": torch.randn(3, 5, generator=gen), "steps": torch.arange(7), "half": torch.randn(2, generator=gen)
            .to(torch.bfloat16), "empty": torch.zeros(0, 4), "flag": torch.tensor([True, False])}


def _read(path):
    with SafetensorsFile(path) as f:
        return f.read_all()


def test_every_damage_to_a_safetensors_file_is_caught(tmp_path):
    """Each single-bit flip at every byte and each truncation: CheckpointError naming the file, or (a flip in
    the free-form metadata) exactly the original tensors."""
    path = tmp_path / "weights.safetensors"
    original = _tensors()
    save_safetensors(path, original, metadata={"note": "free text"})
    data = path.read_bytes()
    rng = random.Random(0)
    survived = []

    def attempt(damaged: bytes, what: str):
        path.write_bytes(damaged)
        try:
            got = _read(path)
        except CheckpointError as error:
            assert str(path) in str(error), f"{what}: the error does not name the file: {error}"
            return
        assert got.keys() == original.keys(), f"{what}: read with other tensor names {list(got)}"
        for name, tensor in original.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), f"{what}: {name} differs"
        survived.append(what)

    for position in range(len(data)):
        damaged = bytearray(data)
        damaged[position] ^= 1 << rng.randrange(8)
        if chr(data[position]) in "abcdef" and chr(damaged[position]).lower() == chr(data[position]):
            continue  # the case of a hex digit of a checksum: the same number
        attempt(bytes(damaged), f"bit flip at byte {position}")
    for length in range(len(data)):
        attempt(data[:length], f"truncated to {length} bytes")
    attempt(data + b"\0", "one byte appended")
    # Only flips inside the free-form metadata (key and text) may go unnoticed: it carries no checksum;
    # so may one in the name of the table checksum (then the tensors are still checked one by one).
    header_text = data[8:8 + int.from_bytes(data[:8], "little")].decode()
    spans = [(8 + header_text.index(text) + 1, 8 + header_text.index(text) + len(text) - 1)
             for text in ('"note":"free text"', '"cogview.header_crc32"')]
    for what in survived:
        position = int(what.split()[-1]) if what.startswith("bit flip") else -1
        assert any(lo <= position < hi for lo, hi in spans), f"{what} went unnoticed"


# ---------------------------------------------------------------------------------------------
# training checkpoints
# ---------------------------------------------------------------------------------------------

VQ = dict(model="test-x4", resolution=16, steps=4, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1,
          checkpoint_every=1, grid_images=0, progress=False, tensorboard=False, threads=1,
          data={"name": "shapes", "num_samples": 16, "resolution": 16})


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    from cogview.training import train_vqvae

    previous = torch.get_num_threads()
    out = tmp_path_factory.mktemp("faults") / "run"
    try:
        summary = train_vqvae(output=str(out), stop_at=2, **VQ)
    finally:
        torch.set_num_threads(previous)
    assert summary["step"] == 2 and not summary["finished"]
    return out


def _damage_checkpoint(folder, kind):
    if kind == "trainer_truncated":
        file = folder / "trainer.json"
        file.write_bytes(file.read_bytes()[:40])
    elif kind == "trainer_not_a_state":
        file = folder / "trainer.json"
        file.write_text("[1, 2, 3]")
    elif kind == "metadata_missing":
        file = folder / ".metadata"
        file.unlink()
    elif kind == "metadata_truncated":
        file = folder / ".metadata"
        file.write_bytes(file.read_bytes()[:50])
    elif kind == "data_truncated":
        file = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 3])
    elif kind == "rank_truncated":
        file = folder / "rank-00000.pt"
        file.write_bytes(file.read_bytes()[:100])
    else:  # pragma: no cover
        raise AssertionError(kind)
    return file


@pytest.mark.parametrize("kind", ["trainer_truncated", "trainer_not_a_state", "metadata_missing",
                                  "metadata_truncated", "data_truncated", "rank_truncated"])
def test_a_damaged_training_checkpoint_is_refused_naming_it(stopped_run, tmp_path, kind):
    from cogview.training import train_vqvae

    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    latest = run / "training" / "checkpoints" / (run / "training" / "checkpoints" / "latest").read_text().strip()
    file = _damage_checkpoint(latest, kind)
    previous = torch.get_num_threads()
    try:
        with pytest.raises(CheckpointCorruptError) as info:
            train_vqvae(output=str(run), resume="latest", **VQ)
    finally:
        torch.set_num_threads(previous)
    message = str(info.value)
    assert str(file) in message or str(latest) in message, message


def test_the_undamaged_checkpoint_resumes(stopped_run, tmp_path):
    from cogview.training import train_vqvae

    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    previous = torch.get_num_threads()
    try:
        summary = train_vqvae(output=str(run), resume="latest", **VQ)
    finally:
        torch.set_num_threads(previous)
    assert summary["finished"] and summary["steps_run"] == 2


# ---------------------------------------------------------------------------------------------
# tokenizer files
# ---------------------------------------------------------------------------------------------


def test_damaged_tokenizer_in_a_model_directory_is_refused(tmp_path):
    """The model directory records the tokenizer's sha256: any damage is caught, naming the file."""
    from _captions import tiny_text_model

    from cogview.models import CogViewConfig, presets
    from cogview.pipeline import CogView, load_tokenizer

    tiny = presets["test-tiny"]
    config = CogViewConfig(tiny.transformer.replace(text_tokens=400), tiny.vqvae, "tiny-test")
    torch.manual_seed(0)
    path = CogView.from_config(config, tiny_text_model()).save_pretrained(tmp_path / "model")
    file = path / "tokenizer.model"
    data = file.read_bytes()
    rng = random.Random(1)
    for position in sorted(rng.sample(range(len(data)), 12)) + [0, len(data) - 1]:
        damaged = bytearray(data)
        damaged[position] ^= 0x10
        file.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointError, match=re.escape(str(file))):
            load_tokenizer(path)
    for length in (0, 1, len(data) // 2, len(data) - 1):
        file.write_bytes(data[:length])
        with pytest.raises(CheckpointError, match=re.escape(str(file))):
            load_tokenizer(path)
    file.write_bytes(data)
    assert load_tokenizer(path).model_bytes == data


def test_truncated_or_garbage_standalone_tokenizer_files(tmp_path):
    """A SentencePiece file given on its own (no checksum to compare with): anything that does not parse
    is a CheckpointCorruptError naming the file."""
    from _captions import tiny_text_model

    from cogview.tokenizer import CogViewTokenizer

    data = tiny_text_model()
    file = tmp_path / "text.model"
    outcomes = {"error": 0, "loaded": 0}
    for length in [0, 1, 2, 7, 64] + list(range(100, len(data), max(1, len(data) // 40))):
        file.write_bytes(data[:length])
        try:
            tok = CogViewTokenizer.from_file(file)
        except CheckpointCorruptError as error:
            assert str(file) in str(error)
            outcomes["error"] += 1
            continue
        # Protobuf can end at a field boundary: then it is a smaller but well-formed model.
        assert tok.encode_text("a red circle") is not None
        outcomes["loaded"] += 1
    file.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointCorruptError, match=re.escape(str(file))):
        CogViewTokenizer.from_file(file)
    assert outcomes["error"] >= 1


# ---------------------------------------------------------------------------------------------
# token files
# ---------------------------------------------------------------------------------------------


def _token_file(path):
    from cogview.data.tokens import TokenFileWriter

    with TokenFileWriter(path, 3, (2, 2), 16, {"downsample": 4}, {"name": "test"}) as w:
        w.append(np.arange(12).reshape(3, 4), [["a"], ["b"], ["c"]])
    return path


@pytest.mark.parametrize("kind", ["codes_truncated", "codes_missing", "codes_out_of_range", "captions_not_json",
                                  "captions_short", "captions_not_utf8", "header_missing_field", "header_not_json"])
def test_damaged_token_files_name_the_file(tmp_path, kind):
    from cogview.data.tokens import TokenDataset

    path = _token_file(tmp_path / "tok")
    codes, captions, header = path / "codes.bin", path / "captions.jsonl", path / "header.json"
    if kind == "codes_truncated":
        codes.write_bytes(codes.read_bytes()[:-1])
        damaged = codes
    elif kind == "codes_missing":
        codes.unlink()
        damaged = codes
    elif kind == "codes_out_of_range":
        raw = bytearray(codes.read_bytes())
        raw[4:6] = (40000).to_bytes(2, "little")  # item 1's first code (uint16)
        codes.write_bytes(bytes(raw))
        damaged = codes
    elif kind == "captions_not_json":
        captions.write_text('["a"]\n{broken\n["c"]\n')
        damaged = captions
    elif kind == "captions_short":
        captions.write_text('["a"]\n["b"]\n')
        damaged = captions
    elif kind == "captions_not_utf8":
        captions.write_bytes(b'["a"]\n["\xff\xfe"]\n["c"]\n')
        damaged = captions
    elif kind == "header_missing_field":
        content = json.loads(header.read_text())
        del content["code_shape"]
        header.write_text(json.dumps(content))
        damaged = header
    else:
        header.write_text("{not json")
        damaged = path
    with pytest.raises(ValueError) as info:
        ds = TokenDataset(path)
        [ds[i] for i in range(len(ds))]
    assert str(damaged) in str(info.value), info.value


# ---------------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------------


def _png(color=(200, 30, 30), size=(20, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 240)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_every_kind_of_broken_image_is_a_counted_skip(tmp_path):
    from cogview.data import ImageCaptionFolder
    from cogview.data.loader import DataOrder, MicroBatchSampler, SkipTally, make_loader

    root = tmp_path / "images"
    root.mkdir()
    good = {"good1.png": _png(), "good2.jpg": _jpeg()}
    broken = {
        "empty.png": b"",
        "header_only.png": _png()[:8],
        "truncated.png": _png()[: len(_png()) // 2],
        "truncated.jpg": _jpeg()[: len(_jpeg()) // 3],
        "text.jpg": b"this is not an image at all",
        "garbage.webp": bytes(range(256)) * 4,
        "wrong_extension.png": _jpeg()[:40],
    }
    for name, data in {**good, **broken}.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_bytes(b"caption \xff\xfe of " + name.encode())  # not UTF-8
    (root / "a_folder.png").mkdir()  # a directory with an image name
    ds = ImageCaptionFolder(root, resolution=16)
    names = [p.split("/")[-1] for p, _ in ds.items]
    assert set(good) <= set(names)
    readable = {name for i, name in enumerate(names) if ds[i] is not None}
    assert readable == set(good), readable
    assert all(isinstance(c, str) for i in range(len(ds)) for c in ds.captions(i))
    tally = SkipTally()
    seen = 0
    order = DataOrder(len(ds), seed=0)
    for batch in make_loader(ds, MicroBatchSampler(order, 3, num_steps=len(ds))):
        tally.add(batch["skipped"], ds.path)
        seen += len(batch["index"])
        if "image" in batch:
            assert batch["image"].shape[1:] == (3, 16, 16) and torch.isfinite(batch["image"]).all()
    bad_in_folder = len(names) - len(good)
    assert tally.count == 3 * bad_in_folder and seen == 3 * len(good)
    assert any(name in tally.report() for name in broken)

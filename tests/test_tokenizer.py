"""The unified vocabulary: CogView's id layout, SentencePiece training/loading, text round trips, the
empty/over-long text rules, the sequence layouts, and the `cogview tokenizer` CLI."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cogview.checkpoint import CheckpointCorruptError, CheckpointNotFoundError
from cogview.cli import main as cli_main
from cogview.models import COGVIEW_COMMAND_TOKENS, presets
from cogview.tokenizer import (
    CAPTION_END,
    CogViewTokenizer,
    TextTruncatedWarning,
    collate,
    train_text_model,
)
from tests._captions import synthetic_captions, tiny_text_model


def small(**kwargs) -> CogViewTokenizer:
    kwargs.setdefault("image_tokens", 64)
    return CogViewTokenizer(tiny_text_model(), **kwargs)


def cogview_sized() -> CogViewTokenizer:
    """CogView's sizes (8192 image codes, 50000 text ids, its positions and codes per image) over the
    tiny text model."""
    return CogViewTokenizer.for_config(tiny_text_model(), presets["cogview-4b"])


# ---------------------------------------------------------------------------------------------
# Id layout
# ---------------------------------------------------------------------------------------------


def test_cogview_command_ids_are_exactly_the_originals():
    tok = cogview_sized()
    expected = {"[PAD]": 58192, "[BOI1]": 58193, "[BOI2]": 58194, "[BOI3]": 58195, "[EOI1]": 58196,
                "[EOI2]": 58197, "[EOI3]": 58198, "[ROI1]": 58199, "[ROI2]": 58200, "[ROI3]": 58201,
                "[SEP]": 58202, "[MASK]": 58203, "[CLS]": 58204, "[ENC]": 58205, "[TINY]": 58206,
                "[SMALL]": 58207, "[BASE]": 58208, "[BIG]": 58209}
    expected.update({f"[POS{i}]": 58210 + i for i in range(9)})
    assert {name: tok[name] for name in expected} == expected
    assert tok.pad_id == 58192 and tok.vocab_size == 58219
    assert tok.text_offset == 8192 and tok.command_offset == 58192
    assert list(tok.command_tokens) == list(COGVIEW_COMMAND_TOKENS)
    config = presets["cogview-4b"].transformer
    assert all(tok[name] == config.command_id(name) for name in COGVIEW_COMMAND_TOKENS)
    assert (tok.image_len, tok.max_len) == (1024, 1089)
    with pytest.raises(KeyError, match="unknown command token"):
        tok["[BOI9]"]


def test_text_ids_are_piece_ids_offset_by_the_image_codes():
    tok = small(text_tokens=500)
    text = "a red circle on the left"
    pieces = tok.processor.encode(text)
    assert tok.encode_text(text) == [64 + p for p in pieces]
    ids = torch.tensor(tok.encode_text(text))
    assert bool(tok.is_text(ids).all()) and not bool(tok.is_image(ids).any())
    assert tok.id_range("image") == range(0, 64)
    assert tok.id_range("text") == range(64, 564)
    assert tok.id_range("command") == range(564, 564 + 27)
    assert tok.kind_of(63) == "image" and tok.kind_of(64) == "text" and tok.kind_of(564) == "command"
    assert tok.kind_of(564 + 27) == "unused"


def test_allowed_mask_selects_kinds_and_never_padding_rows():
    tok = small(text_tokens=500)
    mask = tok.allowed_mask("image", vocab_rows=600)
    assert mask.shape == (600,) and int(mask.sum()) == 64 and bool(mask[:64].all())
    mask = tok.allowed_mask(["text"], vocab_rows=600, extra=[CAPTION_END])
    assert int(mask.sum()) == 501 and bool(mask[tok[CAPTION_END]]) and not bool(mask[tok.pad_id])
    assert not bool(tok.allowed_mask(["image", "text", "command"], vocab_rows=600)[tok.vocab_size:].any())
    with pytest.raises(ValueError, match="smaller than the vocabulary"):
        tok.allowed_mask("image", vocab_rows=10)


def test_text_tokens_must_cover_the_text_model():
    pieces = small().num_pieces
    assert small().text_tokens == pieces
    with pytest.raises(ValueError, match="text_tokens"):
        small(text_tokens=pieces - 1)
    with pytest.raises(ValueError, match="command_tokens"):
        small(command_tokens=("[PAD]", "[PAD]"))
    with pytest.raises(ValueError, match="lacks"):
        small(command_tokens=("[PAD]", "[BOI1]"))


# ---------------------------------------------------------------------------------------------
# Text round trips and rules
# ---------------------------------------------------------------------------------------------

ROUND_TRIP = [
    "a small red circle on the left, a blue background.",
    "一个红色的圆形在左边，背景是蓝色。",
    "一个red circle在右边, and a 绿色三角形!",
    # characters never seen in training: byte fallback carries them
    "Ünïcödé façade, naïve — «quotes» 😀 猫と犬 Кошка",
    "tab\tand\nnewline",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(text):
    tok = small()
    ids = tok.encode_text(text)
    assert tok.decode_text(ids) == text
    assert tok.processor.unk_id() + 64 not in ids


def test_unseen_characters_use_byte_pieces_not_unk():
    tok = small()
    pieces = tok.text_pieces("😀")
    assert pieces[0] == "\u2581"  # SentencePiece's word-start marker, then the 4 UTF-8 bytes
    assert pieces[1:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tok.processor.unk_id() + 64 not in tok.encode_text("😀")


def test_spaces_collapse_and_ends_are_stripped():
    tok = small()
    assert tok.decode_text(tok.encode_text("  a   red  circle ")) == "a red circle"


@given(st.text(alphabet=st.sampled_from(list("abcxyz ABC,.!?红色圆形三角在左边，。😀é-'") + [" "]), max_size=40))
def test_round_trip_property(text):
    tok = small()
    assert tok.decode_text(tok.encode_text(text)) == " ".join(text.split())


def test_empty_and_whitespace_text_encode_to_nothing():
    tok = small()
    assert tok.encode_text("") == [] and tok.encode_text("   ") == []
    assert tok.decode_text([]) == ""
    with pytest.raises(TypeError):
        tok.encode_text(None)


def test_truncation_keeps_the_first_tokens_and_warns():
    tok = small()
    text = " ".join(synthetic_captions(12))
    full = tok.encode_text(text)
    assert len(full) > 20
    with pytest.warns(TextTruncatedWarning, match=f"truncated to its first 20"):
        cut = tok.encode_text(text, 20)
    assert cut == full[:20]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tok.encode_text(text, len(full)) == full  # exactly at the budget: no warning
        assert tok.encode_text(text, 5, warn=False) == full[:5]


def test_decode_skips_or_rejects_non_text_ids():
    tok = small()
    ids = tok.encode_text("a red circle")
    mixed = [3, tok["[ROI1]"], *ids, tok["[BASE]"], 7]
    assert tok.decode_text(mixed) == "a red circle"
    with pytest.raises(ValueError, match="not a text piece"):
        tok.decode_text(mixed, skip_special=False)
    text = tok.describe(mixed[:2] + ids + [tok["[BASE]"], tok["[BOI1]"]] + [5] * 16 + [tok["[EOI1]"]])
    assert text == "<1 image codes> [ROI1] 'a red circle' [BASE] [BOI1] <16 image codes> [EOI1]"


# ---------------------------------------------------------------------------------------------
# Training and loading models
# ---------------------------------------------------------------------------------------------


def test_training_is_deterministic_and_bounded_by_vocab_size():
    captions = synthetic_captions(120, seed=3)
    a = train_text_model(captions, 350)
    b = train_text_model(captions, 350)
    assert a == b
    assert CogViewTokenizer(a, image_tokens=0).num_pieces <= 350
    tok = CogViewTokenizer(a, image_tokens=0)
    assert [tok.processor.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]


def test_training_errors_are_clear():
    with pytest.raises(ValueError, match="too small"):
        train_text_model(synthetic_captions(60), 50)
    with pytest.raises(ValueError, match="no non-empty captions"):
        train_text_model(["", "   "], 300)
    with pytest.raises(TypeError, match="not one string"):
        train_text_model("a caption", 300)


def test_save_and_load_model_file(tmp_path):
    tok = small(text_tokens=450)
    path = tmp_path / "sub" / "tokenizer.model"
    tok.save(path)
    again = CogViewTokenizer.from_file(path, image_tokens=64, text_tokens=450)
    assert again == tok
    assert again.encode_text(ROUND_TRIP[2]) == tok.encode_text(ROUND_TRIP[2])
    assert not [p for p in path.parent.iterdir() if p.name != "tokenizer.model"]  # no temp files left


def test_loading_errors(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        CogViewTokenizer.from_file(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00\x01 not a sentencepiece model")
    with pytest.raises(CheckpointCorruptError, match="not a valid SentencePiece model"):
        CogViewTokenizer.from_file(bad)
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(tiny_text_model()[: len(tiny_text_model()) // 2])
    with pytest.raises(CheckpointCorruptError):
        CogViewTokenizer.from_file(truncated)


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


def test_text_to_image_layout():
    tok = small(image_len=16, max_len=40)
    codes = torch.arange(16).view(4, 4)
    text = tok.encode_text("a red circle")
    x = tok.text_to_image("a red circle", codes)
    expected = [tok["[ROI1]"], *text, tok["[BASE]"], tok["[BOI1]"], *range(16), tok["[EOI1]"]]
    assert x.tokens.tolist() == expected
    assert x.position_ids.tolist() == list(range(len(expected)))
    assert x.text_span == (1, 1 + len(text)) and x.image_span == (3 + len(text), 19 + len(text))
    assert x.text_mask.nonzero().flatten().tolist() == list(range(*x.text_span))
    assert x.image_mask.nonzero().flatten().tolist() == list(range(*x.image_span))
    assert x.complete and x.prompt_len == len(x) and x.text_budget == 40 - 16 - 4
    prompt = tok.text_to_image("a red circle")
    assert not prompt.complete and prompt.prompt_len == 3 + len(text)
    assert prompt.tokens[: prompt.prompt_len].tolist() == expected[: prompt.prompt_len]
    assert prompt.tokens[prompt.image_mask].eq(tok["[MASK]"]).all() and len(prompt) == len(x)
    with pytest.raises(ValueError, match="placeholder"):
        prompt.loss_weights()


def test_text_to_image_empty_text_and_budget():
    tok = cogview_sized()
    x = tok.text_to_image("", torch.zeros(1024, dtype=torch.long))
    assert x.tokens[:3].tolist() == [tok["[ROI1]"], tok["[BASE]"], tok["[BOI1]"]] and x.num_text_tokens == 0
    assert len(x) == 1024 + 4
    long_text = " ".join(synthetic_captions(30))
    with pytest.warns(TextTruncatedWarning):
        x = tok.text_to_image(long_text, torch.zeros(1024, dtype=torch.long))
    assert x.text_budget == 61 == presets["cogview-4b"].max_text_len and x.num_text_tokens == 61
    assert len(x) == 1089  # fills the position table exactly


def test_code_validation():
    tok = small(image_len=16)
    with pytest.raises(ValueError, match=r"in \[0, 64\)"):
        tok.text_to_image("x", torch.full((16,), 64))
    with pytest.raises(ValueError, match="expected 16 image codes"):
        tok.text_to_image("x", torch.zeros(15, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        tok.image_to_text(torch.zeros(16))
    with pytest.raises(ValueError, match="codes per image unknown"):
        small().text_to_image("x")


def test_image_to_text_and_caption_scoring():
    tok = small(image_len=16, max_len=40)
    codes = torch.arange(16)
    text = tok.encode_text("一个红色的圆形")
    prompt = tok.image_to_text(codes)
    head = [tok["[BASE]"], tok["[BOI1]"], *range(16), tok["[EOI1]"], tok["[ROI1]"]]
    assert prompt.tokens.tolist() == head and prompt.prompt_len == len(head)
    assert prompt.text_span == (len(head), len(head)) and prompt.text_budget == 40 - 16 - 3
    x = tok.caption_scoring(codes, "一个红色的圆形")
    assert x.kind == "caption_scoring" and x.tokens.tolist() == head + text
    assert x.text_mask.nonzero().flatten().tolist() == list(range(len(head), len(head) + len(text)))
    ended = tok.image_to_text(codes, "一个红色的圆形", end=True)
    assert ended.tokens.tolist() == head + text + [tok[CAPTION_END]] and ended.text_budget == 40 - 16 - 4


def test_super_resolution_layout_restarts_positions_at_roi2():
    tok = small(max_len=80)
    low, high = torch.arange(16), torch.arange(64) % 64
    text = tok.encode_text("a red circle")
    x = tok.super_resolution("a red circle", low, high, window=3)
    first = [tok["[ROI1]"], *text, tok["[BASE]"], tok["[BOI1]"], *range(16), tok["[EOI1]"]]
    second = [tok["[ROI2]"], tok["[POS3]"], tok["[BASE]"], tok["[BOI2]"], *high.tolist()]
    assert x.tokens.tolist() == first + second
    assert x.position_ids.tolist() == list(range(len(first))) + list(range(len(second)))
    assert x.context_image_span == (3 + len(text), 19 + len(text))
    assert x.image_span == (len(first) + 4, len(first) + 4 + 64)
    assert int(x.image_mask.sum()) == 80
    prompt = tok.super_resolution("a red circle", low)
    assert prompt.prompt_len == len(first) + 4 and len(prompt) == len(x) and not prompt.complete
    with pytest.raises(ValueError, match="POS"):
        tok.super_resolution("x", low, window=9)
    with pytest.raises(ValueError, match="exceeds 80 positions"):
        tok.super_resolution("x", low, high_res_len=100)


def test_collate_pads_and_weights_the_loss():
    tok = small(image_len=4)
    a = tok.text_to_image("a red circle on the left", torch.arange(4))
    b = tok.text_to_image("", torch.arange(4))
    c = tok.image_to_text(torch.arange(4), "a blue square")
    batch = collate([a, b, c], tok.pad_id)
    length = max(len(a), len(b), len(c))
    assert batch.tokens.shape == (3, length)
    assert batch.tokens[1, len(b):].eq(tok.pad_id).all() and batch.position_ids[1, len(b):].eq(0).all()
    assert batch.valid.sum(1).tolist() == [len(a), len(b), len(c)] == batch.lengths.tolist()
    weights = batch.loss_weights(text_loss_scale=5.0)
    assert weights[:, 0].eq(0).all() and weights[1, len(b):].eq(0).all()
    assert weights[0][a.text_mask].eq(5.0).all() and weights[0, 1:len(a)][~a.text_mask[1:]].eq(1.0).all()
    assert tok.collate([a], pad_to=length + 3).tokens.shape == (1, length + 3)
    with pytest.raises(ValueError, match="shorter"):
        collate([a], tok.pad_id, pad_to=2)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_tokenizer_train_encode_decode(tmp_path, capsys):
    captions = synthetic_captions(150, seed=5)
    (tmp_path / "captions.txt").write_text("\n".join(captions[:50]) + "\n", encoding="utf-8")
    with open(tmp_path / "captions.jsonl", "w", encoding="utf-8") as f:
        for c in captions[50:100]:
            f.write(json.dumps({"caption": c}, ensure_ascii=False) + "\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, c in enumerate(captions[100:]):
        (folder / f"{i:03d}.txt").write_text(c, encoding="utf-8")
    out = tmp_path / "tok.model"
    code = cli_main(["tokenizer", "train", "--input", str(tmp_path / "captions.txt"), str(tmp_path / "captions.jsonl"),
                     str(folder), "--vocab-size", "380", "--out", str(out)])
    assert code == 0 and out.is_file()
    assert "on 150 captions" in capsys.readouterr().out
    assert out.read_bytes() == train_text_model(captions, 380)  # same captions, same model

    tok = CogViewTokenizer.from_file(out, image_tokens=8192)
    assert cli_main(["tokenizer", "encode", "--model", str(out), "一个red circle"]) == 0
    printed = capsys.readouterr().out.split()
    assert [int(i) for i in printed] == tok.encode_text("一个red circle")
    assert cli_main(["tokenizer", "decode", "--model", str(out), *printed]) == 0
    assert capsys.readouterr().out.strip() == "一个red circle"


def test_cli_reports_errors(tmp_path, capsys):
    assert cli_main(["tokenizer", "train", "--input", str(tmp_path / "nope.txt"), "--vocab-size", "300",
                     "--out", str(tmp_path / "x.model")]) == 1
    assert "not found" in capsys.readouterr().err


def test_large_caption_sets_are_subsampled_deterministically():
    captions = synthetic_captions(400, seed=9)
    a = train_text_model(captions, 350, max_sentences=150, seed=1)
    assert a == train_text_model(captions, 350, max_sentences=150, seed=1)
    assert a != train_text_model(captions, 350)  # all 400 captions give another model


def test_tokenizer_pickles_for_data_loader_workers():
    import pickle

    tok = small(text_tokens=450, image_len=16, max_len=40)
    again = pickle.loads(pickle.dumps(tok))
    assert again == tok and (again.image_len, again.max_len) == (16, 40)
    assert again.encode_text(ROUND_TRIP[1]) == tok.encode_text(ROUND_TRIP[1])

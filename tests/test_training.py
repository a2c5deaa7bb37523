"""Trainers: schedules, configs, VQ-VAE and transformer runs, CogView's loss, exact resume, fine-tuning, CLI."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cogview.data import ShapesDataset, TokenDataset
from cogview.data.tokenize import tokenize_dataset
from cogview.models import vqvae_from_preset
from cogview.training import (
    TransformerTrainConfig,
    VQVAETrainConfig,
    lr_multiplier,
    make_config,
    train_transformer,
    train_vqvae,
)
from cogview.training.config import add_config_arguments, config_from_args
from cogview.training.transformer_trainer import TransformerLoss, build_sequences

TINY_DATA = {"name": "shapes", "num_samples": 64, "resolution": 16}
QUIET = dict(progress=False, tensorboard=False, threads=1)


@pytest.fixture(autouse=True, scope="module")
def _threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def _vq_settings(**kw):
    base = dict(data=TINY_DATA, model="test-x4", resolution=16, steps=8, batch_size=8, lr=3e-3, warmup_steps=2,
                log_every=2, checkpoint_every=0, grid_images=4, **QUIET)
    base.update(kw)
    return base


def _tf_settings(tokens, **kw):
    base = dict(data=str(tokens), model="test-tiny", steps=6, batch_size=8, lr=2e-3, warmup_steps=2, log_every=1,
                checkpoint_every=0, model_overrides={"text_tokens": 400, "max_positions": 80}, text_vocab_size=400,
                caption_ratio=0.4, caption_dropout=0.2, **QUIET)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def vqvae_dir(workdir):
    out = workdir / "vq"
    train_vqvae(output=str(out), **_vq_settings())
    return out


@pytest.fixture(scope="module")
def tokens(workdir, vqvae_dir):
    from cogview.pipeline import load_vqvae

    path = workdir / "tokens"
    tokenize_dataset(ShapesDataset(48, resolution=16), load_vqvae(vqvae_dir), path, batch_size=16, progress=False,
                     log=None, vqvae_path=vqvae_dir)
    return path


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "training" / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# schedule and configuration
# ---------------------------------------------------------------------------------------------


def test_warmup_then_cosine():
    values = [lr_multiplier(s, 10, 110, 0.1) for s in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(values[:9], values[1:10]))
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5)
    assert values[110] == pytest.approx(0.1) and min(values) >= 0.1 - 1e-12
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_config_file_then_flags(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TransformerTrainConfig)
    (tmp_path / "c.yaml").write_text("steps: 50\nbatch-size: 4\nmodel_overrides: {num_layers: 1}\n"
                                     "data: {name: shapes, num_samples: 10}\nsample_prompts: [a, b]\n")
    args = parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--batch-size", "8", "--precision", "bf16",
                              "--no-caption-end", "--resume"])
    config = config_from_args(TransformerTrainConfig, args)
    assert (config.steps, config.batch_size, config.precision, config.caption_end) == (50, 8, "bf16", False)
    assert config.model_overrides == {"num_layers": 1} and config.data == {"name": "shapes", "num_samples": 10}
    assert config.resume == "latest" and config.sample_prompts == ["a", "b"] and config.lr == 3e-4
    (tmp_path / "c.json").write_text(json.dumps({"steps": 7, "data": "shapes"}))
    config = config_from_args(TransformerTrainConfig, parser.parse_args(["-c", str(tmp_path / "c.json")]))
    assert config.steps == 7 and config.data == "shapes"
    with pytest.raises(ValueError, match="unknown setting"):
        make_config(VQVAETrainConfig, {"stepz": 3})
    with pytest.raises(ValueError, match="caption-ratio"):
        make_config(TransformerTrainConfig, {"caption_ratio": 2.0})
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "fp8"])


# ---------------------------------------------------------------------------------------------
# VQ-VAE
# ---------------------------------------------------------------------------------------------


def test_vqvae_run_writes_a_model_metrics_and_grids(vqvae_dir):
    from cogview.pipeline import load_vqvae, read_model_directory

    vqvae = load_vqvae(vqvae_dir)
    assert vqvae.config.image_size == 16 and read_model_directory(vqvae_dir).config is None
    assert read_model_directory(vqvae_dir).metadata["training"]["trainer"] == "vqvae"
    records = _metrics(vqvae_dir)
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    for key in ("loss", "recon", "commitment", "psnr", "codebook_usage", "codebook_perplexity", "img_per_s"):
        assert all(math.isfinite(r[key]) for r in records), key
    assert 0 < records[-1]["codebook_usage"] <= 1 and 1 <= records[-1]["codebook_perplexity"] <= 32
    grid = Image.open(vqvae_dir / "training" / "samples" / "recon-00000008.png")
    assert grid.size[0] > grid.size[1] > 0
    summary = json.loads((vqvae_dir / "training" / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == 8 and summary["skipped"] == 0


def test_vqvae_learns_and_l1_runs(tmp_path):
    summary = train_vqvae(output=str(tmp_path / "a"), **_vq_settings(steps=30, lr=5e-3, log_every=10, grid_images=0))
    records = _metrics(tmp_path / "a")
    assert records[-1]["recon"] < 0.7 * records[0]["recon"]
    assert summary["loss"] == pytest.approx(records[-1]["loss"], rel=0.5)
    train_vqvae(output=str(tmp_path / "b"), **_vq_settings(steps=2, loss="l1", precision="bf16", grid_images=0))
    assert all(math.isfinite(r["recon"]) for r in _metrics(tmp_path / "b"))


def test_vqvae_resume_is_bit_exact(tmp_path):
    from cogview.pipeline import load_vqvae

    # Frequent dead-code restarts (global RNG + the quantizer's ring buffer) and accumulation.
    kw = _vq_settings(steps=10, accumulation=2, grid_images=0, model_overrides={"restart_window": 0.5})
    train_vqvae(output=str(tmp_path / "full"), **kw)
    stopped = train_vqvae(output=str(tmp_path / "split"), stop_at=4, **kw)
    assert not stopped["finished"] and not (tmp_path / "split" / "config.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):  # a fresh start would mix with the earlier run
        train_vqvae(output=str(tmp_path / "split"), **kw)
    train_vqvae(output=str(tmp_path / "split"), resume="latest", **kw)
    a, b = load_vqvae(tmp_path / "full").state_dict(), load_vqvae(tmp_path / "split").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full, split = _metrics(tmp_path / "full"), _metrics(tmp_path / "split")
    assert [r["step"] for r in split] == [r["step"] for r in full]
    assert [r["loss"] for r in split] == [r["loss"] for r in full]


def test_bad_images_are_skipped_counted_and_reported(tmp_path, capsys):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(6):
        Image.new("RGB", (20, 20), (40 * i, 100, 200)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"image {i}")
    (root / "3.png").write_bytes(b"garbage")
    (root / "4.png").unlink()  # caption without image: not listed
    summary = train_vqvae(output=str(tmp_path / "run"), **_vq_settings(data=str(root), steps=3, batch_size=4,
                                                                         grid_images=2))
    assert summary["finished"] and summary["skipped"] >= 2  # 3 steps x 4 = 12 draws over 5 items, one broken
    assert "skipped" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# transformer: sequences and loss
# ---------------------------------------------------------------------------------------------


def _tokenizer(tokens_path):
    from cogview.models import presets
    from cogview.tokenizer import CogViewTokenizer, train_text_model

    ds = TokenDataset(tokens_path)
    config = presets["test-tiny"]
    config = type(config)(config.transformer.replace(text_tokens=400, max_positions=80), config.vqvae, "t")
    model = train_text_model([c for i in range(len(ds)) for c in ds.captions(i)], 400)
    return ds, config, CogViewTokenizer.for_config(model, config)


def test_sequences_follow_the_layouts_and_per_item_choices(tokens):
    ds, config, tok = _tokenizer(tokens)
    items = [ds[i] for i in range(16)]
    codes = torch.stack([it["codes"] for it in items])
    caps = [it["captions"] for it in items]

    def build(epoch, **kw):
        args = dict(seed=1, caption_ratio=0.5, caption_dropout=0.5, text_loss_scale=5.0)
        args.update(kw)
        return build_sequences(tok, codes, caps, [epoch] * 16, list(range(16)), **args)

    a, b = build(0), build(0)
    assert torch.equal(a.tokens, b.tokens)  # deterministic per (seed, epoch, index)
    assert not torch.equal(a.tokens, build(1).tokens)  # and differs across epochs
    boi, eoi, roi, base, sep, pad = (tok[n] for n in ("[BOI1]", "[EOI1]", "[ROI1]", "[BASE]", "[SEP]", "[PAD]"))
    kinds = set()
    for row, code in zip(a.tokens.tolist(), codes.tolist()):
        row = [t for t in row if t != pad]
        if row[0] == roi:  # text -> image
            i = row.index(boi)
            assert row[i - 1] == base and row[i + 1: i + 17] == code and row[i + 17] == eoi and len(row) == i + 18
            kinds.add("t2i-empty" if i == 2 else "t2i")
        else:  # image -> text
            assert row[:2] == [base, boi] and row[2:18] == code and row[18:20] == [eoi, roi] and row[-1] == sep
            kinds.add("i2t")
    assert kinds == {"t2i", "t2i-empty", "i2t"}
    assert build(0, caption_ratio=0.0, caption_dropout=0.0).num_captioning == 0
    # Weights: 0 at padding, text targets x scale, everything else 1.
    w, t = a.weights, a.targets
    assert torch.all(w[t == pad] == 0)
    assert torch.all(w[a.text_targets] == 5.0) and torch.all(w[(t != pad) & ~a.text_targets] == 1.0)
    # style word
    styled = build(0, caption_ratio=0.0, caption_dropout=0.0, style="油画")
    assert "油画" in tok.decode_text(styled.tokens[0])


def test_loss_is_cogviews_weighted_cross_entropy(tokens):
    from cogview.models import CogViewTransformer

    ds, config, tok = _tokenizer(tokens)
    codes = torch.stack([ds[i]["codes"] for i in range(6)])
    seqs = build_sequences(tok, codes, [ds.captions(i) for i in range(6)], [0] * 6, list(range(6)), seed=0,
                           caption_ratio=0.5, caption_dropout=0.0, text_loss_scale=3.0)
    model = CogViewTransformer(config.transformer)
    loss, metrics = TransformerLoss(model)(seqs)
    logits = model(seqs.tokens, seqs.position_ids)[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs.targets.reshape(-1), reduction="none")
    pad = tok.pad_id
    weights = torch.where(seqs.targets == pad, 0.0, torch.where(seqs.text_targets, 3.0, 1.0)).reshape(-1)
    expected = (ce * weights).sum() / weights.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert model.word_embeddings.weight.grad.abs().sum() > 0
    assert metrics["image_loss"] > 0 and metrics["text_loss"] > 0


def test_accumulation_splits_the_global_batch_exactly(tmp_path, tokens):
    from cogview.pipeline import load_transformer

    kw = _tf_settings(tokens, steps=2, warmup_steps=0, caption_dropout=0.5)
    train_transformer(output=str(tmp_path / "a1"), **kw)
    train_transformer(output=str(tmp_path / "a4"), **dict(kw, accumulation=4))
    ma, mb = _metrics(tmp_path / "a1"), _metrics(tmp_path / "a4")
    for ra, rb in zip(ma, mb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    a = load_transformer(tmp_path / "a1").state_dict()
    b = load_transformer(tmp_path / "a4").state_dict()
    # Same gradients up to summation order; AdamW (lr 2e-3) turns that into at most ~1e-5 of movement
    # where a gradient is ~0 and m / sqrt(v) is ill-conditioned.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# transformer: runs, resume, fine-tuning
# ---------------------------------------------------------------------------------------------


def test_transformer_run_makes_a_loadable_model(tmp_path, tokens):
    from cogview.pipeline import CogView

    out = tmp_path / "cv"
    summary = train_transformer(output=str(out), **_tf_settings(tokens, steps=4, sample_every=2))
    model = CogView.from_pretrained(out)
    assert model.config.transformer.image_tokens == 32 and model.tokenizer.num_pieces <= 400
    assert model.metadata["training"]["trainer"] == "transformer" and summary["model"] == str(out)
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "image_loss", "text_loss", "tok_per_s", "lr", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in records), key
    for step in (2, 4):
        grid = Image.open(out / "training" / "samples" / f"samples-{step:08d}.png")
        assert grid.size[0] > grid.size[1]
        assert "caption of item 0" in (out / "training" / "samples" / f"samples-{step:08d}.txt").read_text()
    # The trained model's loss on its own data is the logged one (same weights, same batches).
    assert json.loads((out / "training" / "summary.json").read_text())["finished"]


def test_transformer_resume_after_a_crash_is_bit_exact(tmp_path, tokens, monkeypatch):
    from cogview.pipeline import load_transformer
    from cogview.training.transformer_trainer import TransformerTrainer

    kw = _tf_settings(tokens, steps=7, accumulation=2, checkpoint_every=3)
    train_transformer(output=str(tmp_path / "full"), **kw)

    original = TransformerTrainer.periodic

    def crash(self, step, final):
        if step == 5:
            raise RuntimeError("simulated crash")
        return original(self, step, final)

    monkeypatch.setattr(TransformerTrainer, "periodic", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_transformer(output=str(tmp_path / "split"), **dict(kw, sample_every=5))
    monkeypatch.setattr(TransformerTrainer, "periodic", original)
    assert (tmp_path / "split" / "training" / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    assert max(r["step"] for r in _metrics(tmp_path / "split")) == 5
    train_transformer(output=str(tmp_path / "split"), resume="latest", **kw)
    a = load_transformer(tmp_path / "full").state_dict()
    b = load_transformer(tmp_path / "split").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _metrics(tmp_path / "split")] == [r["loss"] for r in _metrics(tmp_path / "full")]


def test_precisions_checkpointing_and_fine_tuning(tmp_path, tokens):
    from cogview.pipeline import CogView

    base = tmp_path / "base"
    train_transformer(output=str(base), **_tf_settings(tokens, steps=2))
    first = {}
    for name, extra in (("fp32", {}), ("ckpt", {"activation_checkpointing": True}), ("bf16", {"precision": "bf16"}),
                        ("fp16", {"precision": "fp16"})):
        out = tmp_path / name
        train_transformer(output=str(out), **_tf_settings(tokens, steps=2, init=str(base), lr=1e-3, model_overrides={},
                                                                      **extra))
        records = _metrics(out)
        assert all(math.isfinite(r["loss"]) for r in records)
        first[name] = records[0]["loss"]
        if name == "fp16":
            assert "loss_scale" in records[0]
    # Activation checkpointing recomputes the same function.
    assert first["ckpt"] == pytest.approx(first["fp32"], rel=1e-6)
    assert first["bf16"] == pytest.approx(first["fp32"], rel=0.05)
    # --init starts from the given weights: its first loss is far below a fresh model's.
    fresh = tmp_path / "fresh"
    train_transformer(output=str(fresh), **_tf_settings(tokens, steps=1))
    tuned = CogView.from_pretrained(tmp_path / "fp32")
    assert tuned.tokenizer == CogView.from_pretrained(base).tokenizer
    assert first["fp32"] < _metrics(fresh)[0]["loss"]


def test_cli_trains_end_to_end(tmp_path, capsys):
    from cogview.cli import build_parser, main
    from cogview.pipeline import CogView

    config = tmp_path / "vq.yaml"
    config.write_text("model: test-x4\nresolution: 16\nsteps: 2\nbatch_size: 4\nprogress: false\nthreads: 1\n"
                      "data: {name: shapes, num_samples: 16, resolution: 16}\ngrid_images: 2\n")
    assert main(["train-vqvae", "--config", str(config), "--output", str(tmp_path / "vq"), "--lr", "1e-3"]) == 0
    assert main(["tokenize-images", "--vqvae", str(tmp_path / "vq"), "--data", '{"name": "shapes", "num_samples": 12}',
                 "--output", str(tmp_path / "tok"), "--batch-size", "5"]) == 0
    assert len(TokenDataset(tmp_path / "tok")) == 12
    argv = ["train", "--data", str(tmp_path / "tok"), "--output", str(tmp_path / "cv"), "--model", "test-tiny",
            "--model-overrides", '{"text_tokens": 400, "max_positions": 80}', "--text-vocab-size", "400",
            "--steps", "2", "--batch-size", "4", "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    assert '"finished": true' in capsys.readouterr().out
    assert CogView.from_pretrained(tmp_path / "cv").config.vqvae.image_size == 16
    # An image dataset + --vqvae: tokenized once into OUTPUT/training/tokens first.
    argv2 = [a if a != str(tmp_path / "tok") else '{"name": "shapes", "num_samples": 10}' for a in argv]
    argv2[argv2.index(str(tmp_path / "cv"))] = str(tmp_path / "cv2")
    assert main(argv2 + ["--vqvae", str(tmp_path / "vq")]) == 0
    assert len(TokenDataset(tmp_path / "cv2" / "training" / "tokens")) == 10
    assert CogView.from_pretrained(tmp_path / "cv2").metadata["training"]["source"]["name"] == "shapes"
    # Errors are reported, not raised: e.g. a missing token file / VQ-VAE.
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x"), "--no-progress"]) == 1
    assert "error" in capsys.readouterr().err
    parser = build_parser()
    for name in ("train-vqvae", "tokenize-images", "train"):
        with pytest.raises(SystemExit):
            parser.parse_args([name, "--help"])
        text = capsys.readouterr().out
        assert "--config" in text and "--output" in text


def test_sigterm_checkpoints_and_stops(tmp_path, tokens, monkeypatch):
    import os
    import signal

    from cogview.training.transformer_trainer import TransformerTrainer

    def log_extra(self, step):  # runs after step 2's statistics: the flag is seen at the end of step 3
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's pre-emption notice would
        return {}

    monkeypatch.setattr(TransformerTrainer, "log_extra", log_extra)
    previous = signal.getsignal(signal.SIGTERM)
    summary = train_transformer(output=str(tmp_path / "run"), **_tf_settings(tokens, steps=6))
    assert summary["interrupted"] and summary["step"] == 3 and not summary["finished"]
    assert (tmp_path / "run" / "training" / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    assert signal.getsignal(signal.SIGTERM) is previous  # the trainer's handler is gone again
    monkeypatch.undo()
    summary = train_transformer(output=str(tmp_path / "run"), resume="latest", **_tf_settings(tokens, steps=6))
    assert summary["finished"] and summary["steps_run"] == 3

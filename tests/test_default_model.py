"""The embedded default model: shipped in the package, used by default, English and Chinese prompts, its
super-resolution stage.

Quality: the README states the measured figures (recipes/default/quality.json, 50 prompts each, at the
model's recommended temperature 0.7: held-out pairs 80% plain and 98% with rerank=8, seen pairs 86% / 100%;
at CogView's temperature 1.0: 80% and 72%). Issue 12's target: >= 80% plain on held-out pairs and +5 points
with rerank=8. test_quality_floor guards the measured levels against regressions, with a margin for
sampling noise on other CPUs and instruction sets.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogview.assets import DEFAULT_MODEL, default_model_dir
from cogview.commands.generation import resolve_model_dir
from cogview.data.shape_detector import contains
from cogview.generation.shapes_quality import held_out_pairs, shapes_quality
from cogview.pipeline import CogView

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model():
    return CogView.from_pretrained(default_model_dir(), dtype="float32").eval()


def test_shipped_inside_the_package_within_budget():
    assert default_model_dir() == DEFAULT_MODEL and DEFAULT_MODEL.parent.name == "assets"
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir())
    assert size <= 40 * 2**20, f"the embedded model takes {size / 2**20:.1f} MiB (budget 40 MiB with its SR stage)"


def test_generate_uses_it_without_a_model_argument(monkeypatch):
    monkeypatch.delenv("COGVIEW_MODEL", raising=False)
    assert Path(resolve_model_dir(None)) == DEFAULT_MODEL


def test_the_recipe_held_out_pairs(model):
    assert len(held_out_pairs(model)) >= 3
    training = model.metadata["training"]
    data = training["source"] if training["data"]["name"] == "tokens" else training["data"]
    assert data["name"] == "shapes" and data["split"] == "train"


@pytest.mark.parametrize("prompt, color, shape", [("a large blue circle", "blue", "circle"),
                                                  ("一个大的蓝色圆形", "blue", "circle"),
                                                  ("a large white triangle", "white", "triangle"),
                                                  ("一个大的白色三角形", "white", "triangle"),
                                                  ("a large red circle in the center", "red", "circle"),
                                                  ("中间有一个大的红色圆形", "red", "circle")])
def test_english_and_chinese_prompts(model, prompt, color, shape):
    # The best 4 of 8 by the model's own caption score: plain samples of these short prompts show the
    # right colour nearly always but the right shape only about half the time (test_quality_floor).
    results = model.generate(prompt, num_images=4, rerank=8, seed=0, progress=False)
    assert sum(contains(r.image, color, shape) for r in results) >= 3


def test_cli_generate_without_model(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "cogview.cli", "generate", "a blue triangle", "-n", "2", "--out",
                          str(out), "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**__import__("os").environ, "COGVIEW_MODEL": ""})
    assert run.returncode == 0, run.stderr
    assert (out / "grid.png").is_file() and (out / "0000.png").is_file()
    assert json.loads((out / "results.json").read_text())["model"] == str(DEFAULT_MODEL)


def test_quality_floor(model):
    held_out = shapes_quality(model, "held-out", count=50, seed=0, progress=False)
    reranked = shapes_quality(model, "held-out", count=50, seed=0, rerank=8, progress=False)
    seen = shapes_quality(model, "seen", count=50, seed=0, progress=False)
    print(f"held-out pairs {held_out['rate']:.0%} (rerank=8: {reranked['rate']:.0%}), seen pairs {seen['rate']:.0%}")
    assert held_out["temperature"] == model.default_temperature == 0.7  # the recipe's recommendation
    assert held_out["rate"] >= 0.70, held_out["per_pair"]
    assert reranked["rate"] >= 0.85 and reranked["rate"] >= held_out["rate"] + 0.05, reranked["per_pair"]
    assert seen["rate"] >= 0.68, seen["per_pair"]


def test_the_held_out_pairs_were_held_out_of_the_captions(model):
    data = model.metadata["training"]["data"]
    data = model.metadata["training"]["source"] if data["name"] == "tokens" else data
    assert data["holdout_mode"] == "captions"


def test_it_has_a_super_resolution_stage_and_upscale_uses_it(model, tmp_path):
    assert model.super_resolution is not None
    assert model.super_resolution.config.scale == 3
    small = model.generate("a large red square", num_images=1, seed=0, progress=False)[0].image
    small.save(tmp_path / "small.png")
    run = subprocess.run([sys.executable, "-m", "cogview.cli", "upscale", str(tmp_path / "small.png"), "--out",
                          str(tmp_path / "big.png")], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**__import__("os").environ, "COGVIEW_MODEL": ""})
    assert run.returncode == 0, run.stderr
    from PIL import Image

    assert Image.open(tmp_path / "big.png").size == (96, 96)


def test_its_super_resolution_beats_bicubic_on_held_out_scenes(model):
    """Issue 13's quality target, guarded at the level measured (recipes/default/quality.json: 29.28 dB vs
    bicubic 29.12 over these 64 scenes; +0.68 dB over 256)."""
    from cogview.generation.super_resolution import evaluate_super_resolution

    report = evaluate_super_resolution(model, num_images=64)
    assert report["psnr_sr"] > report["psnr_bicubic"] + 0.1, report
    assert model.super_resolution.config.pixel_hint == model.vqvae.config.downsample

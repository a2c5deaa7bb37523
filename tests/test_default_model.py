"""The embedded default model: shipped in the package, used by default, English and Chinese prompts.

Quality: the README states the measured figures (recipes/default/quality.json, 50 prompts each: held-out
pairs 56%, seen pairs 86%). The target of issue 12 (>= 80% on held-out pairs, +5 points with rerank=8)
is NOT met yet by this model; test_quality_floor guards the measured level against regressions with a
margin for sampling noise on other CPUs and instruction sets, and will be raised to the target when a
model that meets it is trained.
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
    assert size <= 25 * 2**20, f"the embedded model takes {size / 2**20:.1f} MiB (budget 25 MiB)"


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
    results = model.generate(prompt, num_images=4, seed=0, progress=False)
    assert sum(contains(r.image, color, shape) for r in results) >= 2


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
    seen = shapes_quality(model, "seen", count=50, seed=0, progress=False)
    print(f"held-out pairs {held_out['rate']:.0%}, seen pairs {seen['rate']:.0%}")
    assert held_out["rate"] >= 0.45, held_out["per_pair"]
    assert seen["rate"] >= 0.75, seen["per_pair"]

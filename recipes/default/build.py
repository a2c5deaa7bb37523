"""Build the embedded default model from scratch: `make default-model` (or `python recipes/default/build.py`).

Steps (each skipped when its output already exists, unless --force):
  1. VQ-VAE on `shapes` at 32x32 (recipes/default/vqvae.yaml)            -> runs/default/vqvae
  2. transformer on the same scenes, tokenized by that VQ-VAE
     (recipes/default/transformer.yaml)                                  -> runs/default/model
  3. export: transformer stored in float16 into cogview/assets/default (the package data)
  4. quality: the shapes detector over 50 held-out-pair prompts, plain and with rerank=8, and over 50
     seen-pair prompts -> recipes/default/quality.json, docs/images/default-grid.png

Prints the wall time of every step. Training threads: --threads (default: all cores).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

ASSET = ROOT / "cogview" / "assets" / "default"
GRID_PROMPTS = [
    "a red circle", "a blue triangle", "a green square", "a yellow circle",
    "a large white triangle in the center, on a black background", "a small orange square at the top",
    "一个紫色三角形", "黑色背景上，中间有一个大的绿色圆形",
]


def _step(name: str, done: bool, force: bool, fn) -> float:
    if done and not force:
        print(f"[default-model] {name}: already done (use --force to redo)")
        return 0.0
    print(f"[default-model] {name} ...", flush=True)
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    print(f"[default-model] {name}: {seconds / 60:.1f} min", flush=True)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "default"), help="work directory (default runs/default)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    parser.add_argument("--force", action="store_true", help="redo every step")
    parser.add_argument("--skip-quality", action="store_true", help="export only; do not measure quality")
    args = parser.parse_args(argv)

    import torch

    from cogview.training import train_transformer, train_vqvae
    from cogview.training.config import load_config_file

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    runs = Path(args.runs)
    vqvae_dir, model_dir = runs / "vqvae", runs / "model"
    timings = {}

    def vqvae():
        settings = load_config_file(HERE / "vqvae.yaml")
        train_vqvae(**settings, output=str(vqvae_dir), threads=threads, resume="latest")

    def transformer():
        settings = load_config_file(HERE / "transformer.yaml")
        train_transformer(**settings, output=str(model_dir), vqvae=str(vqvae_dir), threads=threads, resume="latest")

    def export():
        from cogview.pipeline import CogView

        model = CogView.from_pretrained(model_dir)
        staging = ASSET.with_name("default.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, dtype=torch.float16)
        shutil.rmtree(ASSET, ignore_errors=True)
        staging.rename(ASSET)
        size = sum(f.stat().st_size for f in ASSET.iterdir())
        print(f"[default-model] exported to {ASSET}: {size / 2**20:.2f} MiB")

    timings["vqvae"] = _step("1/4 train the VQ-VAE", (vqvae_dir / "config.json").is_file(), args.force, vqvae)
    timings["transformer"] = _step("2/4 train the transformer", (model_dir / "config.json").is_file(), args.force,
                                   transformer)
    timings["export"] = _step("3/4 export to the package", False, True, export)
    if not args.skip_quality:
        timings["quality"] = _step("4/4 measure quality", False, True, lambda: measure(HERE / "quality.json"))
    print(json.dumps({"minutes": {k: round(v / 60, 2) for k, v in timings.items()}}, indent=1))
    return 0


def measure(report_path: Path) -> dict:
    """The README's quality figures for the exported model (held-out and seen pairs, rerank 8)."""
    from cogview.generation import image_grid
    from cogview.generation.shapes_quality import shapes_quality
    from cogview.pipeline import CogView

    model = CogView.from_pretrained(ASSET, dtype="float32").eval()
    report = {}
    for name, pairs, rerank in (("held_out", "held-out", None), ("held_out_rerank8", "held-out", 8),
                                ("seen", "seen", None), ("seen_rerank8", "seen", 8)):
        result = shapes_quality(model, pairs, count=50, seed=0, rerank=rerank)
        result.pop("images")
        report[name] = result
        print(f"[default-model] {name}: {result['hits']}/{result['prompts']} = {result['rate']:.0%}", flush=True)
    report_path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    results = model.generate(GRID_PROMPTS, num_images=4, seed=0, progress=False)
    grid = image_grid([r.image.resize((96, 96), 0) for r in results], columns=8)
    out = ROOT / "docs" / "images" / "default-grid.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(f"[default-model] quality report {report_path}, grid {out}")
    return report


if __name__ == "__main__":
    sys.exit(main())

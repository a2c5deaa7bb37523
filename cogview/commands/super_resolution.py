"""`cogview train-sr`, `cogview upscale`, `cogview evaluate-sr`: the super-resolution stage.

    cogview train-sr --base MODEL_DIR --output runs/sr --steps 2000 --batch-size 16
    cogview upscale small.png --out big.png [--model DIR] [--prompt "a red circle"]
    cogview evaluate-sr [--model DIR] --num-images 64
    cogview generate "a red circle" --super-resolution ...     (cogview/commands/generation.py)

The model directory: --model, else what `resolve_model_dir` (cogview/commands/generation.py) picks.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["COMMANDS", "add_sampling_options"]


def add_sampling_options(p, prefix: str = "") -> None:
    """--[sr-]temperature/--[sr-]top-k/--[sr-]passes for the super-resolution sampling."""
    from cogview.generation.super_resolution import SR_DEFAULTS

    p.add_argument(f"--{prefix}temperature", type=float, default=SR_DEFAULTS["temperature"],
                   help=f"super-resolution sampling temperature (default {SR_DEFAULTS['temperature']}: greedy)")
    p.add_argument(f"--{prefix}top-k", type=int, default=SR_DEFAULTS["top_k"],
                   help="super-resolution top-k (default 0: off)")
    p.add_argument(f"--{prefix}schedule", default=None, metavar="N,N,...",
                   help="cells re-masked per tile in each refinement pass (default: the stage's, e.g. "
                        "23,19,15,10,6,2; 'none' = direct super-resolution only)")


def parse_schedule(text: str | None):
    if text is None:
        return None
    if text.strip().lower() in ("none", "0", ""):
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--schedule must be comma-separated ints, got {text!r}") from None


def _load_stage(args):
    import torch

    from cogview.commands.generation import resolve_model_dir
    from cogview.generation.super_resolution import SuperResolutionPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return SuperResolutionPipeline.from_pretrained(resolve_model_dir(args.model), device=device,
                                                   dtype=args.dtype).eval()


def _add_dtype_option(p) -> None:
    from cogview.commands.generation import DTYPE_CHOICES

    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES,
                   help="SR stage weights (default float32; bfloat16 is several times faster on CPUs with bf16 "
                        "matrix units, e.g. AMX, and on GPUs)")


# ---------------------------------------------------------------------------------------------
# train-sr
# ---------------------------------------------------------------------------------------------


def _train_sr(args) -> int:
    from cogview.training.config import config_from_args
    from cogview.training.sr_trainer import SRTrainConfig, SRTrainer

    config = config_from_args(SRTrainConfig, args)
    summary = SRTrainer(config).run()
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["finished"] or not summary["interrupted"] else 130


def add_train_sr_parser(subparsers) -> None:
    from cogview.training.config import add_config_arguments
    from cogview.training.sr_trainer import SRTrainConfig

    p = subparsers.add_parser(
        "train-sr", help="train the super-resolution stage of a model",
        description="Train a CogView2-style super-resolution stage (direct SR + LoPAR refinement) for the model "
                    "in --base: scenes rendered (shapes) or loaded at both resolutions and tokenized by the base "
                    "model's VQ-VAE. Writes a model directory to --output: the base model plus the SR stage "
                    "(cogview upscale / generate --super-resolution --model OUTPUT), with checkpoints, "
                    "metrics.jsonl, sample grids and a held-out PSNR evaluation under OUTPUT/training/.",
        epilog="example: cogview train-sr --config recipes/shapes-sr.yaml --base runs/cv --output runs/sr")
    add_config_arguments(p, SRTrainConfig)
    p.set_defaults(func=_train_sr)


# ---------------------------------------------------------------------------------------------
# upscale
# ---------------------------------------------------------------------------------------------


def _upscale(args) -> int:
    from cogview.generation import load_image_file

    stage = _load_stage(args)
    sr = stage.super_resolution
    size = sr.config.low_res * stage.vqvae.config.downsample
    outs = [Path(args.out)] if len(args.images) == 1 else None
    if outs is None:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        outs = [folder / (Path(p).stem + "-sr.png") for p in args.images]
    images = []
    for path in args.images:
        try:
            images.append(load_image_file(path, size, resize=args.resize))
        except ValueError as error:
            if args.resize or "model takes" not in str(error):
                raise
            raise ValueError(f"{error} (the super-resolution stage's low-res size; pass --resize to fit it)") from None
    results = stage.upscale(images, args.prompt or None, schedule=parse_schedule(args.schedule),
                            temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    for result, out in zip(results, outs):
        out.parent.mkdir(parents=True, exist_ok=True)
        result.image.save(out)
        print(f"{out}: {result.image.size[0]}x{result.image.size[1]}")
    return 0


def add_upscale_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "upscale", help="low-res image -> high-res image (the super-resolution stage)",
        description="Upscale images with a model's super-resolution stage: encode with its VQ-VAE, direct "
                    "super-resolution + refinement passes, decode. The image must have the stage's low-res size "
                    "(the base model's image size; e.g. 32x32 -> 96x96) unless --resize.")
    p.add_argument("images", nargs="+", help="image file(s)")
    p.add_argument("--out", "-o", required=True, help="output PNG (one image) or folder (several)")
    p.add_argument("--prompt", default="", help="caption to condition on (default: none)")
    p.add_argument("--resize", action="store_true",
                   help="fit other sizes first (shorter side resized, centre crop) instead of refusing them")
    p.add_argument("--model", "-m", default=None, help="model directory with a super-resolution stage "
                                                       "(default: as for cogview generate)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (sampling only; default 0)")
    _add_dtype_option(p)
    add_sampling_options(p)
    p.set_defaults(func=_upscale)


# ---------------------------------------------------------------------------------------------
# evaluate-sr
# ---------------------------------------------------------------------------------------------


def _evaluate_sr(args) -> int:
    from cogview.commands.generation import print_report
    from cogview.generation.super_resolution import evaluate_super_resolution

    stage = _load_stage(args)
    data = json.loads(args.data) if args.data else None
    report = evaluate_super_resolution(stage, data, num_images=args.num_images,
                                       schedule=parse_schedule(args.schedule), captions=args.captions,
                                       progress=not args.no_progress)
    return print_report(report, args)


def add_evaluate_sr_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate-sr", help="PSNR of the super-resolution stage vs bicubic on held-out shapes scenes",
        description="Render held-out shapes scenes at both resolutions; upscale the low-res ones (temperature 0, "
                    "direct SR + refinement) and report the mean PSNR against the true high-res render, next to "
                    "bicubic upscaling, direct SR alone, and the VQ-VAE's own reconstruction (the ceiling).")
    p.add_argument("--model", "-m", default=None, help="model directory with a super-resolution stage")
    p.add_argument("--num-images", type=int, default=64, help="scenes (default 64)")
    p.add_argument("--data", default=None, metavar="JSON",
                   help='shapes spec, default {"name": "shapes", "seed": 1000003} (scenes unseen in training)')
    p.add_argument("--schedule", default=None, metavar="N,N,...", help="refinement schedule (default: the stage's)")
    p.add_argument("--captions", action="store_true", help="condition on the scenes' captions")
    p.add_argument("--device", default=None, help="cpu, cuda, ...")
    _add_dtype_option(p)
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_evaluate_sr)


COMMANDS = [add_train_sr_parser, add_upscale_parser, add_evaluate_sr_parser]

"""`cogview train-vqvae`, `cogview tokenize-images` and `cogview train`.

Each subcommand takes `--config FILE` (YAML or JSON) and flags that override it; every setting has a
flag (see `cogview train --help`). Under torchrun every process runs the same command:

    cogview train-vqvae --output runs/vq --data shapes --steps 3000 --batch-size 64
    cogview tokenize-images --vqvae runs/vq --data shapes --output runs/tokens
    cogview train --output runs/cv --data runs/tokens --steps 6000 --batch-size 32
    torchrun --nproc-per-node 4 -m cogview.cli train --config recipe.yaml --distributed fsdp
"""
from __future__ import annotations

import argparse
import json

__all__ = ["COMMANDS", "add_train_vqvae_parser", "add_tokenize_images_parser", "add_train_parser"]

_FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def _print_summary(summary: dict) -> None:
    print(json.dumps(summary, indent=2, default=str))


# ---------------------------------------------------------------------------------------------
# train-vqvae
# ---------------------------------------------------------------------------------------------


def _train_vqvae(args) -> int:
    from cogview.training.config import VQVAETrainConfig, config_from_args
    from cogview.training.vqvae_trainer import VQVAETrainer

    config = config_from_args(VQVAETrainConfig, args)
    summary = VQVAETrainer(config).run()
    _print_summary(summary)
    return 0 if summary["finished"] or not summary["interrupted"] else 130


def add_train_vqvae_parser(subparsers) -> None:
    from cogview.training.config import VQVAETrainConfig, add_config_arguments

    p = subparsers.add_parser(
        "train-vqvae", help="train a VQ-VAE image tokenizer",
        description="Train a VQ-VAE (reconstruction L2/L1 + commitment, EMA codebook with dead-code restarts) on "
                    "the built-in shapes data or your images. Writes a VQ-VAE model directory to --output, with "
                    "checkpoints, metrics.jsonl and reconstruction grids under OUTPUT/training/. Run under torchrun "
                    "for several processes (DDP or FSDP2).",
        epilog="example: cogview train-vqvae --output runs/vq --data shapes --steps 3000 --batch-size 64")
    add_config_arguments(p, VQVAETrainConfig)
    p.set_defaults(func=_train_vqvae)


# ---------------------------------------------------------------------------------------------
# tokenize-images
# ---------------------------------------------------------------------------------------------


def _tokenize_images(args) -> int:
    import torch

    from cogview.data.loader import build_dataset
    from cogview.data.tokenize import tokenize_dataset
    from cogview.pipeline import load_vqvae
    from cogview.training.config import load_config_file

    settings = load_config_file(args.config) if args.config else {}
    for key in ("vqvae", "data", "output", "batch_size", "num_workers", "device", "overwrite", "threads"):
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    unknown = sorted(set(settings) - {"vqvae", "data", "output", "batch_size", "num_workers", "device", "overwrite",
                                      "threads", "progress"})
    if unknown:
        raise ValueError(f"unknown tokenize-images setting(s) {unknown}")
    for key in ("vqvae", "data", "output"):
        if not settings.get(key):
            raise ValueError(f"--{key} is required")
    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))
    device = settings.get("device") or "cpu"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    vqvae = load_vqvae(settings["vqvae"], device=device)
    dataset = build_dataset(settings["data"], resolution=vqvae.config.image_size)
    tokenize_dataset(dataset, vqvae, settings["output"], batch_size=int(settings.get("batch_size") or 64),
                     num_workers=int(settings.get("num_workers") or 0), device=device,
                     overwrite=bool(settings.get("overwrite")), progress=settings.get("progress", True),
                     vqvae_path=settings["vqvae"])
    return 0


def add_tokenize_images_parser(subparsers) -> None:
    from cogview.training.config import _json_or_text

    p = subparsers.add_parser(
        "tokenize-images", help="encode a dataset once with a trained VQ-VAE into a token file",
        formatter_class=_FORMATTER,
        description="Encode every image of a dataset with a VQ-VAE into a memory-mapped token file (a folder: "
                    "header.json, codes.bin, captions.jsonl), so transformer training never runs the encoder. "
                    "Missing or unreadable images are skipped and counted in the header.",
        epilog="example: cogview tokenize-images --vqvae runs/vq --data photos/ --output runs/photos.tokens")
    p.add_argument("--config", "-c", default=None, metavar="FILE",
                   help="YAML or JSON file with the settings below (flags override it)")
    p.add_argument("--vqvae", default=None, help="VQ-VAE model directory (train-vqvae output or a full model)")
    p.add_argument("--data", type=_json_or_text, default=None,
                   help="'shapes', an image folder, a .jsonl/.tsv manifest, or a JSON dataset spec; images are "
                        "resized and centre-cropped to the VQ-VAE's image size")
    p.add_argument("--output", "-o", default=None, help="token file (folder) to write")
    p.add_argument("--batch-size", type=int, default=None, help="images per encoder batch (default 64)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers decoding images (default 0)")
    p.add_argument("--device", default=None, help="cpu (default), cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing token file")
    p.set_defaults(func=_tokenize_images)


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


def _train(args) -> int:
    from cogview.training.config import TransformerTrainConfig, config_from_args
    from cogview.training.transformer_trainer import TransformerTrainer

    config = config_from_args(TransformerTrainConfig, args)
    summary = TransformerTrainer(config).run()
    _print_summary(summary)
    return 0 if summary["finished"] or not summary["interrupted"] else 130


def add_train_parser(subparsers) -> None:
    from cogview.training.config import TransformerTrainConfig, add_config_arguments

    p = subparsers.add_parser(
        "train", help="train (or fine-tune) the CogView transformer",
        description="Train the CogView transformer on a token file (or an image dataset, tokenized first with "
                    "--vqvae): text->image sequences plus a --caption-ratio share of image->text ones, CogView's "
                    "loss with --text-loss-scale, optional caption dropout and style word. --init DIR fine-tunes "
                    "any model directory. Writes a model directory to --output (CogView.from_pretrained, "
                    "cogview generate --model) with checkpoints, metrics.jsonl and sample grids under "
                    "OUTPUT/training/. --resume continues an interrupted run exactly.",
        epilog="example: cogview train --output runs/cv --data runs/tokens --steps 6000 --batch-size 32 "
               "--precision bf16")
    add_config_arguments(p, TransformerTrainConfig)
    p.set_defaults(func=_train)


COMMANDS = [add_train_vqvae_parser, add_tokenize_images_parser, add_train_parser]

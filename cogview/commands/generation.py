"""`cogview generate`, `cogview caption`, `cogview evaluate`.

    cogview generate "a red circle above a blue square" -n 8 --out DIR [--model MODEL_DIR]
        -> DIR/0000.png ... DIR/0007.png, DIR/grid.png, DIR/results.json
    cogview caption IMG... --model MODEL_DIR
    cogview evaluate DATA_DIR --model MODEL_DIR

The model: --model DIR, else $COGVIEW_MODEL, else the default model embedded in the package
(`cogview.assets.default_model_dir()`: trained on the built-in `shapes` data, 32x32 images).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["COMMANDS", "DefaultModelMissing", "resolve_model_dir"]

MODEL_ENV = "COGVIEW_MODEL"
DTYPE_CHOICES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")  # --dtype of the model commands


class DefaultModelMissing(ValueError):
    pass


def resolve_model_dir(model: str | None) -> str:
    """--model, else $COGVIEW_MODEL, else the embedded default model."""
    from cogview.assets import default_model_dir

    if model:
        return model
    if os.environ.get(MODEL_ENV):
        return os.environ[MODEL_ENV]
    try:
        return str(default_model_dir())
    except FileNotFoundError as error:
        raise DefaultModelMissing(f"{error}: pass --model DIR (a model directory, e.g. one written by `cogview "
                                  f"train` or `cogview convert`) or set ${MODEL_ENV}") from None


def _load(args):
    import torch

    from cogview.pipeline import CogView

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return CogView.from_pretrained(resolve_model_dir(args.model), device=device, dtype=dtype).eval()


def _add_model_options(p) -> None:
    p.add_argument("--model", "-m", default=None,
                   help=f"model directory (default: ${MODEL_ENV}, else the bundled default model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help="transformer weights (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: what fits)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


def _generate(args) -> int:
    from cogview.generation import image_grid

    if args.num_images < 1:
        raise ValueError(f"-n/--num-images must be >= 1, got {args.num_images}")
    out = Path(args.out)
    model = _load(args)
    results = model.generate(args.prompts, num_images=args.num_images, top_k=args.top_k, top_p=args.top_p,
                             temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
                             guidance_scale=args.guidance, rerank=args.rerank, progress=not args.no_progress)
    if args.super_resolution:  # the model's super-resolution stage (cogview/commands/super_resolution.py)
        from cogview.commands.super_resolution import parse_schedule
        from cogview.generation.super_resolution import upscale_results

        results = upscale_results(model, results, schedule=parse_schedule(args.sr_schedule),
                                  temperature=args.sr_temperature, top_k=args.sr_top_k, batch_size=args.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, result in enumerate(results):
        name = f"{i:04d}.png"
        result.image.save(out / name)
        records.append({"file": name, "prompt": result.prompt, "index": result.index, "seed": result.seed,
                        "score": result.score, "invalid": result.invalid})
    image_grid([r.image for r in results], columns=args.num_images if len(args.prompts) > 1 else None).save(
        out / "grid.png")
    settings = {k: getattr(args, k) for k in ("top_k", "top_p", "temperature", "seed", "rerank", "guidance",
                                              "super_resolution")}
    if settings["temperature"] is None:
        settings["temperature"] = model.default_temperature
    (out / "results.json").write_text(json.dumps({"model": str(resolve_model_dir(args.model)), "settings": settings,
                                                  "images": records}, indent=2, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    print(f"wrote {len(results)} images and grid.png to {out}")
    return 0


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="text -> images",
                              description="Generate images from text prompts. Writes OUT/0000.png, ... (prompt by "
                                          "prompt), OUT/grid.png and OUT/results.json (prompt, seed, score of each).")
    p.add_argument("prompts", nargs="+", help="text prompt(s)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--top-k", type=int, default=200, help="top-k sampling (default 200, CogView's; 0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0 = off)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (0 = greedy; default: the model's recommendation, 1.0 unless its "
                        "directory says otherwise; the embedded model recommends 0.7)")
    p.add_argument("--rerank", type=int, default=None, metavar="N",
                   help="draw N candidates per prompt and keep the best -n by caption score (self-reranking)")
    p.add_argument("--guidance", type=float, default=None, metavar="SCALE",
                   help="classifier-free guidance scale (helps models trained with caption dropout; off by default)")
    p.add_argument("--super-resolution", action="store_true",
                   help="upscale every image with the model's super-resolution stage (e.g. 32 -> 96 px)")
    from cogview.commands.super_resolution import add_sampling_options

    add_sampling_options(p, prefix="sr-")
    _add_model_options(p)
    p.set_defaults(func=_generate)


# ---------------------------------------------------------------------------------------------
# caption
# ---------------------------------------------------------------------------------------------


def _caption(args) -> int:
    import torch

    from cogview.generation import load_image_file

    model = _load(args)
    size = model.config.image_size
    images = torch.stack([load_image_file(path, size, resize=not args.no_resize) for path in args.images])
    captions = model.caption(images, max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                             seed=args.seed, batch_size=args.batch_size, progress=not args.no_progress)
    for path, text in zip(args.images, captions):
        print(f"{path}\t{text}")
    return 0


def add_caption_parser(subparsers) -> None:
    p = subparsers.add_parser("caption", help="image -> text",
                              description="Caption images (printed as PATH<TAB>CAPTION). Images are resized "
                                          "(shorter side) and centre-cropped to the model's size.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--max-tokens", type=int, default=None, help="caption length limit (default: the model's budget)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="top-k when sampling (default 0 = off)")
    p.add_argument("--no-resize", action="store_true", help="refuse images that are not the model's size")
    _add_model_options(p)
    p.set_defaults(func=_caption)


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------


def _evaluate(args) -> int:
    from cogview.generation.evaluate import evaluate_captions

    model = _load(args)
    report = evaluate_captions(model, args.data, batch_size=args.batch_size, limit=args.limit,
                               progress=not args.no_progress)
    return print_report(report, args)


def print_report(report: dict, args) -> int:
    """Print an evaluation report as JSON (with the model directory), and write it to --json if given."""
    report["model"] = str(resolve_model_dir(args.model))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


def add_evaluate_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="caption loss over an image-caption dataset",
                              description="Caption loss (mean NLL per caption token, image ids masked; lower is "
                                          "better), perplexity and mean caption score over an image-caption dataset: "
                                          "a folder of images with same-name .txt captions, a .jsonl/.tsv manifest, "
                                          "'shapes' or a JSON spec of it, or a token file.")
    p.add_argument("data", help="image-caption folder, manifest, token file, 'shapes' or a JSON dataset spec")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--json", default=None, help="also write the report here")
    _add_model_options(p)
    p.set_defaults(func=_evaluate)


COMMANDS = [add_generate_parser, add_caption_parser, add_evaluate_parser]

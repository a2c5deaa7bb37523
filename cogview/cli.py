"""The `cogview` command.

    cogview tokenizer train --input captions.txt --vocab-size 1000 --out tokenizer.model
    cogview tokenizer encode --model tokenizer.model "a red circle"
    cogview tokenizer decode --model tokenizer.model 8301 8302
    cogview convert --transformer cogview-base --vqvae vqvae_hard_biggerset_011.pt \
        --tokenizer cog-pretrain.model --out cogview-4b

Subcommands register through `COMMANDS`: each entry is a function `(subparsers) -> None` that adds its
parser and sets `func` (a function of the parsed args returning an exit code). Heavy imports happen
inside the handlers, so `cogview --help` stays quick.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

__all__ = ["COMMANDS", "build_parser", "iter_captions", "main"]


# ---------------------------------------------------------------------------------------------
# Caption sources (for tokenizer training)
# ---------------------------------------------------------------------------------------------


def iter_captions(paths: Sequence[str | Path], field: str = "caption") -> Iterator[str]:
    """Captions from files and folders: a .jsonl file (the `field` of each object; also "text"), a .tsv
    file (the `field` column when the first row names it, else the last column), any other file one
    caption per line, a folder every *.txt inside it (recursively; each file one caption, as in an
    image-caption folder)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for file in sorted(path.rglob("*.txt")):
                text = file.read_text(encoding="utf-8", errors="replace").strip()
                if text:
                    yield " ".join(text.split())
            continue
        if not path.is_file():
            raise FileNotFoundError(f"caption source not found: {path}")
        suffix = path.suffix.lower()
        with open(path, encoding="utf-8", errors="replace") as f:
            if suffix == ".jsonl":
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{number}: not JSON ({error})") from None
                    value = item.get(field, item.get("text")) if isinstance(item, dict) else None
                    if isinstance(value, str) and value.strip():
                        yield value
            elif suffix == ".tsv":
                column = -1
                for number, line in enumerate(f, 1):
                    cells = line.rstrip("\n").split("\t")
                    if number == 1 and field in cells:
                        column = cells.index(field)
                        continue
                    if len(cells) > (column if column >= 0 else 0) and cells[column].strip():
                        yield cells[column]
            else:
                for line in f:
                    if line.strip():
                        yield line.rstrip("\n")


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


def _tokenizer_train(args) -> int:
    from cogview.tokenizer import CogViewTokenizer, train_text_model

    captions = list(iter_captions(args.input, field=args.field))
    if not captions:
        raise ValueError(f"no captions found in {', '.join(map(str, args.input))}")
    model = train_text_model(captions, args.vocab_size, model_type=args.model_type,
                             character_coverage=args.character_coverage, byte_fallback=not args.no_byte_fallback,
                             normalization=args.normalization, num_threads=args.threads, out=args.out)
    tok = CogViewTokenizer(model, image_tokens=0)
    print(f"trained a {args.model_type} SentencePiece model with {tok.num_pieces} pieces on {len(captions)} captions "
          f"-> {args.out}")
    return 0


def _load_cli_tokenizer(args):
    from cogview.tokenizer import CogViewTokenizer

    return CogViewTokenizer.from_file(args.model, image_tokens=args.image_tokens, text_tokens=args.text_tokens)


def _tokenizer_encode(args) -> int:
    tok = _load_cli_tokenizer(args)
    for text in args.text:
        ids = tok.encode_text(text)
        print(" ".join(map(str, ids)))
        if args.pieces:
            print(" ".join(tok.text_pieces(text)))
    return 0


def _tokenizer_decode(args) -> int:
    tok = _load_cli_tokenizer(args)
    print(tok.decode_text([int(i) for i in args.ids]) if not args.describe else tok.describe([int(i) for i in args.ids]))
    return 0


def add_tokenizer_parser(subparsers) -> None:
    parser = subparsers.add_parser("tokenizer", help="train or try the text tokenizer (SentencePiece)",
                                   description="Train a SentencePiece model from captions, or encode/decode with one.")
    sub = parser.add_subparsers(dest="tokenizer_command", required=True, metavar="{train,encode,decode}")

    train = sub.add_parser("train", help="train a SentencePiece BPE model from captions",
                           description="Train a SentencePiece model from captions. Inputs: text files (one caption "
                                       "per line), .jsonl (a 'caption' field), .tsv (a 'caption' column or the last "
                                       "one), or folders (every .txt file inside is one caption).")
    train.add_argument("--input", "-i", nargs="+", required=True, help="caption files or folders")
    train.add_argument("--vocab-size", type=int, required=True,
                       help="number of pieces (upper bound; >= 259 + distinct characters with byte fallback)")
    train.add_argument("--out", "-o", required=True, help="output .model file (written atomically)")
    train.add_argument("--model-type", default="bpe", choices=("bpe", "unigram", "char", "word"), help="default: bpe")
    train.add_argument("--character-coverage", type=float, default=0.9995,
                       help="share of characters given their own piece (default 0.9995; the rest use byte pieces)")
    train.add_argument("--no-byte-fallback", action="store_true",
                       help="map unseen characters to <unk> instead of UTF-8 byte pieces")
    train.add_argument("--normalization", default="identity",
                       help="SentencePiece normalisation rule (default identity: keep text as written; nmt_nfkc folds "
                            "full-width forms)")
    train.add_argument("--field", default="caption", help="JSONL field / TSV column holding the caption")
    train.add_argument("--threads", type=int, default=1, help="training threads (default 1)")
    train.set_defaults(func=_tokenizer_train)

    for name, handler, helptext in (("encode", _tokenizer_encode, "text -> unified ids"),
                                    ("decode", _tokenizer_decode, "unified ids -> text")):
        p = sub.add_parser(name, help=helptext, description=f"{helptext} (text ids = piece id + --image-tokens).")
        p.add_argument("--model", "-m", required=True, help="SentencePiece .model file")
        p.add_argument("--image-tokens", type=int, default=8192, help="image codes before the text ids (default 8192)")
        p.add_argument("--text-tokens", type=int, default=None,
                       help="ids reserved for text (default: the model's piece count)")
        if name == "encode":
            p.add_argument("text", nargs="+", help="text(s) to encode")
            p.add_argument("--pieces", action="store_true", help="also print the pieces")
        else:
            p.add_argument("ids", nargs="+", help="unified ids")
            p.add_argument("--describe", action="store_true",
                           help="render the whole sequence (command tokens by name, image-code runs counted)")
        p.set_defaults(func=handler)


# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------


def _convert(args) -> int:
    from cogview.convert import convert_release

    out = convert_release(args.transformer, args.vqvae, args.tokenizer, args.out, num_heads=args.num_heads,
                          image_tokens=args.image_tokens, text_tokens=args.text_tokens, image_size=args.image_size,
                          pb_relax=not args.no_pb_relax, dtype=args.dtype, name=args.name, iteration=args.iteration,
                          overwrite=args.force)
    from cogview.pipeline import read_model_directory

    info = read_model_directory(out)
    t = info.config.transformer
    print(f"converted -> {out}: {t.num_layers} layers, hidden {t.hidden_size}, {t.num_heads} heads, "
          f"{t.num_parameters():,} parameters, vocab {t.vocab_size} ({t.vocab_rows} rows), "
          f"{t.max_positions} positions; VQ-VAE x{info.vqvae_config.downsample}, "
          f"{info.vqvae_config.codebook_size} codes")
    return 0


def add_convert_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert the original CogView release into a model directory",
        description="Convert the original CogView release (Megatron/DeepSpeed or SwissArmyTransformer transformer "
                    "folder, the VQ-VAE .pt file, the SentencePiece model) into a cogview model directory "
                    "(config.json, model.safetensors, vqvae.safetensors, tokenizer.model). Checkpoints are read "
                    "with torch.load(weights_only=True) only. Layers and widths come from the weights.")
    p.add_argument("--transformer", required=True,
                   help="release folder (with latest_checkpointed_iteration.txt or latest), its iteration folder, or "
                        "the mp_rank_00_model_states.pt file")
    p.add_argument("--vqvae", required=True, help="VQ-VAE checkpoint (e.g. vqvae_hard_biggerset_011.pt)")
    p.add_argument("--tokenizer", required=True, help="SentencePiece model (e.g. cog-pretrain.model)")
    p.add_argument("--out", "-o", required=True, help="output model directory")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (default: model_config.json's num_attention_heads, else 40 as in the 4B release)")
    p.add_argument("--image-tokens", type=int, default=8192, help="image codes in the vocabulary (default 8192)")
    p.add_argument("--text-tokens", type=int, default=50000, help="text ids in the vocabulary (default 50000)")
    p.add_argument("--image-size", type=int, default=256, help="nominal image size of the VQ-VAE (default 256)")
    p.add_argument("--no-pb-relax", action="store_true",
                   help="plain LayerNorm instead of the PB-relax LayerNorm the release was trained with")
    p.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32", "fp16", "bf16", "fp32"),
                   help="store the transformer in this dtype (default: as in the release, fp16)")
    p.add_argument("--name", default="cogview-release", help="model name recorded in config.json")
    p.add_argument("--iteration", default=None, help="iteration folder to read instead of the tracker's")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=_convert)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

COMMANDS: list[Callable] = [add_tokenizer_parser, add_convert_parser]
# train-vqvae, tokenize-images, train (cogview/commands/training.py)
from cogview.commands.training import COMMANDS as _TRAINING_COMMANDS  # noqa: E402

COMMANDS += _TRAINING_COMMANDS
# generate, caption, evaluate (cogview/commands/generation.py)
from cogview.commands.generation import COMMANDS as _GENERATION_COMMANDS  # noqa: E402

COMMANDS += _GENERATION_COMMANDS
# train-sr, upscale, evaluate-sr (cogview/commands/super_resolution.py)
from cogview.commands.super_resolution import COMMANDS as _SR_COMMANDS  # noqa: E402

COMMANDS += _SR_COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogview", description="CogView: text-to-image generation in PyTorch.")
    try:
        from cogview.version import __version__
    except ImportError:  # pragma: no cover
        __version__ = "unknown"
    parser.add_argument("--version", action="version", version=f"cogview {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from cogview.cpu_allocator import auto_tune_cpu_allocator

    auto_tune_cpu_allocator()  # generation and training loops reuse freed activations (see the module)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"cogview {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

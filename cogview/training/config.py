"""Training configurations: flat dataclasses, loadable from YAML/JSON files and overridable by CLI flags.

Every field is a setting with a help text; `add_config_arguments(parser, cls)` turns the fields into
`--field-name` flags, and `config_from_args(cls, args)` builds the config from (in increasing
priority) the defaults, the `--config FILE` (YAML or JSON; keys with - or _), and the flags given.
Dict- and list-valued fields take JSON on the command line (e.g. `--model-overrides '{"num_layers": 2}'`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "TrainConfig",
    "VQVAETrainConfig",
    "TransformerTrainConfig",
    "load_config_file",
    "add_config_arguments",
    "config_from_args",
    "make_config",
]


def setting(default, help: str, *, choices=None, metavar=None, flag_default=None):
    """A config field with its help text (and, for the CLI, choices/metavar)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if metavar is not None:
        meta["metavar"] = metavar
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Settings shared by the VQ-VAE and transformer trainers."""

    output: str = setting("", "run directory: the final model directory is written here, training state under "
                              "OUTPUT/training/ (checkpoints, metrics.jsonl, samples)")
    data: Any = setting("shapes", "dataset: 'shapes', an image folder, a .jsonl/.tsv manifest, a token file, or a "
                                  "JSON object such as '{\"name\": \"shapes\", \"num_samples\": 20000, "
                                  "\"holdout\": [\"red circle\"]}'")
    steps: int = setting(1000, "optimizer steps of the schedule (warm-up + cosine decay span these)")
    batch_size: int = setting(32, "global batch size per optimizer step (all processes and micro-batches)")
    accumulation: int = setting(1, "micro-batches per step per process (gradient accumulation)")
    lr: float = setting(3e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = setting(0.1, "final learning rate of the cosine decay, as a fraction of --lr")
    warmup_steps: int = setting(100, "linear warm-up steps from 0 to --lr")
    weight_decay: float = setting(0.01, "AdamW weight decay (not applied to biases, norms and codebooks)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0: no clipping)")
    precision: str = setting("fp32", "fp32; bf16 (autocast); fp16 (autocast + dynamic loss scaling)",
                             choices=("fp32", "bf16", "fp16"))
    activation_checkpointing: bool = setting(False, "recompute activations in the backward pass (less memory, "
                                                    "~30%% more compute)")
    compile: bool = setting(False, "torch.compile the model (slow start; may pay off on long runs)")
    seed: int = setting(0, "seed of the model initialisation, data order and per-item choices")
    checkpoint_every: int = setting(500, "save a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = setting(2, "checkpoints to keep (older ones are deleted)")
    log_every: int = setting(10, "write metrics every N steps")
    sample_every: int = setting(0, "save a sample / reconstruction grid every N steps (0: only at the end)")
    num_workers: int = setting(0, "DataLoader worker processes (0: load in the training process)")
    device: str = setting("auto", "auto (cuda when available), cpu, cuda")
    distributed: str = setting("ddp", "with several processes (torchrun): ddp, or fsdp (FSDP2 fully_shard, sharded "
                                      "checkpoints)", choices=("ddp", "fsdp"))
    threads: int = setting(0, "torch CPU threads per process (0: torch's default)")
    resume: Any = setting(None, "resume from the latest checkpoint in OUTPUT ('latest'), or from a checkpoint "
                                "directory")
    init: Any = setting(None, "initialise the weights from a model directory (fine-tuning)")
    stop_at: Any = setting(None, "stop after this step (with a checkpoint) although the schedule runs to --steps")
    progress: bool = setting(True, "show a tqdm progress bar")
    tensorboard: bool = setting(True, "also write TensorBoard events when tensorboard is installed")
    model: str = setting("", "model preset to train (see cogview.models.presets / vqvae_presets)")
    model_overrides: dict = setting({}, "JSON object of config fields changed from the preset, e.g. "
                                        "'{\"num_layers\": 4}'")


@dataclass
class VQVAETrainConfig(TrainConfig):
    """`cogview train-vqvae`: the VQ-VAE with reconstruction + commitment loss and an EMA codebook."""

    model: str = setting("small-x4", "VQ-VAE preset (cogview.models.vqvae_presets, or a full-model preset)")
    resolution: int = setting(0, "training image size (0: the preset's image_size)")
    loss: str = setting("l2", "reconstruction loss in normalised pixel space", choices=("l2", "l1"))
    channels_last: bool = setting(True, "run the convolutions in channels-last memory format (faster with oneDNN "
                                        "on CPUs and with cuDNN)")
    grid_images: int = setting(8, "images in each reconstruction grid")


@dataclass
class TransformerTrainConfig(TrainConfig):
    """`cogview train`: the CogView transformer on image tokens + captions."""

    model: str = setting("small-16x16", "model preset (cogview.models.presets); image_tokens follow the VQ-VAE")
    data: Any = setting("", "a token file (cogview tokenize-images), or an image dataset (as for train-vqvae) that is "
                            "tokenized first into OUTPUT/training/tokens with --vqvae")
    vqvae: Any = setting(None, "VQ-VAE model directory (default: the one recorded in the token file; with --init the "
                               "init model's)")
    tokenizer: Any = setting(None, "SentencePiece model for the text side (default: trained on the dataset's captions, "
                                   "or the --init model's)")
    text_vocab_size: int = setting(0, "pieces of the trained tokenizer (0: the model's text_tokens)")
    text_loss_scale: float = setting(5.0, "weight of text-token losses relative to image tokens (CogView: 5)")
    caption_ratio: float = setting(0.1, "fraction of sequences in the image->text (captioning) layout")
    caption_dropout: float = setting(0.0, "probability of an empty caption in text->image sequences (enables "
                                          "classifier-free guidance)")
    caption_end: bool = setting(True, "end image->text captions with [SEP] so captioning knows where to stop")
    style: Any = setting(None, "style word appended to every caption (style fine-tuning, as CogView did)")
    sample_prompts: list = setting([], "prompts of the sample grids (default: captions of the first items)")
    sample_top_k: int = setting(100, "top-k of the sample grids")
    sample_temperature: float = setting(1.0, "temperature of the sample grids")


# ---------------------------------------------------------------------------------------------
# Files and flags
# ---------------------------------------------------------------------------------------------


def load_config_file(path: str | Path) -> dict:
    """A YAML (.yaml/.yml) or JSON file as a dict; keys may use - or _."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error}); YAML files need a .yaml or .yml suffix") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _base_type(annotation):
    if isinstance(annotation, str):
        annotation = eval(annotation, {"Any": Any, "dict": dict, "list": list})  # noqa: S307 (our own annotations)
    return annotation


def make_config(cls, values: dict):
    """`cls(**values)` with unknown keys reported by name and values type-checked loosely."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    clean = {}
    for key, value in values.items():
        kind = _base_type(names[key].type)
        if value is not None and kind in (int, float) and not isinstance(value, bool):
            try:
                value = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"setting {key!r} must be a number, got {value!r}") from None
        elif kind is bool and not isinstance(value, bool):
            raise ValueError(f"setting {key!r} must be true or false, got {value!r}")
        elif kind is dict and not isinstance(value, dict):
            raise ValueError(f"setting {key!r} must be a mapping, got {value!r}")
        elif kind is list and not isinstance(value, list):
            raise ValueError(f"setting {key!r} must be a list, got {value!r}")
        clean[key] = value
    config = cls(**clean)
    _validate(config)
    return config


def _validate(config: TrainConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    need(config.steps >= 1, f"--steps must be >= 1, got {config.steps}")
    need(config.batch_size >= 1 and config.accumulation >= 1, "--batch-size and --accumulation must be >= 1")
    need(config.lr > 0 and 0 <= config.min_lr_ratio <= 1, "--lr must be > 0 and --min-lr-ratio in [0, 1]")
    need(config.warmup_steps >= 0 and config.grad_clip >= 0 and config.weight_decay >= 0,
         "--warmup-steps, --grad-clip and --weight-decay must be >= 0")
    need(config.checkpoint_every >= 0 and config.sample_every >= 0 and config.log_every >= 1,
         "--checkpoint-every/--sample-every must be >= 0 and --log-every >= 1")
    need(config.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1")
    need(config.stop_at is None or int(config.stop_at) >= 1, "--stop-at must be >= 1")
    if isinstance(config, TransformerTrainConfig):
        need(0 <= config.caption_ratio <= 1, "--caption-ratio must lie in [0, 1]")
        need(0 <= config.caption_dropout <= 1, "--caption-dropout must lie in [0, 1]")
        need(config.text_loss_scale >= 0, "--text-loss-scale must be >= 0")
        need(config.sample_top_k >= 0 and config.sample_temperature > 0,
             "--sample-top-k must be >= 0 and --sample-temperature > 0")


def _json_or_text(text: str):
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    return text


def _json_value(kind):
    def parse(text: str):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"expected a JSON {'object' if kind is dict else 'list'}")
        return value

    return parse


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """`--config FILE` plus one flag per field of `cls` (defaults suppressed: only given flags override)."""
    parser.add_argument("--config", "-c", default=None, metavar="FILE",
                        help="YAML or JSON file of settings (keys as the flags below, - or _); flags override it")
    groups = {}
    for f in dataclasses.fields(cls):
        owner = "common" if f.name in {g.name for g in dataclasses.fields(TrainConfig)} and f.name not in (
            "model", "data") else "specific"
        if owner not in groups:
            groups[owner] = parser.add_argument_group("training settings" if owner == "common" else
                                                      f"{cls.__name__.replace('TrainConfig', '')} settings")
        group = groups[owner]
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "") + f" (default: {json.dumps(default)})"
        kind = _base_type(f.type)
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif kind in (int, float, str):
            if "choices" not in kwargs:
                kwargs["metavar"] = f.metadata.get("metavar", {"str": "TEXT"}.get(kind.__name__, kind.__name__.upper()))
            group.add_argument(flag, type=kind, **kwargs)
        elif kind is dict:
            group.add_argument(flag, type=_json_value(dict), metavar="JSON", **kwargs)
        elif kind is list:
            group.add_argument(flag, type=_json_value(list), metavar="JSON", **kwargs)
        elif f.name == "resume":
            group.add_argument(flag, nargs="?", const="latest", metavar="CHECKPOINT", **kwargs)
        elif f.name == "stop_at":
            group.add_argument(flag, type=int, metavar="STEP", **kwargs)
        else:
            group.add_argument(flag, type=_json_or_text, metavar="VALUE", **kwargs)


def config_from_args(cls, args: argparse.Namespace):
    """Defaults, then the --config file, then the flags given."""
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return make_config(cls, values)

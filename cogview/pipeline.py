"""The model directory and the `CogView` facade.

A model is a directory:

    config.json          format marker, the CogViewConfig (transformer + vqvae + name), free metadata,
                         and a record of the files below (which save wrote them)
    model.safetensors    the transformer (parameter names as in cogview.models.transformer)
    vqvae.safetensors    the VQ-VAE (encoder.*, quantizer.{embed [n, dim], cluster_size, embed_avg}, decoder.*)
    tokenizer.model      the SentencePiece model of the text side
    super_resolution.safetensors   optional: the super-resolution stage (config.json "super_resolution":
                         {"config": SuperResolutionConfig, "metadata": ...}); see `attach_super_resolution`

    model = CogView.from_pretrained("DIR", device="cuda", dtype=torch.bfloat16)
    model.transformer, model.vqvae, model.tokenizer, model.config
    model.save_pretrained("OUT")

Loading builds the models on the meta device and assigns the tensors read one at a time straight to
the target device and dtype, so a 4B model is never held twice (bf16 on the CPU: ~7.9 GB of weights plus
one tensor). Nothing is fetched from the network: the path is a local directory.

Saving writes each file atomically (temporary file + rename) and config.json last; config.json records a
save id that each safetensors file carries, so a directory left half-written by an interrupted save
(new weights, old config) is detected on load instead of silently mixing models. Errors are
`cogview.checkpoint.CheckpointError`s (ValueError): `CheckpointNotFoundError` (also FileNotFoundError),
`CheckpointCorruptError`, `CheckpointMismatchError`.

A directory may also hold a VQ-VAE alone (config.json without "transformer", vqvae.safetensors): what
VQ-VAE training writes; `load_vqvae` reads either kind.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cogview import generation as _generation
from cogview.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    SafetensorsFile,
    atomic_write_bytes,
    atomic_write_text,
    check_state_shapes,
    dtype_from_name,
    dtype_name,
    load_into_meta_module,
    save_safetensors,
)
from cogview.models.config import CogViewConfig, VQVAEConfig, presets
from cogview.models.super_resolution import SuperResolutionConfig, SuperResolutionTransformer
from cogview.models.transformer import CogViewTransformer
from cogview.models.vqvae import VQVAE
from cogview.tokenizer import CogViewTokenizer
from cogview.version import __version__

__all__ = [
    "CogView",
    "ModelDirectory",
    "CONFIG_FILE",
    "TRANSFORMER_FILE",
    "VQVAE_FILE",
    "TOKENIZER_FILE",
    "read_model_directory",
    "load_transformer",
    "load_vqvae",
    "load_tokenizer",
    "save_model_dir",
    "SR_FILE",
    "attach_super_resolution",
    "load_super_resolution",
]

CONFIG_FILE = "config.json"
TRANSFORMER_FILE = "model.safetensors"
VQVAE_FILE = "vqvae.safetensors"
TOKENIZER_FILE = "tokenizer.model"
SR_FILE = "super_resolution.safetensors"
FORMAT = "cogview-model"
FORMAT_VERSION = 1
_SAVE_ID_KEY = "cogview.save_id"


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelDirectory:
    """What a model directory's config.json says. `config` is None for a VQ-VAE-only directory."""

    path: Path
    config: CogViewConfig | None
    vqvae_config: VQVAEConfig
    name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    super_resolution: SuperResolutionConfig | None = None  # the optional SR stage
    super_resolution_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def has_transformer(self) -> bool:
        return self.config is not None

    def file(self, name: str) -> Path:
        return self.path / name


def read_model_directory(path: str | os.PathLike) -> ModelDirectory:
    """Parse and validate `path`/config.json."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"model directory not found: {path}")
    if not path.is_dir():
        raise CheckpointNotFoundError(f"not a model directory (a file): {path}")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointNotFoundError(f"not a cogview model directory: {config_path} is missing")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointCorruptError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointCorruptError(f"{config_path}: not a cogview model config (format {data.get('format')!r} "
                                     f"instead of {FORMAT!r})" if isinstance(data, dict) else
                                     f"{config_path}: not a cogview model config")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointCorruptError(f"{config_path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format version {version} is newer than this cogview supports "
                              f"({FORMAT_VERSION}); upgrade cogview")
    if "vqvae" not in data:
        raise CheckpointCorruptError(f"{config_path}: no 'vqvae' entry")
    name = str(data.get("name", ""))
    try:
        if data.get("transformer") is not None:
            config = CogViewConfig.from_dict({"name": name, "transformer": data["transformer"],
                                              "vqvae": data["vqvae"]})
            vqvae_config = config.vqvae
        else:
            config = None
            vqvae_config = VQVAEConfig.from_dict(data["vqvae"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{config_path}: invalid model config: {error}") from None
    metadata = data.get("metadata") or {}
    files = data.get("files") or {}
    if not isinstance(metadata, dict) or not isinstance(files, dict):
        raise CheckpointCorruptError(f"{config_path}: 'metadata' and 'files' must be objects")
    sr_config, sr_metadata = None, {}
    sr_entry = data.get("super_resolution")
    if sr_entry is not None:
        if not isinstance(sr_entry, dict) or "config" not in sr_entry:
            raise CheckpointCorruptError(f"{config_path}: 'super_resolution' must be an object with a 'config'")
        try:
            sr_config = SuperResolutionConfig.from_dict(sr_entry["config"])
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{config_path}: invalid super-resolution config: {error}") from None
        sr_metadata = sr_entry.get("metadata") or {}
    return ModelDirectory(path, config, vqvae_config, name, metadata, files, sr_config, sr_metadata)


def _check_save_id(directory: ModelDirectory, filename: str, source: SafetensorsFile) -> None:
    recorded = directory.files.get(filename, {}).get("save_id")
    found = source.metadata.get(_SAVE_ID_KEY)
    if recorded and found and recorded != found:
        raise CheckpointMismatchError(
            f"{source.path} was written by a different save than {directory.path / CONFIG_FILE} (save ids "
            f"{found} vs {recorded}): the directory mixes two models, e.g. after an interrupted save; save "
            f"it again")


def _open_component(directory: ModelDirectory, filename: str) -> SafetensorsFile:
    path = directory.file(filename)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{directory.path}: {filename} is missing")
    source = SafetensorsFile(path)
    try:
        _check_save_id(directory, filename, source)
    except BaseException:
        source.close()
        raise
    return source


# ---------------------------------------------------------------------------------------------
# Component loaders
# ---------------------------------------------------------------------------------------------


def _directory(path_or_dir) -> ModelDirectory:
    return path_or_dir if isinstance(path_or_dir, ModelDirectory) else read_model_directory(path_or_dir)


def load_transformer(path, *, device=None, dtype=None, verify: bool = True) -> CogViewTransformer:
    """The transformer of a model directory, built on the meta device and loaded by assignment onto
    `device` (default CPU) in `dtype` (default: as stored)."""
    directory = _directory(path)
    if directory.config is None:
        raise CheckpointNotFoundError(f"{directory.path} holds a VQ-VAE only (no transformer in its config.json)")
    dtype = dtype_from_name(dtype)
    device = torch.device("cpu") if device is None else torch.device(device)
    with _open_component(directory, TRANSFORMER_FILE) as source:
        with torch.device("meta"):
            model = CogViewTransformer(directory.config.transformer)
        return load_into_meta_module(model, source, what=str(source.path), device=device,
                                     dtype_for=lambda name, stored: dtype, verify=verify)


def load_vqvae(path, *, device=None, dtype=torch.float32, verify: bool = True,
               channels_last: bool | None = None) -> VQVAE:
    """The VQ-VAE of a model directory (full or VQ-VAE-only). The convolutions are loaded in `dtype`
    (default float32); the codebook buffers always in float32.

    channels_last (default: on CPU): store the convolution weights channels-last. CPU convolutions
    then take oneDNN's channels-last kernels: the same values, and decoding a 32 x 32 image takes
    about half the time (the SR stage's pixel hint decodes one per image)."""
    directory = _directory(path)
    dtype = dtype_from_name(dtype)
    device = torch.device("cpu") if device is None else torch.device(device)
    if channels_last is None:
        channels_last = device.type == "cpu"

    def dtype_for(name: str, stored: torch.dtype):
        return torch.float32 if name.startswith("quantizer.") else dtype

    with _open_component(directory, VQVAE_FILE) as source:
        with torch.device("meta"):
            model = VQVAE(directory.vqvae_config)
        model = load_into_meta_module(model, source, what=str(source.path), device=device, dtype_for=dtype_for,
                                      verify=verify)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def load_tokenizer(path) -> CogViewTokenizer:
    """The tokenizer of a model directory, with the vocabulary layout of its config."""
    directory = _directory(path)
    if directory.config is None:
        raise CheckpointNotFoundError(f"{directory.path} holds a VQ-VAE only (no tokenizer)")
    file = directory.file(TOKENIZER_FILE)
    if not file.is_file():
        raise CheckpointNotFoundError(f"{directory.path}: {TOKENIZER_FILE} is missing")
    data = file.read_bytes()
    recorded = directory.files.get(TOKENIZER_FILE, {}).get("sha256")
    if recorded and hashlib.sha256(data).hexdigest() != recorded:
        raise CheckpointMismatchError(f"{file} is not the tokenizer {directory.path / CONFIG_FILE} was saved with "
                                      f"(sha256 differs): damaged, or replaced after saving")
    try:
        return CogViewTokenizer.for_config(data, directory.config)
    except CheckpointError:
        raise
    except ValueError as error:
        raise CheckpointMismatchError(f"{file} does not fit the config: {error}") from None


def load_super_resolution(path, *, device=None, dtype=None, verify: bool = True) -> SuperResolutionTransformer:
    """The super-resolution stage of a model directory (built on the meta device, loaded by assignment)."""
    directory = _directory(path)
    if directory.super_resolution is None:
        raise CheckpointNotFoundError(f"{directory.path} has no super-resolution stage (no 'super_resolution' in "
                                      f"its {CONFIG_FILE}); train one with `cogview train-sr`")
    dtype = dtype_from_name(dtype)
    device = torch.device("cpu") if device is None else torch.device(device)
    with _open_component(directory, SR_FILE) as source:
        with torch.device("meta"):
            model = SuperResolutionTransformer(directory.super_resolution)
        return load_into_meta_module(model, source, what=str(source.path), device=device,
                                     dtype_for=lambda name, stored: dtype, verify=verify)


def check_super_resolution_fits(sr: SuperResolutionConfig, vqvae_config: VQVAEConfig,
                                config: CogViewConfig | None, what: str) -> None:
    """Raise CheckpointMismatchError when the SR stage cannot serve this VQ-VAE / base model: its image
    codes must be the VQ-VAE's; with a base transformer its low-res grid must be the base model's code
    grid and, when it reads text, its vocabulary the base model's (the same tokenizer)."""
    if sr.transformer.image_tokens != vqvae_config.codebook_size:
        raise CheckpointMismatchError(f"{what}: the SR stage reads {sr.transformer.image_tokens} image codes but the "
                                      f"VQ-VAE has {vqvae_config.codebook_size}")
    if sr.pixel_hint and (sr.pixel_hint, sr.image_channels) != (vqvae_config.downsample, vqvae_config.in_channels):
        raise CheckpointMismatchError(f"{what}: the SR stage's pixel hint reads {sr.image_channels}-channel "
                                      f"{sr.pixel_hint}x{sr.pixel_hint} patches but the VQ-VAE decodes "
                                      f"{vqvae_config.in_channels} channels at x{vqvae_config.downsample}")
    if config is None:
        return
    if sr.low_res != config.code_size:
        raise CheckpointMismatchError(f"{what}: the SR stage takes {sr.low_res}x{sr.low_res} codes but the base model "
                                      f"makes {config.code_size}x{config.code_size}")
    t = config.transformer
    if sr.text_positions and (sr.transformer.text_tokens, sr.transformer.command_tokens) != (
            t.text_tokens, t.command_tokens):
        raise CheckpointMismatchError(f"{what}: the SR stage's text vocabulary ({sr.transformer.text_tokens} text ids) "
                                      f"is not the base model's ({t.text_tokens})")


def _sr_state(super_resolution, config: SuperResolutionConfig | None, what: str):
    if isinstance(super_resolution, SuperResolutionTransformer):
        return super_resolution.state_dict(), super_resolution.config
    if isinstance(super_resolution, Mapping):
        if not isinstance(config, SuperResolutionConfig):
            raise ValueError(f"{what}: pass `super_resolution_config` with a super-resolution state dict")
        return super_resolution, config
    raise TypeError(f"{what}: `super_resolution` must be a SuperResolutionTransformer or a state dict, got "
                    f"{type(super_resolution).__name__}")


def _write_sr_file(path: Path, state, sr_config: SuperResolutionConfig, save_id: str, dtype, what: str) -> dict:
    with torch.device("meta"):
        expected = SuperResolutionTransformer(sr_config).state_dict()
    check_state_shapes({k: tuple(v.shape) for k, v in expected.items()}, {k: tuple(v.shape) for k, v in state.items()},
                       f"{what}: super_resolution")
    save_safetensors(path / SR_FILE, state, {"format": "cogview-super-resolution", _SAVE_ID_KEY: save_id}, dtype=dtype)
    stored = {v.dtype for v in state.values() if v.is_floating_point()}
    return {"save_id": save_id, "dtype": dtype_name(dtype) if dtype is not None else
            ",".join(sorted(dtype_name(d) for d in stored))}


def attach_super_resolution(path: str | os.PathLike, super_resolution, *,
                            config: SuperResolutionConfig | None = None, metadata: Mapping[str, Any] | None = None,
                            dtype=None) -> Path:
    """Add (or replace) the super-resolution stage of an existing model directory (full or VQ-VAE-only):
    writes super_resolution.safetensors (atomically), then config.json with a "super_resolution" entry;
    everything else in the directory is kept as it is. The stage must fit the directory's VQ-VAE (and
    base model: `check_super_resolution_fits`)."""
    what = "attach_super_resolution"
    directory = read_model_directory(path)
    dtype = dtype_from_name(dtype)
    state, sr_config = _sr_state(super_resolution, config, what)
    check_super_resolution_fits(sr_config, directory.vqvae_config, directory.config, what)
    metadata = dict(metadata or {})
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what}: `metadata` must be JSON-serialisable: {error}") from None
    config_path = directory.path / CONFIG_FILE
    document = json.loads(config_path.read_text(encoding="utf-8"))
    record = _write_sr_file(directory.path, state, sr_config, uuid.uuid4().hex, dtype, what)
    document["super_resolution"] = {"config": sr_config.to_dict(), "metadata": metadata}
    document.setdefault("files", {})[SR_FILE] = record
    atomic_write_text(config_path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return directory.path


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def _state_dict(obj, what: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    raise TypeError(f"save_model_dir: `{what}` must be a module or a state dict, got {type(obj).__name__}")


def save_model_dir(path: str | os.PathLike, *, vqvae, transformer=None, tokenizer=None,
                   config: CogViewConfig | VQVAEConfig | None = None, name: str | None = None,
                   metadata: Mapping[str, Any] | None = None, dtype=None, super_resolution=None,
                   super_resolution_config: SuperResolutionConfig | None = None,
                   super_resolution_metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a model directory (each file atomically, config.json last).

    vqvae / transformer: modules or state dicts (for state dicts, e.g. gathered from FSDP, pass
    `config`). Without a transformer the directory holds a VQ-VAE alone. tokenizer: a
    CogViewTokenizer, the SentencePiece model's bytes or a path to it (required with a transformer).
    dtype: cast the transformer's (and the SR stage's) floating-point weights (default: as they are). metadata: free JSON
    data kept in config.json (training settings, provenance).
    """
    path = Path(path)
    dtype = dtype_from_name(dtype)
    if config is None:
        if not isinstance(vqvae, VQVAE) or (transformer is not None and not isinstance(transformer, CogViewTransformer)):
            raise ValueError("save_model_dir: pass `config` when saving state dicts")
        vqvae_config = vqvae.config
        full = CogViewConfig(transformer.config, vqvae_config, name or "") if transformer is not None else None
    elif isinstance(config, CogViewConfig):
        full, vqvae_config = config, config.vqvae
        if transformer is None:
            raise ValueError("save_model_dir: a CogViewConfig was given but no transformer")
    elif isinstance(config, VQVAEConfig):
        if transformer is not None:
            raise ValueError("save_model_dir: a transformer needs a CogViewConfig, got a VQVAEConfig")
        full, vqvae_config = None, config
    else:
        raise TypeError(f"save_model_dir: `config` must be a CogViewConfig or VQVAEConfig, got {type(config).__name__}")
    if name is None:
        name = full.name if full is not None else ""
    if full is not None and tokenizer is None:
        raise ValueError("save_model_dir: a model with a transformer needs its `tokenizer`")
    metadata = dict(metadata or {})
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise ValueError(f"save_model_dir: `metadata` must be JSON-serialisable: {error}") from None

    tokenizer_bytes = None
    if full is not None:
        if isinstance(tokenizer, CogViewTokenizer):
            tok = tokenizer
        else:
            tok = CogViewTokenizer.for_config(tokenizer if isinstance(tokenizer, (bytes, bytearray)) else Path(tokenizer),
                                              full)
        layout = (tok.image_tokens, tok.text_tokens, tok.command_tokens)
        wanted = (full.transformer.image_tokens, full.transformer.text_tokens, full.transformer.command_tokens)
        if layout != wanted:
            raise ValueError(f"save_model_dir: the tokenizer's vocabulary (image, text, commands) = "
                             f"{layout[:2]} + {len(layout[2])} does not match the transformer's {wanted[:2]} + "
                             f"{len(wanted[2])}")
        tokenizer_bytes = tok.model_bytes

    vqvae_state = _state_dict(vqvae, "vqvae")
    state = _state_dict(transformer, "transformer") if full is not None else None
    sr_state = sr_config = None
    if super_resolution is not None:
        sr_state, sr_config = _sr_state(super_resolution, super_resolution_config, "save_model_dir")
        check_super_resolution_fits(sr_config, vqvae_config, full, "save_model_dir")
        sr_metadata = dict(super_resolution_metadata or {})
        json.dumps(sr_metadata)
    # refuse to write a directory that would not load: names and shapes against the config
    with torch.device("meta"):
        check_state_shapes({k: tuple(v.shape) for k, v in VQVAE(vqvae_config).state_dict().items()},
                           {k: tuple(v.shape) for k, v in vqvae_state.items()}, "save_model_dir: vqvae")
        if full is not None:
            check_state_shapes({k: tuple(v.shape) for k, v in CogViewTransformer(full.transformer).state_dict().items()},
                               {k: tuple(v.shape) for k, v in state.items()}, "save_model_dir: transformer")

    path.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    files: dict[str, dict[str, Any]] = {}
    save_safetensors(path / VQVAE_FILE, vqvae_state, {"format": "cogview-vqvae", _SAVE_ID_KEY: save_id})
    files[VQVAE_FILE] = {"save_id": save_id}
    if full is not None:
        save_safetensors(path / TRANSFORMER_FILE, state, {"format": "cogview-transformer", _SAVE_ID_KEY: save_id},
                         dtype=dtype)
        stored = {v.dtype for v in state.values() if v.is_floating_point()}
        files[TRANSFORMER_FILE] = {"save_id": save_id,
                                   "dtype": dtype_name(dtype) if dtype is not None else
                                   ",".join(sorted(dtype_name(d) for d in stored))}
        atomic_write_bytes(path / TOKENIZER_FILE, tokenizer_bytes)
        files[TOKENIZER_FILE] = {"sha256": hashlib.sha256(tokenizer_bytes).hexdigest()}
    if sr_state is not None:
        files[SR_FILE] = _write_sr_file(path, sr_state, sr_config, save_id, dtype, "save_model_dir")
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "cogview_version": __version__, "name": name,
                "transformer": full.transformer.to_dict() if full is not None else None,
                "vqvae": vqvae_config.to_dict(), "metadata": metadata, "files": files}
    if sr_state is not None:
        document["super_resolution"] = {"config": sr_config.to_dict(), "metadata": sr_metadata}
    atomic_write_text(path / CONFIG_FILE, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    stale_files = ((TRANSFORMER_FILE, TOKENIZER_FILE) if full is None else ()) + ((SR_FILE,) if sr_state is None else ())
    for stale in stale_files:  # drop what no longer belongs (e.g. a VQ-VAE-only save over a full model directory)
        if (path / stale).exists():
            (path / stale).unlink()
    return path


# ---------------------------------------------------------------------------------------------
# The facade
# ---------------------------------------------------------------------------------------------


class CogView:
    """A CogView model: `.transformer` (CogViewTransformer), `.vqvae` (VQVAE), `.tokenizer`
    (CogViewTokenizer), `.config` (CogViewConfig) and free `.metadata`.

        model = CogView.from_pretrained(DIR, device="cuda", dtype="bf16")
        model.save_pretrained(OUT)
        model = CogView.from_config("small-16x16", tokenizer)   # fresh random weights
    """

    def __init__(self, transformer: CogViewTransformer, vqvae: VQVAE, tokenizer: CogViewTokenizer, *,
                 name: str = "", metadata: Mapping[str, Any] | None = None,
                 super_resolution: SuperResolutionTransformer | None = None,
                 super_resolution_metadata: Mapping[str, Any] | None = None):
        if not isinstance(transformer, CogViewTransformer):
            raise TypeError(f"CogView: `transformer` must be a CogViewTransformer, got {type(transformer).__name__}")
        if not isinstance(vqvae, VQVAE):
            raise TypeError(f"CogView: `vqvae` must be a VQVAE, got {type(vqvae).__name__}")
        if not isinstance(tokenizer, CogViewTokenizer):
            raise TypeError(f"CogView: `tokenizer` must be a CogViewTokenizer, got {type(tokenizer).__name__}")
        self.config = CogViewConfig(transformer.config, vqvae.config, name)  # checks codebook == image tokens
        t = transformer.config
        if (tokenizer.image_tokens, tokenizer.text_tokens, tokenizer.command_tokens) != (
                t.image_tokens, t.text_tokens, t.command_tokens):
            raise ValueError(f"CogView: the tokenizer's vocabulary ({tokenizer.image_tokens} image + "
                             f"{tokenizer.text_tokens} text + {len(tokenizer.command_tokens)} command tokens) does "
                             f"not match the transformer's ({t.image_tokens} + {t.text_tokens} + "
                             f"{len(t.command_tokens)})")
        if tokenizer.image_len is None:
            tokenizer.set_layout(image_len=self.config.image_seq_len)
        if tokenizer.max_len is None:
            tokenizer.set_layout(max_len=t.max_positions)
        self.transformer = transformer
        self.vqvae = vqvae
        self.tokenizer = tokenizer
        self.metadata: dict[str, Any] = dict(metadata or {})
        # The optional super-resolution stage (`model.upscale`, `cogview generate --super-resolution`).
        if super_resolution is not None:
            if not isinstance(super_resolution, SuperResolutionTransformer):
                raise TypeError(f"CogView: `super_resolution` must be a SuperResolutionTransformer, got "
                                f"{type(super_resolution).__name__}")
            check_super_resolution_fits(super_resolution.config, vqvae.config, self.config, "CogView")
        self.super_resolution = super_resolution
        self.super_resolution_metadata: dict[str, Any] = dict(super_resolution_metadata or {})

    @property
    def name(self) -> str:
        return self.config.name

    # ---- construction ----
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device=None, dtype=None, vqvae_dtype=torch.float32,
                        verify: bool = True) -> "CogView":
        """Load a model directory (local only). device: default CPU. dtype: the transformer's (default:
        as stored; e.g. torch.bfloat16 or "bf16"). vqvae_dtype: the VQ-VAE convolutions' (default float32;
        the codebook stays float32). verify: check every tensor's CRC-32 (on by default)."""
        directory = read_model_directory(path)
        if directory.config is None:
            raise CheckpointNotFoundError(f"{directory.path} holds a VQ-VAE only; load it with "
                                          f"cogview.pipeline.load_vqvae")
        tokenizer = load_tokenizer(directory)
        transformer = load_transformer(directory, device=device, dtype=dtype, verify=verify)
        vqvae = load_vqvae(directory, device=device, dtype=vqvae_dtype, verify=verify)
        sr = None
        if directory.super_resolution is not None:
            sr = load_super_resolution(directory, device=device, dtype=dtype, verify=verify)
        return cls(transformer, vqvae, tokenizer, name=directory.name, metadata=directory.metadata,
                   super_resolution=sr, super_resolution_metadata=directory.super_resolution_metadata)

    @classmethod
    def from_config(cls, config: CogViewConfig | str, tokenizer, *, device=None, dtype=None,
                    name: str | None = None) -> "CogView":
        """A freshly initialised model of `config` (a CogViewConfig or a preset name) with `tokenizer`
        (a CogViewTokenizer, or a SentencePiece model path/bytes given the config's layout)."""
        if isinstance(config, str):
            if config not in presets:
                raise KeyError(f"unknown model preset {config!r}; known: {sorted(presets)}")
            config = presets[config]
        if not isinstance(config, CogViewConfig):
            raise TypeError(f"CogView.from_config: expected a CogViewConfig or preset name, got {type(config).__name__}")
        if not isinstance(tokenizer, CogViewTokenizer):
            tokenizer = CogViewTokenizer.for_config(tokenizer, config)
        dtype = dtype_from_name(dtype)
        transformer = CogViewTransformer(config.transformer, device=device, dtype=dtype)
        vqvae = VQVAE(config.vqvae, device=device)
        return cls(transformer, vqvae, tokenizer, name=config.name if name is None else name)

    # ---- saving ----
    @property
    def default_temperature(self) -> float:
        """The sampling temperature `generate`/`complete` use when given none: the model directory's
        recommendation (`metadata["sampling"]["temperature"]`, written by whoever trained it), else
        CogView's 1.0."""
        value = (self.metadata.get("sampling") or {}).get("temperature", 1.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"CogView: the model's metadata recommends temperature {value!r}; it must be a finite "
                             f"number >= 0 (config.json, metadata.sampling.temperature)")
        return float(value)

    def save_pretrained(self, path: str | os.PathLike, *, dtype=None, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write the model directory (atomically per file, config.json last). dtype: store the
        transformer in this dtype (default: as it is). metadata: replaces `self.metadata` in the file."""
        return save_model_dir(path, vqvae=self.vqvae, transformer=self.transformer, tokenizer=self.tokenizer,
                              name=self.name, metadata=self.metadata if metadata is None else metadata,
                              dtype=dtype, super_resolution=self.super_resolution,
                              super_resolution_metadata=self.super_resolution_metadata)

    # ---- device / dtype ----
    @property
    def device(self) -> torch.device:
        return self.transformer.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.word_embeddings.weight.dtype

    def to(self, device=None, dtype=None) -> "CogView":
        """Move both models to `device`; `dtype` applies to the transformer (the VQ-VAE keeps its own)."""
        dtype = dtype_from_name(dtype)
        self.transformer.to(device=device, dtype=dtype)
        if self.super_resolution is not None:
            self.super_resolution.to(device=device, dtype=dtype)
        if device is not None:
            self.vqvae.to(device=device)
        return self

    def eval(self) -> "CogView":
        self.transformer.eval()
        self.vqvae.eval()
        if self.super_resolution is not None:
            self.super_resolution.eval()
        return self

    def num_parameters(self) -> int:
        return self.transformer.num_parameters()

    # ---- generation: the functions of cogview.generation, as methods ----
    generate = _generation.generate
    caption = _generation.caption
    score = _generation.score
    complete = _generation.complete
    upscale = _generation.upscale  # needs the super-resolution stage

    def __repr__(self) -> str:
        t = self.config.transformer
        return (f"CogView(name={self.name!r}, layers={t.num_layers}, hidden={t.hidden_size}, heads={t.num_heads}, "
                f"parameters={self.num_parameters():,}, image={self.config.image_size}px -> "
                f"{self.config.code_size}x{self.config.code_size} codes, device={self.device}, dtype={self.dtype})")

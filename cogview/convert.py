"""Convert the original CogView release into a cogview model directory.

    convert_release(transformer="cogview-base", vqvae="vqvae_hard_biggerset_011.pt",
                    tokenizer="cog-pretrain.model", out="cogview-4b")
    cogview convert --transformer cogview-base --vqvae vqvae_hard_biggerset_011.pt \
                    --tokenizer cog-pretrain.model --out cogview-4b

What it reads (facts in ../shared/reference/cogview-facts.md):
- the transformer folder: `latest_checkpointed_iteration.txt` (Megatron/CogView) or `latest` (+
  `model_config.json`, SwissArmyTransformer) naming the iteration folder, and
  `<iter>/mp_rank_00_model_states.pt` whose ["module"] is the fp16 state dict. CogView's keys are
  `word_embeddings.weight` + `transformer.*`; SwissArmyTransformer roots all of them under
  `transformer.`. Either way, dropping the leading `transformer.` gives this project's names. The path
  may also be the iteration folder or the .pt file itself.
- the VQ-VAE: a state dict with `module.`-prefixed keys `enc_b.blocks.*`, `quantize_t.{embed,
  cluster_size, embed_avg}` (embed and embed_avg stored [dim, n]: transposed here), `dec.blocks.*`.
- the SentencePiece model of the text side.

The release has no config: layers, widths, MLP size, positions and the embedding rows are read from the
shapes; `num_heads` (default 40, or `num_attention_heads` of a model_config.json), `image_tokens` (8192)
and `text_tokens` (50000) are given. The converted transformer uses the PB-relax LayerNorm, as the
release did (`pb_relax=False` gives plain LayerNorm). Weights keep their stored dtype (fp16) unless
`dtype` says otherwise.

Pickles are read with `torch.load(weights_only=True)` only (memory-mapped when the file allows, so a
7.9 GB checkpoint is streamed to the output rather than held in memory). Plain data that DeepSpeed
checkpoints carry besides the weights (numpy RNG states, argparse namespaces) is allowed through a fixed
allow-list; anything else is refused with the offending names.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from cogview.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    check_state_shapes,
    dtype_from_name,
    dtype_name,
)
from cogview.models.config import CogViewConfig, TransformerConfig, VQVAEConfig
from cogview.models.transformer import CogViewTransformer
from cogview.models.vqvae import VQVAE
from cogview.tokenizer import CogViewTokenizer

__all__ = [
    "convert_release",
    "convert_transformer_state",
    "convert_vqvae_state",
    "find_release_checkpoint",
    "load_release_state",
]

TRACKER_FILES = ("latest_checkpointed_iteration.txt", "latest")
MODEL_STATES = "mp_rank_00_model_states.pt"


# ---------------------------------------------------------------------------------------------
# Reading the release
# ---------------------------------------------------------------------------------------------


def find_release_checkpoint(path: str | os.PathLike, iteration: str | None = None) -> tuple[Path, dict | None]:
    """Locate the model-states file of a release folder. Returns (file, model_config.json contents or
    None). `path`: the folder with the tracker file, the iteration folder, or the .pt file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"transformer checkpoint not found: {path}")
    model_config = None
    if path.is_file():
        return path, _read_model_config(path.parent.parent / "model_config.json")
    if (path / MODEL_STATES).is_file() and iteration is None:
        return path / MODEL_STATES, _read_model_config(path.parent / "model_config.json")
    model_config = _read_model_config(path / "model_config.json")
    if iteration is None:
        tracker = next((path / t for t in TRACKER_FILES if (path / t).is_file()), None)
        if tracker is None:
            raise CheckpointNotFoundError(f"{path}: no {' or '.join(TRACKER_FILES)} naming the iteration folder, and no "
                                          f"{MODEL_STATES} in it")
        iteration = tracker.read_text(encoding="utf-8", errors="replace").strip()
        if not iteration or "/" in iteration or iteration in (".", ".."):
            raise CheckpointCorruptError(f"{tracker}: does not name an iteration folder ({iteration!r})")
    folder = path / str(iteration)
    file = folder / MODEL_STATES
    if not file.is_file():
        raise CheckpointNotFoundError(f"{path}: the tracker names iteration {iteration!r} but {file} does not exist")
    return file, model_config


def _read_model_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointCorruptError(f"{path}: not valid JSON ({error})") from None
    return data if isinstance(data, dict) else None


# Plain data some original checkpoints hold next to the weights (RNG states, arguments). Names map to
# objects resolved here, never imported from the file's say-so.
def _benign_globals() -> dict[str, Any]:
    import argparse
    import codecs

    allowed: dict[str, Any] = {"argparse.Namespace": argparse.Namespace, "_codecs.encode": codecs.encode}
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return allowed
    allowed["numpy.ndarray"] = np.ndarray
    allowed["numpy.dtype"] = np.dtype
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{module}._reconstruct"] = _numpy_attr("_reconstruct")
        allowed[f"{module}.scalar"] = _numpy_attr("scalar")
    for dtype_class in ("UInt32DType", "Int64DType", "Float64DType", "Float32DType", "UInt8DType", "Int32DType",
                        "BoolDType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, dtype_class):
            allowed[f"numpy.dtypes.{dtype_class}"] = getattr(np.dtypes, dtype_class)
    return {k: v for k, v in allowed.items() if v is not None}


def _numpy_attr(name: str):
    import numpy as np

    for module in ("_core", "core"):
        multiarray = getattr(getattr(np, module, None), "multiarray", None)
        if multiarray is not None and hasattr(multiarray, name):
            return getattr(multiarray, name)
    return None


def _torch_load(file: Path):
    """torch.load(weights_only=True), memory-mapped when possible, with the benign allow-list."""
    def attempt(mmap: bool):
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)

    def attempt_any():
        try:
            return attempt(True)
        except RuntimeError as error:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(error).lower() and "zip" not in str(error).lower():
                raise
            return attempt(False)

    try:
        return attempt_any()
    except pickle.UnpicklingError:
        pass
    # Retry with the allow-list (all of it: unpickling numpy dtypes BUILDs instances of classes such as
    # numpy.dtypes.UInt32DType that are never named as globals).
    try:
        with torch.serialization.safe_globals(list(_benign_globals().values())):
            return attempt_any()
    except pickle.UnpicklingError as error:
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
        except Exception:  # legacy (non-zip) files cannot be scanned
            needed = []
        refused = [n for n in needed if n not in _benign_globals()]
        raise CheckpointCorruptError(
            f"{file}: cannot be read with torch.load(weights_only=True): "
            + (f"it references {refused}, which this converter does not allow" if refused else str(error))
        ) from None


def load_release_state(file: str | os.PathLike, *, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of an original checkpoint: its ["module"] (or ["state_dict"]) entry, or the file
    itself when it is a plain state dict. Read with torch.load(weights_only=True)."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointNotFoundError(f"{what} not found: {file}")
    try:
        data = _torch_load(file)
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointCorruptError(f"{file}: not a readable PyTorch checkpoint (truncated or damaged?): "
                                     f"{error}") from None
    if isinstance(data, dict):
        for key in ("module", "state_dict", "model"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not data:
        raise CheckpointCorruptError(f"{file}: holds no state dict (found {type(data).__name__})")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    others = [k for k in data if k not in tensors]
    if others:
        raise CheckpointCorruptError(f"{file}: the state dict has non-tensor entries {others[:5]}")
    return tensors


def _strip(keys_to_tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if keys_to_tensors and all(k.startswith(prefix) for k in keys_to_tensors):
        return {k[len(prefix):]: v for k, v in keys_to_tensors.items()}
    return keys_to_tensors


# ---------------------------------------------------------------------------------------------
# Transformer
# ---------------------------------------------------------------------------------------------

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")


def convert_transformer_state(state: dict[str, torch.Tensor], *, num_heads: int | None = None,
                              image_tokens: int = 8192, text_tokens: int = 50000, pb_relax: bool = True,
                              model_config: dict | None = None) -> tuple[dict[str, torch.Tensor], TransformerConfig, str]:
    """Original transformer state dict -> (this project's state dict, its TransformerConfig, variant
    name: "cogview" or "swissarmy"). Widths, layers, positions and embedding rows come from the shapes."""
    state = _strip(state, "module.")
    if "transformer.word_embeddings.weight" in state:
        variant = "swissarmy"
    elif "word_embeddings.weight" in state:
        variant = "cogview"
    else:
        raise CheckpointMismatchError("not a CogView transformer checkpoint: no word_embeddings.weight "
                                      f"(first keys: {list(state)[:5]})")
    ours = {}
    for key, tensor in state.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name in ours:
            raise CheckpointMismatchError(f"the checkpoint holds {name} twice (with and without 'transformer.')")
        ours[name] = tensor

    embed = ours["word_embeddings.weight"]
    if embed.dim() != 2:
        raise CheckpointMismatchError(f"word_embeddings.weight must be 2-D, got {tuple(embed.shape)}")
    vocab_rows, hidden = embed.shape
    if "position_embeddings.weight" not in ours:
        raise CheckpointMismatchError("the checkpoint has no transformer.position_embeddings.weight")
    max_positions = ours["position_embeddings.weight"].shape[0]
    layer_ids = sorted({int(m.group(1)) for k in ours if (m := _LAYER_KEY.match(k))})
    if not layer_ids or layer_ids != list(range(len(layer_ids))):
        raise CheckpointMismatchError(f"the checkpoint's layers are not numbered 0..N-1: {layer_ids[:10]}")
    num_layers = len(layer_ids)
    h_to_4h = ours.get("layers.0.mlp.dense_h_to_4h.weight")
    if h_to_4h is None:
        raise CheckpointMismatchError("the checkpoint has no transformer.layers.0.mlp.dense_h_to_4h.weight")
    mlp_size = h_to_4h.shape[0]

    model_config = model_config or {}
    if num_heads is None:
        num_heads = int(model_config.get("num_attention_heads", 40))
    for key, value, what in (("num_layers", num_layers, "layers"), ("hidden_size", hidden, "hidden size"),
                             ("num_attention_heads", num_heads, "heads")):
        if key in model_config and int(model_config[key]) != value:
            raise CheckpointMismatchError(f"model_config.json says {key}={model_config[key]} but the {what} "
                                          f"{'given' if key == 'num_attention_heads' else 'in the weights'} "
                                          f"is {value}")
    if hidden % num_heads:
        raise CheckpointMismatchError(f"hidden size {hidden} (from the weights) is not a multiple of num_heads "
                                      f"{num_heads}")
    try:
        config = TransformerConfig(num_layers=num_layers, hidden_size=hidden, num_heads=num_heads, mlp_size=mlp_size,
                                   max_positions=max_positions, image_tokens=image_tokens, text_tokens=text_tokens,
                                   vocab_rows=vocab_rows, pb_relax=pb_relax)
    except ValueError as error:
        raise CheckpointMismatchError(f"the weights do not fit image_tokens={image_tokens}, text_tokens="
                                      f"{text_tokens}: {error}") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in CogViewTransformer(config).state_dict().items()}
    check_state_shapes(expected, {k: tuple(v.shape) for k, v in ours.items()}, "transformer checkpoint")
    return {k: ours[k] for k in expected}, config, variant


# ---------------------------------------------------------------------------------------------
# VQ-VAE
# ---------------------------------------------------------------------------------------------

_BLOCK_KEY = re.compile(r"^(enc_b|dec)\.blocks\.(\d+)\.(weight|bias)$")


def convert_vqvae_state(state: dict[str, torch.Tensor], *, image_size: int = 256) -> tuple[dict[str, torch.Tensor], VQVAEConfig]:
    """Original VQ-VAE state dict (`module.enc_b...`) -> (this project's state dict in float32, its
    VQVAEConfig with CogView's pixel normalisation). Channels, codebook and down-sampling come from the
    shapes; `image_size` is the nominal resolution (256 for CogView)."""
    state = _strip(state, "module.")
    for key in ("quantize_t.embed", "quantize_t.cluster_size", "quantize_t.embed_avg"):
        if key not in state:
            raise CheckpointMismatchError(f"not a CogView VQ-VAE checkpoint: no {key} (first keys: {list(state)[:5]})")
    unknown = [k for k in state if not _BLOCK_KEY.match(k) and not k.startswith("quantize_t.")]
    if unknown:
        raise CheckpointMismatchError(f"unsupported VQ-VAE layout (residual blocks?): unexpected keys {unknown[:6]}")
    enc = sorted({int(m.group(2)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(1) == "enc_b"})
    if len(enc) < 2 or enc != list(range(0, 2 * len(enc), 2)):
        raise CheckpointMismatchError(f"unsupported VQ-VAE encoder layout: convolutions at blocks {enc}")
    weights = [state[f"enc_b.blocks.{i}.weight"] for i in enc]
    if any(w.dim() != 4 for w in weights) or any(w.shape[-1] != 4 for w in weights[:-1]) or weights[-1].shape[-1] != 1:
        raise CheckpointMismatchError("unsupported VQ-VAE encoder: expected 4x4 stride-2 convolutions then a 1x1, got "
                                      f"kernels {[tuple(w.shape[-2:]) for w in weights]}")
    num_down = len(enc) - 1
    in_channels, hidden, embed_dim = weights[0].shape[1], weights[0].shape[0], weights[-1].shape[0]
    embed = state["quantize_t.embed"]
    if embed.dim() != 2 or embed.shape[0] != embed_dim:
        raise CheckpointMismatchError(f"quantize_t.embed is {tuple(embed.shape)}; expected [{embed_dim}, codebook size] "
                                      f"(the encoder outputs {embed_dim} channels)")
    codebook = embed.shape[1]
    try:
        config = VQVAEConfig(image_size=image_size, in_channels=in_channels, downsample=2**num_down,
                             hidden_channels=hidden, embed_dim=embed_dim, codebook_size=codebook, num_res_blocks=0,
                             pixel_mean=VQVAEConfig().pixel_mean if in_channels == 3 else (0.5,) * in_channels,
                             pixel_std=VQVAEConfig().pixel_std if in_channels == 3 else (0.5,) * in_channels)
    except ValueError as error:
        raise CheckpointMismatchError(f"the VQ-VAE weights give an invalid config: {error}") from None
    ours: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _BLOCK_KEY.match(key)
        if m:
            ours[f"{'encoder' if m.group(1) == 'enc_b' else 'decoder'}.blocks.{m.group(2)}.{m.group(3)}"] = tensor.float()
    ours["quantizer.embed"] = embed.float().t().contiguous()
    ours["quantizer.embed_avg"] = state["quantize_t.embed_avg"].float().t().contiguous()
    ours["quantizer.cluster_size"] = state["quantize_t.cluster_size"].float()
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in VQVAE(config).state_dict().items()}
    check_state_shapes(expected, {k: tuple(v.shape) for k, v in ours.items()}, "VQ-VAE checkpoint")
    return {k: ours[k] for k in expected}, config


# ---------------------------------------------------------------------------------------------
# The whole release
# ---------------------------------------------------------------------------------------------


def convert_release(transformer: str | os.PathLike, vqvae: str | os.PathLike, tokenizer: str | os.PathLike,
                    out: str | os.PathLike, *, num_heads: int | None = None, image_tokens: int = 8192,
                    text_tokens: int = 50000, image_size: int = 256, pb_relax: bool = True, dtype=None,
                    name: str = "cogview-release", iteration: str | None = None, overwrite: bool = False) -> Path:
    """Convert the original release into the model directory `out` (see the module docstring).
    Returns `out`. Refuses a non-empty `out` unless `overwrite`."""
    from cogview.pipeline import save_model_dir

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"convert_release: {out} exists and is not empty (pass overwrite=True / --force)")
    dtype = dtype_from_name(dtype)
    for value, what in ((image_tokens, "image_tokens"), (text_tokens, "text_tokens")):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"convert_release: `{what}` must be a positive int, got {value!r}")
    if num_heads is not None and (not isinstance(num_heads, int) or num_heads < 1):
        raise ValueError(f"convert_release: `num_heads` must be a positive int, got {num_heads!r}")

    tokenizer_path = Path(tokenizer)
    if not tokenizer_path.is_file():
        raise CheckpointNotFoundError(f"tokenizer (SentencePiece model) not found: {tokenizer_path}")
    vqvae_path = Path(vqvae)
    if not vqvae_path.is_file():
        raise CheckpointNotFoundError(f"VQ-VAE checkpoint not found: {vqvae_path}")
    pt_file, model_config = find_release_checkpoint(transformer, iteration)

    vq_state, vq_config = convert_vqvae_state(load_release_state(vqvae_path, what="VQ-VAE checkpoint"),
                                              image_size=image_size)
    if vq_config.codebook_size != image_tokens:
        raise CheckpointMismatchError(f"the VQ-VAE codebook has {vq_config.codebook_size} codes but image_tokens is "
                                      f"{image_tokens}")
    raw = load_release_state(pt_file, what="transformer checkpoint")
    stored = sorted({dtype_name(v.dtype) for v in raw.values() if v.is_floating_point()})
    t_state, t_config, variant = convert_transformer_state(raw, num_heads=num_heads, image_tokens=image_tokens,
                                                           text_tokens=text_tokens, pb_relax=pb_relax,
                                                           model_config=model_config)
    config = CogViewConfig(t_config, vq_config, name)
    try:
        tok = CogViewTokenizer.for_config(tokenizer_path, config)
    except CheckpointError:
        raise
    except ValueError as error:
        raise CheckpointMismatchError(f"{tokenizer_path}: {error}") from None
    metadata = {"converted_from": {
        "format": "CogView release (Megatron/DeepSpeed)" if variant == "cogview" else "SwissArmyTransformer",
        "transformer": str(pt_file), "vqvae": str(vqvae_path), "tokenizer": str(tokenizer_path),
        "stored_dtype": ",".join(stored), "pb_relax_layernorm": pb_relax}}
    return save_model_dir(out, vqvae=vq_state, transformer=t_state, tokenizer=tok, config=config, name=name,
                          metadata=metadata, dtype=dtype)

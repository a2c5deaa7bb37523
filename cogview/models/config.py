"""Model configurations (plain dataclasses, JSON round-trippable) and the named presets.

A full model is a `CogViewConfig`: a `TransformerConfig` plus the `VQVAEConfig` whose codes the
transformer reads. `presets` maps names to full configs; `vqvae_presets` additionally names VQ-VAE
architectures on their own (e.g. `cogview`, CogView1's tokenizer).

The vocabulary layout is part of `TransformerConfig`, as in CogView1: image codes first
(ids 0 .. image_tokens-1), text pieces after them (offset by image_tokens), then the command tokens in
the order of `command_tokens`; the embedding table has `vocab_rows` >= vocab_size rows (padded up to a
multiple of `vocab_pad_multiple`, as Megatron did: 58219 -> 58240 for the 4B model).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# CogView1's command tokens, in id order: [PAD] is image_tokens + text_tokens + 0 (58192 in the original).
COGVIEW_COMMAND_TOKENS: tuple[str, ...] = (
    "[PAD]", "[BOI1]", "[BOI2]", "[BOI3]", "[EOI1]", "[EOI2]", "[EOI3]", "[ROI1]", "[ROI2]", "[ROI3]",
    "[SEP]", "[MASK]", "[CLS]", "[ENC]", "[TINY]", "[SMALL]", "[BASE]", "[BIG]",
    "[POS0]", "[POS1]", "[POS2]", "[POS3]", "[POS4]", "[POS5]", "[POS6]", "[POS7]", "[POS8]",
)

# CogView1's pixel normalisation (applied to images in [0, 1] before the VQ-VAE encoder).
COGVIEW_PIXEL_MEAN = (0.79093, 0.76271, 0.75340)
COGVIEW_PIXEL_STD = (0.30379, 0.32279, 0.32800)


def _from_dict(cls, data: dict[str, Any]):
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}.from_dict: expected a dict, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}.from_dict: unknown field(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            # JSON has no tuples: tuple-typed fields come back as lists.
            if isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
    return cls(**kwargs)


def _to_dict(obj) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _positive_int(owner: str, name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}: `{name}` must be an int >= {minimum}, got {value!r}")


def _positive_float(owner: str, name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{owner}: `{name}` must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")


@dataclass(frozen=True)
class TransformerConfig:
    """The CogView transformer: sandwich-LayerNorm GPT over one text + image + command vocabulary."""

    num_layers: int
    hidden_size: int
    num_heads: int
    mlp_size: int | None = None  # None: 4 * hidden_size
    max_positions: int = 1089  # rows of the learned position table
    image_tokens: int = 8192
    text_tokens: int = 50000
    command_tokens: tuple[str, ...] = COGVIEW_COMMAND_TOKENS
    vocab_pad_multiple: int = 128
    vocab_rows: int | None = None  # None: vocab_size rounded up to vocab_pad_multiple
    layernorm_eps: float = 1e-5
    # CogView's PB-relax LayerNorm LN(x / (max|x| / 8)) (per-row max), in every LayerNorm. On for
    # CogView's own weights (the release was trained with it).
    pb_relax: bool = False
    # PB-relax attention (alpha = attention_alpha): softmax((QK^T / (alpha sqrt d) - max) * alpha).
    # Same function as plain softmax attention, computed so fp16 scores cannot overflow; not used by
    # the CogView release, so off by default.
    attention_pb_relax: bool = False
    attention_alpha: float = 32.0
    init_std: float = 0.02
    checkpoint_activations: bool = False

    def __post_init__(self) -> None:
        owner = "TransformerConfig"
        for name in ("num_layers", "hidden_size", "num_heads", "max_positions", "vocab_pad_multiple"):
            _positive_int(owner, name, getattr(self, name))
        for name in ("image_tokens", "text_tokens"):
            _positive_int(owner, name, getattr(self, name), minimum=0)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{owner}: hidden_size {self.hidden_size} is not a multiple of num_heads "
                             f"{self.num_heads}")
        if self.mlp_size is None:
            object.__setattr__(self, "mlp_size", 4 * self.hidden_size)
        _positive_int(owner, "mlp_size", self.mlp_size)
        commands = tuple(self.command_tokens)
        if any(not isinstance(c, str) for c in commands) or len(set(commands)) != len(commands):
            raise ValueError(f"{owner}: `command_tokens` must be distinct strings, got {commands!r}")
        object.__setattr__(self, "command_tokens", commands)
        if self.vocab_size < 1:
            raise ValueError(f"{owner}: the vocabulary is empty (image_tokens + text_tokens + command tokens = 0)")
        if self.vocab_rows is None:
            rows = -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple
            object.__setattr__(self, "vocab_rows", rows)
        _positive_int(owner, "vocab_rows", self.vocab_rows)
        if self.vocab_rows < self.vocab_size:
            raise ValueError(f"{owner}: vocab_rows {self.vocab_rows} is smaller than the vocabulary "
                             f"({self.image_tokens} image + {self.text_tokens} text + {len(commands)} command "
                             f"= {self.vocab_size})")
        _positive_float(owner, "layernorm_eps", self.layernorm_eps, allow_zero=True)
        _positive_float(owner, "attention_alpha", self.attention_alpha)
        _positive_float(owner, "init_std", self.init_std)

    # ---- vocabulary layout ----
    @property
    def vocab_size(self) -> int:
        """Ids in use: image + text + command tokens (the embedding may have more rows: vocab_rows)."""
        return self.image_tokens + self.text_tokens + len(self.command_tokens)

    @property
    def text_offset(self) -> int:
        """Id of text piece 0."""
        return self.image_tokens

    @property
    def command_offset(self) -> int:
        """Id of the first command token ([PAD] in CogView's order)."""
        return self.image_tokens + self.text_tokens

    def command_id(self, name: str) -> int:
        """The id of a command token, e.g. `command_id("[BOI1]")` (58193 for the 4B model)."""
        try:
            return self.command_offset + self.command_tokens.index(name)
        except ValueError:
            raise KeyError(f"unknown command token {name!r}; known: {list(self.command_tokens)}") from None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_parameters(self) -> int:
        """Parameter count of the model this config builds (no buffers)."""
        h, m, layers = self.hidden_size, self.mlp_size, self.num_layers
        per_layer = (3 * h * h + 3 * h) + (h * h + h) + (m * h + m) + (h * m + h) + 4 * 2 * h
        return self.vocab_rows * h + self.max_positions * h + layers * per_layer + 2 * h

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransformerConfig":
        return _from_dict(cls, data)

    def replace(self, **changes) -> "TransformerConfig":
        """A copy with fields changed, re-validated. Derived fields (vocab_rows, mlp_size) are derived
        again when what they derive from changes, unless given explicitly."""
        base = self.to_dict()
        vocab_keys = ("image_tokens", "text_tokens", "command_tokens", "vocab_pad_multiple")
        if any(k in changes for k in vocab_keys) and "vocab_rows" not in changes:
            base["vocab_rows"] = None
        if "hidden_size" in changes and "mlp_size" not in changes and self.mlp_size == 4 * self.hidden_size:
            base["mlp_size"] = None
        base.update(changes)
        return TransformerConfig.from_dict(base)


@dataclass(frozen=True)
class VQVAEConfig:
    """A convolutional VQ-VAE with an EMA codebook (CogView1's architecture with num_res_blocks = 0).

    Encoder: log2(downsample) x [Conv k4 s2 p1, ReLU] (the first from in_channels), then
    num_res_blocks residual blocks (+ ReLU), then Conv1x1 -> embed_dim. The decoder mirrors it with
    ConvTranspose k4 s2 p1 and a final Conv1x1 -> in_channels. Images in [0, 1] are normalised with
    pixel_mean / pixel_std first; `decode` undoes it and clamps to [0, 1].
    """

    image_size: int = 256  # nominal resolution (any multiple of `downsample` works)
    in_channels: int = 3
    downsample: int = 8  # a power of two >= 2: 8 -> 256x256 images give 32x32 codes
    hidden_channels: int = 512
    embed_dim: int = 256
    codebook_size: int = 8192
    num_res_blocks: int = 0
    res_channels: int | None = None  # None: hidden_channels // 4
    pixel_mean: tuple[float, ...] = COGVIEW_PIXEL_MEAN
    pixel_std: tuple[float, ...] = COGVIEW_PIXEL_STD
    # EMA codebook
    decay: float = 0.99
    eps: float = 1e-5
    commitment: float = 0.25  # weight of ||z_e - sg(z_q)||^2 in the training loss
    # Dead-code restart: after the quantizer has seen `restart_window * codebook_size` encoder outputs in
    # training, every code chosen fewer than `restart_min_usage` times in that window is re-seeded from
    # recent encoder outputs (0 disables restarts).
    restart_window: float = 4.0
    restart_min_usage: float = 1.0
    restart_buffer: int = 4096  # recent encoder outputs kept for re-seeding

    def __post_init__(self) -> None:
        owner = "VQVAEConfig"
        for name in ("image_size", "in_channels", "hidden_channels", "embed_dim", "codebook_size", "restart_buffer"):
            _positive_int(owner, name, getattr(self, name))
        _positive_int(owner, "num_res_blocks", self.num_res_blocks, minimum=0)
        _positive_int(owner, "downsample", self.downsample, minimum=2)
        if self.downsample & (self.downsample - 1):
            raise ValueError(f"{owner}: `downsample` must be a power of two (2, 4, 8, ...), got {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(f"{owner}: image_size {self.image_size} is not a multiple of downsample {self.downsample}")
        if self.res_channels is None:
            object.__setattr__(self, "res_channels", max(1, self.hidden_channels // 4))
        _positive_int(owner, "res_channels", self.res_channels)
        for name in ("pixel_mean", "pixel_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != self.in_channels:
                raise ValueError(f"{owner}: `{name}` needs {self.in_channels} values (one per channel), got {value}")
            object.__setattr__(self, name, value)
        if any(s <= 0 for s in self.pixel_std):
            raise ValueError(f"{owner}: `pixel_std` must be > 0, got {self.pixel_std}")
        if not (0.0 <= self.decay < 1.0):
            raise ValueError(f"{owner}: `decay` must lie in [0, 1), got {self.decay!r}")
        _positive_float(owner, "eps", self.eps)
        _positive_float(owner, "commitment", self.commitment, allow_zero=True)
        _positive_float(owner, "restart_window", self.restart_window, allow_zero=True)
        _positive_float(owner, "restart_min_usage", self.restart_min_usage, allow_zero=True)

    @property
    def code_size(self) -> int:
        """Side of the code grid for `image_size` images (32 for CogView)."""
        return self.image_size // self.downsample

    @property
    def num_downsamples(self) -> int:
        return self.downsample.bit_length() - 1

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VQVAEConfig":
        return _from_dict(cls, data)

    def replace(self, **changes) -> "VQVAEConfig":
        base = self.to_dict()
        if "hidden_channels" in changes and "res_channels" not in changes:
            base["res_channels"] = None
        base.update(changes)
        return VQVAEConfig.from_dict(base)


@dataclass(frozen=True)
class CogViewConfig:
    """A full model: the transformer and the VQ-VAE whose codes it reads (config.json of a model dir)."""

    transformer: TransformerConfig
    vqvae: VQVAEConfig
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.transformer, TransformerConfig) or not isinstance(self.vqvae, VQVAEConfig):
            raise TypeError("CogViewConfig: `transformer` must be a TransformerConfig and `vqvae` a VQVAEConfig")
        if self.vqvae.codebook_size != self.transformer.image_tokens:
            raise ValueError(f"CogViewConfig: the VQ-VAE codebook has {self.vqvae.codebook_size} codes but the "
                             f"transformer has {self.transformer.image_tokens} image tokens")

    @property
    def image_size(self) -> int:
        return self.vqvae.image_size

    @property
    def code_size(self) -> int:
        return self.vqvae.code_size

    @property
    def image_seq_len(self) -> int:
        """Image tokens per image (1024 for CogView)."""
        return self.vqvae.code_size**2

    @property
    def max_text_len(self) -> int:
        """Room for text in the text->image layout `[ROI1] text [BASE] [BOI1] codes [EOI1]` when the
        whole layout fills max_positions (61 for CogView: 64 text-side tokens + 1024 codes + [EOI1])."""
        return self.transformer.max_positions - self.image_seq_len - 4

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "transformer": self.transformer.to_dict(), "vqvae": self.vqvae.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CogViewConfig":
        if not isinstance(data, dict) or "transformer" not in data or "vqvae" not in data:
            raise ValueError("CogViewConfig.from_dict: expected a dict with 'transformer' and 'vqvae' entries")
        unknown = sorted(set(data) - {"transformer", "vqvae", "name"})
        if unknown:
            raise ValueError(f"CogViewConfig.from_dict: unknown field(s) {unknown}")
        return cls(TransformerConfig.from_dict(data["transformer"]), VQVAEConfig.from_dict(data["vqvae"]),
                   str(data.get("name", "")))


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

_SMALL_RESTART = dict(restart_buffer=2048)

vqvae_presets: dict[str, VQVAEConfig] = {
    # CogView1's tokenizer: x8, 8192 x 256 codebook, 512 channels, no residual blocks.
    "cogview": VQVAEConfig(),
    # 64x64 images -> 16x16 codes.
    "small-x4": VQVAEConfig(image_size=64, downsample=4, hidden_channels=128, embed_dim=64, codebook_size=512,
                            num_res_blocks=1, pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5),
                            **_SMALL_RESTART),
    # 64x64 images -> 8x8 codes.
    "small-x8": VQVAEConfig(image_size=64, downsample=8, hidden_channels=128, embed_dim=64, codebook_size=256,
                            num_res_blocks=1, pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5),
                            **_SMALL_RESTART),
    # unit tests: 16x16 images -> 4x4 codes, seconds to build and run.
    "test-x4": VQVAEConfig(image_size=16, downsample=4, hidden_channels=16, embed_dim=8, codebook_size=32,
                           pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5), restart_buffer=256),
}

presets: dict[str, CogViewConfig] = {
    # The CogView1 release, exactly: 3,928,849,920 parameters.
    "cogview-4b": CogViewConfig(
        TransformerConfig(num_layers=48, hidden_size=2560, num_heads=40, mlp_size=10240, max_positions=1089,
                          image_tokens=8192, text_tokens=50000, pb_relax=True),
        vqvae_presets["cogview"], "cogview-4b"),
    # CogView1's tutorial/demo size (12 layers x 1024, 16 heads) with the full CogView vocabulary.
    "cogview-tiny": CogViewConfig(
        TransformerConfig(num_layers=12, hidden_size=1024, num_heads=16, max_positions=1089,
                          image_tokens=8192, text_tokens=50000, pb_relax=True),
        vqvae_presets["cogview"], "cogview-tiny"),
    # Trainable on a 2-core CPU: 64x64 images as 16x16 codes; up to 60 text tokens; ~5M parameters.
    "small-16x16": CogViewConfig(
        TransformerConfig(num_layers=6, hidden_size=256, num_heads=8, max_positions=320,
                          image_tokens=512, text_tokens=1000),
        vqvae_presets["small-x4"], "small-16x16"),
    # Faster still: 64x64 images as 8x8 codes; up to 60 text tokens; ~2M parameters.
    "small-8x8": CogViewConfig(
        TransformerConfig(num_layers=4, hidden_size=192, num_heads=6, max_positions=128,
                          image_tokens=256, text_tokens=1000),
        vqvae_presets["small-x8"], "small-8x8"),
    # Unit tests: 2 layers x 64, a 32-code image vocabulary, 4x4 codes.
    "test-tiny": CogViewConfig(
        TransformerConfig(num_layers=2, hidden_size=64, num_heads=4, max_positions=48, image_tokens=32,
                          text_tokens=64, vocab_pad_multiple=8),
        vqvae_presets["test-x4"], "test-tiny"),
}

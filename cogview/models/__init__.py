"""CogView's models: the VQ-VAE image tokenizer and the transformer, with named presets.

    from cogview.models import presets, transformer_from_preset, vqvae_from_preset
    model = transformer_from_preset("cogview-4b", device="meta")   # 3,928,849,920 parameters
    vqvae = vqvae_from_preset("cogview")                            # CogView1's tokenizer architecture

`presets` maps names to full-model configs (`CogViewConfig`: .transformer and .vqvae); `vqvae_presets`
names VQ-VAE architectures on their own.
"""
from __future__ import annotations

from cogview.models.config import (
    COGVIEW_COMMAND_TOKENS,
    COGVIEW_PIXEL_MEAN,
    COGVIEW_PIXEL_STD,
    CogViewConfig,
    TransformerConfig,
    VQVAEConfig,
    presets,
    vqvae_presets,
)
from cogview.models.transformer import (
    AttentionContext,
    CogViewLayer,
    CogViewTransformer,
    KVCache,
    causal_attention,
    full_causal_attention,
)
from cogview.models.vqvae import VQVAE, EMAQuantizer, QuantizerOutput, VQVAEOutput

__all__ = [
    "presets",
    "vqvae_presets",
    "transformer_from_preset",
    "vqvae_from_preset",
    "CogViewConfig",
    "TransformerConfig",
    "VQVAEConfig",
    "COGVIEW_COMMAND_TOKENS",
    "COGVIEW_PIXEL_MEAN",
    "COGVIEW_PIXEL_STD",
    "CogViewTransformer",
    "CogViewLayer",
    "KVCache",
    "AttentionContext",
    "causal_attention",
    "full_causal_attention",
    "VQVAE",
    "VQVAEOutput",
    "EMAQuantizer",
    "QuantizerOutput",
]


def _unknown(name: str, kind: str, known) -> KeyError:
    return KeyError(f"unknown {kind} preset {name!r}; known: {sorted(known)}")


def transformer_from_preset(name: str, device=None, *, dtype=None, **overrides) -> CogViewTransformer:
    """A freshly initialised transformer of preset `name` (a key of `presets`); on device "meta" the
    weights are not initialised (for loading by assignment). Keyword `overrides` change config
    fields, e.g. `checkpoint_activations=True`."""
    if name not in presets:
        raise _unknown(name, "model", presets)
    config = presets[name].transformer
    if overrides:
        config = config.replace(**overrides)
    return CogViewTransformer(config, device=device, dtype=dtype)


def vqvae_from_preset(name: str, device=None, *, dtype=None, **overrides) -> VQVAE:
    """A freshly initialised VQ-VAE: `name` is a VQ-VAE preset (`vqvae_presets`, e.g. "cogview") or a
    full-model preset (`presets`, whose VQ-VAE is used). Keyword `overrides` change config fields."""
    if name in vqvae_presets:
        config = vqvae_presets[name]
    elif name in presets:
        config = presets[name].vqvae
    else:
        raise _unknown(name, "VQ-VAE", list(vqvae_presets) + list(presets))
    if overrides:
        config = config.replace(**overrides)
    return VQVAE(config, device=device, dtype=dtype)

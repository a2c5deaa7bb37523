"""CogView2-style super-resolution: low-res codes (+ text) -> high-res codes in ONE forward pass, then
local parallel refinement (LoPAR) passes.

The sequence has three parts, each with its own learned positions (one table, `position_embeddings`):

    text part   [ROI1] text pieces [PAD]...        max_text_len + 1 tokens (none when max_text_len = 0)
    low-res     the h x w low-resolution codes     (the base model's code grid)
    high-res    the (s h) x (s w) codes to predict ([MASK] where a code is to be (re-)predicted)

Attention (per layer):
- text and low-res tokens attend densely among themselves (bidirectional; they never see the high-res
  part, so their keys/values are computed once and reused by every refinement pass: `encode_context`);
- a high-res token at (r, c) attends, in one softmax, to a `window` of high-res keys centred on itself
  plus every text key (`cogview.ops.local_attention` with text keys), and to a `cross_window` of
  low-res keys centred on its parent (r // s, c // s) (a second `local_attention` call over the low-res
  grid); the two are merged exactly through their log-sum-exps:
      lse = logaddexp(lse1, lse2),  out = exp(lse1 - lse) out1 + exp(lse2 - lse) out2
  (computed as lerp(out2, out1, sigmoid(lse1 - lse2)): the same weights, fewer passes).
- As in CogView2's direct super-resolution model, high-res tokens have their OWN attention weights in
  every layer (`layers.N.high_res_attention.{query_key_value, dense}`); LayerNorms, MLPs, embeddings
  and the tied output head are shared. (The last layer's text + low-res tokens only serve keys and
  values: that layer has no `attention.dense`, and its context MLP is never run.) Layers use CogView's
  sandwich LayerNorm and the fused `cogview.ops.add_layer_norm` steps, as in cogview.models.transformer.

Input of a high-res token: the embedding of its code (or of [MASK]) + its position + (with
`parent_hint`) the embedding of its parent low-res code + (with `pixel_hint` = the VQ-VAE's down-sampling
factor p) a linear projection of the p x p patch under the cell in the decoded low-res image, upsampled
bicubically to the high-res size. The decoded image is a function of the low-res codes, so the stage still
maps codes to codes; the hint hands it, spatially aligned, what it would otherwise have to learn to decode.
Output: logits over the image codes only (the first `image_tokens` rows of the tied head).

LoPAR schedule (`refinement_masks`): the high-res grid is cut into `tile`-sized tiles; the cells of a
tile are ranked once (farthest-point order on the tile torus, so the cells kept early are spread out),
and refinement pass k re-masks, in every tile, the `schedule[k]` cells of highest rank and re-predicts
them in parallel given everything else. The counts do not increase, so the masked sets are nested:
every pass commits more cells. CogView2's default: 6x6 tiles, 23, 19, 15, 10, 6, 2 cells.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from cogview import ops
from cogview.models.config import TransformerConfig, _from_dict, _positive_int, _to_dict
from cogview.models.transformer import CogViewLayer, LayerNorm, SelfAttention

__all__ = [
    "SuperResolutionConfig",
    "SuperResolutionTransformer",
    "SRContext",
    "sr_presets",
    "tile_order",
    "refinement_masks",
    "build_text_tokens",
]

COGVIEW2_SCHEDULE = (23, 19, 15, 10, 6, 2)


def _pair(owner: str, name: str, value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    if not ok:
        raise ValueError(f"{owner}: `{name}` must be a pair of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class SuperResolutionConfig:
    """The SR stage: a transformer trunk (`transformer`: widths and the vocabulary layout, which must be
    the base model's when text is used) plus the geometry of the two grids, the attention windows and
    the refinement schedule. `transformer.max_positions` is derived (text part + low-res + high-res)."""

    transformer: TransformerConfig
    low_res: int = 8  # side of the low-res code grid (the base model's code grid)
    scale: int = 3  # high-res side = scale * low_res
    max_text_len: int = 0  # text pieces in the text part (0: no text part)
    window: tuple[int, int] = (9, 9)  # high-res self window (odd, odd)
    cross_window: tuple[int, int] = (5, 5)  # window into the low-res grid, centred on the parent (odd, odd)
    tile: tuple[int, int] = (6, 6)  # LoPAR tile (must divide the high-res grid)
    schedule: tuple[int, ...] = COGVIEW2_SCHEDULE  # cells re-masked per tile in each refinement pass
    parent_hint: bool = True  # add the parent low-res code's embedding to every high-res input
    pixel_hint: int = 0  # > 0: add a projection of the decoded low-res image's patch under each high-res
    #                      cell (the patch side = the VQ-VAE's down-sampling factor); 0: codes only
    image_channels: int = 3  # channels of the decoded image read by the pixel hint

    def __post_init__(self) -> None:
        owner = "SuperResolutionConfig"
        if isinstance(self.transformer, dict):
            object.__setattr__(self, "transformer", TransformerConfig.from_dict(self.transformer))
        if not isinstance(self.transformer, TransformerConfig):
            raise TypeError(f"{owner}: `transformer` must be a TransformerConfig, got {type(self.transformer).__name__}")
        _positive_int(owner, "low_res", self.low_res)
        _positive_int(owner, "scale", self.scale)
        _positive_int(owner, "max_text_len", self.max_text_len, minimum=0)
        for name in ("window", "cross_window", "tile"):
            object.__setattr__(self, name, _pair(owner, name, getattr(self, name)))
        for name in ("window", "cross_window"):
            if any(v % 2 == 0 for v in getattr(self, name)):
                raise ValueError(f"{owner}: `{name}` must be odd in both dimensions, got {getattr(self, name)}")
        th, tw = self.tile
        if self.high_res % th or self.high_res % tw:
            raise ValueError(f"{owner}: the tile {self.tile} must divide the high-res grid "
                             f"{self.high_res}x{self.high_res} (low_res {self.low_res} x scale {self.scale})")
        schedule = tuple(self.schedule)
        if any(not isinstance(n, int) or isinstance(n, bool) for n in schedule):
            raise ValueError(f"{owner}: `schedule` must be a list of ints, got {schedule!r}")
        if any(not 1 <= n <= th * tw for n in schedule):
            raise ValueError(f"{owner}: every `schedule` count must lie in [1, {th * tw}] (cells of a {th}x{tw} "
                             f"tile), got {schedule}")
        if any(b > a for a, b in zip(schedule, schedule[1:])):
            raise ValueError(f"{owner}: `schedule` counts must not increase (each pass commits more cells), "
                             f"got {schedule}")
        object.__setattr__(self, "schedule", schedule)
        t = self.transformer
        if t.image_tokens < 1:
            raise ValueError(f"{owner}: the vocabulary has no image codes")
        for name in ("[MASK]", "[PAD]", "[ROI1]"):
            if name not in t.command_tokens:
                raise ValueError(f"{owner}: the vocabulary needs the command token {name}")
        if self.max_text_len and t.text_tokens < 1:
            raise ValueError(f"{owner}: max_text_len {self.max_text_len} needs text tokens in the vocabulary")
        if not isinstance(self.parent_hint, bool):
            raise ValueError(f"{owner}: `parent_hint` must be a bool, got {self.parent_hint!r}")
        _positive_int(owner, "pixel_hint", self.pixel_hint, minimum=0)
        _positive_int(owner, "image_channels", self.image_channels)
        if t.max_positions != self.num_positions:
            object.__setattr__(self, "transformer", t.replace(max_positions=self.num_positions))

    # ---- geometry ----
    @property
    def high_res(self) -> int:
        return self.low_res * self.scale

    @property
    def low_len(self) -> int:
        return self.low_res * self.low_res

    @property
    def high_len(self) -> int:
        return self.high_res * self.high_res

    @property
    def text_positions(self) -> int:
        """Tokens of the text part: [ROI1] + max_text_len pieces (0 without text)."""
        return self.max_text_len + 1 if self.max_text_len else 0

    @property
    def num_positions(self) -> int:
        return self.text_positions + self.low_len + self.high_len

    @property
    def passes(self) -> int:
        return len(self.schedule)

    @property
    def pixel_features(self) -> int:
        """Inputs of the pixel-hint projection: one patch of the decoded image (0 without the hint)."""
        return self.image_channels * self.pixel_hint * self.pixel_hint

    def image_sizes(self, downsample: int) -> tuple[int, int]:
        """(low-res, high-res) image sides in pixels for a VQ-VAE with this down-sampling factor."""
        return self.low_res * downsample, self.high_res * downsample

    # ---- (de)serialisation ----
    def to_dict(self) -> dict[str, Any]:
        out = _to_dict(self)
        out["transformer"] = self.transformer.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SuperResolutionConfig":
        if not isinstance(data, dict) or "transformer" not in data:
            raise ValueError("SuperResolutionConfig.from_dict: expected a dict with a 'transformer' entry")
        data = dict(data)
        data["transformer"] = TransformerConfig.from_dict(data["transformer"])
        return _from_dict(cls, data)

    def replace(self, **changes) -> "SuperResolutionConfig":
        base = self.to_dict()
        base.update(changes)
        if isinstance(base["transformer"], TransformerConfig):
            base["transformer"] = base["transformer"].to_dict()
        return SuperResolutionConfig.from_dict(base)


def _trunk(num_layers, hidden_size, num_heads, image_tokens, text_tokens, **kw) -> TransformerConfig:
    return TransformerConfig(num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
                             image_tokens=image_tokens, text_tokens=text_tokens, **kw)


# Named SR stages. The vocabulary (image_tokens, text_tokens) must match the VQ-VAE and the base model:
# `SuperResolutionConfig.replace(transformer=...)` or the trainer's overrides adjust it.
sr_presets: dict[str, SuperResolutionConfig] = {
    # The embedded default model's SR stage: 8x8 -> 24x24 codes (32 -> 96 px with a x4 VQ-VAE); 1.3M
    # parameters with a 512-code VQ-VAE and 400 text ids (recipes/shapes-sr.yaml).
    "shapes-8to24": SuperResolutionConfig(_trunk(4, 128, 4, 512, 400), low_res=8, scale=3, max_text_len=32,
                                          pixel_hint=4),
    # CogView2's geometry (20x20 -> 60x60 codes), small trunk (for benchmarks).
    "cogview2-20to60": SuperResolutionConfig(_trunk(6, 256, 8, 8192, 50000), low_res=20, scale=3, max_text_len=64),
    # Unit tests: 4x4 -> 12x12 codes.
    "test-4to12": SuperResolutionConfig(_trunk(2, 32, 4, 32, 64, vocab_pad_multiple=8), low_res=4, scale=3,
                                        max_text_len=6, window=(5, 5), cross_window=(3, 3), tile=(3, 3),
                                        schedule=(5, 3, 1)),
}


# ---------------------------------------------------------------------------------------------
# The refinement schedule
# ---------------------------------------------------------------------------------------------


def tile_order(tile: tuple[int, int]) -> torch.Tensor:
    """int64 [th * tw]: the rank of each tile cell (raster index) in the commit order: a farthest-point
    order on the tile torus (cell 0 first; each next cell the one farthest from all chosen so far,
    lowest index on ties), so any prefix of the order is spread over the tile and its neighbours."""
    return torch.tensor(_tile_ranks(tuple(tile)), dtype=torch.long)


@functools.lru_cache(maxsize=32)
def _tile_ranks(tile: tuple[int, int]) -> tuple[int, ...]:
    # (computed once per tile shape: every upscale call builds its masks from it)
    th, tw = tile
    n = th * tw
    rows = torch.arange(n) // tw
    cols = torch.arange(n) % tw
    dr = (rows[:, None] - rows[None, :]).abs()
    dc = (cols[:, None] - cols[None, :]).abs()
    dist = torch.minimum(dr, th - dr) ** 2 + torch.minimum(dc, tw - dc) ** 2  # squared torus distance
    rank = torch.full((n,), -1, dtype=torch.long)
    nearest = torch.full((n,), 1 << 30, dtype=torch.long)
    current = 0
    for r in range(n):
        rank[current] = r
        nearest = torch.minimum(nearest, dist[current])
        candidates = torch.where(rank < 0, nearest, torch.full_like(nearest, -1))
        current = int(torch.argmax(candidates))  # first maximum: lowest index on ties
    return tuple(rank.tolist())


def refinement_masks(config: SuperResolutionConfig, schedule: tuple[int, ...] | None = None) -> torch.Tensor:
    """bool [passes, high_len]: True where refinement pass k re-masks (raster order over the high-res
    grid). In every tile, pass k masks the `schedule[k]` cells of highest `tile_order` rank."""
    schedule = config.schedule if schedule is None else tuple(schedule)
    th, tw = config.tile
    area = th * tw
    if any(not isinstance(n, int) or not 0 <= n <= area for n in schedule):
        raise ValueError(f"refinement_masks: every count must lie in [0, {area}], got {schedule}")
    rank = tile_order(config.tile)
    side = config.high_res
    r = torch.arange(side * side) // side
    c = torch.arange(side * side) % side
    cell_rank = rank[(r % th) * tw + (c % tw)]
    if not schedule:
        return torch.zeros((0, side * side), dtype=torch.bool)
    counts = torch.tensor(schedule, dtype=torch.long)
    return cell_rank[None, :] >= (area - counts)[:, None]


# ---------------------------------------------------------------------------------------------
# Text part
# ---------------------------------------------------------------------------------------------


def build_text_tokens(tokenizer, texts, config: SuperResolutionConfig, *, warn: bool = True) -> torch.Tensor | None:
    """int64 [B, text_positions]: `[ROI1] pieces [PAD]...` per text (truncated to max_text_len, with the
    tokenizer's TextTruncatedWarning when `warn`); None when the config has no text part. texts: str or
    list of str ("" = no caption: the text part is [ROI1] and padding)."""
    if not config.text_positions:
        return None
    if isinstance(texts, str):
        texts = [texts]
    t = config.transformer
    if (tokenizer.image_tokens, tokenizer.text_tokens, tuple(tokenizer.command_tokens)) != (
            t.image_tokens, t.text_tokens, t.command_tokens):
        raise ValueError(f"build_text_tokens: the tokenizer's vocabulary ({tokenizer.image_tokens} image + "
                         f"{tokenizer.text_tokens} text ids) is not the SR stage's ({t.image_tokens} + {t.text_tokens})")
    out = torch.full((len(texts), config.text_positions), t.command_id("[PAD]"), dtype=torch.long)
    out[:, 0] = t.command_id("[ROI1]")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"build_text_tokens: text {i} must be a str, got {type(text).__name__}")
        ids = tokenizer.encode_text(text, config.max_text_len, warn=warn) if text.strip() else []
        out[i, 1: 1 + len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return out


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass
class SRContext:
    """What the high-res part needs from the text + low-res part: per layer the keys and values of
    those tokens ([B, heads, text_positions + low_len, head_dim] each) and, per high-res cell, the
    part of its input that every pass shares (`cell_inputs` [B, high_len, hidden]: position + parent
    hint + pixel hint)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    cell_inputs: torch.Tensor
    text_positions: int = 0

    @property
    def batch_size(self) -> int:
        return self.cell_inputs.shape[0]


class SuperResolutionLayer(CogViewLayer):
    """A CogView sandwich layer with a second attention (`high_res_attention`: its own query_key_value
    and dense) for the high-res tokens; LayerNorms and MLP are shared by all tokens.

    In the LAST layer the text + low-res tokens only provide keys and values (nothing reads their output),
    so that layer has no `attention.dense` and `context_forward` stops after the key/value projection."""

    def __init__(self, config: SuperResolutionConfig, layer_index: int, *, device=None, dtype=None):
        super().__init__(config.transformer, layer_index, device=device, dtype=dtype)
        self.high_res_attention = SelfAttention(config.transformer, layer_index, device=device, dtype=dtype)
        self.last = layer_index == config.transformer.num_layers - 1
        if self.last:
            self.attention.dense = None
        self.sr = config
        self._high = (config.high_res, config.high_res)
        self._low = (config.low_res, config.low_res)

    def _finish(self, residual, branch, next_norm):
        residual, normed = ops.add_layer_norm(
            residual, branch, self.third_layernorm.weight, self.third_layernorm.bias,
            self.post_attention_layernorm.weight, self.post_attention_layernorm.bias, self.eps, self.pb_relax)
        branch = self.mlp(normed)
        return ops.add_layer_norm(
            residual, branch, self.fourth_layernorm.weight, self.fourth_layernorm.bias,
            next_norm.weight, next_norm.bias, self.eps, self.pb_relax)

    def context_forward(self, residual, normed, next_norm):
        """Text + low-res tokens, dense bidirectional attention. Returns (residual, normed, (k, v))
        (residual and normed None in the last layer, where only k and v are needed)."""
        attention = self.attention
        q, k, v = attention.split_heads(normed)
        if self.last:
            return None, None, (k, v)
        out = F.scaled_dot_product_attention(q, k, v, scale=attention.scale)
        residual, normed = self._finish(residual, attention.merge_heads(out), next_norm)
        return residual, normed, (k, v)

    def high_res_forward(self, residual, normed, next_norm, kv, text_positions: int, only=None):
        """High-res tokens: local window + text keys, and the cross-resolution window, merged via lse.
        only: a bool mask [high_len]: every cell still provides keys and values, but only these
        cells' outputs are computed and returned (the last layer of a refinement pass)."""
        attention = self.high_res_attention
        q, k, v = attention.split_heads(normed)
        context_k, context_v = kv
        text_k = context_k[:, :, :text_positions] if text_positions else None
        text_v = context_v[:, :, :text_positions] if text_positions else None
        out_self, lse_self = ops.local_attention(q, k, v, grid_q=self._high, grid_kv=self._high,
                                                 window=self.sr.window, text_k=text_k, text_v=text_v,
                                                 scale=attention.scale)
        out_cross, lse_cross = ops.local_attention(q, context_k[:, :, text_positions:],
                                                   context_v[:, :, text_positions:], grid_q=self._high,
                                                   grid_kv=self._low, window=self.sr.cross_window,
                                                   scale=attention.scale)
        # one softmax over both key sets: the self part's share is exp(lse_self) / (exp(lse_self) +
        # exp(lse_cross)) = sigmoid(lse_self - lse_cross); lerp blends in one pass
        w_self = torch.sigmoid(lse_self - lse_cross).unsqueeze(-1).to(out_self.dtype)
        if only is not None:
            out_self, out_cross, w_self = out_self[:, :, only], out_cross[:, :, only], w_self[:, :, only]
            residual = residual[:, only]
        if torch.is_grad_enabled() and (out_self.requires_grad or out_cross.requires_grad):  # training
            return self._finish(residual, attention.merge_heads(torch.lerp(out_cross, out_self, w_self)), next_norm)
        # inference: the blend is written straight into the heads-merged layout [B, n, heads, d]
        batch, heads, n, head_dim = out_self.shape
        merged = out_self.new_empty(batch, n, heads, head_dim)
        torch.lerp(out_cross, out_self, w_self, out=merged.transpose(1, 2))
        return self._finish(residual, attention.dense(merged.view(batch, n, heads * head_dim)), next_norm)


class SuperResolutionTransformer(nn.Module):
    """The SR stage (see the module docstring).

        model = SuperResolutionTransformer(config)
        logits = model(low_codes, high_tokens, text_tokens)        # [B, high_len, image_tokens]
        context = model.encode_context(low_codes, text_tokens)      # once per image (+ low_pixels with pixel_hint)
        logits = model.high_res_logits(context, high_tokens)       # per refinement pass

    low_codes [B, h, w] (or [B, h*w]) int64; high_tokens [B, H*W] (or [B, H, W]): codes, with
    `mask_id` ([MASK]) where a code is to be predicted; text_tokens [B, text_positions] from
    `build_text_tokens` (None without a text part).
    """

    def __init__(self, config: SuperResolutionConfig, *, device=None, dtype=None, init: bool = True):
        super().__init__()
        if not isinstance(config, SuperResolutionConfig):
            raise TypeError(f"SuperResolutionTransformer: `config` must be a SuperResolutionConfig, got "
                            f"{type(config).__name__}")
        self.config = config
        t = config.transformer
        kw = dict(device=device, dtype=dtype)
        self.word_embeddings = nn.Embedding(t.vocab_rows, t.hidden_size, **kw)
        self.position_embeddings = nn.Embedding(config.num_positions, t.hidden_size, **kw)
        self.layers = nn.ModuleList(SuperResolutionLayer(config, i, **kw) for i in range(t.num_layers))
        self.final_layernorm = LayerNorm(t.hidden_size, t.layernorm_eps, t.pb_relax, **kw)
        self.pixel_projection = (nn.Linear(config.pixel_features, t.hidden_size, **kw) if config.pixel_hint
                                 else None)
        self.mask_id = t.command_id("[MASK]")
        if init and self.word_embeddings.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """CogView's init: N(0, init_std); the branch output projections N(0, init_std / sqrt(2 L))."""
        t = self.config.transformer
        out_std = t.init_std / math.sqrt(2.0 * t.num_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, t.init_std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, t.init_std)
            elif isinstance(module, LayerNorm):
                module.reset_parameters()
        for layer in self.layers:
            for linear in (layer.attention.dense, layer.high_res_attention.dense, layer.mlp.dense_4h_to_h):
                if linear is not None:
                    nn.init.normal_(linear.weight, 0.0, out_std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.word_embeddings.weight.device

    # ---- input checks ----
    def _grid(self, codes, side: int, name: str, what: str, allow_mask: bool = False) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"SuperResolutionTransformer.{what}: `{name}` must be an int64 tensor, got "
                             f"{codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__}")
        if codes.dim() == 3 and tuple(codes.shape[1:]) == (side, side):
            codes = codes.reshape(codes.shape[0], side * side)
        if codes.dim() != 2 or codes.shape[1] != side * side:
            raise ValueError(f"SuperResolutionTransformer.{what}: `{name}` must be [batch, {side}, {side}] (or "
                             f"[batch, {side * side}]): the SR stage maps {self.config.low_res}x{self.config.low_res} "
                             f"to {self.config.high_res}x{self.config.high_res} codes; got shape {tuple(codes.shape)}")
        if codes.device != self.device:
            raise ValueError(f"SuperResolutionTransformer.{what}: `{name}` is on {codes.device} but the model is on "
                             f"{self.device}")
        if codes.numel() and codes.device.type == "cpu" and not torch.compiler.is_compiling():
            limit = self.config.transformer.image_tokens
            bad = (codes < 0) | (codes >= limit)
            if allow_mask:
                bad &= codes != self.mask_id
            if bool(bad.any()):
                raise ValueError(f"SuperResolutionTransformer.{what}: `{name}` holds values outside the image "
                                 f"codes [0, {limit}){' (or [MASK])' if allow_mask else ''}")
        return codes.long()

    def _text(self, text_tokens, batch: int, what: str) -> torch.Tensor | None:
        n = self.config.text_positions
        if n == 0:
            if text_tokens is not None:
                raise ValueError(f"SuperResolutionTransformer.{what}: this SR stage has no text part "
                                 f"(max_text_len 0); pass text_tokens=None")
            return None
        if text_tokens is None:  # no caption: [ROI1] and padding
            t = self.config.transformer
            text_tokens = torch.full((batch, n), t.command_id("[PAD]"), dtype=torch.long, device=self.device)
            text_tokens[:, 0] = t.command_id("[ROI1]")
            return text_tokens
        if not isinstance(text_tokens, torch.Tensor) or text_tokens.dim() != 2 or tuple(text_tokens.shape) != (batch, n):
            raise ValueError(f"SuperResolutionTransformer.{what}: `text_tokens` must be [{batch}, {n}] "
                             f"([ROI1] + {self.config.max_text_len} pieces, from build_text_tokens), got "
                             f"{tuple(text_tokens.shape) if isinstance(text_tokens, torch.Tensor) else text_tokens!r}")
        return text_tokens.to(self.device).long()

    # ---- the two parts ----
    def _pixel_hint(self, low_pixels, batch: int, what: str) -> torch.Tensor | None:
        """The decoded low-res image [B, C, h p, w p] in [0, 1] -> per high-res cell [B, high_len, hidden]."""
        c = self.config
        if not c.pixel_hint:
            if low_pixels is not None:
                raise ValueError(f"SuperResolutionTransformer.{what}: this SR stage reads no pixels (pixel_hint 0); "
                                 f"pass low_pixels=None")
            return None
        side = c.low_res * c.pixel_hint
        shape = (batch, c.image_channels, side, side)
        if low_pixels is None:
            raise ValueError(f"SuperResolutionTransformer.{what}: this SR stage reads the decoded low-res image "
                             f"(pixel_hint {c.pixel_hint}): pass `low_pixels` {list(shape)} in [0, 1], the VQ-VAE's "
                             f"decode of low_codes")
        if not isinstance(low_pixels, torch.Tensor) or not low_pixels.is_floating_point() or \
                tuple(low_pixels.shape) != shape:
            raise ValueError(f"SuperResolutionTransformer.{what}: `low_pixels` must be a float tensor {list(shape)}, got "
                             f"{tuple(low_pixels.shape) if isinstance(low_pixels, torch.Tensor) else type(low_pixels).__name__}")
        if low_pixels.device != self.device:
            raise ValueError(f"SuperResolutionTransformer.{what}: `low_pixels` is on {low_pixels.device} but the model "
                             f"is on {self.device}")
        # the same upsampling as a bicubic baseline, then one p x p patch per high-res cell (row-major)
        weight_dtype = self.pixel_projection.weight.dtype
        work = torch.promote_types(weight_dtype, torch.float32)  # fp16/bf16 weights: upsample in fp32
        up = F.interpolate(low_pixels.to(work) * 2 - 1, scale_factor=c.scale, mode="bicubic", align_corners=False)
        patches = F.unfold(up, kernel_size=c.pixel_hint, stride=c.pixel_hint).transpose(1, 2)
        return self.pixel_projection(patches.to(weight_dtype))

    def encode_context(self, low_codes: torch.Tensor, text_tokens: torch.Tensor | None = None,
                       low_pixels: torch.Tensor | None = None) -> SRContext:
        """Run the text + low-res tokens through every layer; returns their per-layer keys/values and the
        high-res cells' shared inputs. low_pixels: the decoded low-res image (only with pixel_hint)."""
        what = "encode_context"
        c = self.config
        low = self._grid(low_codes, c.low_res, "low_codes", what)
        batch = low.shape[0]
        text = self._text(text_tokens, batch, what)
        pixel_hint = self._pixel_hint(low_pixels, batch, what)
        tokens = low if text is None else torch.cat([text, low], dim=1)
        positions = torch.arange(tokens.shape[1], device=self.device)
        residual = self.word_embeddings(tokens) + self.position_embeddings(positions)[None]
        kv = []
        normed = self.layers[0].input_layernorm(residual) if len(self.layers) else residual
        for i, layer in enumerate(self.layers):
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.final_layernorm
            residual, normed, layer_kv = layer.context_forward(residual, normed, next_norm)
            kv.append(layer_kv)
        start = c.text_positions + c.low_len
        cells = self.position_embeddings(torch.arange(start, start + c.high_len, device=self.device))[None]
        if c.parent_hint:  # the parent (low-res) code of every high-res cell
            side, s = c.high_res, c.scale
            r = torch.arange(side * side, device=self.device) // side
            col = torch.arange(side * side, device=self.device) % side
            cells = cells + self.word_embeddings(low[:, (r // s) * c.low_res + col // s])
        if pixel_hint is not None:
            cells = cells + pixel_hint
        return SRContext(kv, cells.expand(batch, -1, -1), c.text_positions)

    def high_res_hidden(self, context: SRContext, high_tokens: torch.Tensor, only: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """Final hidden states [B, high_len, H] of the high-res tokens given the context; with `only`
        (a bool mask [high_len]) those of the masked cells alone, [B, only.sum(), H] (the last layer
        then runs its attention output, MLP and LayerNorms for those cells only)."""
        what = "high_res_hidden"
        c = self.config
        high = self._grid(high_tokens, c.high_res, "high_tokens", what, allow_mask=True)
        if high.shape[0] != context.batch_size:
            raise ValueError(f"SuperResolutionTransformer.{what}: {high.shape[0]} high-res rows for a context of "
                             f"{context.batch_size}")
        residual = self.word_embeddings(high) + context.cell_inputs
        normed = self.layers[0].input_layernorm(residual) if len(self.layers) else self.final_layernorm(residual)
        if only is not None and (only.dtype != torch.bool or tuple(only.shape) != (c.high_len,)):
            raise ValueError(f"SuperResolutionTransformer.{what}: `only` must be a bool mask [{c.high_len}], got "
                             f"{only.dtype} {tuple(only.shape)}")
        if not len(self.layers):
            return normed if only is None else normed[:, only]
        for i, layer in enumerate(self.layers):
            last = i + 1 == len(self.layers)
            next_norm = self.final_layernorm if last else self.layers[i + 1].input_layernorm
            residual, normed = layer.high_res_forward(residual, normed, next_norm, context.kv[i],
                                                      context.text_positions, only=only if last else None)
        return normed

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., H] -> logits over the image codes [..., image_tokens] (tied head)."""
        return ops.linear(hidden, self.word_embeddings.weight[: self.config.transformer.image_tokens])

    def high_res_logits(self, context: SRContext, high_tokens: torch.Tensor) -> torch.Tensor:
        return self.logits(self.high_res_hidden(context, high_tokens))

    def forward(self, low_codes: torch.Tensor, high_tokens: torch.Tensor | None = None,
                text_tokens: torch.Tensor | None = None, low_pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, high_len, image_tokens]. high_tokens None: all [MASK] (direct super-resolution)."""
        context = self.encode_context(low_codes, text_tokens, low_pixels)
        if high_tokens is None:
            high_tokens = self.masked_input(context.batch_size)
        return self.high_res_logits(context, high_tokens)

    def masked_input(self, batch: int) -> torch.Tensor:
        """[batch, high_len] of [MASK]: the input of direct super-resolution."""
        return torch.full((batch, self.config.high_len), self.mask_id, dtype=torch.long, device=self.device)

"""The CogView transformer: a GPT over one text + image + command vocabulary with sandwich LayerNorm.

Layer (CogView1, facts: ../shared/reference/cogview-facts.md):

    x = x + LN_attn_out( Attention( LN_attn_in(x) ) )      third_layernorm( attention( input_layernorm ) )
    x = x + LN_mlp_out ( MLP      ( LN_mlp_in(x)  ) )      fourth_layernorm( mlp( post_attention_layernorm ) )
    ... after the last layer: final_layernorm; logits = h @ word_embeddings.weight^T (tied, no bias)

Each "branch -> LN_out -> residual add -> next LN_in" runs as ONE `cogview.ops.add_layer_norm` call,
so the residual stream is read and written once per branch. Every layer therefore hands the next one
(residual, normed) where `normed` is already the next layer's LN_attn_in output; the last layer's second
fused step applies `final_layernorm`.

Parameter names follow the original release (minus its `transformer.` prefix): word_embeddings,
position_embeddings, layers.N.{input_layernorm, attention.query_key_value, attention.dense,
third_layernorm, post_attention_layernorm, mlp.dense_h_to_4h, mlp.dense_4h_to_h, fourth_layernorm},
final_layernorm. query_key_value rows are [Q; K; V], each split into heads of head_dim contiguous rows.

Two ways to run it:
- `model(tokens, position_ids=None)`: full causal attention (SDPA) for training and scoring.
- cached decoding: `cache = model.new_cache(batch, max_len)` allocates a static K/V cache
  ([layers, batch, heads, max_len, head_dim]) that the caller owns; `model.decode_step(tokens,
  position_ids, cache, start)` runs n >= 1 new tokens per sequence (n > 1 is a prefill or a chunk),
  writes their keys/values with `cogview.ops.kv_cache_write` at cache positions start[b] .. start[b]+n-1
  and attends with `cogview.ops.decode_attention`. Shapes never depend on data and nothing reads values
  back to the host, so a step can be captured in a CUDA graph (or compiled) once per n.

Attention is pluggable per layer: set `layer.attention.attention_fn` (a function of (module, q, k, v,
ctx)) or replace `layer.attention` altogether by a module with the same forward(hidden, ctx) (e.g. one
with extra weights for some tokens). `AttentionContext` carries what the call knows (positions, cache,
text boost, and a free `extra` slot for the caller).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cogview import ops
from cogview.models.config import TransformerConfig

__all__ = [
    "AttentionContext",
    "AttentionFn",
    "CogViewLayer",
    "CogViewTransformer",
    "KVCache",
    "LayerNorm",
    "MLP",
    "SelfAttention",
    "causal_attention",
    "full_causal_attention",
]


# ---------------------------------------------------------------------------------------------
# Cache and per-call context
# ---------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Static K/V cache owned by the caller: k, v [layers, batch, heads, max_len, head_dim].

    Nothing here tracks how much is filled: the caller passes `start` (where the new tokens go) to
    every `decode_step`, so the cache can be reused, rewound or shared by rows at different lengths.
    """

    k: torch.Tensor
    v: torch.Tensor

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's (k_cache, v_cache), each [batch, heads, max_len, head_dim] (views)."""
        return self.k[index], self.v[index]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


@dataclass
class AttentionContext:
    """What one forward call tells every layer's attention.

    position_ids [B, n]; text_len/text_bias: CogView's text-attention boost (text_bias is added to the
    logits of keys at sequence positions < text_len; queries inside the text see only text keys, so for
    them it changes nothing). For cached decoding: `cache`, `start` [B] (cache position of the first new
    token) and `lengths` [B] = start + n. `extra` is free for the caller (e.g. grid layouts for local
    attention); the default attention ignores it.
    """

    position_ids: torch.Tensor
    text_len: int = 0
    text_bias: float = 0.0
    cache: KVCache | None = None
    start: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    extra: Any = None

    @property
    def decoding(self) -> bool:
        return self.cache is not None


# (module, q, k, v, ctx) -> out; q/k/v/out [B, heads, n, head_dim].
AttentionFn = Callable[["SelfAttention", torch.Tensor, torch.Tensor, torch.Tensor, AttentionContext], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Attention functions
# ---------------------------------------------------------------------------------------------


def _causal_additive_mask(seq_len: int, text_len: int, text_bias: float, dtype, device) -> torch.Tensor:
    """[S, S] additive mask: -inf above the diagonal, + text_bias on keys at positions < text_len."""
    positions = torch.arange(seq_len, device=device)
    visible = positions[None, :] <= positions[:, None]
    bias = torch.where(positions < text_len, text_bias, 0.0).to(dtype)
    return bias[None, :].expand(seq_len, seq_len).masked_fill(~visible, float("-inf"))


def full_causal_attention(q, k, v, *, scale: float, text_len: int = 0, text_bias: float = 0.0,
                          pb_relax_alpha: float | None = None) -> torch.Tensor:
    """Causal self-attention over one whole sequence (query i sees keys 0..i), q/k/v [B, heads, S, d].

    Plain path: `F.scaled_dot_product_attention` (is_causal, or an additive mask when the text boost is
    on). With `pb_relax_alpha`, CogView's PB-relax attention: scores (q * scale / alpha) k^T, minus
    their detached row max, times alpha, softmax in float32 (the same function, overflow-safe in fp16).
    """
    seq_len = q.shape[2]
    boost = text_len > 0 and text_bias != 0.0
    if pb_relax_alpha is None:
        if not boost:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        mask = _causal_additive_mask(seq_len, text_len, text_bias, q.dtype, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    alpha = float(pb_relax_alpha)
    scores = torch.matmul(q * (scale / alpha), k.transpose(-1, -2))
    mask = _causal_additive_mask(seq_len, text_len, text_bias / alpha if boost else 0.0, scores.dtype, q.device)
    scores = scores + mask
    scores = (scores - scores.detach().amax(dim=-1, keepdim=True)) * alpha
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def causal_attention(module: "SelfAttention", q, k, v, ctx: AttentionContext) -> torch.Tensor:
    """The default attention of every layer.

    Full forward: `full_causal_attention`. Cached decoding: write the new keys/values into this
    layer's cache slice with `cogview.ops.kv_cache_write`, then `cogview.ops.decode_attention` over
    everything cached up to each query (decode_attention accumulates in float32, so PB-relax attention
    needs no separate path there).
    """
    if ctx.cache is None:
        return full_causal_attention(q, k, v, scale=module.scale, text_len=ctx.text_len, text_bias=ctx.text_bias,
                                     pb_relax_alpha=module.pb_relax_alpha)
    k_cache, v_cache = ctx.cache.layer(module.layer_index)
    ops.kv_cache_write(k_cache, v_cache, k, v, ctx.start)
    return ops.decode_attention(q, k_cache, v_cache, ctx.lengths, scale=module.scale, text_len=ctx.text_len,
                                text_bias=ctx.text_bias)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """Affine LayerNorm through `cogview.ops.layer_norm` (PB-relax when `pb_relax`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, pb_relax: bool = False, *, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))
        self.eps = eps
        self.pb_relax = pb_relax

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps, self.pb_relax)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, pb_relax={self.pb_relax}"


class Linear(nn.Linear):
    """nn.Linear computed by `cogview.ops.linear` (bf16 on the CPU's AMX tiles where it has them), with
    an optional activation applied to its output in the same pass ("gelu_tanh" for the MLP's first
    projection). Parameters, state-dict keys and module hooks are nn.Linear's."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, activation: str = "none",
                 device=None, dtype=None):
        if activation not in ops.linear_activations():
            raise ValueError(f"Linear: `activation` must be one of {ops.linear_activations()}, got {activation!r}")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation != "none" and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            # training: keep the pre-activation for the backward (the fused op would recompute it)
            return ops.gelu_tanh(ops.linear(x, self.weight, self.bias))
        return ops.linear(x, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation}" if self.activation != "none" else "")


class SelfAttention(nn.Module):
    """query_key_value [3H, H] -> attention_fn per head -> dense [H, H]."""

    def __init__(self, config: TransformerConfig, layer_index: int, *, device=None, dtype=None):
        super().__init__()
        h = config.hidden_size
        self.query_key_value = Linear(h, 3 * h, device=device, dtype=dtype)
        self.dense = Linear(h, h, device=device, dtype=dtype)
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.pb_relax_alpha = config.attention_alpha if config.attention_pb_relax else None
        # None: `causal_attention`. Set a function (module, q, k, v, ctx) -> out to change this layer.
        self.attention_fn: AttentionFn | None = None

    def split_heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [B, n, H] -> q, k, v, each [B, heads, n, head_dim] (views of one projection)."""
        batch, n, _ = hidden.shape
        qkv = self.query_key_value(hidden).view(batch, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """[B, heads, n, head_dim] -> dense([B, n, H])."""
        batch, _, n, _ = out.shape
        return self.dense(out.transpose(1, 2).reshape(batch, n, self.num_heads * self.head_dim))

    def forward(self, hidden: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        q, k, v = self.split_heads(hidden)
        fn = self.attention_fn if self.attention_fn is not None else causal_attention
        return self.merge_heads(fn(self, q, k, v, ctx))


class MLP(nn.Module):
    """dense_h_to_4h (with the tanh-approximate GELU fused into it) -> dense_4h_to_h."""

    def __init__(self, config: TransformerConfig, *, device=None, dtype=None):
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, config.mlp_size, activation="gelu_tanh", device=device,
                                    dtype=dtype)
        self.dense_4h_to_h = Linear(config.mlp_size, config.hidden_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.dense_h_to_4h(x))


class CogViewLayer(nn.Module):
    """One sandwich-LayerNorm layer. Takes and returns (residual, normed): `normed` on the way in is
    LN_attn_in(residual) (computed by the previous step), on the way out `next_norm(residual)`."""

    def __init__(self, config: TransformerConfig, layer_index: int, *, device=None, dtype=None):
        super().__init__()
        h, eps, pb = config.hidden_size, config.layernorm_eps, config.pb_relax
        kw = dict(device=device, dtype=dtype)
        self.input_layernorm = LayerNorm(h, eps, pb, **kw)
        self.attention = SelfAttention(config, layer_index, **kw)
        self.third_layernorm = LayerNorm(h, eps, pb, **kw)
        self.post_attention_layernorm = LayerNorm(h, eps, pb, **kw)
        self.mlp = MLP(config, **kw)
        self.fourth_layernorm = LayerNorm(h, eps, pb, **kw)
        self.eps = eps
        self.pb_relax = pb

    def forward(self, residual: torch.Tensor, normed: torch.Tensor, next_norm: LayerNorm,
                ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        branch = self.attention(normed, ctx)
        residual, normed = ops.add_layer_norm(
            residual, branch, self.third_layernorm.weight, self.third_layernorm.bias,
            self.post_attention_layernorm.weight, self.post_attention_layernorm.bias, self.eps, self.pb_relax)
        branch = self.mlp(normed)
        residual, normed = ops.add_layer_norm(
            residual, branch, self.fourth_layernorm.weight, self.fourth_layernorm.bias,
            next_norm.weight, next_norm.bias, self.eps, self.pb_relax)
        return residual, normed


class CogViewTransformer(nn.Module):
    """The CogView transformer. See the module docstring for the layout and the two ways to run it.

    `CogViewTransformer(config, device=None, dtype=None, init=True)`; on the meta device (or with
    init=False) the weights are left uninitialised for a loader to assign.
    """

    def __init__(self, config: TransformerConfig, *, device=None, dtype=None, init: bool = True):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"CogViewTransformer: `config` must be a TransformerConfig, got {type(config).__name__}")
        self.config = config
        kw = dict(device=device, dtype=dtype)
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_rows, h, **kw)
        self.position_embeddings = nn.Embedding(config.max_positions, h, **kw)
        self.layers = nn.ModuleList(CogViewLayer(config, i, **kw) for i in range(config.num_layers))
        self.final_layernorm = LayerNorm(h, config.layernorm_eps, config.pb_relax, **kw)
        # Recompute each layer in the backward pass instead of storing its activations (training only).
        self.gradient_checkpointing = config.checkpoint_activations
        if init and self.word_embeddings.weight.device.type != "meta":
            self.reset_parameters()

    # ---- initialisation ----
    def reset_parameters(self) -> None:
        """CogView's init: N(0, init_std) for embeddings and linear weights, N(0, init_std / sqrt(2 L))
        for the two branch output projections (attention.dense, mlp.dense_4h_to_h), zero biases,
        LayerNorm weight 1 and bias 0."""
        std = self.config.init_std
        out_std = std / math.sqrt(2.0 * self.config.num_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, LayerNorm):
                module.reset_parameters()
        for layer in self.layers:
            nn.init.normal_(layer.attention.dense.weight, 0.0, out_std)
            nn.init.normal_(layer.mlp.dense_4h_to_h.weight, 0.0, out_std)

    # ---- helpers ----
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_attention_fn(self, fn: AttentionFn | None, layers=None) -> None:
        """Use `fn` (None: the default causal attention) in the given layer indices (default: all)."""
        indices = range(len(self.layers)) if layers is None else layers
        for i in indices:
            self.layers[i].attention.attention_fn = fn

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied output head: hidden [..., H] -> logits [..., vocab_rows] (no bias)."""
        return F.linear(hidden, self.word_embeddings.weight)

    def _check_tokens(self, tokens, position_ids, what: str) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"CogViewTransformer.{what}: `tokens` must be an int64 tensor [batch, seq], got "
                             f"{type(tokens).__name__ if not isinstance(tokens, torch.Tensor) else (tokens.dtype, tuple(tokens.shape))}")
        if position_ids is not None and (not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2
                                         or position_ids.shape[1] != tokens.shape[1]
                                         or position_ids.shape[0] not in (1, tokens.shape[0])):
            raise ValueError(f"CogViewTransformer.{what}: `position_ids` must be [batch or 1, {tokens.shape[1]}] "
                             f"like `tokens` {tuple(tokens.shape)}, got "
                             f"{tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else position_ids!r}")
        if tokens.device != self.word_embeddings.weight.device:
            raise ValueError(f"CogViewTransformer.{what}: `tokens` is on {tokens.device} but the model is on "
                             f"{self.word_embeddings.weight.device}")

    def _run(self, tokens: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Embeddings -> layers -> final LayerNorm; returns the normed hidden states [B, n, H]."""
        residual = self.word_embeddings(tokens) + self.position_embeddings(ctx.position_ids)
        normed = self.layers[0].input_layernorm(residual) if len(self.layers) else self.final_layernorm(residual)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and not ctx.decoding
        for i, layer in enumerate(self.layers):
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.final_layernorm
            if use_checkpoint:
                residual, normed = checkpoint(layer, residual, normed, next_norm, ctx, use_reentrant=False)
            else:
                residual, normed = layer(residual, normed, next_norm, ctx)
        return normed

    # ---- full forward ----
    def hidden_states(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None, *, text_len: int = 0,
                      text_bias: float = 0.0, extra: Any = None) -> torch.Tensor:
        """Full causal forward up to the final LayerNorm: [B, S, H]."""
        self._check_tokens(tokens, position_ids, "forward")
        seq_len = tokens.shape[1]
        if position_ids is None:
            if seq_len > self.config.max_positions:
                raise ValueError(f"CogViewTransformer.forward: {seq_len} tokens exceed max_positions "
                                 f"{self.config.max_positions}; pass position_ids for longer layouts")
            position_ids = torch.arange(seq_len, device=tokens.device)[None, :]
        if position_ids.shape[0] != tokens.shape[0]:
            position_ids = position_ids.expand(tokens.shape[0], -1)
        ctx = AttentionContext(position_ids=position_ids, text_len=int(text_len), text_bias=float(text_bias),
                               extra=extra)
        return self._run(tokens, ctx)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None, *, text_len: int = 0,
                text_bias: float = 0.0, extra: Any = None) -> torch.Tensor:
        """tokens [B, S] int64 -> logits [B, S, vocab_rows], full causal attention.

        position_ids [B or 1, S] default 0..S-1. text_len/text_bias: the text-attention boost (keys at
        positions < text_len get +text_bias on their logits), off by default.
        """
        return self.logits(self.hidden_states(tokens, position_ids, text_len=text_len, text_bias=text_bias,
                                              extra=extra))

    # ---- cached decoding ----
    def new_cache(self, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """A zeroed static K/V cache for `batch_size` sequences of up to `max_len` tokens (default
        max_positions), in `dtype`/on `device` (default: the model's)."""
        max_len = self.config.max_positions if max_len is None else int(max_len)
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"CogViewTransformer.new_cache: batch_size and max_len must be >= 1, got "
                             f"{batch_size}, {max_len}")
        weight = self.word_embeddings.weight
        shape = (self.config.num_layers, batch_size, self.config.num_heads, max_len, self.config.head_dim)
        dtype = weight.dtype if dtype is None else dtype
        device = weight.device if device is None else torch.device(device)
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def decode_step(self, tokens: torch.Tensor, position_ids: torch.Tensor, cache: KVCache, start: torch.Tensor, *,
                    text_len: int = 0, text_bias: float = 0.0, extra: Any = None,
                    return_hidden: bool = False) -> torch.Tensor:
        """Run n new tokens per sequence against the cache.

        tokens [B, n] int64; position_ids [B, n] (position-table rows); start [B] int64: cache slot of
        each sequence's first new token (its cached prefix is slots 0..start[b]-1). Writes the new
        keys/values at slots start[b] .. start[b]+n-1 of every layer, and token i attends to slots
        <= start[b]+i. Returns logits [B, n, vocab_rows] (or the final hidden states [B, n, H] when
        `return_hidden`, e.g. to take logits at a few positions only via `self.logits`).

        A prefill is a call with start = 0 and the whole prompt; prompts of different lengths can be
        right-padded: later steps overwrite the padding, since row b's next start is its true length.
        """
        self._check_tokens(tokens, position_ids, "decode_step")
        if position_ids is None:
            raise ValueError("CogViewTransformer.decode_step: `position_ids` is required")
        if not isinstance(cache, KVCache):
            raise TypeError(f"CogViewTransformer.decode_step: `cache` must be a KVCache (from new_cache), got "
                            f"{type(cache).__name__}")
        batch, n = tokens.shape
        if cache.batch_size != batch or cache.num_layers != self.config.num_layers:
            raise ValueError(f"CogViewTransformer.decode_step: the cache holds {cache.num_layers} layers x "
                             f"{cache.batch_size} sequences, the call has {batch} sequences for "
                             f"{self.config.num_layers} layers")
        if not isinstance(start, torch.Tensor) or start.shape != (batch,):
            raise ValueError(f"CogViewTransformer.decode_step: `start` must be an int64 tensor of shape ({batch},)")
        if position_ids.shape[0] != batch:
            position_ids = position_ids.expand(batch, -1)
        ctx = AttentionContext(position_ids=position_ids, text_len=int(text_len), text_bias=float(text_bias),
                               cache=cache, start=start, lengths=start + n, extra=extra)
        hidden = self._run(tokens, ctx)
        return hidden if return_hidden else self.logits(hidden)

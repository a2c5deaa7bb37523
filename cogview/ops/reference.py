"""Plain-PyTorch twins of every cogview op: the readable specification and the test oracle.

Written for clarity, not speed. The kernels are tested against these; the benchmarks compare
against separate, frozen "best plain PyTorch" baselines in bench/, not against this file.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _accumulator(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Sandwich LayerNorm
# ---------------------------------------------------------------------------------------------


def _layer_norm_acc(x, weight, bias, eps, pb_relax):
    """LayerNorm in the accumulator dtype (float32, or float64 for float64 input), unrounded."""
    acc = _accumulator(x)
    x = x.to(acc)
    if pb_relax:
        # CogView's PB-relax with a per-row max: LN(x / c), c = max|x| / 8 (detached; an
        # all-zero or non-finite row keeps c = 1). LN is scale-invariant, so only eps differs
        # from plain LN: it becomes eps * c^2.
        c = x.detach().abs().amax(dim=-1, keepdim=True) / 8
        c = torch.where((c > 0) & torch.isfinite(c), c, torch.ones_like(c))
        x = x / c
    return F.layer_norm(x, x.shape[-1:], weight.to(acc), bias.to(acc), eps)


def layer_norm(x, weight, bias, eps=1e-5, pb_relax=False):
    return _layer_norm_acc(x, weight, bias, eps, pb_relax).to(x.dtype)


def add_layer_norm(residual, branch, w_out, b_out, w_next=None, b_next=None, eps=1e-5, pb_relax=False):
    """new_residual = residual + LN(branch) (rounded once, to residual's dtype);
    normed = LN_next(new_residual as stored), in branch's dtype, or None."""
    acc = _accumulator(branch)
    new_residual = (residual.to(acc) + _layer_norm_acc(branch, w_out, b_out, eps, pb_relax)).to(residual.dtype)
    if w_next is None:
        return new_residual, None
    normed = _layer_norm_acc(new_residual, w_next, b_next, eps, pb_relax).to(branch.dtype)
    return new_residual, normed


def pb_relax_layer_norm_global(x, weight, bias, eps=1e-5):
    """CogView's literal PB-relax LayerNorm: ONE detached max over the whole tensor,
    `LN(x / (max|x| / 8))`. The ops use a per-row max instead (rows stay independent, so cached
    decoding matches a full forward); the two differ only through the effective eps."""
    acc = _accumulator(x)
    xf = x.to(acc)
    xf = xf / (xf.detach().abs().max() / 8)
    return F.layer_norm(xf, xf.shape[-1:], weight.to(acc), bias.to(acc), eps).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Cached decoding: static K/V cache write and attention over it
# ---------------------------------------------------------------------------------------------


def kv_cache_write(k_cache, v_cache, k_new, v_new, start):
    """In place: cache[b, :, start[b] + i] = new[b, :, i] for i < n (cast to the cache dtype)."""
    n = k_new.shape[2]
    positions = start.to(torch.long)[:, None] + torch.arange(n, device=start.device)  # [B, n]
    index = positions[:, None, :, None].expand(k_new.shape)
    k_cache.scatter_(2, index, k_new.to(k_cache.dtype))
    v_cache.scatter_(2, index, v_new.to(v_cache.dtype))


def decode_attention(q, k_cache, v_cache, lengths, scale=None, text_len=0, text_bias=0.0):
    """Attention of n new queries per sequence over its cache, bottom-right aligned.

    q [B, heads, n, d]; caches [B, heads, max_len, d]; lengths [B] counts the valid cached
    positions INCLUDING the n new ones. Query i of sequence b sits at position
    lengths[b] - n + i and sees cache positions <= its own. Keys at positions < text_len get
    `text_bias` added to their logits (CogView's text-attention boost).
    """
    batch, heads, n, dim = q.shape
    max_len = k_cache.shape[2]
    acc = _accumulator(q)
    scale = dim**-0.5 if scale is None else scale
    query_pos = lengths.to(torch.long)[:, None] - n + torch.arange(n, device=q.device)  # [B, n]
    key_pos = torch.arange(max_len, device=q.device)
    visible = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, n, max_len]
    logits = torch.matmul(q.to(acc), k_cache.to(acc).transpose(-1, -2)) * scale
    logits = logits + text_bias * (key_pos < text_len).to(acc)
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    return torch.matmul(torch.softmax(logits, dim=-1), v_cache.to(acc)).to(q.dtype)

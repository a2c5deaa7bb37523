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
# Local (2D neighbourhood) attention with joint text keys (CogView2)
# ---------------------------------------------------------------------------------------------


def local_attention_mask(grid_q, grid_kv, window, causal=False, device=None) -> torch.Tensor:
    """Boolean [Hq*Wq, Hk*Wk] mask: True where query (raster index) sees key (raster index).

    Query (h, w) sees the kh x kw keys centred on (h // (Hq/Hk), w // (Wq/Wk)) that lie inside
    the key grid. Keys outside the grid are excluded exactly (the original CUDA kernel gave
    them the score -10000 instead, so they kept a tiny weight on small grids). With `causal`
    (same grid only) a query sees only the window keys at or before itself in raster order.
    """
    (hq, wq), (hk, wk), (kh, kw) = grid_q, grid_kv, window
    qi = torch.arange(hq * wq, device=device)
    ki = torch.arange(hk * wk, device=device)
    base_h = (qi // wq) // (hq // hk)
    base_w = (qi % wq) // (wq // wk)
    key_h, key_w = ki // wk, ki % wk
    mask = ((key_h[None, :] - base_h[:, None]).abs() <= kh // 2) & (
        (key_w[None, :] - base_w[:, None]).abs() <= kw // 2
    )
    if causal:
        mask &= ki[None, :] <= qi[:, None]
    return mask


def local_attention(q, k, v, *, grid_q, grid_kv, window, causal=False, text_k=None, text_v=None,
                    text_bias=0.0, scale=None):
    """Attention of every query over its local window of keys plus all text keys, in ONE softmax.

    q [B, heads, Hq*Wq, d]; k, v [B or 1, heads, Hk*Wk, d]; text_k, text_v [B or 1, heads, T, d].
    logit = (q . k) * scale, plus `text_bias` for text keys; scale defaults to d**-0.5.
    Returns (out [B, heads, Hq*Wq, d] in q's dtype, lse [B, heads, Hq*Wq]): lse is the natural
    log of the sum of exp(logit) over every key the query sees, in float32 (float64 for float64
    inputs). Dense and plain: it builds the full [Hq*Wq, Hk*Wk] logits.
    """
    acc = _accumulator(q)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    batch = q.shape[0]
    qf = q.to(acc)
    kf = k.to(acc).expand(batch, *k.shape[1:])
    vf = v.to(acc).expand(batch, *v.shape[1:])
    mask = local_attention_mask(grid_q, grid_kv, window, causal, device=q.device)
    logits = (qf @ kf.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    values = vf
    if text_k is not None:
        tk = text_k.to(acc).expand(batch, *text_k.shape[1:])
        tv = text_v.to(acc).expand(batch, *text_v.shape[1:])
        text_logits = (qf @ tk.transpose(-1, -2)) * scale + text_bias
        logits = torch.cat([text_logits, logits], dim=-1)
        values = torch.cat([tv, vf], dim=-2)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1))
    out = probs @ values
    return out.to(q.dtype), lse

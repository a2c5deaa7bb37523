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
# GELU (tanh approximation)
# ---------------------------------------------------------------------------------------------


def gelu_tanh(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in the accumulator dtype, rounded once."""
    return F.gelu(x.to(_accumulator(x)), approximate="tanh").to(x.dtype)


def linear(x, weight, bias=None, activation="none"):
    """F.linear in the inputs' dtype (as torch computes it), then `gelu_tanh` when asked."""
    y = F.linear(x, weight, bias)
    return gelu_tanh(y) if activation == "gelu_tanh" else y


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
    # Positions no query sees (>= lengths[b]: stale or never written) must not reach the output, not
    # even as 0 * NaN.
    unused = (key_pos[None, :] >= lengths.to(torch.long)[:, None])[:, None, :, None]  # [B, 1, max_len, 1]
    values = v_cache.to(acc).masked_fill(unused, 0)
    return torch.matmul(torch.softmax(logits, dim=-1), values).to(q.dtype)


# Per layer, in this order (the `layer_params` of sandwich_decode_step).
SANDWICH_LAYER_PARAMS = (
    "qkv_weight", "qkv_bias", "dense_weight", "dense_bias",
    "third_ln_weight", "third_ln_bias", "post_attention_ln_weight", "post_attention_ln_bias",
    "up_weight", "up_bias", "down_weight", "down_bias",
    "fourth_ln_weight", "fourth_ln_bias", "next_ln_weight", "next_ln_bias",
)


def sandwich_decode_step(tokens, positions, start, word_embeddings, position_embeddings, first_weight, first_bias,
                         layer_params, k_cache, v_cache, num_heads, scale, eps=1e-5, pb_relax=False):
    """One new token per row through CogView's sandwich-LayerNorm layers over a static K/V cache.

    tokens, positions [R, 1] int64; start [R]: the cache slot of the new token; caches
    [layers, R, heads, max_len, head_dim], written in place. Per layer (SANDWICH_LAYER_PARAMS):
    qkv = Linear(normed); write k, v at `start`; attend over slots <= start; residual +=
    LN3(Linear(context)); normed = LN_post(residual); residual += LN4(Linear(gelu_tanh(Linear(
    normed)))); normed = LN_next(residual) (the next layer's input LayerNorm, or the final one).
    Returns the last `normed`, [R, hidden].
    """
    rows, hidden = tokens.shape[0], word_embeddings.shape[1]
    head_dim = hidden // num_heads
    residual = F.embedding(tokens, word_embeddings) + F.embedding(positions, position_embeddings)
    normed = layer_norm(residual, first_weight, first_bias, eps, pb_relax)
    lengths = start + 1
    for layer in range(k_cache.shape[0]):
        (w_qkv, b_qkv, w_dense, b_dense, w3, b3, w_post, b_post, w_up, b_up, w_down, b_down, w4, b4, w_next,
         b_next) = layer_params[16 * layer: 16 * layer + 16]
        q, k, v = F.linear(normed, w_qkv, b_qkv).view(rows, 1, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        kv_cache_write(k_cache[layer], v_cache[layer], k, v, start)
        context = decode_attention(q, k_cache[layer], v_cache[layer], lengths, scale)
        branch = F.linear(context.transpose(1, 2).reshape(rows, 1, hidden), w_dense, b_dense)
        residual, normed = add_layer_norm(residual, branch, w3, b3, w_post, b_post, eps, pb_relax)
        branch = F.linear(F.gelu(F.linear(normed, w_up, b_up), approximate="tanh"), w_down, b_down)
        residual, normed = add_layer_norm(residual, branch, w4, b4, w_next, b_next, eps, pb_relax)
    return normed[:, 0]


# ---------------------------------------------------------------------------------------------
# Fused token sampling and its counter-based random stream
# ---------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of the 64-bit product of the constant `a` and the words `b`,
    in int64 arithmetic without overflow: `a` is split into 16-bit halves, every partial
    product stays below 2^48."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    p0 = b * a_lo  # < 2^48
    p1 = b * a_hi  # < 2^48; the product is p1 * 2^16 + p0
    t = ((p1 & 0xFFFF) << 16) + p0  # < 2^49
    return (p1 >> 16) + (t >> 32), t & _MASK32


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 (Salmon et al., SC'11) on int64 tensors holding 32-bit words.

    counter [..., 4] and key [..., 2] (broadcastable); returns the [..., 4] output words.
    Identical to csrc/ops/philox.h (checked against the published known-answer vectors)."""
    c0, c1, c2, c3 = (counter[..., i] & _MASK32 for i in range(4))
    k0, k1 = key[..., 0] & _MASK32, key[..., 1] & _MASK32
    for round_ in range(10):
        if round_:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack([c0, c1, c2, c3], dim=-1)


def _words64(value, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high 32-bit words of an int64 (two's complement, i.e. as a uint64)."""
    v = torch.as_tensor(value, dtype=torch.int64, device=device).reshape(())
    return v & _MASK32, (v >> 32) & _MASK32


def sampling_uniforms(seed, offset, rows: int, device=None) -> torch.Tensor:
    """The uniform u in [0, 1) of each row: float64 [rows].

    key = (seed mod 2^32, seed >> 32), counter = (offset mod 2^32, offset >> 32, row mod 2^32,
    row >> 32) with seed and offset read as uint64; u = (first output word) / 2^32. seed/offset may be Python
    ints or one-element int64 tensors (on any device: nothing is read back to the host)."""
    if isinstance(seed, torch.Tensor) and device is None:
        device = seed.device
    seed_lo, seed_hi = _words64(seed, device)
    off_lo, off_hi = _words64(offset, device)
    row = torch.arange(rows, dtype=torch.int64, device=device)
    counter = torch.stack(
        [off_lo.expand(rows), off_hi.expand(rows), row & _MASK32, (row >> 32) & _MASK32], dim=-1
    )
    key = torch.stack([seed_lo, seed_hi]).expand(rows, 2)
    word = philox4x32_10(counter, key)[:, 0]
    return word.to(torch.float64) * 2.0**-32


def _per_row(value, rows: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.as_tensor(value, dtype=dtype, device=device).reshape(-1).expand(rows)


def sample_tokens(logits, *, temperature=1.0, top_k=0, top_p=1.0, vocab_range=None, seed, offset=0, invalid=None):
    """The definition of cogview.ops.sample_tokens, with a stable sort and cumulative sums.

    Per row, over the ids [lo, hi):
      x = logits as float32, NaN -> -inf. Canonical order: larger x first, then lower id
      (-0 and +0 are equal).
      temperature 0: the first id in canonical order (argmax, lowest id on ties).
      s = x / temperature in float32 (clamped to +-float32 max unless x is -inf), m = max s,
      w = exp(s - m) in float64 for the first top_k ids in canonical order (0 or >= the range
      size keeps all), 0 for the rest.
      top-p (top_p < 1): with cum the float64 cumulative sum of w in canonical order and
      Z = its last value, keep the ids whose preceding sum is < top_p * Z (this keeps the token
      that crosses top_p, and always the first).
      Draw: with C the cumulative sum of the kept weights in ascending id order and u the row's
      uniform (`sampling_uniforms`), the token is the first id with C > u * C[-1].
    Rows whose x are all -inf return lo and set invalid[row] = True.
    """
    rows, vocab = logits.shape
    lo, hi = (0, vocab) if vocab_range is None else (int(vocab_range[0]), int(vocab_range[1]))
    n, device = hi - lo, logits.device
    x = logits[:, lo:hi].float()
    x = torch.where(torch.isnan(x), float("-inf"), x) + 0.0  # NaN -> -inf; -0 -> +0 (equal keys on every device)
    temperature = _per_row(temperature, rows, torch.float32, device)
    top_k = _per_row(top_k, rows, torch.int64, device)
    top_p = _per_row(top_p, rows, torch.float64, device)

    order = torch.sort(x, dim=1, descending=True, stable=True).indices  # canonical order
    xs = x.gather(1, order)
    rank = torch.arange(n, device=device)
    greedy = temperature == 0
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    big = torch.finfo(torch.float32).max
    s = (xs / safe_t[:, None]).clamp(-big, big)
    s = torch.where(xs == float("-inf"), float("-inf"), s)
    k_eff = torch.where((top_k <= 0) | (top_k >= n), n, top_k)
    w = torch.exp(s.double() - s[:, :1].double())
    w = torch.where(rank[None, :] < k_eff[:, None], w, 0.0)
    w = torch.nan_to_num(w, nan=0.0)  # rows with no finite logit (handled below)
    cum = torch.cumsum(w, dim=1)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)
    in_nucleus = (before < (top_p * cum[:, -1])[:, None]) | (rank[None, :] == 0) | (top_p[:, None] >= 1)
    w = torch.where(in_nucleus, w, 0.0)

    by_id = torch.zeros_like(w).scatter(1, order, w)
    cum_id = torch.cumsum(by_id, dim=1)
    u = sampling_uniforms(seed, offset, rows, device)
    target = u * cum_id[:, -1]
    drawn = (cum_id <= target[:, None]).sum(dim=1).clamp(max=n - 1)
    token = torch.where(greedy, order[:, 0], drawn)
    bad = xs[:, 0] == float("-inf")
    token = torch.where(bad, 0, token) + lo
    if invalid is not None:
        invalid.logical_or_(bad)
    return token


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

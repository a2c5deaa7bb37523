"""decode_attention over a static K/V cache vs SDPA over the cache slice (issue 6 CPU, issue 7 CUDA).

One decoding step (n = 1 query per sequence) for B sequences of ragged lengths, with CogView's text
attention boost (text_len 64, +1.4). Baseline (frozen): F.scaled_dot_product_attention over
cache[:, :, :max(lengths)] with an explicit additive float mask built from `lengths` each step
(padding -inf, text keys +1.4). Reports the K/V bytes the op must read per second against the
measured copy bandwidth (a copy into a preallocated tensor).

    python bench/decode.py [--smoke] [--device cuda] [--dtypes float32,bfloat16]

On CUDA: B=8, 40 heads x 64 (CogView-4B). bench/decode_attention_gpu.py is the GPU benchmark of issue 7
(B in {1, 8}, context 1088, the bandwidth target) that bench/gpu_check.sh runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _harness  # noqa: E402

import cogview  # noqa: E402

TEXT_LEN, TEXT_BIAS = 64, 1.4


def sdpa_step(q, k_cache, v_cache, lengths, text_len, text_bias):
    limit = k_cache.shape[2] if lengths.is_cuda else int(lengths.max())
    positions = torch.arange(limit, device=q.device)
    bias = torch.where(positions < text_len, text_bias, 0.0).to(q.dtype)
    mask = torch.where(positions[None, :] < lengths[:, None], bias, float("-inf"))
    mask = mask[:, None, None, :].to(q.dtype)  # [B, 1, 1, limit]
    return F.scaled_dot_product_attention(q, k_cache[:, :, :limit], v_cache[:, :, :limit], attn_mask=mask)


def main() -> None:
    args = _harness.parse_args(__doc__, lambda p: p.add_argument("--dtypes", default="float32,bfloat16"))
    device = args.device
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    if args.smoke:
        batch, heads, dim, contexts = 2, 2, 64, (80, 300)
    elif device.startswith("cuda"):  # issue 7's shape (bench/decode_attention_gpu.py also does B = 1)
        batch, heads, dim, contexts = 8, 40, 64, (1088, 4096)
    else:
        batch, heads, dim, contexts = 8, 8, 64, (1088, 4096)
    bandwidth = _harness.copy_bandwidth(device, numel=(1 << 18) if args.smoke else (1 << 24))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for context in contexts:
        # Ragged: lengths spread over the last ~6% of the context; the cache holds `context` positions.
        lengths = context - torch.randint(0, max(1, context // 16), (batch,), generator=gen)
        for dtype in dtypes:
            k_cache = torch.randn(batch, heads, context, dim, generator=gen).to(device, dtype)
            v_cache = torch.randn(batch, heads, context, dim, generator=gen).to(device, dtype)
            q = torch.randn(batch, heads, 1, dim, generator=gen).to(device, dtype)
            lens = lengths.to(device)
            candidates = {
                "sdpa": lambda: sdpa_step(q, k_cache, v_cache, lens, TEXT_LEN, TEXT_BIAS),
                "cogview": lambda: cogview.ops.decode_attention(q, k_cache, v_cache, lens, text_len=TEXT_LEN,
                                                                text_bias=TEXT_BIAS),
            }
            times = _harness.compare(candidates, device, args.repeats)
            kv_bytes = 2 * int(lengths.sum()) * heads * dim * k_cache.element_size()
            gbs = kv_bytes / times["cogview"] / 1e9
            rows.append({
                "context": context, "lengths": f"{int(lengths.min())}-{int(lengths.max())}",
                "dtype": str(dtype).replace("torch.", ""), "sdpa_us": times["sdpa"] * 1e6,
                "cogview_us": times["cogview"] * 1e6, "speedup": times["sdpa"] / times["cogview"],
                "kv_GBps": gbs, "pct_of_copy": 100 * gbs / (bandwidth / 1e9),
            })
    kernel = "kernel" if cogview.ops.has_kernel("decode_attention", torch.device(device).type) else "reference"
    _harness.report("decode", args, rows,
                    ["context", "lengths", "dtype", "sdpa_us", "cogview_us", "speedup", "kv_GBps", "pct_of_copy"],
                    notes=f"B={batch}, heads={heads}, d={dim}, n=1, text_len={TEXT_LEN}; cogview runs the {kernel}; "
                          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read+write); kv_GBps = K/V bytes of the "
                          f"valid positions / cogview time; {torch.get_num_threads()} threads.")


if __name__ == "__main__":
    main()

"""GPU benchmark of cached decoding: `decode_attention` (and `kv_cache_write`) on CUDA (issue 7).

The CogView-4B shape: bf16 (and fp16), 40 heads x 64, context 1088, one new query per sequence,
B in {1, 8}. Baseline (frozen, from bench/decode.py): F.scaled_dot_product_attention over the cache
with an additive float mask built from `lengths` each step. Reported: microseconds per call, the K/V
bytes of the valid positions per second, and that as a fraction of the measured clone bandwidth
(`_harness.copy_bandwidth`, read + write). Also one `kv_cache_write` of the new K/V per step.

Targets (issue 7): K/V read at >= 70% of copy bandwidth at B = 8; microseconds reported at B = 1.

    python bench/decode_attention_gpu.py            # full
    python bench/decode_attention_gpu.py --smoke    # tiny, seconds

Without a GPU it says so and exits 0.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (str(HERE), str(HERE.parent)):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

import _harness  # noqa: E402
from decode import TEXT_BIAS, TEXT_LEN, sdpa_step  # noqa: E402

COLUMNS = ["dtype", "B", "heads", "d", "context", "cogview_us", "sdpa_us", "speedup", "kv_GBps", "of_copy_bw",
           "write_us", "max_abs_diff", "target"]


def bench_gpu(args) -> list[dict]:
    import cogview

    device = "cuda"
    if args.smoke:
        cases = [(torch.bfloat16, 1, 4, 64, 200), (torch.bfloat16, 2, 4, 64, 300)]
    else:
        cases = [(dtype, batch, 40, 64, 1088) for dtype in (torch.bfloat16, torch.float16) for batch in (1, 8)]
    bandwidth = _harness.copy_bandwidth(device, numel=(1 << 20) if args.smoke else (1 << 26))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype, batch, heads, dim, context in cases:
        k_cache = torch.randn(batch, heads, context, dim, generator=gen).to(device, dtype)
        v_cache = torch.randn(batch, heads, context, dim, generator=gen).to(device, dtype)
        q = torch.randn(batch, heads, 1, dim, generator=gen).to(device, dtype)
        lengths = torch.full((batch,), context, dtype=torch.long, device=device)
        start = lengths - 1
        k_new, v_new = k_cache[:, :, -1:].clone(), v_cache[:, :, -1:].clone()
        candidates = {
            "cogview": lambda: cogview.ops.decode_attention(q, k_cache, v_cache, lengths, text_len=TEXT_LEN,
                                                            text_bias=TEXT_BIAS),
            "sdpa": lambda: sdpa_step(q, k_cache, v_cache, lengths, TEXT_LEN, TEXT_BIAS),
            "write": lambda: cogview.ops.kv_cache_write(k_cache, v_cache, k_new, v_new, start),
        }
        times = _harness.compare(candidates, device, args.repeats)
        ours = candidates["cogview"]().float()
        diff = float((ours - candidates["sdpa"]().float()).abs().max())
        kv_bytes = 2 * batch * heads * context * dim * k_cache.element_size()
        gbps = kv_bytes / times["cogview"] / 1e9
        of_copy = gbps / (bandwidth / 1e9)
        target = ""
        if batch == 8 and not args.smoke:
            target = "OK (>= 70%)" if of_copy >= 0.7 else "MISSED (< 70%)"
        rows.append({
            "dtype": str(dtype).replace("torch.", ""), "B": batch, "heads": heads, "d": dim, "context": context,
            "cogview_us": times["cogview"] * 1e6, "sdpa_us": times["sdpa"] * 1e6,
            "speedup": times["sdpa"] / times["cogview"], "kv_GBps": gbps, "of_copy_bw": of_copy,
            "write_us": times["write"] * 1e6, "max_abs_diff": diff, "target": target,
        })
    print(f"clone bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    return rows


def main() -> int:
    args = _harness.parse_args(__doc__.splitlines()[0])
    if not torch.cuda.is_available():
        print(f"bench/decode_attention_gpu.py needs a CUDA GPU; GPU visible: {torch.cuda.is_available()}. "
              "Nothing to do.")
        return 0
    args.device = "cuda"
    import cogview

    if not cogview.ops.has_kernel("decode_attention", "cuda"):
        print("cogview was built without CUDA kernels: rebuild with CUDA to benchmark them")
        return 1
    rows = bench_gpu(args)
    notes = ("n = 1 query per sequence, lengths = context, text_len 64 (+1.4). kv_GBps = K/V bytes / cogview time; "
             "of_copy_bw = that / measured clone bandwidth; speedup = sdpa / cogview; write_us = one kv_cache_write "
             "of the new key and value. Target: of_copy_bw >= 0.7 at B = 8.")
    _harness.report("decode_attention_gpu", args, rows, COLUMNS, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

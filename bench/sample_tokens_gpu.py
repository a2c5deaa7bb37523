"""GPU benchmark of fused token sampling: `sample_tokens` on CUDA vs the plain-PyTorch sampler (issue 7).

Rows {1, 8, 64, 256} x V 58240, vocab range (0, 8192), temperature 1, top_k 200, top_p 0.95: the
baseline (frozen, from bench/sampling.py) slices the range, divides, torch.topk, softmax, top-p over
the kept values, torch.multinomial. Also, for information, the same rows with top_k off and
top_p 0.9 (the kernel's slower path over the whole range; the baseline then sorts the range).

Target (issue 7): >= 5x the baseline in the top_k 200 / top_p 0.95 rows.

    python bench/sample_tokens_gpu.py            # full
    python bench/sample_tokens_gpu.py --smoke    # tiny, seconds

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
from sampling import torch_sampler  # noqa: E402

COLUMNS = ["rows", "V", "range", "top_k", "top_p", "torch_us", "cogview_us", "speedup", "target"]


def torch_nucleus(logits, lo, hi, temperature, top_p):
    """The baseline without top-k: sort the range, top-p, multinomial."""
    x = logits[:, lo:hi] / temperature
    values, ids = torch.sort(x, dim=-1, descending=True)
    probs = torch.softmax(values, dim=-1)
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(before >= top_p, 0.0)
    return ids.gather(1, torch.multinomial(probs, 1)).squeeze(1) + lo


def bench_gpu(args) -> list[dict]:
    import cogview

    device = "cuda"
    lo, hi = (0, 256) if args.smoke else (0, 8192)
    vocab = 1024 if args.smoke else 58240
    row_counts = (1, 8) if args.smoke else (1, 8, 64, 256)
    configs = [(16 if args.smoke else 200, 0.95), (0, 0.9)]
    gen = torch.Generator().manual_seed(0)
    out = []
    for top_k, top_p in configs:
        for rows in row_counts:
            logits = (torch.randn(rows, vocab, generator=gen) * 3).to(device)
            seed = torch.tensor(1234, device=device)
            offset = torch.zeros((), dtype=torch.long, device=device)

            def ours():
                offset.add_(1)
                return cogview.ops.sample_tokens(logits, temperature=1.0, top_k=top_k, top_p=top_p,
                                                 vocab_range=(lo, hi), seed=seed, offset=offset)

            if top_k:
                baseline = lambda: torch_sampler(logits, lo, hi, 1.0, top_k, top_p)  # noqa: E731
            else:
                baseline = lambda: torch_nucleus(logits, lo, hi, 1.0, top_p)  # noqa: E731
            times = _harness.compare({"torch": baseline, "cogview": ours}, device, args.repeats)
            speedup = times["torch"] / times["cogview"]
            target = ""
            if top_k and not args.smoke:
                target = "OK (>= 5x)" if speedup >= 5 else "MISSED (< 5x)"
            out.append({"rows": rows, "V": vocab, "range": f"[{lo}, {hi})", "top_k": top_k, "top_p": top_p,
                        "torch_us": times["torch"] * 1e6, "cogview_us": times["cogview"] * 1e6,
                        "speedup": speedup, "target": target})
    return out


def main() -> int:
    args = _harness.parse_args(__doc__.splitlines()[0])
    if not torch.cuda.is_available():
        print(f"bench/sample_tokens_gpu.py needs a CUDA GPU; GPU visible: {torch.cuda.is_available()}. "
              "Nothing to do.")
        return 0
    args.device = "cuda"
    import cogview

    if not cogview.ops.has_kernel("sample_tokens", "cuda"):
        print("cogview was built without CUDA kernels: rebuild with CUDA to benchmark them")
        return 1
    rows = bench_gpu(args)
    notes = ("speedup = torch / cogview (medians of interleaved rounds); seed and offset are device tensors "
             "(no host synchronisation). Target: >= 5x in the top_k 200 rows.")
    _harness.report("sample_tokens_gpu", args, rows, COLUMNS, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fused token sampling vs the best plain-PyTorch sampler (issue 6 CPU, issue 7 CUDA).

Baseline (frozen): slice the vocab range, divide by the temperature, torch.topk, softmax over the
kept values, top-p over them (keeping the crossing token), torch.multinomial. `--compile` adds
the same function under torch.compile. Candidates run interleaved on the same logits.

    python bench/sampling.py [--smoke] [--device cuda] [--compile]

bench/sample_tokens_gpu.py is the GPU benchmark of issue 7 (device-tensor seed/offset, the 5x target)
that bench/gpu_check.sh runs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _harness  # noqa: E402

import cogview  # noqa: E402

VOCAB_RANGE = (0, 8192)
TOP_K, TOP_P, TEMPERATURE = 200, 0.95, 1.0


def torch_sampler(logits: torch.Tensor, lo: int, hi: int, temperature: float, top_k: int, top_p: float):
    x = logits[:, lo:hi] / temperature
    values, ids = torch.topk(x, top_k, dim=-1)
    probs = torch.softmax(values, dim=-1)
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(before >= top_p, 0.0)
    choice = torch.multinomial(probs, 1)
    return ids.gather(1, choice).squeeze(1) + lo


def main() -> None:
    args = _harness.parse_args(__doc__, lambda p: p.add_argument("--compile", action="store_true",
                                                                 help="also time the baseline under torch.compile"))
    device = args.device
    if args.smoke:
        shapes = [(1, 512), (8, 1024)]
    elif device.startswith("cuda"):  # issue 7's GPU rows (also in bench/sample_tokens_gpu.py)
        shapes = [(r, 58240) for r in (1, 8, 64, 256)]
    else:
        shapes = [(r, v) for r in (1, 8, 64) for v in (8192, 58240)]
    lo, hi = (0, 256) if args.smoke else VOCAB_RANGE
    top_k = 16 if args.smoke else TOP_K
    compiled = torch.compile(torch_sampler, dynamic=False) if args.compile else None
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    for rows, vocab in shapes:
        logits = (torch.randn(rows, vocab, generator=gen) * 3).to(device)
        step = [0]

        def ours():
            step[0] += 1
            return cogview.ops.sample_tokens(logits, temperature=TEMPERATURE, top_k=top_k, top_p=TOP_P,
                                             vocab_range=(lo, hi), seed=1234, offset=step[0])

        candidates = {
            "torch": lambda: torch_sampler(logits, lo, hi, TEMPERATURE, top_k, TOP_P),
            "cogview": ours,
        }
        if compiled is not None:
            candidates["torch.compile"] = lambda: compiled(logits, lo, hi, TEMPERATURE, top_k, TOP_P)
        times = _harness.compare(candidates, device, args.repeats)
        row = {"rows": rows, "V": vocab, "range": f"[{lo}, {hi})", "top_k": top_k, "top_p": TOP_P,
               "torch_us": times["torch"] * 1e6, "cogview_us": times["cogview"] * 1e6,
               "speedup": times["torch"] / times["cogview"]}
        if compiled is not None:
            row["compile_us"] = times["torch.compile"] * 1e6
            row["speedup_vs_compile"] = times["torch.compile"] / times["cogview"]
        rows_out.append(row)
    columns = ["rows", "V", "range", "top_k", "top_p", "torch_us"]
    columns += ["compile_us"] if compiled is not None else []
    columns += ["cogview_us", "speedup"] + (["speedup_vs_compile"] if compiled is not None else [])
    kernel = "kernel" if cogview.ops.has_kernel("sample_tokens", torch.device(device).type) else "reference"
    _harness.report("sampling", args, rows_out, columns,
                    notes=f"cogview.ops.sample_tokens runs the {kernel} on {device}; speedup = torch / cogview "
                          f"(medians of interleaved rounds, {torch.get_num_threads()} threads).")


if __name__ == "__main__":
    main()

"""`cogview.ops.gelu_tanh` vs `F.gelu(x, approximate="tanh")` (and its torch.compile), on the MLP
activations cogview runs:

  decode row   1 x 1024        one decode step of small-16x16 (inside the fused step it runs inline)
  sr pass      576 x 512       one SR layer of the embedded model's stage (24x24 cells, MLP 512)
  sr 60x60     3600 x 1024     one SR layer of cogview2-20to60
  training     32 x 112 x 768  one micro-batch MLP of the default model's recipe

forward, and forward+backward. Interleaved rounds, medians.

    python bench/gelu.py [--smoke] [--dtypes float32,bfloat16] [--device cuda]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

from cogview import ops  # noqa: E402

SHAPES = {"decode row": (1, 1024), "sr pass": (576, 512), "sr 60x60": (3600, 1024), "training": (32, 112, 768)}


def plain(x):
    return F.gelu(x, approximate="tanh")


def _runner(fn, x, grad):
    if grad is None:
        return lambda: fn(x)

    def run():
        x.grad = None
        fn(x).backward(grad)

    return run


def bench_case(name, shape, dtype, mode, args):
    device = args.device
    x = torch.randn(shape, device=device, dtype=dtype)
    grad = None
    if mode == "fwd+bwd":
        x.requires_grad_()
        grad = torch.randn(shape, device=device, dtype=dtype)
    torch._dynamo.reset()
    compiled = torch.compile(plain, fullgraph=True, dynamic=False)
    candidates = {"cogview": _runner(ops.gelu_tanh, x, grad), "plain": _runner(plain, x, grad),
                  "compiled": _runner(compiled, x, grad)}
    with torch.set_grad_enabled(grad is not None):
        times = _harness.compare(candidates, device, args.repeats)
    return {"case": name, "shape": "x".join(map(str, shape)), "dtype": str(dtype).removeprefix("torch."), "mode": mode,
            "cogview us": times["cogview"] * 1e6, "plain us": times["plain"] * 1e6,
            "compiled us": times["compiled"] * 1e6, "vs plain": times["plain"] / times["cogview"],
            "vs compiled": times["compiled"] / times["cogview"]}


def main():
    def extra(parser):
        parser.add_argument("--dtypes", default="float32,bfloat16")

    args = _harness.parse_args(__doc__.splitlines()[0], extra)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gelu.py: --device cuda needs a GPU; skipping")
        return
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    shapes = {"smoke": (64, 256)} if args.smoke else SHAPES
    cases = [(n, s, d, m) for d in dtypes for n, s in shapes.items() for m in ("fwd", "fwd+bwd")]
    if args.smoke:
        cases = cases[:2]
    rows = [bench_case(*case, args) for case in cases]
    columns = ["case", "shape", "dtype", "mode", "cogview us", "plain us", "compiled us", "vs plain", "vs compiled"]
    _harness.report("gelu", args, rows, columns, "vs = baseline time / cogview time (higher is better).")


if __name__ == "__main__":
    main()

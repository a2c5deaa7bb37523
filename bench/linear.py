"""`cogview.ops.linear` (AMX tile products for bf16, bias and GELU in the same pass) vs `F.linear`
(then `cogview.ops.gelu_tanh`, the project's own fastest GELU) and vs `torch.compile` of the plain
composition, on the projections of the SR stage's layers:

  shapes qkv / dense / up+gelu / down   576 rows    the embedded model's SR stage (24x24 cells, 128 wide)
  cv2 qkv / up+gelu / down              3600 rows   cogview2-20to60 (60x60 cells, 256 wide)

forward (inference). Interleaved rounds, medians. The weights are packed into the tile layout
before timing, as cogview.ops.linear keeps them between calls. The `tiles` column says whether the
call ran on the AMX tiles; where it did not (a CPU without AMX, the avx512 kernels switched off, or
a product above the op's size limit, as CogView2's rows are) cogview's column measures F.linear.

    python bench/linear.py [--smoke] [--dtypes bfloat16,float32]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

from cogview import ops  # noqa: E402
from cogview._native import _C  # noqa: E402

# name -> (rows, in_features, out_features, activation)
CASES = {
    "shapes qkv": (576, 128, 384, "none"),
    "shapes dense": (576, 128, 128, "none"),
    "shapes up+gelu": (576, 128, 512, "gelu_tanh"),
    "shapes down": (576, 512, 128, "none"),
    "cv2 qkv": (3600, 256, 768, "none"),
    "cv2 up+gelu": (3600, 256, 1024, "gelu_tanh"),
    "cv2 down": (3600, 1024, 256, "none"),
}
SMOKE = {"smoke up+gelu": (40, 64, 96, "gelu_tanh")}


def plain(x, w, b, activation):
    y = F.linear(x, w, b)
    return ops.gelu_tanh(y) if activation == "gelu_tanh" else y


def plain_torch(x, w, b, activation):  # what torch.compile is given: torch ops only
    y = F.linear(x, w, b)
    return F.gelu(y, approximate="tanh") if activation == "gelu_tanh" else y


def bench_case(name, shape, dtype, args):
    rows, features, out, activation = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, features, generator=g).to(dtype)
    w = (torch.randn(out, features, generator=g) / features**0.5).to(dtype)
    b = torch.randn(out, generator=g).to(dtype)
    torch._dynamo.reset()
    compiled = torch.compile(plain_torch, fullgraph=True, dynamic=False)
    candidates = {"cogview": lambda: ops.linear(x, w, b, activation), "plain": lambda: plain(x, w, b, activation),
                  "compiled": lambda: compiled(x, w, b, activation)}
    with torch.inference_mode():
        times = _harness.compare(candidates, args.device, args.repeats)
    return {"case": name, "rows x in -> out": f"{rows}x{features}->{out}", "dtype": str(dtype).removeprefix("torch."),
            "tiles": _C.tile_linear_runs(x, w),
            "cogview us": times["cogview"] * 1e6, "plain us": times["plain"] * 1e6,
            "compiled us": times["compiled"] * 1e6, "vs plain": times["plain"] / times["cogview"],
            "vs compiled": times["compiled"] / times["cogview"]}


def main():
    def extra(parser):
        parser.add_argument("--dtypes", default="bfloat16,float32")

    args = _harness.parse_args(__doc__.splitlines()[0], extra)
    if args.device != "cpu":
        print("bench/linear.py: the tile kernel is CPU-only (on other devices cogview.ops.linear is F.linear); skipping")
        return
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    cases = SMOKE if args.smoke else CASES
    rows = [bench_case(name, shape, dtype, args) for dtype in dtypes for name, shape in cases.items()]
    columns = ["case", "rows x in -> out", "dtype", "tiles", "cogview us", "plain us", "compiled us", "vs plain",
               "vs compiled"]
    _harness.report("linear", args, rows, columns,
                    "vs = baseline time / cogview time (higher is better). plain = F.linear then "
                    "cogview.ops.gelu_tanh; compiled = torch.compile of F.linear then F.gelu(tanh).")


if __name__ == "__main__":
    main()

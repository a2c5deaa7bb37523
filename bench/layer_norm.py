"""Fused sandwich step `add_layer_norm` vs what a user would write in plain PyTorch.

Candidates, on the same inputs, interleaved:
  fused     cogview.ops.add_layer_norm(residual, branch, w_out, b_out, w_next, b_next)
  eager     r = residual + F.layer_norm(branch, ...); n = F.layer_norm(r, ...)
  compiled  torch.compile of `eager`
  clone     x.clone() of one tensor: the bandwidth yardstick
Bandwidth counts the tensors a fused kernel must move: forward 4 (read residual and branch,
write new_residual and normed); forward+backward 10 (the forward's 4, then read the two output
gradients, branch and new_residual, write the two input gradients).

    python bench/layer_norm.py                 # CPU, 2 threads, the issue's grid
    python bench/layer_norm.py --device cuda   # see bench/layer_norm_gpu.py on a GPU machine
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

import cogview  # noqa: E402,F401
from cogview import ops  # noqa: E402

FULL_ROWS = (4096, 16384)
FULL_HIDDEN = (1024, 2560, 4096)


def eager_sandwich(residual, branch, w_out, b_out, w_next, b_next):
    hidden = branch.shape[-1:]
    new_residual = residual + F.layer_norm(branch, hidden, w_out, b_out, 1e-5)
    return new_residual, F.layer_norm(new_residual, hidden, w_next, b_next, 1e-5)


def fused_sandwich(residual, branch, w_out, b_out, w_next, b_next):
    return ops.add_layer_norm(residual, branch, w_out, b_out, w_next, b_next)


def _inputs(rows, hidden, dtype, device, grad):
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)  # noqa: E731
    params = [(torch.randn(hidden, device=device, dtype=dtype) * 0.1 + 1).requires_grad_(grad),
              (torch.randn(hidden, device=device, dtype=dtype) * 0.1).requires_grad_(grad)] * 2
    return [make(rows, hidden), make(rows, hidden)] + params


def _forward_backward(fn, inputs, grads):
    def run():
        for t in inputs:
            t.grad = None
        torch.autograd.backward(fn(*inputs), grads)

    return run


def bench_case(rows, hidden, dtype, mode, args, compile_it):
    device = args.device
    grad = mode == "fwd+bwd"
    inputs = _inputs(rows, hidden, dtype, device, grad)
    if compile_it:  # a fresh dynamo state per case: one static graph each, no recompile limit
        torch._dynamo.reset()
    compiled = torch.compile(eager_sandwich, fullgraph=True, dynamic=False) if compile_it else None
    if grad:
        grads = [torch.randn(rows, hidden, device=device, dtype=dtype) for _ in range(2)]
        candidates = {"fused": _forward_backward(fused_sandwich, inputs, grads),
                      "eager": _forward_backward(eager_sandwich, inputs, grads)}
        if compiled:
            candidates["compiled"] = _forward_backward(compiled, inputs, grads)
        tensors_moved = 10
    else:
        candidates = {"fused": lambda: fused_sandwich(*inputs), "eager": lambda: eager_sandwich(*inputs)}
        if compiled:
            candidates["compiled"] = lambda: compiled(*inputs)
        tensors_moved = 4
    x = inputs[1].detach()
    candidates["clone"] = x.clone
    with torch.set_grad_enabled(grad):
        times = _harness.compare(candidates, device, args.repeats)
    nbytes = tensors_moved * x.numel() * x.element_size()
    clone_bw = 2 * x.numel() * x.element_size() / times["clone"]
    row = {"rows": rows, "hidden": hidden, "dtype": str(dtype).removeprefix("torch."), "mode": mode,
           "fused ms": times["fused"] * 1e3, "eager ms": times["eager"] * 1e3,
           "fused GB/s": nbytes / times["fused"] / 1e9,
           "% of clone bw": 100 * nbytes / times["fused"] / clone_bw,
           "vs eager": times["eager"] / times["fused"]}
    if compiled:
        row["compiled ms"] = times["compiled"] * 1e3
        row["vs compiled"] = times["compiled"] / times["fused"]
    return row


def main():
    def extra(parser):
        parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
        parser.add_argument("--dtypes", default="float32,bfloat16")
        parser.add_argument("--rows", default=",".join(map(str, FULL_ROWS)))
        parser.add_argument("--hidden", default=",".join(map(str, FULL_HIDDEN)))

    args = _harness.parse_args(__doc__.splitlines()[0], extra)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/layer_norm.py: --device cuda needs a GPU; skipping")
        return
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    if args.smoke:
        cases = [(64, 256, torch.float32, mode) for mode in ("fwd", "fwd+bwd")]
    else:
        sizes = [(int(r), int(h)) for r in args.rows.split(",") for h in args.hidden.split(",")]
        cases = [(r, h, d, m) for d in dtypes for m in ("fwd", "fwd+bwd") for r, h in sizes]
    rows = []
    for rows_n, hidden, dtype, mode in cases:
        # Compile once per shape in full runs; in smoke runs only the forward (keeps CI short).
        compile_it = not args.no_compile and (not args.smoke or mode == "fwd")
        rows.append(bench_case(rows_n, hidden, dtype, mode, args, compile_it))
        print(f"  done {rows_n}x{hidden} {dtype} {mode}", flush=True)
    columns = ["rows", "hidden", "dtype", "mode", "fused ms", "eager ms", "compiled ms", "fused GB/s",
               "% of clone bw", "vs eager", "vs compiled"]
    notes = ("Targets (CPU, 2 threads, 4096x1024 fp32): forward >= 1.8x eager and >= 1.5x compiled; "
             "forward+backward >= 1.5x eager.")
    _harness.report("layer_norm", args, rows, columns, notes)


if __name__ == "__main__":
    main()

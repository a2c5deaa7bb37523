"""GPU benchmark of the fused sandwich LayerNorm (`cogview.ops.add_layer_norm` with a next LayerNorm).

One sandwich step: `new_residual = residual + LN(branch)`, `normed = LN(new_residual)`, in bf16 and
fp16 (weights in the same dtype), rows 16384 x hidden 2560 and 4096, forward and forward+backward.
Compared on the same inputs, interleaved, with the frozen plain-PyTorch baselines below: eager and
`torch.compile` of the same composition. Reported: model GB/s (the bytes the step must move at
least: forward reads residual and branch and writes new_residual and normed; the backward adds
reading the two output gradients, branch and new_residual and writing the two input gradients)
and that as a fraction of the measured device copy bandwidth (`_harness.copy_bandwidth`).

Targets (issue 3): forward >= 80% of copy bandwidth and faster than torch.compile; forward+backward
>= 1.3x eager.

    python bench/layer_norm_gpu.py --device cuda            # full
    python bench/layer_norm_gpu.py --device cuda --smoke    # tiny, seconds
    python bench/layer_norm_gpu.py --device cuda --odd-hidden   # also hidden 4097 (no cliff)

Without a GPU it says so and exits 0. `bench/layer_norm.py` can call `bench_gpu(args)`.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (str(HERE), str(HERE.parent)):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _harness  # noqa: E402

EPS = 1e-5
COLUMNS = ["dtype", "rows", "hidden", "pass", "cogview_ms", "eager_ms", "compile_ms", "cogview_GBps",
           "of_copy_bw", "vs_eager", "vs_compile", "max_abs_diff", "target"]


# ---- frozen baselines: what a competent user writes (do not make these slower) ----------------


def eager_sandwich(residual, branch, w_out, b_out, w_next, b_next):
    hidden = branch.shape[-1:]
    new_residual = residual + F.layer_norm(branch, hidden, w_out, b_out, EPS)
    return new_residual, F.layer_norm(new_residual, hidden, w_next, b_next, EPS)


def cogview_sandwich(residual, branch, w_out, b_out, w_next, b_next):
    import cogview

    return cogview.ops.add_layer_norm(residual, branch, w_out, b_out, w_next, b_next, EPS)


# ---- measurement ------------------------------------------------------------------------------


def cases(smoke: bool, odd_hidden: bool = False) -> list[tuple[torch.dtype, int, int]]:
    if smoke:
        return [(torch.bfloat16, 64, 256), (torch.float16, 33, 1031)]
    hiddens = [2560, 4096] + ([4097] if odd_hidden else [])
    return [(dtype, 16384, hidden) for dtype in (torch.bfloat16, torch.float16) for hidden in hiddens]


def _inputs(rows: int, hidden: int, dtype: torch.dtype, device: str, requires_grad: bool):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def make(*shape, scale=1.0, shift=0.0):
        t = (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return [make(rows, hidden, scale=2.0), make(rows, hidden), make(hidden, scale=0.1, shift=1.0),
            make(hidden, scale=0.1), make(hidden, scale=0.1, shift=1.0), make(hidden, scale=0.1)]


def _forward_fn(step, inputs):
    return lambda: step(*inputs)


def _forward_backward_fn(step, inputs, cotangents):
    def run():
        outputs = step(*inputs)
        return torch.autograd.grad(outputs, inputs, cotangents)

    return run


def _max_abs_diff(a, b) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def bench_gpu(args) -> list[dict]:
    """Rows of the report (one per dtype, size and pass); needs a CUDA device."""
    device = getattr(args, "bench_device", "cuda")  # "cpu" only for a dry run of this code
    torch.backends.cuda.matmul.allow_tf32 = False
    copy_bw = _harness.copy_bandwidth(device)
    print(f"device copy bandwidth (into a preallocated tensor, read + write): {copy_bw / 1e9:.0f} GB/s")
    rows_out = []
    for dtype, rows, hidden in cases(args.smoke, getattr(args, "odd_hidden", False)):
        elem = torch.finfo(dtype).bits // 8
        tensor_bytes = rows * hidden * elem
        for pass_name in ("fwd", "fwd+bwd"):
            backward = pass_name == "fwd+bwd"
            # A fresh, shape-specialised compilation per case: the baseline at its best.
            torch._dynamo.reset()
            compiled = torch.compile(eager_sandwich, dynamic=False)
            steps = {"cogview": cogview_sandwich, "eager": eager_sandwich, "compile": compiled}
            inputs = _inputs(rows, hidden, dtype, device, requires_grad=backward)
            if backward:
                gen = torch.Generator(device="cpu").manual_seed(1)
                cotangents = [torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype)
                              for _ in range(2)]
                fns = {name: _forward_backward_fn(step, inputs, cotangents) for name, step in steps.items()}
                model_bytes = (4 + 6) * tensor_bytes
            else:
                fns = {name: _forward_fn(step, inputs) for name, step in steps.items()}
                model_bytes = 4 * tensor_bytes
            with torch.no_grad() if not backward else torch.enable_grad():
                diff = _max_abs_diff(fns["cogview"](), fns["eager"]())
                seconds = _harness.compare(fns, device, args.repeats)
            gbps = model_bytes / seconds["cogview"] / 1e9
            of_copy = model_bytes / seconds["cogview"] / copy_bw
            vs_eager = seconds["eager"] / seconds["cogview"]
            vs_compile = seconds["compile"] / seconds["cogview"]
            if backward:
                target = "ok" if vs_eager >= 1.3 else "MISS (>= 1.3x eager)"
            else:
                target = "ok" if of_copy >= 0.8 and vs_compile > 1.0 else "MISS (>= 80% copy bw, > compile)"
            rows_out.append({
                "dtype": str(dtype).removeprefix("torch."), "rows": rows, "hidden": hidden, "pass": pass_name,
                "cogview_ms": seconds["cogview"] * 1e3, "eager_ms": seconds["eager"] * 1e3,
                "compile_ms": seconds["compile"] * 1e3, "cogview_GBps": gbps, "of_copy_bw": of_copy,
                "vs_eager": vs_eager, "vs_compile": vs_compile, "max_abs_diff": diff,
                "target": target if not args.smoke else "-",
            })
            print(f"  {rows_out[-1]['dtype']} {rows}x{hidden} {pass_name}: {gbps:.0f} GB/s "
                  f"({of_copy:.0%} of copy), {vs_eager:.2f}x eager, {vs_compile:.2f}x compile", flush=True)
    return rows_out


def main() -> int:
    args = _harness.parse_args(
        __doc__.splitlines()[0],
        lambda p: p.add_argument("--odd-hidden", action="store_true", help="also hidden 4097"),
    )
    if args.device != "cuda" or not torch.cuda.is_available():
        print(f"bench/layer_norm_gpu.py needs a CUDA GPU (--device cuda); device {args.device!r}, "
              f"GPU visible: {torch.cuda.is_available()}. Nothing to do.")
        return 0
    import cogview

    if not cogview.ops.has_kernel("add_layer_norm", "cuda"):
        print("cogview was built without CUDA kernels: rebuild with CUDA to benchmark them")
        return 1
    rows = bench_gpu(args)
    notes = ("model GB/s = bytes the step must move / cogview time; of_copy_bw = that / measured copy "
             "bandwidth; vs_* = baseline time / cogview time (higher is better). Weights in the activation "
             "dtype. Targets: fwd >= 80% of copy bandwidth and faster than torch.compile; fwd+bwd >= 1.3x eager.")
    _harness.report("layer_norm_gpu", args, rows, COLUMNS, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

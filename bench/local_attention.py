"""Local (2D window) attention with joint text keys: cogview.ops.local_attention against
dense `scaled_dot_product_attention` with the equivalent boolean mask and against FlexAttention
with the equivalent block mask (compiled).

Same inputs for every candidate, timed interleaved (bench/_harness.py). The dense and Flex
baselines get the text and image keys as one tensor [text; image], as a model's joint key
projection yields them, and their masks are built once, outside the timing. FlexAttention has
no CPU backward, so on CPU it runs forward only. Useful FLOPs count only the (query, key) pairs
the mask keeps: forward 4 * d per pair, forward+backward 3.5x that (backward = 2.5x forward, the
usual attention accounting); every candidate is credited with the same useful work.

    python bench/local_attention.py             # full grid (minutes)
    python bench/local_attention.py --smoke     # tiny, seconds (no Flex: its compile is slow)
    python bench/local_attention.py --grids 64 --batches 1 --passes fwd
    python bench/local_attention.py --dtype bfloat16 --passes fwd   # + ours with float arithmetic

In bfloat16 on a CPU with AVX512-BF16 our op runs on bf16 dot products; the extra candidate `ours
float` is the same op with those turned off (bf16 converted to float, as on other CPUs), and
`x float` its time over ours.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _harness import compare, copy_bandwidth, parse_args, report

try:
    import cogview
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import cogview
from cogview.ops import local_attention, reference

WINDOWS = {"9x9": ((9, 9), False), "9x9 causal": ((9, 9), True), "9x5": ((9, 5), False)}


def extra_args(parser):
    parser.add_argument("--grids", type=int, nargs="+", default=None, help="square grid sides (default 32 64)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 4)")
    parser.add_argument("--windows", nargs="+", default=list(WINDOWS), choices=list(WINDOWS))
    parser.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--text", type=int, default=16, help="text keys")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="inputs' dtype")


def peak_bytes(fn) -> int:
    """Peak bytes allocated through torch while `fn` runs, above what existed before."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                record_shapes=True, with_stack=True) as prof:
        fn()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        name = str(action)
        if name.endswith("CREATE"):
            current += size
        elif name.endswith("DESTROY"):
            current -= size
        peak = max(peak, current)
    return peak


def probe_seconds(fn) -> float:
    """One warm call's time (the first call compiles or warms caches)."""
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flex_block_mask(side, window, causal, text, n):
    from torch.nn.attention.flex_attention import create_block_mask

    rh, rw = window[0] // 2, window[1] // 2

    def mask_mod(b, h, q_idx, kv_idx):
        key = kv_idx - text
        qh, qw = q_idx // side, q_idx % side
        kh, kw = key // side, key % side
        inside = ((qh - kh).abs() <= rh) & ((qw - kw).abs() <= rw)
        if causal:
            inside = inside & (key <= q_idx)
        return (kv_idx < text) | inside

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n + text, device="cpu")


def candidates(args, batch, side, window, causal, mode, flex):
    heads, d, text = args.heads, args.head_dim, args.text
    dtype = getattr(torch, args.dtype)
    n = side * side
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, n, d, generator=gen).to(dtype)
    keys = torch.randn(batch, heads, text + n, d, generator=gen).to(dtype)  # [text; image], as a model has them
    values = torch.randn(batch, heads, text + n, d, generator=gen).to(dtype)
    window_mask = reference.local_attention_mask((side, side), (side, side), window, causal)
    mask = torch.cat([torch.ones(n, text, dtype=torch.bool), window_mask], 1)
    pairs = int(mask.sum()) * batch * heads
    grid = {"grid_q": (side, side), "grid_kv": (side, side), "window": window, "causal": causal}
    # Our op takes text and image keys as separate tensors (contiguous copies, same values).
    k, v = keys[:, :, text:].contiguous(), values[:, :, text:].contiguous()
    tk, tv = keys[:, :, :text].contiguous(), values[:, :, :text].contiguous()
    block_mask = flex_block_mask(side, window, causal, text, n) if flex else None
    flex_fn = None
    if flex:
        from torch.nn.attention.flex_attention import flex_attention

        # A fresh compile per configuration: otherwise dynamo's recompile limit is reached after
        # 8 configurations and flex_attention silently falls back to its unfused eager path.
        # Static shapes: after a shape change dynamo would go dynamic, and inductor's CPU flex
        # template then fails to compile (torch 2.13).
        torch._dynamo.reset()
        flex_fn = torch.compile(flex_attention, dynamic=False, fullgraph=True)

    with_float = dtype == torch.bfloat16 and cogview.ops.local_attention_bf16_dot_available()

    def float_arithmetic(fn):
        def run():
            with cogview.ops.local_attention_bf16_dot(False):
                return fn()
        return run

    if mode == "fwd":
        fns = {
            "ours": lambda: local_attention(q, k, v, text_k=tk, text_v=tv, **grid),
            "dense": lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask),
        }
        if with_float:
            fns["ours float"] = float_arithmetic(fns["ours"])
        if flex:
            fns["flex"] = lambda: flex_fn(q, keys, values, block_mask=block_mask)
        return fns, 4 * d * pairs

    grad = torch.randn(batch, heads, n, d, generator=gen)
    ours_leaves = [t.clone().requires_grad_() for t in (q, k, v, tk, tv)]
    dense_leaves = [t.clone().requires_grad_() for t in (q, keys, values)]

    def ours():
        qq, kk, vv, tkk, tvv = ours_leaves
        out, _ = local_attention(qq, kk, vv, text_k=tkk, text_v=tvv, **grid)
        return torch.autograd.grad(out, ours_leaves, grad)

    def dense():
        qq, kk, vv = dense_leaves
        out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
        return torch.autograd.grad(out, dense_leaves, grad)

    fns = {"ours": ours, "dense": dense}
    if with_float:
        fns["ours float"] = float_arithmetic(ours)
    return fns, 3.5 * 4 * d * pairs


def main():
    args = parse_args(__doc__.split("\n\n")[0], extra_args)
    if args.device != "cpu":
        sys.exit("bench/local_attention.py: only --device cpu is benchmarked here (the CUDA kernel is separate)")
    if args.smoke:
        grids, batches, args.heads, args.head_dim, args.text = [8], [1], 2, 16, 4
        flex = False
    else:
        grids, batches = args.grids or [32, 64], args.batches or [1, 4]
        flex = not args.no_flex
    rows, failures = [], []
    for batch in batches:
        for side in grids:
            for wname in args.windows:
                window, causal = WINDOWS[wname]
                for mode in args.passes:
                    fns, flops = candidates(args, batch, side, window, causal, mode, flex and mode == "fwd")
                    # Fewer rounds where one call takes seconds (dense at 64x64): still interleaved.
                    probes = {}
                    for name in list(fns):
                        try:
                            probes[name] = probe_seconds(fns[name])
                        except Exception as error:  # a baseline that fails here is reported, not fatal
                            if name == "ours":
                                raise
                            failures.append(f"{name} at B={batch} {side}x{side} {wname} {mode}: "
                                            f"{type(error).__name__}: {str(error).splitlines()[0][:160]}")
                            del fns[name]
                    slowest = max(probes[name] for name in fns)
                    repeats = args.repeats if slowest < 0.25 else max(3, min(args.repeats, int(6 / slowest)))
                    times = compare(fns, args.device, repeats)
                    row = {"batch": batch, "grid": f"{side}x{side}", "window": wname, "pass": mode}
                    for name, seconds in times.items():
                        row[f"{name} ms"] = seconds * 1e3
                        row[f"{name} GFLOP/s"] = flops / seconds / 1e9
                        row[f"{name} peak MB"] = peak_bytes(fns[name]) / 2**20
                    row["x dense"] = times["dense"] / times["ours"]
                    if "flex" in times:
                        row["x flex"] = times["flex"] / times["ours"]
                    if "ours float" in times:
                        row["x float"] = times["ours float"] / times["ours"]
                    rows.append(row)
                    print(f"  {row['batch']} {row['grid']} {wname} {mode}: x dense {row['x dense']:.1f}", flush=True)
    columns = ["batch", "grid", "window", "pass", "ours ms", "ours float ms", "dense ms", "flex ms", "x float",
               "x dense", "x flex", "ours GFLOP/s", "dense GFLOP/s", "flex GFLOP/s", "ours peak MB", "dense peak MB",
               "flex peak MB"]
    bandwidth = copy_bandwidth(args.device)
    notes = (f"{args.dtype}, {args.heads} heads, head_dim {args.head_dim}, {args.text} text keys, {args.threads} threads, "
             f"CPU ISA {cogview.ops.cpu_isa()}. 'x dense' / 'x flex': their median time over ours. GFLOP/s: useful "
             "work only (pairs the mask keeps), the same for every candidate. Peak MB: bytes allocated through "
             "torch during one call (inputs excluded; ours includes its per-thread pack scratch). Flex: forward "
             f"only (no CPU backward). Copy bandwidth {bandwidth / 1e9:.1f} GB/s.")
    if failures:
        notes += "\nBaselines that failed to run: " + "; ".join(failures)
    report("local_attention" if args.dtype == "float32" else f"local_attention-{args.dtype}", args, rows, columns, notes)


if __name__ == "__main__":
    main()

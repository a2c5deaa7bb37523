"""GPU benchmark of local attention (issue 5): cogview.ops.local_attention on CUDA vs dense SDPA with
the equivalent mask and FlexAttention with the equivalent block mask (compiled), forward and
forward+backward.

bf16, B=8, 16 heads, d 64, 16 text keys (text keys and image keys as one [text; image] tensor for
the baselines, as a model's joint projection gives them; masks built once, outside the timing):
  64x64 grid, 9x9 window;  64x64, 9x9 causal;  60x60 queries over a 20x20 key grid, 5x5
  (CogView2's cross-resolution layer);  60x60 self, 9x5.
Useful FLOPs count the (query, key) pairs the mask keeps: forward 4 d per pair, forward+backward
3.5x that; every candidate is credited with the same useful work (effective TFLOP/s).

Targets: forward >= 1.5x FlexAttention and >= 2x dense SDPA at 64x64; backward (fwd+bwd - fwd)
<= 2.5x our forward.

    python bench/local_attention_gpu.py            # full
    python bench/local_attention_gpu.py --smoke    # tiny, seconds (no Flex)

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
import torch.nn.functional as F  # noqa: E402

import _harness  # noqa: E402

COLUMNS = ["case", "pass", "ours_ms", "dense_ms", "flex_ms", "x_dense", "x_flex", "ours_TFLOPs", "flex_TFLOPs",
           "bwd_over_fwd", "max_abs_diff", "target"]


def cases(smoke: bool):
    if smoke:
        return [("16x16 5x5", (16, 16), (16, 16), (5, 5), False, 1, 2)]
    return [
        ("64x64 9x9", (64, 64), (64, 64), (9, 9), False, 8, 16),
        ("64x64 9x9 causal", (64, 64), (64, 64), (9, 9), True, 8, 16),
        ("60x60 -> 20x20 5x5", (60, 60), (20, 20), (5, 5), False, 8, 16),
        ("60x60 9x5", (60, 60), (60, 60), (9, 5), False, 8, 16),
    ]


def flex_block_mask(grid_q, grid_kv, window, causal, text, device):
    from torch.nn.attention.flex_attention import create_block_mask

    (hq, wq), (hk, wk) = grid_q, grid_kv
    sh, sw = hq // hk, wq // wk
    rh, rw = window[0] // 2, window[1] // 2

    def mask_mod(b, h, q_idx, kv_idx):
        key = kv_idx - text
        cy, cx = (q_idx // wq) // sh, (q_idx % wq) // sw
        ky, kx = key // wk, key % wk
        inside = ((cy - ky).abs() <= rh) & ((cx - kx).abs() <= rw)
        if causal:
            inside = inside & (key <= q_idx)
        return (kv_idx < text) | inside

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=hq * wq, KV_LEN=hk * wk + text, device=device)


def bench_gpu(args) -> list[dict]:
    from cogview.ops import local_attention, reference

    device, dtype, d, text = "cuda", torch.bfloat16, 64, 16
    use_flex = not args.smoke
    flex_fn = None
    if use_flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex_fn = torch.compile(flex_attention, dynamic=False, fullgraph=True)
        except Exception as error:  # noqa: BLE001 - reported, not fatal
            print(f"FlexAttention unavailable: {error}")
            use_flex = False
    rows = []
    for name, grid_q, grid_kv, window, causal, batch, heads in cases(args.smoke):
        nq, nk = grid_q[0] * grid_q[1], grid_kv[0] * grid_kv[1]
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(batch, heads, nq, d, generator=gen).to(device, dtype)
        keys = torch.randn(batch, heads, text + nk, d, generator=gen).to(device, dtype)
        values = torch.randn(batch, heads, text + nk, d, generator=gen).to(device, dtype)
        k, v = keys[:, :, text:].contiguous(), values[:, :, text:].contiguous()
        tk, tv = keys[:, :, :text].contiguous(), values[:, :, :text].contiguous()
        window_mask = reference.local_attention_mask(grid_q, grid_kv, window, causal, device=device)
        mask = torch.cat([torch.ones(nq, text, dtype=torch.bool, device=device), window_mask], 1)
        pairs = int(mask.sum()) * batch * heads
        geometry = dict(grid_q=grid_q, grid_kv=grid_kv, window=window, causal=causal)
        block_mask = None
        if use_flex:
            torch._dynamo.reset()
            flex_fn = torch.compile(flex_attention, dynamic=False, fullgraph=True)
            block_mask = flex_block_mask(grid_q, grid_kv, window, causal, text, device)
        grad = torch.randn(batch, heads, nq, d, generator=gen).to(device, dtype)
        ours_leaves = [t.clone().requires_grad_() for t in (q, k, v, tk, tv)]
        base_leaves = [t.clone().requires_grad_() for t in (q, keys, values)]

        def ours_fwd():
            return local_attention(q, k, v, text_k=tk, text_v=tv, **geometry)[0]

        def ours_both():
            out, _ = local_attention(*ours_leaves[:3], text_k=ours_leaves[3], text_v=ours_leaves[4], **geometry)
            return torch.autograd.grad(out, ours_leaves, grad)

        def dense_fwd():
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

        def dense_both():
            out = F.scaled_dot_product_attention(*base_leaves, attn_mask=mask)
            return torch.autograd.grad(out, base_leaves, grad)

        fwd = {"ours": ours_fwd, "dense": dense_fwd}
        both = {"ours": ours_both, "dense": dense_both}
        if use_flex:
            fwd["flex"] = lambda: flex_fn(q, keys, values, block_mask=block_mask)

            def flex_both():
                out = flex_fn(*base_leaves, block_mask=block_mask)
                return torch.autograd.grad(out, base_leaves, grad)

            both["flex"] = flex_both
        diff = float((ours_fwd().float() - dense_fwd().float()).abs().max())
        results = {}
        for pass_name, fns, flops in (("fwd", fwd, 4 * d * pairs), ("fwd+bwd", both, 3.5 * 4 * d * pairs)):
            try:
                times = _harness.compare(fns, device, args.repeats)
            except Exception as error:  # noqa: BLE001 - a baseline failing is reported, not fatal
                print(f"{name} {pass_name}: {type(error).__name__}: {error}")
                fns.pop("flex", None)
                times = _harness.compare(fns, device, args.repeats)
            results[pass_name] = times
            row = {"case": name, "pass": pass_name, "ours_ms": times["ours"] * 1e3,
                   "dense_ms": times["dense"] * 1e3, "flex_ms": times.get("flex", float("nan")) * 1e3,
                   "x_dense": times["dense"] / times["ours"],
                   "x_flex": times["flex"] / times["ours"] if "flex" in times else float("nan"),
                   "ours_TFLOPs": flops / times["ours"] / 1e12,
                   "flex_TFLOPs": flops / times["flex"] / 1e12 if "flex" in times else float("nan"),
                   "bwd_over_fwd": float("nan"), "max_abs_diff": diff if pass_name == "fwd" else float("nan"),
                   "target": ""}
            if pass_name == "fwd" and name.startswith("64x64") and not args.smoke:
                ok = row["x_dense"] >= 2 and (row["x_flex"] >= 1.5 or "flex" not in times)
                row["target"] = "OK" if ok else "MISSED (x_flex >= 1.5, x_dense >= 2)"
            if pass_name == "fwd+bwd":
                ratio = (times["ours"] - results["fwd"]["ours"]) / results["fwd"]["ours"]
                row["bwd_over_fwd"] = ratio
                if not args.smoke:
                    row["target"] = "OK" if ratio <= 2.5 else "MISSED (bwd <= 2.5x fwd)"
            rows.append(row)
    return rows


def main() -> int:
    args = _harness.parse_args(__doc__.splitlines()[0])
    if not torch.cuda.is_available():
        print(f"bench/local_attention_gpu.py needs a CUDA GPU; GPU visible: {torch.cuda.is_available()}. "
              "Nothing to do.")
        return 0
    args.device = "cuda"
    import cogview

    if not cogview.ops.has_kernel("local_attention", "cuda"):
        print("cogview was built without CUDA kernels: rebuild with CUDA to benchmark them")
        return 1
    rows = bench_gpu(args)
    notes = ("bf16; x_dense / x_flex = their median time over ours; TFLOP/s count the useful (query, key) pairs "
             "only; bwd_over_fwd = (fwd+bwd - fwd) / fwd of ours; max_abs_diff = ours vs dense SDPA forward.")
    _harness.report("local_attention_gpu", args, rows, COLUMNS, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

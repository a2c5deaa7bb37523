"""Training throughput: one optimizer step (forward, backward, AdamW) of the VQ-VAE and of the transformer,
with cogview's kernels vs the plain-PyTorch reference ops (`cogview.ops.force_reference()`), plus the
`shapes` data generator.

The VQ-VAE uses no cogview op (convolutions and the quantizer are plain PyTorch), so its two rows differ
only by noise; the transformer runs every LayerNorm / add+LayerNorm through cogview.ops.

    python bench/train_throughput.py            # small-x4 VQ-VAE (64x64, batch 32), small-16x16 transformer
    python bench/train_throughput.py --smoke    # tiny models, seconds
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from _harness import compare, parse_args, report  # noqa: E402

from cogview import ops  # noqa: E402
from cogview.data import ShapesDataset  # noqa: E402
from cogview.models import CogViewTransformer, presets, vqvae_from_preset  # noqa: E402
from cogview.training.transformer_trainer import SequenceBatch, TransformerLoss  # noqa: E402
from cogview.training.vqvae_trainer import VQVAELoss  # noqa: E402


def _extra(parser):
    parser.add_argument("--vqvae-batch", type=int, default=None, help="VQ-VAE images per step (default 32)")
    parser.add_argument("--batch", type=int, default=None, help="transformer sequences per step (default 16)")
    parser.add_argument("--bf16", action="store_true", help="also time the transformer under bf16 autocast")


def step_fn(module, inputs, optimizer, reference: bool, autocast_dtype=None):
    def run():
        ctx = ops.force_reference() if reference else _null()
        with ctx, torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss, _ = module(inputs)
        loss = loss.float()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _extra)
    if args.smoke:  # tiny ops: on a shared 2-core machine the intra-op thread hand-off would dominate
        torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []

    # ---- VQ-VAE ----
    vq_name = "test-x4" if args.smoke else "small-x4"
    vqvae = vqvae_from_preset(vq_name)
    res = vqvae.config.image_size
    batch = args.vqvae_batch or (4 if args.smoke else 32)
    data = ShapesDataset(batch, resolution=res)
    images = torch.stack([data[i]["image"] for i in range(batch)])
    vq_module = VQVAELoss(vqvae, channels_last=True)  # as the trainer runs it
    vq_opt = torch.optim.AdamW(vq_module.parameters(), lr=1e-4)
    candidates = {"kernels": step_fn(vq_module, images, vq_opt, False),
                  "reference": step_fn(vq_module, images, vq_opt, True)}
    if args.bf16:
        candidates["kernels bf16"] = step_fn(vq_module, images, vq_opt, False, torch.bfloat16)
    times = compare(candidates, "cpu", args.repeats)
    for name, seconds in times.items():
        rows.append({"model": f"vqvae {vq_name} {res}px", "ops": name, "batch": batch, "ms_per_step": seconds * 1e3,
                     "throughput": batch / seconds, "unit": "images/s",
                     "ratio_vs_reference": times["reference"] / seconds})

    # ---- transformer ----
    tf_name = "test-tiny" if args.smoke else "small-16x16"
    config = presets[tf_name]
    model = CogViewTransformer(config.transformer)
    n = config.image_seq_len + 4 + (8 if args.smoke else 32)  # codes + layout tokens + a typical shapes caption
    n = min(n, config.transformer.max_positions)
    seqs = args.batch or (4 if args.smoke else 16)
    tokens = torch.randint(0, config.transformer.vocab_size, (seqs, n))
    weights = torch.ones(seqs, n - 1)
    batch_in = SequenceBatch(tokens=tokens, position_ids=torch.arange(n)[None].expand(seqs, n), targets=tokens[:, 1:],
                             weights=weights, text_targets=torch.zeros(seqs, n - 1, dtype=torch.bool),
                             num_tokens=seqs * n)
    tf_module = TransformerLoss(model)
    tf_opt = torch.optim.AdamW(tf_module.parameters(), lr=1e-4)
    candidates = {"kernels": step_fn(tf_module, batch_in, tf_opt, False),
                  "reference": step_fn(tf_module, batch_in, tf_opt, True)}
    if args.bf16:
        candidates["kernels bf16"] = step_fn(tf_module, batch_in, tf_opt, False, torch.bfloat16)
        candidates["reference bf16"] = step_fn(tf_module, batch_in, tf_opt, True, torch.bfloat16)
    times = compare(candidates, "cpu", args.repeats)
    for name, seconds in times.items():
        rows.append({"model": f"transformer {tf_name} ({model.num_parameters() / 1e6:.1f}M, seq {n})", "ops": name,
                     "batch": seqs, "ms_per_step": seconds * 1e3, "throughput": seqs * n / seconds,
                     "unit": "tokens/s", "ratio_vs_reference": times["reference"] / seconds})

    # ---- data ----
    gen = ShapesDataset(10_000, resolution=64)
    count = 50 if args.smoke else 1000
    start = time.perf_counter()
    for i in range(count):
        gen[i]
    seconds = (time.perf_counter() - start) / count
    rows.append({"model": "shapes generator 64px", "ops": "-", "batch": 1, "ms_per_step": seconds * 1e3,
                 "throughput": 1 / seconds, "unit": "images/s"})

    report("train_throughput", args, rows, ["model", "ops", "batch", "ms_per_step", "throughput", "unit",
                                             "ratio_vs_reference"],
           notes="One optimizer step on a fixed batch (no data loading), medians of interleaved rounds. "
                 "ratio_vs_reference > 1: faster than the reference ops.")


if __name__ == "__main__":
    main()

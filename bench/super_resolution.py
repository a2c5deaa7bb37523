"""Super-resolution wall time: CogView2's direct SR + 6 LoPAR passes vs CogView1's sliding window.

Both make the same high-res code grid (H x H, H = scale x h) from the same low-res grid (h x h) and text
(16 pieces; none in the shapes case, text-free like the embedded model's stage),
with random-weight transformers of the same trunk (layers, width, heads, vocabulary), sampling at
temperature 1 over the image codes, batch 1 (and more with --batches). The VQ-VAE decode of the result
(the same for both) is not timed; the decode of the low-res codes that a pixel-hint stage reads is.

- sr: `cogview.generation.super_resolve_codes`: the text + low-res part encoded once, one direct pass
  over all H*H cells, then 6 refinement passes (re-masking 23, 19, 15, 10, 6, 2 cells per 6x6 tile),
  each ONE forward pass of the high-res part (local + cross-resolution attention by
  `cogview.ops.local_attention`).
- sliding (frozen baseline, CogView1): nine overlapping windows (3 x 3, stride H/4), each a full
  autoregressive pass over its (H/2)^2 high-res codes, conditioned on the window's (h/2)^2 low-res codes
  and the text in CogView1's layout `[ROI1] text [BASE] [BOI1] low [EOI1] [ROI2] [POS0] [BASE] [BOI2]`
  (`CogViewTokenizer.super_resolution`). Each window is decoded with the project's fastest decoder,
  `cogview.generation.sample_image_codes` (static K/V cache, decode-attention kernel, lean CPU step):
  9 (H/2)^2 sequential steps in all. Later windows overwrite the overlap (the timing is what matters).

Also reported: the SR run's matrix products (projections and output head) recorded and replayed
alone (`products_ms`, bench/_products.py), and `ceiling` = sliding / products: the most the SR side
could gain on this machine if everything but its products took no time.

Reported: medians of interleaved rounds (one warm-up call each; 3 rounds, more for cases whose round takes
under 10 s: about 30 s of rounds, at most 15; --repeats N fixes N), the speedup,
sequential steps, and the tokens each method pushes
through the trunk (the SR passes process MORE tokens; the win is parallelism, not fewer FLOPs).

Both methods run in every --dtypes (default float32 and bfloat16): parallel passes are matrix products
that a CPU with bf16 matrix units (AMX) runs several times faster, while the sliding window's one-token
steps stream weights; the notes name each method's fastest dtype and compare those.

    python bench/super_resolution.py [--smoke] [--cases shapes-8to24,cogview2-20to60] [--batches 1]
                                     [--dtypes float32,bfloat16]
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _harness  # noqa: E402
import _products  # noqa: E402

from cogview.generation import low_res_pixels, sample_image_codes, super_resolve_codes  # noqa: E402
from cogview.models import VQVAE, CogViewTransformer, vqvae_presets  # noqa: E402
from cogview.models.super_resolution import SuperResolutionTransformer, sr_presets  # noqa: E402

# name -> (SR preset, trunk overrides, text pieces in both layouts)
CASES = {
    # the embedded model's stage: 8x8 -> 24x24 codes, 4 x 128, text-free (as shipped), pixel hint
    "shapes-8to24": ("shapes-8to24", {}, 0),
    "cogview2-20to60": ("cogview2-20to60", {}, 16),  # CogView2's grids: 20x20 -> 60x60 codes, 6 x 256, text
    "smoke": ("test-4to12", {}, 16),  # 2x2 -> 6x6 codes, 2 x 32 (see SMOKE)
}
SMOKE = dict(low_res=2, window=(3, 3), cross_window=(3, 3), tile=(3, 3), schedule=(5, 3, 1))


# ---------------------------------------------------------------------------------------------
# The sliding-window baseline (CogView1, frozen)
# ---------------------------------------------------------------------------------------------


def cogview1_prompt(config, text: list[int], low_window: list[int]) -> list[int]:
    """`[ROI1] text [BASE] [BOI1] low [EOI1] [ROI2] [POS0] [BASE] [BOI2]` (CogView1's SR layout)."""
    c = config.command_id
    return ([c("[ROI1]")] + text + [c("[BASE]"), c("[BOI1]")] + low_window + [c("[EOI1]"), c("[ROI2]"), c("[POS0]"),
                                                                              c("[BASE]"), c("[BOI2]")])


@torch.inference_mode()
def sliding_window_sr(model: CogViewTransformer, low: torch.Tensor, text: list[int], scale: int,
                      seeds: list[int]) -> torch.Tensor:
    """low [B, h, h] -> high [B, H, H] by nine overlapping windows, each decoded autoregressively."""
    batch, h, _ = low.shape
    big = h * scale
    lw, hw = h // 2, big // 2  # window sides (low, high); 3 x 3 windows at strides h/4, H/4
    out = torch.zeros(batch, big, big, dtype=torch.long)
    config = model.config
    for i in range(3):
        for j in range(3):
            r0, c0 = i * lw // 2, j * lw // 2
            window = low[:, r0: r0 + lw, c0: c0 + lw].reshape(batch, -1)
            prompts = [cogview1_prompt(config, text, window[b].tolist()) for b in range(batch)]
            codes, _ = sample_image_codes(model, prompts, [s + 9 * i + j for s in seeds], num_new=hw * hw,
                                          image_tokens=config.image_tokens, pad_id=config.command_id("[PAD]"),
                                          temperature=1.0, top_k=0)
            out[:, r0 * scale: r0 * scale + hw, c0 * scale: c0 * scale + hw] = codes.view(batch, hw, hw).cpu()
    return out


# ---------------------------------------------------------------------------------------------


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SystemExit(f"--dtypes: unknown float dtype {name!r}")
    return dtype


def main() -> None:
    def extra(p):
        p.add_argument("--cases", default=None, help=f"comma-separated of {sorted(CASES)}")
        p.add_argument("--batches", default="1", help="images per call (comma-separated)")
        p.add_argument("--dtypes", default="float32,bfloat16",
                       help="weight dtypes, each method timed in each (comma-separated; default float32,bfloat16)")

    args = _harness.parse_args(__doc__, extra)
    if args.smoke:
        torch.set_num_threads(1)  # seconds, and gentle on a shared machine
    device = args.device
    cases = (args.cases or ("smoke" if args.smoke else "shapes-8to24,cogview2-20to60")).split(",")
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = [_dtype(name) for name in args.dtypes.split(",")]
    rows, best = [], []
    for name in cases:
        preset, overrides, text_len = CASES[name]
        config = sr_presets[preset]
        if name == "smoke":
            config = config.replace(**SMOKE)
        if overrides:
            config = config.replace(transformer=config.transformer.replace(**overrides))
        config = config.replace(max_text_len=max(config.max_text_len, text_len) if text_len else 0)
        torch.manual_seed(0)
        sr32 = SuperResolutionTransformer(config).to(device).eval()
        h, big = config.low_res, config.high_res
        # the baseline: a CogView transformer of the same trunk whose positions fit a window's sequence
        prompt_len = len(cogview1_prompt(config.transformer, [0] * text_len, [0] * (h // 2) ** 2))
        trunk = config.transformer.replace(max_positions=prompt_len + (big // 2) ** 2)
        ar32 = CogViewTransformer(trunk).to(device).eval()
        models = {dtype: (copy.deepcopy(sr32).to(dtype), copy.deepcopy(ar32).to(dtype)) for dtype in dtypes}
        # a stage with a pixel hint also reads the VQ-VAE's decode of the low-res codes: timed with it
        # (channels-last on CPU, as cogview.pipeline.load_vqvae loads it)
        vqvae = (VQVAE(vqvae_presets["small-x4"].replace(image_size=h * config.pixel_hint,
                                                          downsample=config.pixel_hint,
                                                          codebook_size=config.transformer.image_tokens)).to(device).eval()
                 if config.pixel_hint else None)
        if vqvae is not None and torch.device(device).type == "cpu":
            vqvae = vqvae.to(memory_format=torch.channels_last)
        t = config.transformer
        g = torch.Generator().manual_seed(1)
        text = torch.randint(t.text_offset, t.text_offset + t.text_tokens, (text_len,), generator=g).tolist()
        # whole-image calls of seconds: 3 rounds unless --repeats says otherwise
        explicit_repeats = "--repeats" in sys.argv
        repeats = 1 if args.smoke else (args.repeats if explicit_repeats else 3)
        for batch in batches:
            low = torch.randint(0, t.image_tokens, (batch, h, h), generator=g)
            text_d = None
            if config.text_positions:
                text_tokens = torch.full((batch, config.text_positions), t.command_id("[PAD]"), dtype=torch.long)
                text_tokens[:, 0] = t.command_id("[ROI1]")
                text_tokens[:, 1: 1 + text_len] = torch.tensor(text)
                text_d = text_tokens.to(device)
            low_d = low.to(device)
            seeds = list(range(batch))

            def run_sr(sr):
                return super_resolve_codes(sr, low_d, text_d, temperature=1.0, seeds=seeds,
                                           low_pixels=low_res_pixels(sr, vqvae, low_d))  # None: no pixel hint

            candidates = {}
            for dtype, (sr, ar) in models.items():
                tag = str(dtype).removeprefix("torch.")
                candidates[f"sr {tag}"] = lambda sr=sr: run_sr(sr)
                candidates[f"sliding {tag}"] = lambda ar=ar: sliding_window_sr(ar, low, text, config.scale, seeds)
            start = time.perf_counter()
            for fn in candidates.values():  # warm-up call of each (and the shapes agree)
                assert fn().shape == (batch, big, big)
            round_s = time.perf_counter() - start
            # cheap cases get more rounds (about 30 s in all, 3 to 15): their medians then ride out the
            # machine's slower and faster spells, which last seconds
            rounds = repeats if explicit_repeats else max(repeats, min(15, int(30 / max(round_s, 1e-3))))
            times = _harness.compare(candidates, device, rounds, min_round_s=0, warmup=0)  # warmed up above
            passes = 1 + len(config.schedule)
            products_by_dtype = {}
            for dtype in dtypes:
                tag = str(dtype).removeprefix("torch.")
                sr_s, sliding_s = times[f"sr {tag}"], times[f"sliding {tag}"]
                # the SR run's matrix products alone: a floor for sr_ms on this machine
                products = _products.record_products(candidates[f"sr {tag}"])
                products_s = _products.replay_seconds(products, device, rounds=max(3, min(rounds, 7)))
                products_by_dtype[tag] = products_s
                rows.append({
                    "case": name, "grids": f"{h}x{h}->{big}x{big}", "trunk": f"{t.num_layers}x{t.hidden_size}",
                    "text": text_len,
                    "dtype": tag, "batch": batch, "sr_ms": sr_s * 1e3, "sliding_ms": sliding_s * 1e3,
                    "speedup": sliding_s / sr_s, "products_ms": products_s * 1e3,
                    "products_gmac": _products.multiply_adds(products) / 1e9,
                    "ceiling": sliding_s / products_s, "sr_passes": passes, "sliding_steps": 9 * (big // 2) ** 2,
                    "sr_tokens": passes * big * big, "sliding_tokens": 9 * (big // 2) ** 2,
                })
                print(f"{name} batch {batch} {tag}: sr {sr_s * 1e3:.0f} ms, sliding {sliding_s * 1e3:.0f} ms, "
                      f"speedup {sliding_s / sr_s:.1f}x; the sr run's products alone {products_s * 1e3:.0f} ms "
                      f"(ceiling {sliding_s / products_s:.1f}x)", flush=True)
            fastest = {kind: min((times[k], k.split()[1]) for k in times if k.startswith(kind))
                       for kind in ("sr", "sliding")}
            best.append(f"{name} batch {batch}: fastest sr ({fastest['sr'][1]}) {fastest['sr'][0] * 1e3:.0f} ms vs "
                        f"fastest sliding ({fastest['sliding'][1]}) {fastest['sliding'][0] * 1e3:.0f} ms = "
                        f"{fastest['sliding'][0] / fastest['sr'][0]:.1f}x (ceiling "
                        f"{fastest['sliding'][0] / min(products_by_dtype.values()):.1f}x: fastest sliding / the "
                        f"fastest sr products alone)")
    _harness.report("super_resolution", args, rows,
                    ["case", "grids", "trunk", "text", "dtype", "batch", "sr_ms", "sliding_ms", "speedup", "products_ms",
                     "products_gmac", "ceiling", "sr_passes", "sliding_steps", "sr_tokens", "sliding_tokens"],
                    notes=f"sr = direct SR + sr_passes - 1 LoPAR passes (one forward each; CogView2's 6 = 23, 19, "
                          f"15, 10, 6, 2 cells per 6x6 tile; with a pixel hint, the VQ-VAE decode of the low-res "
                          f"codes it reads is timed too); sliding = CogView1's nine autoregressive windows through "
                          f"cogview.generation.sample_image_codes. Both methods in each dtype (weights and "
                          f"activations), temperature 1, text pieces as in the `text` column (0: text-free), random weights, "
                          f"{torch.get_num_threads()} threads; tokens = high-res tokens pushed through the trunk. "
                          f"products_ms: the sr run's matrix products (the projections and the output head, "
                          f"`cogview.ops.linear` calls, with the bias and GELU where the op fuses them; "
                          f"products_gmac multiply-adds) recorded and replayed alone; ceiling = sliding_ms / products_ms, the most the sr side "
                          f"could gain on this machine if everything but its products took no time.\n\n"
                          f"Each method in its fastest dtype:\n" + "\n".join(f"- {line}" for line in best))


if __name__ == "__main__":
    main()

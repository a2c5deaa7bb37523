"""End-to-end text->image decoding: images/s and tokens/s, cogview's generator vs a plain-PyTorch loop.

Both draw every image code of a batch of prompts with the same random-weight model (a small preset on
CPU; cogview-4b in bf16 on CUDA), top-k 200 at temperature 1 over the image ids:

- cogview: `cogview.generation.sample_image_codes` (static K/V cache, `cogview.ops` decode attention and
  fused LayerNorms, the image rows of the head only, fused per-image sampling; a CUDA graph per step on
  GPU).
- plain (frozen baseline): the loop a competent PyTorch user writes around the same weights: a growing
  K/V cache by `torch.cat`, `F.scaled_dot_product_attention`, `F.layer_norm`, the model's full output head,
  then the image-id slice, `torch.topk` + `softmax` + `torch.multinomial`.

The two are first checked to pick the same codes greedily (top-k 1). Timings are interleaved rounds of
whole batches (one warm-up call each, medians); the VQ-VAE decode (the same for both) is not included. A "token" is one drawn code.
On CUDA the table adds ms per token (averaged over the image's codes) against the roofline
(weight bytes + K/V bytes read per step, averaged) / measured copy bandwidth.

    python bench/generate.py [--smoke] [--presets small-16x16,long-32x32] [--batches 1,8] [--device cuda]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _harness  # noqa: E402

from cogview.generation import sample_image_codes  # noqa: E402
from cogview.models import CogViewConfig, CogViewTransformer, TransformerConfig, presets, vqvae_presets  # noqa: E402

TOP_K = 200
TEXT_TOKENS = 12  # prompt: [ROI1] + 12 text ids + [BASE] [BOI1]


# ---------------------------------------------------------------------------------------------
# The plain-PyTorch baseline (frozen)
# ---------------------------------------------------------------------------------------------


def _ln(x, norm):
    return F.layer_norm(x, norm.weight.shape, norm.weight, norm.bias, norm.eps)


def _linear(module, x):  # written out: the model's projections call cogview.ops.linear
    return F.linear(x, module.weight, module.bias)


def _mlp(mlp, x):  # written out: the model's MLP fuses cogview's GELU into its first projection
    return _linear(mlp.dense_4h_to_h, F.gelu(_linear(mlp.dense_h_to_4h, x), approximate="tanh"))


@torch.inference_mode()
def plain_generate(model: CogViewTransformer, prompt: torch.Tensor, num_codes: int, top_k: int,
                   temperature: float = 1.0, generator=None) -> torch.Tensor:
    """prompt [B, P] -> codes [B, num_codes] with a growing K/V cache (torch.cat) and SDPA."""
    config = model.config
    batch = prompt.shape[0]
    heads, head_dim = config.num_heads, config.head_dim
    caches = [None] * config.num_layers
    tokens, start = prompt, 0
    out = []
    for step in range(num_codes):
        n = tokens.shape[1]
        positions = torch.arange(start, start + n, device=tokens.device)
        h = model.word_embeddings(tokens) + model.position_embeddings(positions)[None]
        for i, layer in enumerate(model.layers):
            attn = layer.attention
            qkv = _linear(attn.query_key_value, _ln(h, layer.input_layernorm)).view(batch, n, 3, heads, head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            if caches[i] is not None:
                k = torch.cat([caches[i][0], k], dim=2)
                v = torch.cat([caches[i][1], v], dim=2)
            caches[i] = (k, v)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1)
            a = _linear(attn.dense, a.transpose(1, 2).reshape(batch, n, -1))
            h = h + _ln(a, layer.third_layernorm)
            m = _mlp(layer.mlp, _ln(h, layer.post_attention_layernorm))
            h = h + _ln(m, layer.fourth_layernorm)
        h = _ln(h[:, -1], model.final_layernorm)
        logits = model.logits(h)[:, : config.image_tokens].float()
        if temperature == 0 or top_k == 1:
            code = logits.argmax(-1, keepdim=True)
        else:
            values, indices = torch.topk(logits / temperature, min(top_k, logits.shape[-1]))
            choice = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator)
            code = indices.gather(1, choice)
        out.append(code)
        start += n
        tokens = code
    return torch.cat(out, dim=1)


# ---------------------------------------------------------------------------------------------


def roofline_ms(config, batch: int, prompt_len: int, num_codes: int, bandwidth: float, dtype) -> float:
    """ms per step if every step only streamed what it must read at copy bandwidth: the layer weights, the
    image rows of the output head (not the embedding tables: one row each) and the K/V cache so far."""
    element = torch.empty((), dtype=dtype).element_size()
    h = config.hidden_size
    weights = (config.num_parameters() - config.vocab_rows * h - config.max_positions * h
               + config.image_tokens * h) * element
    mean_context = prompt_len + (num_codes - 1) / 2
    kv = 2 * config.num_layers * batch * mean_context * config.hidden_size * element
    return (weights + kv) / bandwidth * 1e3


def model_config(name: str) -> CogViewConfig:
    if name == "long-32x32":  # CogView's sequence (1089 positions, 32x32 codes) on a narrow 4-layer model
        return CogViewConfig(TransformerConfig(num_layers=4, hidden_size=256, num_heads=4, max_positions=1089,
                                               image_tokens=8192, text_tokens=1000), vqvae_presets["cogview"], name)
    return presets[name]


def run_preset(name: str, args, batches: list[int], bandwidth: float) -> list[dict]:
    device = args.device
    on_cuda = device.startswith("cuda")
    full = model_config(name)
    config = full.transformer
    if config.pb_relax:  # the baseline uses plain F.layer_norm
        config = config.replace(pb_relax=False)
    dtype = torch.bfloat16 if on_cuda else torch.float32
    torch.manual_seed(0)
    model = CogViewTransformer(config, device=device, dtype=dtype).eval()
    num_codes = full.image_seq_len
    pad_id = config.command_id("[PAD]")
    gen = torch.Generator().manual_seed(0)
    text = config.image_tokens + torch.randint(0, config.text_tokens, (max(batches), TEXT_TOKENS), generator=gen)
    commands = lambda *names: torch.tensor([[config.command_id(n) for n in names]]).expand(text.shape[0], -1)  # noqa
    prompts = torch.cat([commands("[ROI1]"), text, commands("[BASE]", "[BOI1]")], dim=1)
    prompt_len = prompts.shape[1]

    # the two loops draw the same codes greedily (first 64 codes of two images)
    check, n_check = prompts[:2], min(num_codes, 64)
    ours, _ = sample_image_codes(model, check.tolist(), list(range(len(check))), num_new=n_check, image_tokens=config.image_tokens,
                                 pad_id=pad_id, temperature=0.0)
    theirs = plain_generate(model, check.to(device), n_check, top_k=1)
    agree = (ours == theirs).float().mean().item()
    print(f"{name}: greedy agreement cogview vs plain: {agree:.4f} of {ours.numel()} codes")
    if agree < 1.0 and not on_cuda:  # fp32 on the CPU: the same computation picks the same codes
        raise SystemExit("the cogview loop and the plain loop disagree: not the same computation")
    if agree < 0.95:  # bf16: a near-tie split differently changes every later code
        print("  (bf16: greedy paths diverged after a near-tie; compare the first codes)")

    repeats = args.repeats if num_codes <= 256 else min(args.repeats, 3)
    rows = []
    for batch in batches:
        p = prompts[:batch]
        p_list, p_dev = p.tolist(), p.to(device)
        seeds = list(range(batch))
        generator = torch.Generator(device=device).manual_seed(0)
        candidates = {
            "cogview": lambda: sample_image_codes(model, p_list, seeds, num_new=num_codes,
                                                  image_tokens=config.image_tokens, pad_id=pad_id, top_k=TOP_K),
            "plain": lambda: plain_generate(model, p_dev, num_codes, TOP_K, generator=generator),
        }
        times = _harness.compare(candidates, device, repeats, min_round_s=0, warmup=1)  # whole batches
        base = times["plain"]
        for label, seconds in times.items():
            row = {"preset": name, "codes": num_codes, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
                   "impl": label, "images/s": batch / seconds, "tokens/s": batch * num_codes / seconds,
                   "ms/token": seconds / num_codes * 1e3, "speedup": base / seconds}
            if on_cuda:
                row["roofline ms/token"] = roofline_ms(config, batch, prompt_len, num_codes, bandwidth, dtype)
                row["x roofline"] = row["ms/token"] / row["roofline ms/token"]
            rows.append(row)
    del model
    return rows


def main() -> None:
    def extra(p):
        p.add_argument("--presets", default=None,
                       help="model presets, comma-separated (default: small-16x16,long-32x32 on CPU, cogview-4b on "
                            "CUDA); long-32x32 is a 4-layer x 256 model over CogView's 1089-position sequence "
                            "(32x32 codes)")
        p.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")

    args = _harness.parse_args(__doc__, extra)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/generate.py --device cuda needs a GPU; none is visible")
        return
    on_cuda = device.startswith("cuda")
    names = (args.presets or ("test-tiny" if args.smoke else "cogview-4b" if on_cuda else "small-16x16,long-32x32"))
    batches = [int(b) for b in args.batches.split(",")]
    bandwidth = _harness.copy_bandwidth(device, numel=(1 << 18) if args.smoke else (1 << 24))
    rows = []
    for name in names.split(","):
        rows += run_preset(name, args, batches, bandwidth)
    columns = ["preset", "codes", "dtype", "batch", "impl", "images/s", "tokens/s", "ms/token", "speedup"]
    if on_cuda:
        columns += ["roofline ms/token", "x roofline"]
    notes = (f"Prompts of {TEXT_TOKENS + 3} tokens; top-k {TOP_K}, temperature 1; speedup = plain time / time "
             f"(same preset and batch). Copy bandwidth {bandwidth / 1e9:.1f} GB/s.")
    _harness.report("generate", args, rows, columns, notes)


if __name__ == "__main__":
    main()

"""Text->image generation, self-reranking, captioning, caption scoring and image completion.

These are the methods of `cogview.CogView` (`model.generate(...)` is `generate(model, ...)`):

    results = model.generate(["a red circle above a blue square"], num_images=4, seed=0)
    results[0].image.save("0.png"); results[0].codes            # PIL image, [side, side] int64 codes
    best = model.generate("a red circle", num_images=2, rerank=16)  # 16 drawn, the 2 best by caption score
    model.caption(images)                                        # -> list of str
    model.score(images, "a red circle")                          # -> float32 tensor, higher is better
    model.complete(image, keep_rows=8, prompt="a red circle")    # keep the top 8 code rows, draw the rest

Determinism: every image has its own seed, derived from (seed, prompt text, image index) by
`image_seed`; code t of that image is drawn with sampling offset t (see cogview.generation.sampler). So
`generate(["a", "b"], seed=3)` and `generate(["b"], seed=3)` give the same images for "b", with any
`batch_size`, on the same device and dtype (matrix products of other shapes may round differently,
which moves a draw only when its uniform lies within rounding of a probability boundary).

Classifier-free guidance (`guidance_scale=s`): each image is decoded twice in one batch, under its
prompt (c) and under the empty caption `[ROI1] [BASE] [BOI1]` (u); codes are drawn from
logits u + s (c - u). It only helps a model that saw the empty caption in training (caption dropout,
`cogview train --caption-dropout 0.1`: then u is a real unconditional model and s of ~2-4 sharpens
prompt adherence at some cost in diversity). CogView's own release was not trained that way: its
"unconditional" logits are an arbitrary prompt's, and guidance mostly adds artefacts; it also doubles
the batch (time and K/V memory). A model whose metadata says it was trained without caption dropout
gets a warning.

Memory: the transformer can be loaded in bf16/fp16 straight onto the GPU
(`CogView.from_pretrained(DIR, device="cuda", dtype="bf16")`, tensor by tensor from safetensors), and
`batch_size` chunks the work (default: what fits the free memory). cogview-4b at batch 1, bf16:
weights 3,928,849,920 x 2 B = 7.86 GB; K/V cache 2 x 48 layers x 1,089 slots x 2,560 x 2 B = 0.54 GB
(x2 with guidance); logits and step activations < 1 MB; the fp32 VQ-VAE ~0.1 GB of weights and
~0.3 GB of activations decoding one 256x256 image; with the CUDA context (~0.5 GB) and the allocator's
slack, about 9.5 GB: it fits a 16 GB GPU, with room for batch ~8 (0.54 GB each). Loading never holds the
weights twice (meta-device build, one tensor at a time).
"""
from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cogview import ops
from cogview.generation.images import codes_from_images, tensor_to_pil
from cogview.generation.sampler import kv_cache_bytes, sample_image_codes
from cogview.tokenizer import CAPTION_END

__all__ = ["GenerationResult", "caption", "caption_log_probs", "complete", "generate", "image_seed", "score"]


@dataclass
class GenerationResult:
    """One generated image: `image` (PIL), `codes` ([side, side] int64, CPU), the `prompt`, its `index`
    among the candidates drawn for that prompt, the per-image `seed` its codes were drawn with, and
    `score` (the caption score, log-probability of the prompt given the image; set by reranking)."""

    prompt: str
    index: int
    seed: int
    codes: torch.Tensor
    image: Any = field(repr=False)
    score: float | None = None
    invalid: bool = False  # some step had no finite logit (e.g. fp16 overflow): the image is not trustworthy

    def save(self, path) -> None:
        self.image.save(path)


def image_seed(seed: int, prompt: str, index: int) -> int:
    """The seed of image `index` of `prompt` under the user's `seed` (a 63-bit int, BLAKE2b of the three)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{prompt}\x00{int(index)}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _int(name: str, value, minimum: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{what}: `{name}` must be an int >= {minimum}, got {value!r}")
    return value


def _sampling(what: str, temperature, top_k, top_p) -> tuple[float, int, float]:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"{what}: `temperature` must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    top_k = _int("top_k", top_k, 0, what)
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"{what}: `top_p` must lie in [0, 1], got {top_p!r}")
    return float(temperature), top_k, float(top_p)


def _seed(seed, what: str) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{what}: `seed` must be an int, got {seed!r}")
    return seed


def _prompts(prompts, what: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"{what}: `prompts` must be a non-empty string or list of strings")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{what}: prompt {i} must be a str, got {type(p).__name__}")
        if not p.strip():
            raise ValueError(f"{what}: prompt {i} is empty: give each image a caption")
        out.append(p)
    return out


def _guidance(model, guidance_scale, what: str) -> float | None:
    if guidance_scale is None:
        return None
    if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) \
            or not math.isfinite(guidance_scale):
        raise ValueError(f"{what}: `guidance_scale` must be a finite number or None, got {guidance_scale!r}")
    if guidance_scale == 1.0:
        return None  # u + 1 (c - u) = c
    training = model.metadata.get("training") if isinstance(model.metadata, dict) else None
    if isinstance(training, dict) and training.get("caption_dropout") == 0:
        warnings.warn(f"{what}: this model was trained without caption dropout, so its unconditional logits are "
                      f"not a real unconditional model; classifier-free guidance is unlikely to help",
                      UserWarning, stacklevel=3)
    return float(guidance_scale)


def _caption_end(model, end) -> bool:
    if end is not None:
        return bool(end)
    training = model.metadata.get("training") if isinstance(model.metadata, dict) else None
    if isinstance(training, dict) and "caption_end" in training:
        return bool(training["caption_end"])
    return False  # CogView's release: captions run without an end marker


def _auto_batch(model, rows_per_item: int, max_len: int, count: int) -> int:
    """Items per chunk: CPU 8; CUDA what ~70% of the free memory holds (K/V cache + logits per row)."""
    if model.device.type != "cuda":
        return max(1, min(count, 8))
    config = model.config.transformer
    per_item = rows_per_item * (kv_cache_bytes(config, 1, max_len, model.dtype)
                                + 4 * config.vocab_rows * 4 + 16 * config.hidden_size * 4)
    free, _ = torch.cuda.mem_get_info(model.device)
    return max(1, min(count, 64, int(0.7 * free) // max(per_item, 1)))


def _batch_size(model, batch_size, rows_per_item: int, max_len: int, count: int, what: str) -> int:
    if batch_size is None:
        return _auto_batch(model, rows_per_item, max_len, count)
    return _int("batch_size", batch_size, 1, what)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="tok", leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# Drawing image codes (generate and complete)
# ---------------------------------------------------------------------------------------------


def _draw(model, jobs: list[tuple[str, list[int], int]], *, kept: torch.Tensor | None, temperature, top_k, top_p,
          guidance, batch_size, progress: bool, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """jobs: (prompt text, prompt token ids ending in [BOI1], seed). kept: codes [k] every job keeps at
    the top of its image (completion). Returns (codes [n, N] CPU, invalid [n] CPU)."""
    tok = model.tokenizer
    n_codes = model.config.image_seq_len
    first = 0 if kept is None else int(kept.numel())
    kept_ids = [] if kept is None else kept.tolist()
    uncond = tok.text_to_image("").tokens[: 3].tolist() + kept_ids if guidance is not None else None
    longest = max(len(p) for _, p, _ in jobs) + len(kept_ids)
    size = _batch_size(model, batch_size, 2 if guidance is not None else 1, longest + n_codes - first, len(jobs), what)
    chunks = [jobs[i: i + size] for i in range(0, len(jobs), size)]
    codes, invalid = [], []
    bar = _progress(sum(n_codes - first for _ in jobs), progress, what)
    try:
        for number, chunk in enumerate(chunks):
            if len(chunks) > 1:
                bar.set_description(f"{what} {number + 1}/{len(chunks)}")
            drawn, bad = sample_image_codes(
                model.transformer, [p + kept_ids for _, p, _ in chunk], [s for _, _, s in chunk],
                num_new=n_codes - first, first_index=first, image_tokens=model.config.transformer.image_tokens,
                pad_id=tok.pad_id, temperature=temperature, top_k=top_k, top_p=top_p,
                uncond_prompts=[uncond] * len(chunk) if guidance is not None else None, guidance_scale=guidance,
                on_step=lambda k, c=len(chunk): bar.update(k * c))
            if kept is not None:
                drawn = torch.cat([kept.to(drawn.device).expand(len(chunk), -1), drawn], dim=1)
            codes.append(drawn.cpu())
            invalid.append(bad.cpu())
    finally:
        bar.close()
    return torch.cat(codes), torch.cat(invalid)


def _decode_images(model, codes: torch.Tensor, batch_size: int) -> list:
    side = model.config.code_size
    images = []
    for i in range(0, codes.shape[0], batch_size):
        chunk = codes[i: i + batch_size].view(-1, side, side).to(model.device)
        images.extend(tensor_to_pil(x) for x in model.vqvae.decode(chunk))
    return images


def _check_invalid(invalid: torch.Tensor, what: str) -> None:
    if bool(invalid.any()):
        rows = invalid.nonzero().flatten().tolist()
        warnings.warn(f"{what}: images {rows} met logits with no finite value (NaN/inf, e.g. an fp16 overflow); "
                      f"their codes are not trustworthy (try bf16 or float32)", RuntimeWarning, stacklevel=3)


@torch.inference_mode()
def generate(model, prompts, num_images: int = 1, top_k: int = 200, top_p: float = 1.0,
             temperature: float | None = None,
             seed: int = 0, batch_size: int | None = None, guidance_scale: float | None = None,
             rerank: int | None = None, progress: bool = True) -> list[GenerationResult]:
    """Text -> images. prompts: a str or a list of str (none empty; over-long ones are truncated to the
    model's text budget with a TextTruncatedWarning). Returns `num_images` results per prompt, prompt by
    prompt.

    Sampling (CogView's defaults): temperature 1.0, top_k 200 (0 = off), top_p 1.0 (off), over image ids
    only; temperature None = the model's recommendation (`model.default_temperature`: 1.0 unless its
    directory says otherwise; the embedded default model recommends 0.7). seed: images are reproducible per (seed, prompt, image index), whatever the batch size.
    batch_size: images decoded together (default: CPU 8, CUDA what fits). guidance_scale: classifier-free
    guidance (None/1.0 = off; see the module docstring for when it helps). rerank=N: draw N >= num_images
    candidates per prompt, score each by the caption score (`score`) and return the best `num_images`,
    best first, with `.score` set. progress: a tqdm bar over the drawn tokens.
    """
    what = "generate"
    prompts = _prompts(prompts, what)
    num_images = _int("num_images", num_images, 1, what)
    temperature = model.default_temperature if temperature is None else temperature
    temperature, top_k, top_p = _sampling(what, temperature, top_k, top_p)
    seed = _seed(seed, what)
    candidates = num_images
    if rerank is not None:
        candidates = _int("rerank", rerank, 1, what)
        if candidates < num_images:
            raise ValueError(f"{what}: `rerank` ({candidates}) must be >= num_images ({num_images}): it is the number "
                             f"of candidates drawn per prompt")
    guidance = _guidance(model, guidance_scale, what)
    tok = model.tokenizer
    jobs = []
    for prompt in prompts:
        layout = tok.text_to_image(prompt)
        ids = layout.tokens[: layout.prompt_len].tolist()
        jobs += [(prompt, ids, image_seed(seed, prompt, j)) for j in range(candidates)]
    codes, invalid = _draw(model, jobs, kept=None, temperature=temperature, top_k=top_k, top_p=top_p,
                           guidance=guidance, batch_size=batch_size, progress=progress, what=what)
    _check_invalid(invalid, what)
    scores = None
    if rerank is not None:
        scores = score(model, codes.view(-1, model.config.code_size, model.config.code_size),
                       [p for p, _, _ in jobs], batch_size=batch_size).tolist()
    results = []
    for p, prompt in enumerate(prompts):
        order = list(range(candidates))
        if scores is not None:
            order.sort(key=lambda j: -scores[p * candidates + j])
        results += [(p * candidates + j, j) for j in order[:num_images]]
    images = _decode_images(model, codes[[i for i, _ in results]], batch_size or 8)
    side = model.config.code_size
    return [GenerationResult(prompt=jobs[i][0], index=j, seed=jobs[i][2], codes=codes[i].view(side, side),
                             image=image, score=None if scores is None else float(scores[i]),
                             invalid=bool(invalid[i]))
            for (i, j), image in zip(results, images)]


@torch.inference_mode()
def complete(model, image, keep_rows: int, *, prompt: str = "", num_images: int = 1, top_k: int = 200,
             top_p: float = 1.0, temperature: float | None = None, seed: int = 0, batch_size: int | None = None,
             guidance_scale: float | None = None, progress: bool = True) -> list[GenerationResult]:
    """Keep the top `keep_rows` rows of an image's codes and draw the rest (conditioned on `prompt`;
    "" = no text; temperature None = the model's recommendation, as in `generate`). image: a PIL image / float tensor [3, H, W] of the model's size, or codes [side, side].
    Returns `num_images` completions; their first keep_rows x side codes are the image's."""
    what = "complete"
    codes = codes_from_images(model, image, what)
    if codes.shape[0] != 1:
        raise ValueError(f"{what}: give one image, got {codes.shape[0]}")
    side = model.config.code_size
    keep_rows = _int("keep_rows", keep_rows, 0, what)
    if keep_rows >= side:
        raise ValueError(f"{what}: `keep_rows` must be < {side} (the code rows of an image), got {keep_rows}: "
                         f"nothing would be left to draw")
    if not isinstance(prompt, str):
        raise TypeError(f"{what}: `prompt` must be a str, got {type(prompt).__name__}")
    num_images = _int("num_images", num_images, 1, what)
    temperature = model.default_temperature if temperature is None else temperature
    temperature, top_k, top_p = _sampling(what, temperature, top_k, top_p)
    seed = _seed(seed, what)
    guidance = _guidance(model, guidance_scale, what)
    layout = model.tokenizer.text_to_image(prompt)
    ids = layout.tokens[: layout.prompt_len].tolist()
    kept = codes[0].reshape(-1)[: keep_rows * side].cpu()
    jobs = [(prompt, ids, image_seed(seed, prompt, j)) for j in range(num_images)]
    out, invalid = _draw(model, jobs, kept=kept if keep_rows else None, temperature=temperature, top_k=top_k,
                         top_p=top_p, guidance=guidance, batch_size=batch_size, progress=progress, what=what)
    _check_invalid(invalid, what)
    images = _decode_images(model, out, batch_size or 8)
    return [GenerationResult(prompt=prompt, index=j, seed=jobs[j][2], codes=out[j].view(side, side), image=img,
                             invalid=bool(invalid[j]))
            for j, img in enumerate(images)]


# ---------------------------------------------------------------------------------------------
# Caption score and captioning
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def score(model, images, texts, *, batch_size: int | None = None) -> torch.Tensor:
    """CogView's caption score: for each (image, text), the sum over the text's tokens of
    log p(token | [BASE] [BOI1] codes [EOI1] [ROI1] preceding text), with the image ids masked out of the
    softmax. Higher is better (it ranks candidates for self-reranking; -score / tokens is the mean caption
    loss). images: PIL images / float tensors [3, H, W] of the model's size, or code grids; texts: one
    str for every image, or one per image (none empty). Returns float32 [n] on the CPU."""
    what = "score"
    codes = codes_from_images(model, images, what)
    return caption_log_probs(model, codes, texts, batch_size=batch_size, what=what)[0]


def caption_log_probs(model, codes: torch.Tensor, texts, *, batch_size: int | None = None,
                      what: str = "score") -> tuple[torch.Tensor, torch.Tensor]:
    """codes [n, side, side] and texts -> (summed log-probabilities float32 [n], text tokens int64 [n]),
    both on the CPU: `score` plus the token counts (for per-token caption losses)."""
    n = codes.shape[0]
    if isinstance(texts, str):
        texts = [texts] * n
    if not isinstance(texts, Sequence) or len(texts) != n:
        raise ValueError(f"{what}: give one text, or one per image ({n}), got "
                         f"{len(texts) if isinstance(texts, Sequence) else type(texts).__name__}")
    tok = model.tokenizer
    layouts = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what}: text {i} must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{what}: text {i} is empty: there is nothing to score")
        layouts.append(tok.caption_scoring(codes[i].cpu(), text))
    transformer = model.transformer
    image_tokens = model.config.transformer.image_tokens
    head = transformer.word_embeddings.weight[image_tokens:]  # every row but the image ids
    size = batch_size or max(1, min(n, 16 if model.device.type == "cuda" else 8))
    with torch.inference_mode():
        out = []
        for i in range(0, n, size):
            batch = tok.collate(layouts[i: i + size]).to(model.device)
            # the last token is only a target (the layout may be one longer than the position table)
            hidden = transformer.hidden_states(batch.tokens[:, :-1], batch.position_ids[:, :-1])
            # position j predicts token j + 1: the text targets are text_mask[:, 1:]
            rows, cols = batch.text_mask[:, 1:].nonzero(as_tuple=True)
            logp = F.log_softmax(F.linear(hidden[rows, cols], head).float(), dim=-1)
            picked = logp.gather(1, (batch.tokens[rows, cols + 1] - image_tokens)[:, None])[:, 0]
            sums = torch.zeros(batch.tokens.shape[0], dtype=torch.float32, device=model.device)
            sums.index_add_(0, rows, picked)
            out.append(sums.cpu())
    counts = torch.tensor([x.num_text_tokens for x in layouts], dtype=torch.long)
    return torch.cat(out), counts


@torch.inference_mode()
def caption(model, images, *, max_tokens: int | None = None, temperature: float = 0.0, top_k: int = 0,
            top_p: float = 1.0, seed: int = 0, end: bool | None = None, batch_size: int | None = None,
            progress: bool = False) -> list[str]:
    """Image -> text: `[BASE] [BOI1] codes [EOI1] [ROI1]` then text tokens (only text ids, and the caption
    end marker [SEP] when `end`), greedy by default (temperature 0). end: whether the model ends captions
    with [SEP] (default: as its training metadata says, else False: CogView's release has no end marker,
    so its captions run `max_tokens`). max_tokens: default the model's text budget. Image i's draws use
    seed image_seed(seed, "", i) (sampling only)."""
    what = "caption"
    codes = codes_from_images(model, images, what)
    temperature, top_k, top_p = _sampling(what, temperature, top_k, top_p)
    seed = _seed(seed, what)
    end = _caption_end(model, end)
    tok = model.tokenizer
    transformer = model.transformer
    config = model.config.transformer
    n, n_codes = codes.shape[0], model.config.image_seq_len
    budget = config.max_positions - n_codes - 3  # new tokens (the last one drawn is never fed back)
    if budget < 1:
        raise ValueError(f"{what}: the model's {config.max_positions} positions leave no room for text after "
                         f"{n_codes} codes")
    max_tokens = budget if max_tokens is None else min(_int("max_tokens", max_tokens, 1, what), budget)
    lo = config.image_tokens
    sep = tok[CAPTION_END]
    hi = sep + 1 if end else config.command_offset
    head = transformer.word_embeddings.weight[lo:hi]
    allowed = torch.zeros(hi - lo, dtype=torch.bool)
    allowed[: tok.num_pieces] = True  # text pieces (reserved text ids beyond the model's pieces never)
    if end:
        allowed[sep - lo] = True
    mask = torch.where(allowed, 0.0, float("-inf")).to(model.device)
    size = batch_size or max(1, min(n, 16 if model.device.type == "cuda" else 8))
    captions: list[str] = []
    bar = _progress(n * max_tokens, progress, what)
    try:
        for c in range(0, n, size):
            chunk = codes[c: c + size]
            rows = chunk.shape[0]
            prompt = torch.stack([tok.image_to_text(x.cpu()).tokens for x in chunk]).to(model.device)
            length = prompt.shape[1]
            cache = transformer.new_cache(rows, length + max_tokens)
            seeds = [image_seed(seed, "", c + i) for i in range(rows)]
            positions = torch.arange(length, device=model.device)[None].expand(rows, -1)
            start = torch.zeros(rows, dtype=torch.long, device=model.device)
            hidden = transformer.decode_step(prompt, positions, cache, start, return_hidden=True)[:, -1]
            out = torch.empty((rows, max_tokens), dtype=torch.long, device=model.device)
            done = torch.zeros(rows, dtype=torch.bool, device=model.device)
            for t in range(max_tokens):
                logits = F.linear(hidden, head).float() + mask
                new = torch.cat([ops.sample_tokens(logits[b: b + 1], temperature=temperature, top_k=top_k,
                                                   top_p=top_p, seed=seeds[b], offset=t) for b in range(rows)]) + lo
                out[:, t] = new
                bar.update(rows)
                if end:
                    done |= new == sep
                    if bool(done.all()):
                        out = out[:, : t + 1]
                        break
                if t + 1 < max_tokens:
                    step_start = torch.full((rows,), length + t, dtype=torch.long, device=model.device)
                    hidden = transformer.decode_step(new[:, None], step_start[:, None], cache, step_start,
                                                     return_hidden=True)[:, 0]
            for row in out.cpu().tolist():
                if end and sep in row:
                    row = row[: row.index(sep)]
                captions.append(tok.decode_text(row))
    finally:
        bar.close()
    return captions

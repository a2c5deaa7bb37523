"""Minimal generation for the trainer's sample grids: top-k sampling of image codes and greedy captions,
through the transformer's cached decoding (`new_cache` + `decode_step`). The library's full generator
(classifier-free guidance, reranking, super-resolution) lives elsewhere; this is only what training
needs to show progress."""
from __future__ import annotations

import torch

from cogview.models.transformer import CogViewTransformer
from cogview.tokenizer import CogViewTokenizer

__all__ = ["sample_image_codes", "greedy_captions"]


def _pick(logits: torch.Tensor, allowed: torch.Tensor, top_k: int, temperature: float,
          generator: torch.Generator | None) -> torch.Tensor:
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    if top_k <= 0 and temperature <= 0:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-6)
    if top_k > 0:
        k = min(top_k, int(allowed.sum()))
        kth = logits.topk(k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _prefill(model: CogViewTransformer, tokenizer: CogViewTokenizer, layouts, extra: int):
    device = model.word_embeddings.weight.device
    batch = len(layouts)
    lengths = torch.tensor([x.prompt_len for x in layouts], device=device)
    longest = int(lengths.max())
    tokens = torch.full((batch, longest), tokenizer.pad_id, dtype=torch.long, device=device)
    positions = torch.zeros((batch, longest), dtype=torch.long, device=device)
    for i, x in enumerate(layouts):
        tokens[i, : x.prompt_len] = x.tokens[: x.prompt_len]
        positions[i, : x.prompt_len] = x.position_ids[: x.prompt_len]
    cache = model.new_cache(batch, longest + extra)
    hidden = model.decode_step(tokens, positions, cache, torch.zeros(batch, dtype=torch.long, device=device),
                               return_hidden=True)
    last = model.logits(hidden[torch.arange(batch, device=device), lengths - 1])
    # position id of the next token of each row: one past its last prompt position
    next_pos = torch.stack([x.position_ids[x.prompt_len - 1] for x in layouts]).to(device) + 1
    return cache, last, lengths, next_pos


@torch.no_grad()
def sample_image_codes(model: CogViewTransformer, tokenizer: CogViewTokenizer, prompts: list[str], *,
                       image_len: int, top_k: int = 100, temperature: float = 1.0,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Codes [len(prompts), image_len] sampled after `[ROI1] prompt [BASE] [BOI1]`, image ids only."""
    was_training = model.training
    model.eval()
    layouts = [tokenizer.text_to_image(p, image_len=image_len) for p in prompts]
    cache, logits, start, pos = _prefill(model, tokenizer, layouts, image_len)
    allowed = tokenizer.allowed_mask("image", model.config.vocab_rows, device=logits.device)
    codes = []
    for i in range(image_len):
        token = _pick(logits, allowed, top_k, temperature, generator)
        codes.append(token)
        if i + 1 == image_len:
            break
        logits = model.decode_step(token[:, None], (pos + i)[:, None], cache, start + i)[:, 0]
    model.train(was_training)
    return torch.stack(codes, dim=1)


@torch.no_grad()
def greedy_captions(model: CogViewTransformer, tokenizer: CogViewTokenizer, codes: torch.Tensor, *,
                    max_tokens: int = 32, end: bool = True) -> list[str]:
    """Greedy captions of images given as codes [B, n]: text pieces after `[BASE] [BOI1] codes [EOI1]
    [ROI1]`, stopping at [SEP] (when the model was trained with caption ends) or `max_tokens`."""
    was_training = model.training
    model.eval()
    layouts = [tokenizer.image_to_text(c.reshape(-1), image_len=c.numel()) for c in codes]
    budget = max(1, min(max_tokens, model.config.max_positions - len(layouts[0])))
    cache, logits, start, pos = _prefill(model, tokenizer, layouts, budget)
    allowed = tokenizer.allowed_mask("text", model.config.vocab_rows, extra=("[SEP]",) if end else (),
                                     device=logits.device)
    stop_id = tokenizer["[SEP]"]
    out = [[] for _ in layouts]
    done = torch.zeros(len(layouts), dtype=torch.bool, device=logits.device)
    for i in range(budget):
        token = _pick(logits, allowed, 0, 0.0, None)
        for b, t in enumerate(token.tolist()):
            if not done[b]:
                if end and t == stop_id:
                    done[b] = True
                else:
                    out[b].append(t)
        if bool(done.all()) or i + 1 == budget:
            break
        logits = model.decode_step(token[:, None], (pos + i)[:, None], cache, start + i)[:, 0]
    model.train(was_training)
    return [tokenizer.decode_text(ids) for ids in out]

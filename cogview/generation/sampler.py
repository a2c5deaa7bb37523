"""The image-code sampling loop: one prefill, then one cached decode step per code.

    codes, invalid = sample_image_codes(transformer, prompts, seeds, num_codes=N, image_tokens=I, ...)

`prompts` are token-id lists that end right before the first code to draw (for text->image:
`[ROI1] text [BASE] [BOI1]`; for completion also the kept codes). Every row gets its own static K/V
cache slice; prompts of different lengths are right-padded in the prefill and each row then writes at
its own cache slot (`start`), so no row ever attends to padding.

Per step (all on the device, nothing read back to the host):
  1. `transformer.decode_step` on the previous code of every row (`cogview.ops.kv_cache_write` +
     `cogview.ops.decode_attention` inside);
  2. logits of the IMAGE ids only: the last hidden state times the first `image_tokens` rows of the
     tied output head (the same as masking every other id to -inf, without computing them);
  3. classifier-free guidance (optional): rows B..2B-1 hold the same images under the unconditional
     prompt; logits = u + s (c - u);
  4. `cogview.ops.sample_tokens` (temperature, top-k, top-p and the draw fused) PER ROW with that
     image's own seed and offset = the code's index in the image. The draw of code t of an image
     therefore depends only on (image seed, t, logits), never on the row's place in the batch: the
     same (prompt, seed, image index) gives the same image whatever the batch size (up to the
     floating-point differences of matrix products of different shapes, which move a draw only when
     its uniform falls within rounding of a probability boundary);
  5. the drawn codes go into the output and become the next step's input; positions, cache slots and
     the offset advance in place.

On CUDA the step is captured once in a CUDA graph and replayed (all its inputs are static buffers
updated in place); when capture fails (an op on the path that synchronises, e.g. a reference op
without a CUDA kernel), the loop warns once and runs eagerly.

On CPU, where nothing removes per-call Python costs, a standard model (every layer a CogViewLayer with
the default attention) runs its decode steps through `lean_cpu_step`: one `cogview.ops.sandwich_decode_step`
call per step, which runs the same kernels in the same order as `decode_step` inside C++, with the
weights bound once. Its projections are the only difference: up to 4 rows go through cogview's own
matrix-vector kernel (split over the threads; MKL's runs on one), from 5 rows on float32 weights are
MKL-packed once per batch, so the hidden states match `decode_step`'s up to the rounding of those
products. The kernel checks shapes, dtypes and every cache position before touching memory.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from cogview import ops
from cogview.models.transformer import CogViewLayer, LayerNorm, SelfAttention

__all__ = ["kv_cache_bytes", "lean_cpu_step", "sandwich_layer_params", "sample_image_codes"]


def kv_cache_bytes(config, rows: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of a static K/V cache: 2 (k, v) x layers x rows x max_len x hidden x element size."""
    return 2 * config.num_layers * rows * max_len * config.hidden_size * torch.empty((), dtype=dtype).element_size()


_LEAN_OPS = ("sandwich_decode_step", "sample_tokens")

# Fewest cache rows for which the projection weights are MKL-packed. Up to 4 rows the kernel's own
# matrix-vector products stream each weight once and are faster (2 cores, small-16x16, per step:
# 1 row 1.01 ms vs packed 1.11, 2 rows 0.99 vs 1.05, 4 rows even); from 6 rows packed MKL wins (8 rows
# 1.65 vs 2.26). Packing itself costs ~2-15 ms per batch.
PACK_MIN_ROWS = 5


def sandwich_layer_params(transformer) -> list[torch.Tensor]:
    """The `layer_params` of `cogview.ops.sandwich_decode_step` for a standard CogViewTransformer: 16
    tensors per layer in SANDWICH_LAYER_PARAMS order (the last pair is the next layer's input
    LayerNorm, or the final LayerNorm)."""
    layers = list(transformer.layers)
    params = []
    for i, layer in enumerate(layers):
        nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else transformer.final_layernorm
        a, m = layer.attention, layer.mlp
        params += [a.query_key_value.weight, a.query_key_value.bias, a.dense.weight, a.dense.bias,
                   layer.third_layernorm.weight, layer.third_layernorm.bias, layer.post_attention_layernorm.weight,
                   layer.post_attention_layernorm.bias, m.dense_h_to_4h.weight, m.dense_h_to_4h.bias,
                   m.dense_4h_to_h.weight, m.dense_4h_to_h.bias, layer.fourth_layernorm.weight,
                   layer.fourth_layernorm.bias, nxt.weight, nxt.bias]
    return params


def lean_cpu_step(transformer, cache, *, pack: bool | None = None):
    """A CPU decode step for ONE new token per row through `cogview.ops.sandwich_decode_step` (the
    whole layer stack in one kernel call): a function (tokens [R, 1], positions [R, 1], start [R]) ->
    final hidden states [R, H], `transformer.decode_step(..., return_hidden=True)[:, 0]` up to the
    rounding of the projections (see the module docstring);
    None when the model is not the standard one (every layer a plain CogViewLayer with one eps,
    pb_relax and attention scale) on the CPU kernels (then use decode_step). The caller guarantees
    start + 1 <= cache.max_len. pack: hand the kernel MKL-packed projection weights for the cache's
    row count (float32 with MKL; products equal up to rounding); default: when the cache has at least
    PACK_MIN_ROWS rows, where it is faster."""
    weight = transformer.word_embeddings.weight
    if weight.device.type != "cpu" or not all(ops.has_kernel(op, "cpu") for op in _LEAN_OPS):
        return None
    layers = list(transformer.layers)
    if not layers or any(type(layer) is not CogViewLayer or type(layer.attention) is not SelfAttention
                         or layer.attention.attention_fn is not None
                         or any(type(n) is not LayerNorm for n in (layer.input_layernorm, layer.third_layernorm,
                                                                  layer.post_attention_layernorm,
                                                                  layer.fourth_layernorm))
                         for layer in layers) or type(transformer.final_layernorm) is not LayerNorm:
        return None
    if any(t.dtype != weight.dtype for t in transformer.parameters()) or cache.dtype != weight.dtype:
        return None
    first = layers[0].input_layernorm
    settings = {(float(layer.eps), bool(layer.pb_relax), float(layer.attention.scale)) for layer in layers}
    settings |= {(float(n.eps), bool(n.pb_relax), float(layers[0].attention.scale))
                 for n in [first, transformer.final_layernorm] + [layer.input_layernorm for layer in layers[1:]]}
    if len(settings) != 1:
        return None
    (eps, pb_relax, scale), = settings
    params = sandwich_layer_params(transformer)
    bound = dict(word_embeddings=weight, position_embeddings=transformer.position_embeddings.weight,
                 first_norm=(first.weight, first.bias), layer_params=params, k_cache=cache.k, v_cache=cache.v,
                 num_heads=transformer.config.num_heads, scale=scale, eps=eps, pb_relax=pb_relax)
    rows = cache.k.shape[1]
    if pack is None:
        pack = rows >= PACK_MIN_ROWS
    packed = ops.pack_projection_weights(params, rows) if pack else None
    if packed is not None:
        bound.update(packed_weights=packed, packed_rows=rows)

    return ops.bind_sandwich_decode_step(**bound)


class _ImageLoop:
    """The static buffers of one batch and the step that advances them."""

    def __init__(self, transformer, prompts: Sequence[Sequence[int]], seeds: Sequence[int], *, num_new: int,
                 first_index: int, image_tokens: int, pad_id: int, temperature: float, top_k: int, top_p: float,
                 uncond_prompts: Sequence[Sequence[int]] | None, guidance_scale: float | None, lean: bool = True):
        self.transformer = transformer
        self.batch = len(prompts)
        self.guided = uncond_prompts is not None
        rows = list(prompts) + (list(uncond_prompts) if self.guided else [])
        self.rows = len(rows)
        device = transformer.word_embeddings.weight.device
        self.device = device
        lengths = [len(p) for p in rows]
        width = max(lengths)
        tokens = torch.full((self.rows, width), int(pad_id), dtype=torch.long)
        positions = torch.zeros((self.rows, width), dtype=torch.long)
        for r, prompt in enumerate(rows):
            tokens[r, : len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long)
            positions[r, : len(prompt)] = torch.arange(len(prompt))
        self.prefill_tokens = tokens.to(device)
        self.prefill_positions = positions.to(device)
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=device)
        # slots: the prefill fills 0..width-1 (padding included); row r then writes its codes at
        # lengths[r], lengths[r] + 1, ... (the last drawn code is never fed back).
        self.cache = transformer.new_cache(self.rows, width + num_new)
        self.head = transformer.word_embeddings.weight[:image_tokens]  # the image rows of the tied head
        self.num_new = num_new
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.scale = None if guidance_scale is None else float(guidance_scale)
        # static step state
        self.tokens = torch.zeros((self.rows, 1), dtype=torch.long, device=device)
        self.start = self.lengths.clone()
        self.positions = self.start[:, None]  # a view: a new code's position is its cache slot
        self.seeds = torch.tensor([int(s) for s in seeds], dtype=torch.long, device=device)
        self.offset = torch.full((1,), int(first_index), dtype=torch.long, device=device)
        self.index = torch.zeros((1,), dtype=torch.long, device=device)
        self.codes = torch.zeros((self.batch, num_new), dtype=torch.long, device=device)
        self.invalid = torch.zeros((self.batch,), dtype=torch.bool, device=device)
        self.row_seeds = list(self.seeds.unbind(0))  # per image: 0-dim views, bound once
        self.row_invalid = list(self.invalid.split(1))
        self.lean = lean_cpu_step(transformer, self.cache) if lean else None
        # sampling settings as given to the wrapper: numbers, or (CUDA without a sampling kernel) one-element
        # device tensors, so the reference path copies nothing from the host inside a CUDA graph capture
        self.settings = dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        if device.type == "cuda" and not ops.has_kernel("sample_tokens", "cuda"):
            self.settings = dict(temperature=torch.tensor([self.temperature], dtype=torch.float32, device=device),
                                 top_k=torch.tensor([self.top_k], dtype=torch.long, device=device),
                                 top_p=torch.tensor([self.top_p], dtype=torch.float64, device=device))

    # ---- pieces ----
    def _draw(self, hidden: torch.Tensor) -> None:
        """hidden [rows, H] (the last position of every row) -> draw one code per image, record it,
        make it the next input, advance offset/index."""
        logits = F.linear(hidden, self.head).float()
        if self.guided:
            cond, uncond = logits[: self.batch], logits[self.batch:]
            logits = uncond + self.scale * (cond - uncond)
        drawn = [ops.sample_tokens(row, seed=seed, offset=self.offset, invalid=flag, **self.settings)
                 for row, seed, flag in zip(logits.split(1), self.row_seeds, self.row_invalid)]
        new = drawn[0] if len(drawn) == 1 else torch.cat(drawn)
        self.codes.index_copy_(1, self.index, new[:, None])
        self.tokens.copy_((torch.cat([new, new]) if self.guided else new)[:, None])
        self.index.add_(1)
        self.offset.add_(1)

    def prefill(self) -> None:
        zero = torch.zeros(self.rows, dtype=torch.long, device=self.device)
        hidden = self.transformer.decode_step(self.prefill_tokens, self.prefill_positions, self.cache, zero,
                                              return_hidden=True)
        last = hidden[torch.arange(self.rows, device=self.device), self.lengths - 1]
        self._draw(last)

    def step(self) -> None:
        if self.lean is not None:
            hidden = self.lean(self.tokens, self.positions, self.start)
        else:
            hidden = self.transformer.decode_step(self.tokens, self.positions, self.cache, self.start,
                                                  return_hidden=True)[:, 0]
        self.start.add_(1)  # (positions is a view of start)
        self._draw(hidden)

    # ---- CUDA graph ----
    def _state(self) -> list[torch.Tensor]:
        return [self.tokens, self.positions, self.start, self.offset, self.index, self.codes, self.invalid]

    def capture(self) -> Callable[[], None] | None:
        """A CUDA graph of `step` (replay = one step), or None when capture fails. Leaves the state as
        it was (the warm-up step's cache writes are redone by the first replay)."""
        saved = [t.clone() for t in self._state()]
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):  # warm-up outside capture (lazy init, workspaces)
                self.step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t, s in zip(self._state(), saved):
                t.copy_(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step()
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager steps
            torch.cuda.synchronize(self.device)
            for t, s in zip(self._state(), saved):
                t.copy_(s)
            warnings.warn(f"cogview.generation: CUDA graph capture of the decode step failed ({type(error).__name__}: "
                          f"{error}); decoding eagerly", RuntimeWarning, stacklevel=4)
            return None
        for t, s in zip(self._state(), saved):  # capture does not run the step, but be exact
            t.copy_(s)
        return graph.replay


@torch.inference_mode()
def sample_image_codes(transformer, prompts: Sequence[Sequence[int]], seeds: Sequence[int], *, num_new: int,
                       image_tokens: int, pad_id: int, first_index: int = 0, temperature: float = 1.0,
                       top_k: int = 200, top_p: float = 1.0, uncond_prompts: Sequence[Sequence[int]] | None = None,
                       guidance_scale: float | None = None, cuda_graph: bool | None = None, lean: bool = True,
                       on_step: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `num_new` image codes after each prompt. Returns (codes [B, num_new] int64, invalid [B] bool:
    a row met logits with no finite allowed value, e.g. an fp16 overflow) on the model's device.

    seeds: one per prompt (the image's stream); first_index: the index in the image of the first code
    drawn (the sampling offset; > 0 when completing an image). uncond_prompts + guidance_scale:
    classifier-free guidance. cuda_graph: capture the step on CUDA (default: on CUDA). lean: on the CPU,
    run the steps through `lean_cpu_step` when the model allows (default). on_step(n) is
    called after each n steps (progress)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"sample_image_codes: {len(prompts)} prompts but {len(seeds)} seeds")
    if uncond_prompts is not None and len(uncond_prompts) != len(prompts):
        raise ValueError("sample_image_codes: `uncond_prompts` must match `prompts`")
    if num_new < 1:
        raise ValueError(f"sample_image_codes: `num_new` must be >= 1, got {num_new}")
    if not (0.0 <= float(temperature) < float("inf")) or int(top_k) < 0 or not 0.0 <= float(top_p) <= 1.0:
        raise ValueError(f"sample_image_codes: need temperature >= 0 (finite), top_k >= 0 and top_p in [0, 1], got "
                         f"{temperature!r}, {top_k!r}, {top_p!r}")
    loop = _ImageLoop(transformer, prompts, seeds, num_new=num_new, first_index=first_index,
                      image_tokens=image_tokens, pad_id=pad_id, temperature=temperature, top_k=top_k, top_p=top_p,
                      uncond_prompts=uncond_prompts, guidance_scale=guidance_scale, lean=lean)
    loop.prefill()
    if on_step:
        on_step(1)
    step = loop.step
    on_cuda = loop.device.type == "cuda"
    if num_new > 2 and on_cuda and (cuda_graph is None or cuda_graph):
        step = loop.capture() or loop.step
    for _ in range(num_new - 1):
        step()
        if on_step:
            on_step(1)
    return loop.codes, loop.invalid

"""CogView transformer training on pre-tokenized images and their captions.

Sequences (cogview.tokenizer layouts):
    text->image  [ROI1] caption [BASE] [BOI1] codes [EOI1]
    image->text  [BASE] [BOI1] codes [EOI1] [ROI1] caption [SEP]     (a --caption-ratio share of them)
right-padded with [PAD]. The loss is CogView's: cross-entropy of every non-pad token given the tokens
before it, text tokens weighted by --text-loss-scale, normalised by the summed weights (over the whole
global batch, see cogview.training.engine). Logits are computed only where a weight is non-zero.

Per item and epoch a private RNG seeded by (seed, epoch, index) picks one of the item's caption
alternatives (e.g. English or Chinese for `shapes`), decides the layout, and drops the caption with
probability --caption-dropout (text->image only: the empty-caption sequence classifier-free guidance
needs). --style appends a style word to every caption (CogView's style fine-tuning).

Inputs: a token file from `cogview tokenize-images`, or any image dataset plus --vqvae (then tokenized
once into OUTPUT/training/tokens). The text tokenizer is --tokenizer, the --init model's, or trained on
the captions (SentencePiece BPE, byte fallback). The output is a full model directory:
`CogView.from_pretrained(OUTPUT)`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cogview.data.loader import build_dataset
from cogview.data.tokens import TokenDataset, is_token_file
from cogview.models import CogViewConfig, CogViewTransformer, presets
from cogview.training.config import TransformerTrainConfig
from cogview.training.distributed import barrier, broadcast_object, unwrap_model
from cogview.training.engine import Trainer
from cogview.training.images import save_grid
from cogview.training.state import full_model_state_dict

__all__ = ["TransformerTrainer", "TransformerLoss", "SequenceBatch", "build_sequences", "train_transformer"]


@dataclass
class SequenceBatch:
    """A micro-batch of sequences: tokens / position_ids [B, L]; targets / weights / text_targets
    [B, L-1] (weights 0 at padding and for the first token); tokens = non-pad tokens."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    text_targets: torch.Tensor
    num_tokens: int
    num_captioning: int = 0

    def to(self, device) -> "SequenceBatch":
        return dataclasses.replace(self, **{f: getattr(self, f).to(device, non_blocking=True)
                                            for f in ("tokens", "position_ids", "targets", "weights", "text_targets")})


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([int(seed), 0xC0DE, int(epoch), int(index)]))


def build_sequences(tokenizer, codes: torch.Tensor, captions: list[list[str]], epochs: list[int],
                    indices: list[int], *, seed: int, caption_ratio: float, caption_dropout: float,
                    text_loss_scale: float, caption_end: bool = True, style: str | None = None) -> SequenceBatch:
    """The sequences of one micro-batch (see the module docstring for the per-item choices)."""
    layouts, captioning = [], 0
    image_len = codes.shape[1]
    for row, caps, epoch, index in zip(codes, captions, epochs, indices):
        rng = item_rng(seed, epoch, index)
        caption = caps[int(rng.integers(len(caps)))] if caps else ""
        if style:
            caption = f"{caption} {style}".strip()
        to_text = rng.random() < caption_ratio
        drop = rng.random() < caption_dropout
        if to_text:
            layouts.append(tokenizer.image_to_text(row, caption, end=caption_end, image_len=image_len))
            captioning += 1
        else:
            layouts.append(tokenizer.text_to_image("" if drop else caption, row, image_len=image_len))
    batch = tokenizer.collate(layouts)
    weights = batch.loss_weights(text_loss_scale)
    return SequenceBatch(tokens=batch.tokens, position_ids=batch.position_ids, targets=batch.tokens[:, 1:],
                         weights=weights[:, 1:], text_targets=batch.text_mask[:, 1:],
                         num_tokens=int(batch.valid.sum()), num_captioning=captioning)


class TransformerLoss(nn.Module):
    """forward(SequenceBatch) -> (weighted mean loss, metrics) for a CogViewTransformer."""

    def __init__(self, transformer: CogViewTransformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, batch: SequenceBatch):
        hidden = self.transformer.hidden_states(batch.tokens, batch.position_ids)[:, :-1]
        select = batch.weights > 0
        logits = self.transformer.logits(hidden[select]).float()
        targets = batch.targets[select]
        weights = batch.weights[select]
        losses = F.cross_entropy(logits, targets, reduction="none")
        loss = (losses * weights).sum() / weights.sum().clamp_min(1e-12)
        with torch.no_grad():  # masked means: no data-dependent branches (torch.compile-friendly)
            text = batch.text_targets[select].float()
            image = (targets < self.transformer.config.image_tokens).float()
            correct = (logits.argmax(-1) == targets).float()
            metrics = {
                "loss": loss.detach(),
                "image_loss": (losses * image).sum() / image.sum().clamp_min(1),
                "text_loss": (losses * text).sum() / text.sum().clamp_min(1),
                "image_accuracy": (correct * image).sum() / image.sum().clamp_min(1),
            }
        return loss, metrics


class TransformerTrainer(Trainer):
    unit = "tok"
    log_name = "train"

    def __init__(self, config: TransformerTrainConfig, **kwargs):
        if not isinstance(config, TransformerTrainConfig):
            raise TypeError("TransformerTrainer needs a TransformerTrainConfig")
        super().__init__(config, **kwargs)

    # ---- set-up ----
    def setup(self) -> None:
        from cogview.pipeline import load_tokenizer, load_transformer, load_vqvae, read_model_directory

        c = self.config
        init_dir = read_model_directory(c.init) if c.init else None
        if init_dir is not None and init_dir.config is None:
            raise ValueError(f"--init {c.init}: a VQ-VAE-only directory; the transformer needs a full model directory")
        # VQ-VAE and tokens
        vqvae_path = c.vqvae
        data = c.data
        if not data:
            raise ValueError("--data is required: a token file (cogview tokenize-images) or an image dataset")
        if isinstance(data, (str, Path)) and is_token_file(data):
            tokens = TokenDataset(data)
            vqvae_path = vqvae_path or tokens.header.get("vqvae_path") or (c.init if c.init else None)
        else:
            vqvae_path = vqvae_path or c.init
            tokens = None
        if not vqvae_path:
            raise ValueError("no VQ-VAE: pass --vqvae DIR (a train-vqvae output or a model directory)")
        self.vqvae = load_vqvae(vqvae_path).eval()
        self.vqvae_path = str(vqvae_path)
        if tokens is None:
            tokens = self._tokenize(data)
        self._check_tokens(tokens)
        self.dataset = tokens
        self.image_len = tokens.code_shape[0] * tokens.code_shape[1]
        # Model and tokenizer
        if init_dir is not None:
            if c.model_overrides:
                raise ValueError("--model-overrides cannot change a model loaded with --init")
            transformer = load_transformer(init_dir)
            if init_dir.config.vqvae.codebook_size != self.vqvae.config.codebook_size:
                raise ValueError(f"--init {c.init} reads {init_dir.config.vqvae.codebook_size} image codes but the "
                                 f"tokens come from a {self.vqvae.config.codebook_size}-code VQ-VAE")
            tokenizer = load_tokenizer(init_dir) if not c.tokenizer else None
            transformer.gradient_checkpointing = c.activation_checkpointing
        else:
            if c.model not in presets:
                raise ValueError(f"--model: unknown preset {c.model!r}; known: {sorted(presets)}")
            overrides = {"image_tokens": self.vqvae.config.codebook_size,
                         "checkpoint_activations": c.activation_checkpointing, **c.model_overrides}
            tconfig = presets[c.model].transformer.replace(**overrides)
            transformer = CogViewTransformer(tconfig)
            tokenizer = None
        full = CogViewConfig(transformer.config, self.vqvae.config, c.model if not c.init else init_dir.name)
        if full.transformer.max_positions < self.image_len + 5:
            raise ValueError(f"the model has {full.transformer.max_positions} positions: too few for "
                             f"{self.image_len} image codes + 4 layout tokens + text")
        if tokenizer is None:
            tokenizer = self._tokenizer(full)
        self.full_config = full
        self.tokenizer = tokenizer
        self.transformer = transformer
        self.module = TransformerLoss(transformer)
        # FSDP units: each layer's attention and MLP (the bulk of the weights). Not whole layers: a layer's
        # fused add+LayerNorm step applies the NEXT layer's input LayerNorm, so LayerNorms (and the
        # embeddings) stay with the root unit, gathered for the whole forward and backward.
        self.shard_units = [m for layer in transformer.layers for m in (layer.attention, layer.mlp)]
        self.sample_prompts = list(c.sample_prompts) or self._default_prompts()
        t = transformer.config
        self.log(f"transformer {full.name or 'model'}: {transformer.num_parameters():,} parameters ({t.num_layers} "
                 f"layers x {t.hidden_size}, {t.num_heads} heads, {t.max_positions} positions); "
                 f"{len(self.dataset)} images as {tokens.code_shape[0]}x{tokens.code_shape[1]} codes; tokenizer "
                 f"{tokenizer.num_pieces} pieces; {self.env.world_size} process(es) on {self.device}")

    def _tokenize(self, data) -> TokenDataset:
        from cogview.data.tokenize import tokenize_dataset

        path = self.train_dir / "tokens"
        if self.env.is_main and not is_token_file(path):
            dataset = build_dataset(data, resolution=self.vqvae.config.image_size, default_seed=self.config.seed)
            self.log(f"tokenizing {len(dataset)} images once into {path}")
            tokenize_dataset(dataset, self.vqvae, path, batch_size=64, num_workers=self.config.num_workers,
                             overwrite=True, progress=self.config.progress, log=self.log, vqvae_path=self.vqvae_path)
        barrier(self.env)
        return TokenDataset(path)

    def _check_tokens(self, tokens: TokenDataset) -> None:
        v = self.vqvae.config
        if tokens.codebook_size != v.codebook_size:
            raise ValueError(f"the token file has {tokens.codebook_size}-code tokens but the VQ-VAE has "
                             f"{v.codebook_size} codes: tokenize with this VQ-VAE")
        recorded = tokens.header.get("vqvae") or {}
        for key in ("downsample", "embed_dim", "hidden_channels", "num_res_blocks"):
            if key in recorded and recorded[key] != getattr(v, key):
                raise ValueError(f"the token file was made by a different VQ-VAE ({key} {recorded[key]} vs "
                                 f"{getattr(v, key)})")

    def _tokenizer(self, full: CogViewConfig):
        from cogview.tokenizer import CogViewTokenizer, train_text_model

        c = self.config
        if c.tokenizer:
            return CogViewTokenizer.for_config(Path(c.tokenizer), full)
        model_bytes = None
        if self.env.is_main:
            captions = []
            for i in range(min(len(self.dataset), 200_000)):
                for caption in self.dataset.captions(i):
                    captions.append(f"{caption} {c.style}" if c.style else caption)
            size = c.text_vocab_size or full.transformer.text_tokens
            size = min(size, full.transformer.text_tokens)
            model_bytes = train_text_model(captions, size, seed=c.seed)
            self.log(f"trained a SentencePiece tokenizer on {len(captions)} captions (vocab <= {size})")
        model_bytes = broadcast_object(model_bytes, self.env)
        return CogViewTokenizer.for_config(model_bytes, full)

    def _default_prompts(self) -> list[str]:
        prompts = []
        for i in range(min(4, len(self.dataset))):
            caps = self.dataset.captions(i)
            if caps:
                prompts.append(caps[i % len(caps)] + (f" {self.config.style}" if self.config.style else ""))
        return prompts

    # ---- batches ----
    def prepare(self, batch: dict) -> SequenceBatch:
        c = self.config
        seqs = build_sequences(self.tokenizer, batch["codes"], batch["captions"], batch["epoch"], batch["index"],
                               seed=c.seed, caption_ratio=c.caption_ratio, caption_dropout=c.caption_dropout,
                               text_loss_scale=c.text_loss_scale, caption_end=c.caption_end, style=c.style)
        return seqs.to(self.device)

    def batch_weight(self, prepared: SequenceBatch) -> float:
        return float(prepared.weights.sum())

    def batch_items(self, prepared: SequenceBatch) -> float:
        return prepared.num_tokens

    # ---- samples and export ----
    def _plain_transformer(self) -> CogViewTransformer | None:
        """A full, unsharded transformer on rank 0 (None elsewhere); collective under FSDP."""
        if self.config.distributed == "fsdp" and self.env.distributed:
            state = full_model_state_dict(self.model, self.env)
            if not self.env.is_main:
                return None
            plain = CogViewTransformer(self.transformer.config, init=False)
            plain.load_state_dict({k[len("transformer."):]: v for k, v in state.items()})
            return plain.to(self.device)
        return unwrap_model(self.model).transformer if self.env.is_main else None

    def periodic(self, step: int, final: bool) -> None:
        model = self._plain_transformer()
        if model is not None and self.sample_prompts:
            from cogview.training.sampling import greedy_captions, sample_image_codes

            generator = torch.Generator(device=self.device).manual_seed(self.config.seed + 1)
            prompts = [p for p in self.sample_prompts for _ in range(2)]
            rng_state = torch.get_rng_state()
            with self.autocast():
                codes = sample_image_codes(model, self.tokenizer, prompts, image_len=self.image_len,
                                           top_k=self.config.sample_top_k, temperature=self.config.sample_temperature,
                                           generator=generator)
                side = self.dataset.code_shape
                real = torch.stack([self.dataset[i]["codes"] for i in range(min(2, len(self.dataset)))])
                captions = greedy_captions(model, self.tokenizer, real.to(self.device), end=self.config.caption_end)
            torch.set_rng_state(rng_state)
            with torch.no_grad():
                images = self.vqvae.to(self.device).decode(codes.view(len(prompts), *side))
            directory = self.train_dir / "samples"
            path = save_grid([images[0::2].cpu(), images[1::2].cpu()], directory / f"samples-{step:08d}.png",
                             scale=max(1, 128 // self.vqvae.config.image_size))
            lines = [f"column {i}: {p}" for i, p in enumerate(self.sample_prompts)]
            lines += [f"caption of item {i}: {cap!r} (true: {self.dataset.captions(i)})" for i, cap in enumerate(captions)]
            (directory / f"samples-{step:08d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
            self.log(f"samples {path}; caption of item 0: {captions[0]!r}")
        barrier(self.env)

    def export(self) -> Path:
        from cogview.pipeline import save_model_dir

        state = full_model_state_dict(self.model, self.env)
        if self.env.is_main:
            transformer_state = {k[len("transformer."):]: v for k, v in state.items()}
            c = self.config
            metadata = {"training": {
                "trainer": "transformer", "steps": c.steps, "batch_size": c.batch_size, "lr": c.lr,
                "text_loss_scale": c.text_loss_scale, "caption_ratio": c.caption_ratio,
                "caption_dropout": c.caption_dropout, "caption_end": c.caption_end, "style": c.style,
                "data": self.dataset.describe(), "source": self.dataset.header.get("source", {}),
                "vqvae": self.vqvae_path, "init": c.init, "seed": c.seed, "precision": c.precision}}
            save_model_dir(self.output, vqvae=self.vqvae, transformer=transformer_state, tokenizer=self.tokenizer,
                           config=self.full_config, metadata=json.loads(json.dumps(metadata, default=str)))
        barrier(self.env)
        return self.output


def train_transformer(config: TransformerTrainConfig | None = None, **settings) -> dict[str, Any]:
    """Train the transformer (in this process, or this torchrun process); returns the run summary.

        train_transformer(output="runs/cv", data="runs/tokens", steps=5000, batch_size=32)
    """
    from cogview.training.config import make_config

    if config is None:
        config = make_config(TransformerTrainConfig, settings)
    elif settings:
        raise TypeError("train_transformer: pass either a config or settings, not both")
    return TransformerTrainer(config).run()

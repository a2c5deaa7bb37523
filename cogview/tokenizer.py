"""The unified CogView vocabulary and the sequence layouts built from it.

One id space holds everything the transformer reads or writes (CogView1's layout, facts in
../shared/reference/cogview-facts.md):

    ids 0 .. I-1            image codes (I = image_tokens, the VQ-VAE codebook size)
    ids I .. I+T-1          text pieces: SentencePiece id + I (T = text_tokens)
    ids I+T .. I+T+C-1      command tokens, in the order of `command_tokens`

With CogView's sizes (8192 image, 50000 text) the command tokens get exactly CogView's ids:
[PAD] 58192, [BOI1] 58193, ... [ROI1] 58199, [ROI2] 58200, [SEP] 58202, [BASE] 58208, [POS0] 58210 ..
[POS8] 58218.

Text side: any SentencePiece model. `train_text_model` / `CogViewTokenizer.train` (and the CLI
`cogview tokenizer train`) train a BPE model from captions with byte fallback, so characters never seen
in training (other scripts, emoji) still round-trip through UTF-8 byte pieces, and with the identity
normalisation, so Chinese (full-width) punctuation is kept as written. `CogViewTokenizer.from_file`
loads any existing model, CogView's own 50k model included (that one normalises with NFKC and has no
byte fallback: unseen characters become <unk>).

Text rules:
- empty (or whitespace-only) text encodes to no tokens: the text->image layout then has no text between
  [ROI1] and [BASE] (the unconditional sequence classifier-free guidance needs);
- text longer than a layout's budget is truncated to the budget (its first tokens) with a
  `TextTruncatedWarning`. The budgets, for a model with P positions and N codes per image:
  text->image P - N - 4, image->text P - N - 3 (P - N - 4 with the end marker), super-resolution
  P - n_low - 4 (n_low the low-resolution codes);
- decoding skips non-text ids (or raises, with `skip_special=False`); SentencePiece collapses runs of
  spaces and strips both ends, so decode(encode(t)) == " ".join(t.split()) for trained models.

Layouts (each returns a `Layout`: tokens, position ids, which positions hold text / image codes, spans,
how much of it is the given prompt):

    text_to_image(text, codes=None)      [ROI1] text [BASE] [BOI1] codes [EOI1]
    image_to_text(codes, text=None)      [BASE] [BOI1] codes [EOI1] [ROI1] text (+ [SEP] when end=True)
    caption_scoring(codes, text)         the image->text layout; score = sum of log p(text tokens)
    super_resolution(text, low, high)    [ROI1] text [BASE] [BOI1] low [EOI1] [ROI2] [POS0] [BASE] [BOI2] high
                                         position ids restart at [ROI2] (it gets 0, the next token 1, ...)

`collate(layouts)` right-pads a list of layouts with [PAD] into a `LayoutBatch` for the trainer.
"""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cogview.models.config import COGVIEW_COMMAND_TOKENS, CogViewConfig, TransformerConfig

__all__ = [
    "CAPTION_END",
    "CogViewTokenizer",
    "Layout",
    "LayoutBatch",
    "TextTruncatedWarning",
    "collate",
    "train_text_model",
]

# Marks the end of a caption in image->text sequences of models trained by this project (end=True), so
# captioning knows where to stop. CogView's release has no such marker (its captions run to the end).
CAPTION_END = "[SEP]"

_KINDS = ("image", "text", "command")


class TextTruncatedWarning(UserWarning):
    """A text was longer than its layout's budget and was cut to its first tokens."""


# ---------------------------------------------------------------------------------------------
# Training a SentencePiece model
# ---------------------------------------------------------------------------------------------


def train_text_model(captions: Iterable[str], vocab_size: int, *, model_type: str = "bpe",
                     character_coverage: float = 0.9995, byte_fallback: bool = True,
                     normalization: str = "identity", max_sentence_length: int = 16384,
                     max_sentences: int | None = 2_000_000, seed: int = 0, num_threads: int = 1,
                     out: str | os.PathLike | None = None) -> bytes:
    """Train a SentencePiece model on `captions` (an iterable of strings; empty ones are skipped) and
    return the serialized model (also written atomically to `out` when given).

    Defaults: BPE; `byte_fallback` so unseen characters survive as UTF-8 byte pieces (needs
    vocab_size >= 259 + the distinct characters kept); `character_coverage` 0.9995 (the share of
    characters given their own piece; the rest go through bytes); the `identity` normalisation keeps
    text as written (use "nmt_nfkc" to fold full-width forms). `vocab_size` is an upper bound: a small
    caption set may give fewer pieces. Pieces 0, 1, 2 are <unk>, <s>, </s>. More than `max_sentences`
    captions are subsampled (seeded by `seed`). Deterministic for a given caption list.
    """
    import sentencepiece as spm

    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 4:
        raise ValueError(f"train_text_model: `vocab_size` must be an int >= 4, got {vocab_size!r}")
    if model_type not in ("bpe", "unigram", "char", "word"):
        raise ValueError(f"train_text_model: `model_type` must be bpe, unigram, char or word, got {model_type!r}")
    if not (0.0 < float(character_coverage) <= 1.0):
        raise ValueError(f"train_text_model: `character_coverage` must lie in (0, 1], got {character_coverage!r}")
    if isinstance(captions, str):
        raise TypeError("train_text_model: `captions` must be an iterable of strings, not one string")

    lines: list[str] = []
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise TypeError(f"train_text_model: caption {i} is a {type(caption).__name__}, not a str")
        caption = " ".join(caption.split())  # one line per caption: newlines and tabs become spaces
        if caption:
            lines.append(caption)
    if not lines:
        raise ValueError("train_text_model: no non-empty captions to train on")
    if max_sentences is not None and len(lines) > max_sentences:
        import random

        lines = random.Random(seed).sample(lines, int(max_sentences))

    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buffer, model_type=model_type, vocab_size=vocab_size,
            character_coverage=float(character_coverage), byte_fallback=bool(byte_fallback),
            normalization_rule_name=normalization, hard_vocab_limit=False,
            max_sentence_length=int(max_sentence_length), num_threads=int(num_threads), minloglevel=2,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    except RuntimeError as error:
        message = str(error)
        if "Vocabulary size is smaller than required_chars" in message or "vocab_size" in message:
            raise ValueError(f"train_text_model: vocab_size {vocab_size} is too small for these captions "
                             f"({message.split(']')[-1].strip()}); with byte fallback it needs at least "
                             f"259 + the characters kept") from None
        raise ValueError(f"train_text_model: SentencePiece training failed: {message}") from None
    model = buffer.getvalue()
    if out is not None:
        from cogview.checkpoint import atomic_write_bytes

        atomic_write_bytes(out, model)
    return model


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """One sequence: its tokens and what each position is.

    tokens / position_ids: int64 [L]. text_mask / image_mask: bool [L], positions holding text pieces /
    image codes (also where codes are still to be generated). `prompt_len`: the leading tokens that are
    given (what a generator pre-fills); `complete`: every token is known (False while placeholder
    codes stand where an image is to be generated; those hold [MASK]). Spans are [start, stop) indices:
    `text_span` the text (for a caption still to be generated: (L, L)); `image_span` the image being
    generated or conditioned on (the high-resolution one for super-resolution); `context_image_span`
    the low-resolution codes of super-resolution. `text_budget`: the room the layout leaves for text
    (max text tokens), None when no limit was known.
    """

    kind: str
    tokens: torch.Tensor
    position_ids: torch.Tensor
    text_mask: torch.Tensor
    image_mask: torch.Tensor
    prompt_len: int
    complete: bool
    text_span: tuple[int, int]
    image_span: tuple[int, int]
    context_image_span: tuple[int, int] | None = None
    text_budget: int | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_text_tokens(self) -> int:
        return self.text_span[1] - self.text_span[0]

    def loss_weights(self, text_loss_scale: float = 1.0) -> torch.Tensor:
        """float32 [L]: the weight of predicting token i from tokens < i (CogView's loss: every token
        but the first, text tokens times `text_loss_scale`). Use `weights[1:]` against
        `logits[:-1]`. The scale goes by the kind of the predicted token; CogView's code keyed it on the
        input token instead (any non-image input), so it also scaled the predictions of [BASE], [BOI1]
        and the first image code: three tokens per sequence, not reproduced here."""
        if not self.complete:
            raise ValueError(f"Layout.loss_weights: this {self.kind} layout still has placeholder image codes")
        weights = torch.ones(len(self), dtype=torch.float32)
        weights[self.text_mask] = float(text_loss_scale)
        weights[0] = 0.0
        return weights


@dataclass
class LayoutBatch:
    """Layouts right-padded with [PAD] to one length: tokens, position_ids (0 at padding), text_mask,
    image_mask, valid (bool, False at padding) [B, L]; lengths, prompt_lens [B]."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    text_mask: torch.Tensor
    image_mask: torch.Tensor
    valid: torch.Tensor
    lengths: torch.Tensor
    prompt_lens: torch.Tensor
    layouts: list[Layout] = field(repr=False, default_factory=list)

    def loss_weights(self, text_loss_scale: float = 1.0) -> torch.Tensor:
        """float32 [B, L]: each layout's `loss_weights`, 0 at padding (CogView's loss counts every
        non-pad token). Pair `weights[:, 1:]` with `logits[:, :-1]` and targets `tokens[:, 1:]`."""
        weights = torch.zeros(self.tokens.shape, dtype=torch.float32)
        for i, layout in enumerate(self.layouts):
            weights[i, : len(layout)] = layout.loss_weights(text_loss_scale)
        return weights

    def to(self, device) -> "LayoutBatch":
        names = ("tokens", "position_ids", "text_mask", "image_mask", "valid", "lengths", "prompt_lens")
        moved = {n: getattr(self, n).to(device) for n in names}
        return LayoutBatch(**moved, layouts=self.layouts)


def collate(layouts: Sequence[Layout], pad_id: int, pad_to: int | None = None) -> LayoutBatch:
    """Right-pad `layouts` with `pad_id` ([PAD]) to the longest one (or `pad_to`)."""
    if not layouts:
        raise ValueError("collate: no layouts")
    longest = max(len(x) for x in layouts)
    length = longest if pad_to is None else int(pad_to)
    if length < longest:
        raise ValueError(f"collate: pad_to={pad_to} is shorter than the longest layout ({longest})")
    batch = len(layouts)
    tokens = torch.full((batch, length), int(pad_id), dtype=torch.long)
    positions = torch.zeros((batch, length), dtype=torch.long)
    text_mask = torch.zeros((batch, length), dtype=torch.bool)
    image_mask = torch.zeros((batch, length), dtype=torch.bool)
    valid = torch.zeros((batch, length), dtype=torch.bool)
    for i, x in enumerate(layouts):
        n = len(x)
        tokens[i, :n] = x.tokens
        positions[i, :n] = x.position_ids
        text_mask[i, :n] = x.text_mask
        image_mask[i, :n] = x.image_mask
        valid[i, :n] = True
    lengths = torch.tensor([len(x) for x in layouts], dtype=torch.long)
    prompt_lens = torch.tensor([x.prompt_len for x in layouts], dtype=torch.long)
    return LayoutBatch(tokens, positions, text_mask, image_mask, valid, lengths, prompt_lens, list(layouts))


class _Builder:
    """Accumulates segments of one sequence, remembering what each position holds."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.kinds: list[str] = []
        self.position_ids: list[int] = []
        self._next_position = 0

    def add(self, ids: Sequence[int], kind: str) -> tuple[int, int]:
        start = len(self.ids)
        self.ids.extend(int(i) for i in ids)
        self.kinds.extend([kind] * len(ids))
        self.position_ids.extend(range(self._next_position, self._next_position + len(ids)))
        self._next_position += len(ids)
        return start, len(self.ids)

    def restart_positions(self) -> None:
        self._next_position = 0

    def build(self, kind: str, prompt_len: int, complete: bool, text_span, image_span, context_image_span=None,
              text_budget=None) -> Layout:
        kinds = self.kinds
        return Layout(
            kind=kind,
            tokens=torch.tensor(self.ids, dtype=torch.long),
            position_ids=torch.tensor(self.position_ids, dtype=torch.long),
            text_mask=torch.tensor([k == "text" for k in kinds], dtype=torch.bool),
            image_mask=torch.tensor([k == "image" for k in kinds], dtype=torch.bool),
            prompt_len=int(prompt_len), complete=bool(complete), text_span=tuple(text_span),
            image_span=tuple(image_span), context_image_span=None if context_image_span is None else
            tuple(context_image_span), text_budget=text_budget)


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------


def _load_processor(text_model):
    import sentencepiece as spm

    if isinstance(text_model, spm.SentencePieceProcessor):
        return text_model, text_model.serialized_model_proto()
    if isinstance(text_model, (bytes, bytearray, memoryview)):
        data = bytes(text_model)
        source = "the given bytes"
    elif isinstance(text_model, (str, os.PathLike)):
        path = Path(text_model)
        if not path.is_file():
            from cogview.checkpoint import CheckpointNotFoundError

            raise CheckpointNotFoundError(f"SentencePiece model file not found: {path}")
        data = path.read_bytes()
        source = str(path)
    else:
        raise TypeError(f"CogViewTokenizer: `text_model` must be a path, the model's bytes or a "
                        f"SentencePieceProcessor, got {type(text_model).__name__}")
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(data)
    except (RuntimeError, OSError) as error:
        from cogview.checkpoint import CheckpointCorruptError

        raise CheckpointCorruptError(f"not a valid SentencePiece model: {source} ({error})") from None
    if processor.get_piece_size() < 1:
        from cogview.checkpoint import CheckpointCorruptError

        raise CheckpointCorruptError(f"the SentencePiece model {source} has no pieces")
    return processor, data


class CogViewTokenizer:
    """Text pieces (SentencePiece) + image codes + command tokens in one id space (module docstring).

    CogViewTokenizer(text_model, image_tokens=8192, text_tokens=None, command_tokens=CogView's,
                     image_len=None, max_len=None)

    text_model: a path to a SentencePiece .model file, its bytes, or a SentencePieceProcessor.
    text_tokens: ids reserved for text (default: the model's piece count; may be larger, never smaller).
    image_len: codes per image (1024 for CogView) and max_len: positions of the model (1089): the
    defaults of the layout builders (`for_config` sets both from a model config).
    """

    def __init__(self, text_model, *, image_tokens: int = 8192, text_tokens: int | None = None,
                 command_tokens: Sequence[str] = COGVIEW_COMMAND_TOKENS, image_len: int | None = None,
                 max_len: int | None = None):
        self._sp, self._model_bytes = _load_processor(text_model)
        pieces = self._sp.get_piece_size()
        if not isinstance(image_tokens, int) or isinstance(image_tokens, bool) or image_tokens < 0:
            raise ValueError(f"CogViewTokenizer: `image_tokens` must be an int >= 0, got {image_tokens!r}")
        if text_tokens is None:
            text_tokens = pieces
        if not isinstance(text_tokens, int) or isinstance(text_tokens, bool) or text_tokens < pieces:
            raise ValueError(f"CogViewTokenizer: `text_tokens` ({text_tokens!r}) must be an int >= the text model's "
                             f"{pieces} pieces")
        commands = tuple(command_tokens)
        if not commands or any(not isinstance(c, str) for c in commands) or len(set(commands)) != len(commands):
            raise ValueError(f"CogViewTokenizer: `command_tokens` must be distinct strings, got {commands!r}")
        for required in ("[PAD]", "[BOI1]", "[EOI1]", "[ROI1]", "[BASE]"):
            if required not in commands:
                raise ValueError(f"CogViewTokenizer: `command_tokens` lacks {required}")
        self.image_tokens = image_tokens
        self.text_tokens = text_tokens
        self.command_tokens = commands
        self._command_ids = {name: image_tokens + text_tokens + i for i, name in enumerate(commands)}
        self.image_len = None
        self.max_len = None
        self.set_layout(image_len=image_len, max_len=max_len)

    # ---- construction ----
    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> "CogViewTokenizer":
        """Load any SentencePiece model file (keyword arguments as for the constructor)."""
        return cls(Path(path), **kwargs)

    @classmethod
    def for_config(cls, text_model, config: CogViewConfig | TransformerConfig) -> "CogViewTokenizer":
        """A tokenizer with `config`'s vocabulary layout (and, for a full CogViewConfig, its codes per
        image and positions as layout defaults). Raises if the text model has more pieces than the
        config's text_tokens."""
        transformer = config.transformer if isinstance(config, CogViewConfig) else config
        if not isinstance(transformer, TransformerConfig):
            raise TypeError(f"CogViewTokenizer.for_config: expected a CogViewConfig or TransformerConfig, got "
                            f"{type(config).__name__}")
        tok = cls(text_model, image_tokens=transformer.image_tokens, text_tokens=transformer.text_tokens,
                  command_tokens=transformer.command_tokens, max_len=transformer.max_positions,
                  image_len=config.image_seq_len if isinstance(config, CogViewConfig) else None)
        return tok

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int, *, image_tokens: int = 8192,
              text_tokens: int | None = None, command_tokens: Sequence[str] = COGVIEW_COMMAND_TOKENS,
              image_len: int | None = None, max_len: int | None = None, **train_options) -> "CogViewTokenizer":
        """Train a SentencePiece model on `captions` (see `train_text_model` for the options) and wrap it."""
        model = train_text_model(captions, vocab_size, **train_options)
        return cls(model, image_tokens=image_tokens, text_tokens=text_tokens, command_tokens=command_tokens,
                   image_len=image_len, max_len=max_len)

    def set_layout(self, *, image_len: int | None = None, max_len: int | None = None) -> None:
        """Set the layout defaults: codes per image and the model's positions."""
        for name, value in (("image_len", image_len), ("max_len", max_len)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"CogViewTokenizer: `{name}` must be a positive int or None, got {value!r}")
        if image_len is not None:
            self.image_len = image_len
        if max_len is not None:
            self.max_len = max_len

    # ---- the model file ----
    @property
    def model_bytes(self) -> bytes:
        """The serialized SentencePiece model (what `save` writes)."""
        return self._model_bytes

    @property
    def processor(self):
        """The underlying `sentencepiece.SentencePieceProcessor`."""
        return self._sp

    def save(self, path: str | os.PathLike) -> None:
        """Write the SentencePiece model file (atomically)."""
        from cogview.checkpoint import atomic_write_bytes

        atomic_write_bytes(path, self._model_bytes)

    # ---- id layout ----
    @property
    def num_pieces(self) -> int:
        """Pieces of the SentencePiece model (<= text_tokens)."""
        return self._sp.get_piece_size()

    @property
    def text_offset(self) -> int:
        return self.image_tokens

    @property
    def command_offset(self) -> int:
        return self.image_tokens + self.text_tokens

    @property
    def vocab_size(self) -> int:
        """Ids in use: image + text + command tokens."""
        return self.image_tokens + self.text_tokens + len(self.command_tokens)

    def command_id(self, name: str) -> int:
        """Id of a command token, e.g. command_id("[BOI1]") (58193 with CogView's sizes)."""
        try:
            return self._command_ids[name]
        except KeyError:
            raise KeyError(f"unknown command token {name!r}; known: {list(self.command_tokens)}") from None

    def __getitem__(self, name: str) -> int:
        return self.command_id(name)

    @property
    def pad_id(self) -> int:
        return self._command_ids["[PAD]"]

    def id_range(self, kind: str) -> range:
        """The ids of one kind: "image", "text" (all reserved text ids) or "command"."""
        if kind == "image":
            return range(0, self.image_tokens)
        if kind == "text":
            return range(self.image_tokens, self.command_offset)
        if kind == "command":
            return range(self.command_offset, self.vocab_size)
        raise ValueError(f"id_range: `kind` must be one of {_KINDS}, got {kind!r}")

    def kind_of(self, token_id: int) -> str:
        """"image", "text", "command" or "unused" (padding rows of the embedding)."""
        token_id = int(token_id)
        if 0 <= token_id < self.image_tokens:
            return "image"
        if self.image_tokens <= token_id < self.command_offset:
            return "text"
        if self.command_offset <= token_id < self.vocab_size:
            return "command"
        return "unused"

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= 0) & (ids < self.image_tokens)

    def is_text(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.image_tokens) & (ids < self.command_offset)

    def is_command(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.command_offset) & (ids < self.vocab_size)

    def allowed_mask(self, kinds: str | Sequence[str], vocab_rows: int | None = None, *,
                     extra: Sequence[str] = (), device=None) -> torch.Tensor:
        """bool [vocab_rows] (default vocab_size): True for the ids of the given kinds ("image", "text",
        "command") and the named command tokens in `extra`; padding rows are never allowed. Sampling
        sets the other logits to -inf (e.g. only "image" after [BOI1]; "text" + [SEP] after [EOI1]
        [ROI1] for a model trained with caption ends)."""
        rows = self.vocab_size if vocab_rows is None else int(vocab_rows)
        if rows < self.vocab_size:
            raise ValueError(f"allowed_mask: vocab_rows {rows} is smaller than the vocabulary ({self.vocab_size})")
        mask = torch.zeros(rows, dtype=torch.bool, device=device)
        for kind in ([kinds] if isinstance(kinds, str) else kinds):
            r = self.id_range(kind)
            mask[r.start:r.stop] = True
        for name in extra:
            mask[self.command_id(name)] = True
        return mask

    # ---- text ----
    def encode_text(self, text: str, max_tokens: int | None = None, *, warn: bool = True) -> list[int]:
        """Text -> unified ids (SentencePiece ids + image_tokens). Empty or whitespace-only text gives [].
        With `max_tokens`, longer text keeps its first max_tokens ids and warns (TextTruncatedWarning)."""
        if not isinstance(text, str):
            raise TypeError(f"encode_text: `text` must be a str, got {type(text).__name__}")
        if not text.strip():
            return []
        offset = self.image_tokens
        ids = [offset + i for i in self._sp.encode(text)]
        if max_tokens is not None:
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
                raise ValueError(f"encode_text: `max_tokens` must be an int >= 0, got {max_tokens!r}")
            if len(ids) > max_tokens:
                if warn:
                    shown = text if len(text) <= 60 else text[:57] + "..."
                    warnings.warn(f"text of {len(ids)} tokens truncated to its first {max_tokens} (the budget of "
                                  f"this layout): {shown!r}", TextTruncatedWarning, stacklevel=3)
                ids = ids[:max_tokens]
        return ids

    def decode_text(self, ids, *, skip_special: bool = True) -> str:
        """Unified ids -> text. Non-text ids (image codes, command tokens) are skipped, or raise a
        ValueError with skip_special=False."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        pieces = []
        lo, hi = self.image_tokens, self.image_tokens + self.num_pieces
        for value in values:
            value = int(value)
            if lo <= value < hi:
                pieces.append(value - lo)
            elif not skip_special:
                raise ValueError(f"decode_text: id {value} is not a text piece ({self.kind_of(value)}; text pieces "
                                 f"are {lo} .. {hi - 1})")
        return self._sp.decode(pieces)

    def text_pieces(self, text: str) -> list[str]:
        """The SentencePiece pieces of `text` (for inspection)."""
        return self._sp.encode(text, out_type=str)

    def describe(self, ids) -> str:
        """A readable rendering of a sequence: text decoded, command tokens by name, runs of image codes
        as <N image codes>."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        parts: list[str] = []
        run_kind, run = None, []

        def flush():
            if not run:
                return
            if run_kind == "text":
                parts.append(repr(self.decode_text(run)))
            elif run_kind == "image":
                parts.append(f"<{len(run)} image codes>")
            elif run_kind == "unused":
                parts.append(f"<unused ids {run}>")

        for value in values:
            kind = self.kind_of(value)
            if kind == "command":
                flush()
                run_kind, run = None, []
                parts.append(self.command_tokens[int(value) - self.command_offset])
                continue
            if kind != run_kind:
                flush()
                run_kind, run = kind, []
            run.append(int(value))
        flush()
        return " ".join(parts)

    # ---- layouts ----
    def _codes(self, codes, what: str, expected: int | None) -> list[int]:
        if isinstance(codes, torch.Tensor):
            if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
                raise ValueError(f"{what}: codes must be integers, got {codes.dtype}")
            values = codes.detach().reshape(-1).tolist()
        else:
            values = [int(c) for c in codes]
        if not values:
            raise ValueError(f"{what}: no image codes")
        lo, hi = min(values), max(values)
        if lo < 0 or hi >= self.image_tokens:
            raise ValueError(f"{what}: image codes must lie in [0, {self.image_tokens}), got values in [{lo}, {hi}]")
        if expected is not None and len(values) != expected:
            raise ValueError(f"{what}: expected {expected} image codes, got {len(values)}")
        return values

    def _image_len(self, image_len, what: str) -> int:
        n = self.image_len if image_len is None else image_len
        if n is None:
            raise ValueError(f"{what}: codes per image unknown: pass `image_len` (or build the tokenizer with "
                             f"for_config / image_len=)")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{what}: `image_len` must be a positive int, got {n!r}")
        return n

    def _budget(self, max_text_len, max_len, overhead: int, what: str) -> int | None:
        if max_text_len is not None:
            if not isinstance(max_text_len, int) or isinstance(max_text_len, bool) or max_text_len < 0:
                raise ValueError(f"{what}: `max_text_len` must be an int >= 0, got {max_text_len!r}")
            return max_text_len
        positions = self.max_len if max_len is None else max_len
        if positions is None:
            return None
        budget = positions - overhead
        if budget < 0:
            raise ValueError(f"{what}: {overhead} layout tokens do not fit in {positions} positions")
        return budget

    def text_to_image(self, text: str, codes=None, *, image_len: int | None = None, max_len: int | None = None,
                      max_text_len: int | None = None) -> Layout:
        """`[ROI1] text [BASE] [BOI1] codes [EOI1]` (CogView's training and generation layout).

        codes: the image's codes (any shape, raster order) or None for a generation prompt: then
        `image_len` positions of [MASK] placeholders stand for the codes (`prompt_len` ends after
        [BOI1]). Text is truncated (with a warning) to max_text_len, by default max_len - image_len - 4
        (61 for CogView)."""
        what = "text_to_image"
        expected = None if (codes is not None and image_len is None and self.image_len is None) else \
            self._image_len(image_len, what)
        code_ids = self._codes(codes, what, expected) if codes is not None else None
        n = len(code_ids) if code_ids is not None else expected
        budget = self._budget(max_text_len, max_len, n + 4, what)
        text_ids = self.encode_text(text, budget)
        b = _Builder()
        b.add([self["[ROI1]"]], "command")
        text_span = b.add(text_ids, "text")
        b.add([self["[BASE]"], self["[BOI1]"]], "command")
        prompt_len = len(b.ids)
        image_span = b.add(code_ids if code_ids is not None else [self["[MASK]"]] * n, "image")
        b.add([self["[EOI1]"]], "command")
        return b.build(what, prompt_len if code_ids is None else len(b.ids), code_ids is not None, text_span,
                       image_span, text_budget=budget)

    def image_to_text(self, codes, text: str | None = None, *, end: bool = False, image_len: int | None = None,
                      max_len: int | None = None, max_text_len: int | None = None) -> Layout:
        """`[BASE] [BOI1] codes [EOI1] [ROI1] text` (captioning), + CAPTION_END ([SEP]) when `end`.

        text None: a captioning prompt (`prompt_len` = the whole layout, `text_span` empty at its end).
        Text is truncated (with a warning) to max_text_len, by default max_len - N - 3 (- 1 with end)."""
        what = "image_to_text"
        expected = None if (image_len is None and self.image_len is None) else self._image_len(image_len, what)
        code_ids = self._codes(codes, what, expected)
        budget = self._budget(max_text_len, max_len, len(code_ids) + 3 + int(end), what)
        b = _Builder()
        b.add([self["[BASE]"], self["[BOI1]"]], "command")
        image_span = b.add(code_ids, "image")
        b.add([self["[EOI1]"], self["[ROI1]"]], "command")
        if text is None:
            n = len(b.ids)
            return b.build(what, n, True, (n, n), image_span, text_budget=budget)
        text_span = b.add(self.encode_text(text, budget), "text")
        if end:
            b.add([self[CAPTION_END]], "command")
        return b.build(what, len(b.ids), True, text_span, image_span, text_budget=budget)

    def caption_scoring(self, codes, text: str, *, end: bool = False, image_len: int | None = None,
                        max_len: int | None = None, max_text_len: int | None = None) -> Layout:
        """The image->text layout with a candidate caption. CogView's caption score (self-reranking):
        sum over the text positions i (`text_mask`) of log p(tokens[i] | tokens[:i]) with the image
        logits masked out; higher is better."""
        if not isinstance(text, str):
            raise TypeError(f"caption_scoring: `text` must be a str, got {type(text).__name__}")
        layout = self.image_to_text(codes, text, end=end, image_len=image_len, max_len=max_len,
                                    max_text_len=max_text_len)
        layout.kind = "caption_scoring"
        return layout

    def super_resolution(self, text: str, low_res_codes, high_res_codes=None, *, high_res_len: int | None = None,
                         window: int = 0, max_len: int | None = None, max_text_len: int | None = None) -> Layout:
        """CogView1's super-resolution layout:
        `[ROI1] text [BASE] [BOI1] low [EOI1] [ROI2] [POS<window>] [BASE] [BOI2] high`.

        Position ids restart at [ROI2] (it gets 0, [POS] 1, ...), as in CogView's fine-tuning, so both
        halves fit the position table. high_res_codes None: a generation prompt with `high_res_len`
        [MASK] placeholders (default 4 x the low-resolution count). `window` picks [POS0..8]. Text is
        truncated to max_text_len, by default max_len - len(low) - 4."""
        what = "super_resolution"
        low = self._codes(low_res_codes, what, None)
        if high_res_codes is not None:
            high = self._codes(high_res_codes, what, high_res_len)
        else:
            n_high = 4 * len(low) if high_res_len is None else int(high_res_len)
            if n_high < 1:
                raise ValueError(f"{what}: `high_res_len` must be >= 1, got {high_res_len!r}")
            high = None
        pos_token = f"[POS{int(window)}]"
        if pos_token not in self._command_ids:
            raise ValueError(f"{what}: `window` must pick one of the [POS*] command tokens, got {window!r}")
        budget = self._budget(max_text_len, max_len, len(low) + 4, what)
        positions = self.max_len if max_len is None else max_len
        n_second = 4 + (len(high) if high is not None else n_high)
        if positions is not None and n_second > positions:
            raise ValueError(f"{what}: the high-resolution part ({n_second} tokens from [ROI2]) exceeds {positions} "
                             f"positions")
        b = _Builder()
        b.add([self["[ROI1]"]], "command")
        text_span = b.add(self.encode_text(text, budget), "text")
        b.add([self["[BASE]"], self["[BOI1]"]], "command")
        low_span = b.add(low, "image")
        b.add([self["[EOI1]"]], "command")
        b.restart_positions()
        b.add([self["[ROI2]"], self[pos_token], self["[BASE]"], self["[BOI2]"]], "command")
        prompt_len = len(b.ids)
        high_span = b.add(high if high is not None else [self["[MASK]"]] * n_high, "image")
        return b.build(what, prompt_len if high is None else len(b.ids), high is not None, text_span, high_span,
                       context_image_span=low_span, text_budget=budget)

    def collate(self, layouts: Sequence[Layout], pad_to: int | None = None) -> LayoutBatch:
        """Right-pad layouts with [PAD] into a LayoutBatch."""
        return collate(layouts, self.pad_id, pad_to)

    def __repr__(self) -> str:
        return (f"CogViewTokenizer(image_tokens={self.image_tokens}, text_tokens={self.text_tokens} "
                f"({self.num_pieces} pieces), command_tokens={len(self.command_tokens)}, vocab_size={self.vocab_size}"
                f", image_len={self.image_len}, max_len={self.max_len})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, CogViewTokenizer):
            return NotImplemented
        return (self._model_bytes == other._model_bytes and self.image_tokens == other.image_tokens
                and self.text_tokens == other.text_tokens and self.command_tokens == other.command_tokens)

    __hash__ = None  # mutable layout defaults

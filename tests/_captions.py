"""Small synthetic caption sets (English, Chinese, mixed) and tiny SentencePiece models trained on them,
shared by the tokenizer, checkpoint and converter tests (trained once per process)."""
from __future__ import annotations

import functools
import random

COLOURS_EN = ["red", "green", "blue", "yellow", "orange", "purple", "white"]
SHAPES_EN = ["circle", "square", "triangle"]
SIZES_EN = ["small", "large", "tiny", "big"]
PLACES_EN = ["on the left", "on the right", "at the top", "at the bottom", "in the middle"]
COLOURS_ZH = ["红色", "绿色", "蓝色", "黄色", "橙色", "紫色", "白色"]
SHAPES_ZH = ["圆形", "正方形", "三角形"]
PLACES_ZH = ["在左边", "在右边", "在上面", "在下面", "在中间"]


def synthetic_captions(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    captions = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            captions.append(f"a {rng.choice(SIZES_EN)} {rng.choice(COLOURS_EN)} {rng.choice(SHAPES_EN)} "
                            f"{rng.choice(PLACES_EN)}, a {rng.choice(COLOURS_EN)} background.")
        elif kind == 1:
            captions.append(f"一个{rng.choice(COLOURS_ZH)}的{rng.choice(SHAPES_ZH)}{rng.choice(PLACES_ZH)}，"
                            f"背景是{rng.choice(COLOURS_ZH)}。")
        else:
            captions.append(f"一个{rng.choice(COLOURS_EN)} {rng.choice(SHAPES_EN)}{rng.choice(PLACES_ZH)}, "
                            f"and a {rng.choice(COLOURS_ZH)}{rng.choice(SHAPES_ZH)}!")
    return captions


@functools.lru_cache(maxsize=None)
def tiny_text_model(vocab_size: int = 400) -> bytes:
    """A BPE SentencePiece model with byte fallback trained on the synthetic captions."""
    from cogview.tokenizer import train_text_model

    return train_text_model(synthetic_captions(), vocab_size)

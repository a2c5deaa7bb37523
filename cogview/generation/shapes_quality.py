"""Text->image quality of a model trained on the built-in `shapes` data, measured with a detector.

    report = shapes_quality(model, pairs="held-out", count=50, rerank=8)
    report["rate"]      # share of images in which the named colour AND shape were both found

Prompts are captions of seeded one-object scenes whose object has one of `pairs` (colour, shape); by
default the object is large and the prompt says so (size=None: either size, named or not), a share of
the prompts leaves out position or background (as training captions do), and they alternate between
English and Chinese. Why large: at the default model's 32x32 a small shape is ~7 pixels across, and its
8x8-code tokenizer keeps such a small shape recognisable in only about 60% of plain reconstructions,
so small shapes would measure the tokenizer, not whether the transformer composes colour and shape. Each prompt gets one image (the best of `rerank` candidates by caption
score when reranking), and `cogview.data.shape_detector.contains` decides whether the named colour and
shape are in it. pairs="held-out" / "seen" read the model's training metadata (the hold-out list of
its `shapes` data); an explicit list of pairs works for any model.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

from cogview.data.shape_detector import contains
from cogview.data.shapes import COLORS, SHAPES, SIZES, ShapesDataset, caption_scene, parse_pairs

__all__ = ["shapes_quality", "shapes_prompts", "held_out_pairs"]


def held_out_pairs(model) -> tuple[tuple[str, str], ...]:
    """The colour-shape pairs the model's `shapes` training data held out (from its metadata)."""
    training = model.metadata.get("training") or {}
    data = training.get("data") or {}
    if data.get("name") == "tokens":  # trained on a token file: the images it was made from
        data = training.get("source") or {}
    if data.get("name") != "shapes":
        raise ValueError("shapes_quality: the model's metadata records no `shapes` training data; pass `pairs` "
                         "as a list of colour-shape pairs")
    return parse_pairs(data.get("holdout") or ())


def _resolve_pairs(model, pairs) -> tuple[tuple[str, str], ...]:
    if isinstance(pairs, str) and pairs in ("held-out", "seen"):
        held = held_out_pairs(model)
        if pairs == "held-out":
            if not held:
                raise ValueError("shapes_quality: the model's training data held out no colour-shape pairs")
            return held
        return tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in held)
    resolved = parse_pairs(pairs)
    if not resolved:
        raise ValueError("shapes_quality: `pairs` is empty")
    return resolved


def shapes_prompts(pairs, count: int = 50, *, seed: int = 0, size: str | None = "large",
                   attribute_dropout: float = 0.3) -> list[tuple[str, str, str]]:
    """`count` (prompt, colour, shape) triples: captions of one-object scenes drawn from `pairs`,
    alternating English and Chinese. size: "large" or "small" fixes the object's size and always
    names it; None leaves it to the scene (and its caption may leave it out)."""
    pairs = parse_pairs(pairs)
    if size is not None and size not in SIZES:
        raise ValueError(f"shapes_prompts: `size` must be one of {list(SIZES)} or None, got {size!r}")
    scenes = ShapesDataset(count, seed=seed, holdout=pairs, split="holdout", min_objects=1, max_objects=1,
                           attribute_dropout=attribute_dropout)
    prompts = []
    for index in range(count):
        scene, attributes = scenes.scene(index)
        if size is not None:
            scene = replace(scene, objects=(replace(scene.objects[0], size=size),))
            attributes = {**attributes, "size": True}
        language = "en" if index % 2 == 0 else "zh"
        obj = scene.objects[0]
        prompts.append((caption_scene(scene, language, **attributes), obj.color, obj.shape))
    return prompts


def shapes_quality(model, pairs="held-out", *, count: int = 50, seed: int = 0, size: str | None = "large",
                   rerank: int | None = None,
                   top_k: int = 200, temperature: float | None = None, batch_size: int | None = None,
                   progress: bool = True) -> dict:
    """Share of generated images showing the prompt's colour and shape (see the module docstring).
    temperature None: the model's recommended one (`model.default_temperature`), as `generate` uses."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"shapes_quality: `count` must be an int >= 1, got {count!r}")
    resolved = _resolve_pairs(model, pairs)
    prompts = shapes_prompts(resolved, count, seed=seed, size=size)
    results = model.generate([p for p, _, _ in prompts], num_images=1, top_k=top_k, temperature=temperature,
                             seed=seed, batch_size=batch_size, rerank=rerank, progress=progress)
    hits, per_pair, tried = 0, Counter(), Counter()
    for (_, color, shape), result in zip(prompts, results):
        found = contains(result.image, color, shape)
        hits += found
        per_pair[f"{color} {shape}"] += found
        tried[f"{color} {shape}"] += 1
    return {"pairs": pairs if isinstance(pairs, str) else [" ".join(p) for p in resolved], "prompts": count,
            "size": size, "rerank": rerank, "seed": seed,
            "temperature": model.default_temperature if temperature is None else temperature,
            "hits": hits, "rate": hits / count,
            "per_pair": {k: f"{per_pair[k]}/{tried[k]}" for k in sorted(tried)},
            "images": [r.image for r in results]}

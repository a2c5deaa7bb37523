"""shapes_quality on a tiny random-weight model: prompts, pair resolution from metadata, reranking, errors."""
import pytest
import torch

from cogview.data.shapes import COLORS, SHAPES
from cogview.generation.shapes_quality import held_out_pairs, shapes_prompts, shapes_quality
from tests.test_generation import make_model

SOURCE = {"name": "shapes", "holdout": ["red circle", "blue triangle"], "split": "train"}
METADATA = {"training": {"data": {"name": "tokens"}, "source": SOURCE}}


def test_prompts_name_the_pair_and_alternate_languages():
    prompts = shapes_prompts(["red circle", "green square"], 6, seed=3)
    assert len(prompts) == 6
    for index, (text, color, shape) in enumerate(prompts):
        assert (color, shape) in {("red", "circle"), ("green", "square")}
        if index % 2 == 0:
            assert color in text and shape in text and "large" in text
        else:
            assert COLORS[color][1] in text and SHAPES[shape] in text and "大" in text
    assert shapes_prompts(["red circle"], 4, seed=3) == shapes_prompts(["red circle"], 4, seed=3)
    with pytest.raises(ValueError, match="size"):
        shapes_prompts(["red circle"], 2, size="huge")


def test_pairs_come_from_the_training_metadata():
    model = make_model(metadata=METADATA)
    assert held_out_pairs(model) == (("red", "circle"), ("blue", "triangle"))
    report = shapes_quality(model, "seen", count=4, progress=False)
    assert len(report["per_pair"]) >= 1 and not {"red circle", "blue triangle"} & set(report["per_pair"])
    with pytest.raises(ValueError, match="pairs"):
        shapes_quality(make_model(metadata={}), "held-out", count=2, progress=False)


def test_report_counts_hits_and_reranks():
    model = make_model(metadata=METADATA)
    torch.manual_seed(0)
    plain = shapes_quality(model, "held-out", count=4, progress=False)
    reranked = shapes_quality(model, "held-out", count=4, rerank=3, progress=False)
    for report in (plain, reranked):
        assert 0 <= report["hits"] <= 4 and report["rate"] == report["hits"] / 4 and len(report["images"]) == 4
    assert reranked["rerank"] == 3
    with pytest.raises(ValueError, match="count"):
        shapes_quality(model, ["red circle"], count=0)

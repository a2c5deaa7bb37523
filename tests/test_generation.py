"""Generation (cogview.generation, the CogView methods and the CLI) on a tiny random-weight model: batch-size
invariance, image-only sampling, the cached loop against full forwards (greedy, with and without guidance),
caption scores against a direct computation, reranking, captioning, completion, the CLI and the errors."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import cogview

from cogview.checkpoint import CheckpointNotFoundError
from cogview.cli import main as cli_main
from cogview.generation import image_seed, pil_to_tensor, sample_image_codes
from cogview.generation.evaluate import evaluate_captions
from cogview.generation.sampler import lean_cpu_step
from cogview.models import CogViewConfig, presets
from cogview.pipeline import CogView
from cogview.tokenizer import TextTruncatedWarning
from tests._captions import tiny_text_model

TINY = presets["test-tiny"]
CONFIG = CogViewConfig(TINY.transformer.replace(text_tokens=400), TINY.vqvae, "tiny-test")
IMAGE_TOKENS = CONFIG.transformer.image_tokens
SIDE = CONFIG.code_size
PROMPTS = ["a red circle on the left", "a big blue square at the top", "一个红色的圆形"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_model(seed: int = 0, metadata=None) -> CogView:
    torch.manual_seed(seed)
    model = CogView.from_config(CONFIG, tiny_text_model())
    with torch.no_grad():  # sharper, prompt-dependent logits than the N(0, 0.02) init gives
        model.transformer.word_embeddings.weight.mul_(10)
        model.transformer.position_embeddings.weight.mul_(10)
        for p in model.transformer.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    if metadata is not None:
        model.metadata = metadata
    return model.eval()


@pytest.fixture(scope="module")
def model() -> CogView:
    return make_model()


def random_codes(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, IMAGE_TOKENS, (n, SIDE, SIDE), generator=g)


# ---------------------------------------------------------------------------------------------
# Direct computations (full forwards, no cache) to check against
# ---------------------------------------------------------------------------------------------


def greedy_direct(model: CogView, prompt: str, guidance: float | None = None, kept=()) -> list[int]:
    """Greedy image codes by a full forward per code (no cache), guided as u + s (c - u)."""
    tok = model.tokenizer
    layout = tok.text_to_image(prompt)
    cond = layout.tokens[: layout.prompt_len].tolist() + list(kept)
    uncond = tok.text_to_image("").tokens[:3].tolist() + list(kept)
    codes = []
    for _ in range(model.config.image_seq_len - len(kept)):
        with torch.no_grad():
            c = model.transformer(torch.tensor([cond + codes], device=model.device))[0, -1, :IMAGE_TOKENS].float()
            if guidance is not None:
                u = model.transformer(torch.tensor([uncond + codes], device=model.device))[0, -1, :IMAGE_TOKENS]
                u = u.float()
                c = u + guidance * (c - u)
        codes.append(int(c.argmax()))
    return list(kept) + codes


def score_direct(model: CogView, codes: torch.Tensor, text: str) -> float:
    tok = model.tokenizer
    ids = ([tok["[BASE]"], tok["[BOI1]"]] + codes.flatten().tolist() + [tok["[EOI1]"], tok["[ROI1]"]]
           + tok.encode_text(text))
    text_start = SIDE * SIDE + 4
    with torch.no_grad():  # the last token is only a target (a full caption fills one more than the positions)
        logits = model.transformer(torch.tensor([ids[:-1]]))[0].double()
    logits[:, :IMAGE_TOKENS] = float("-inf")
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[i - 1, ids[i]] for i in range(text_start, len(ids))))


# ---------------------------------------------------------------------------------------------
# Text -> image
# ---------------------------------------------------------------------------------------------


def test_same_prompt_seed_index_gives_same_image_whatever_the_batch(model):
    codes = lambda results: [r.codes for r in results]  # noqa: E731
    full = model.generate(PROMPTS, num_images=3, seed=7, progress=False)
    assert [(r.prompt, r.index) for r in full] == [(p, j) for p in PROMPTS for j in range(3)]
    for batch_size in (1, 2, 4):
        alone = model.generate(PROMPTS[1:2], num_images=3, seed=7, batch_size=batch_size, progress=False)
        assert all(torch.equal(a, b) for a, b in zip(codes(alone), codes(full[3:6])))
        assert [r.seed for r in alone] == [image_seed(7, PROMPTS[1], j) for j in range(3)]
    # different seeds / indices / prompts give different images (a 16-code image colliding is ~impossible)
    other = model.generate(PROMPTS[1:2], num_images=3, seed=8, progress=False)
    assert not torch.equal(other[0].codes, full[3].codes)
    assert not torch.equal(full[3].codes, full[4].codes)
    image = full[0].image
    assert image.size == (CONFIG.image_size, CONFIG.image_size) and image.mode == "RGB"
    assert full[0].codes.shape == (SIDE, SIDE) and full[0].codes.dtype == torch.int64


def test_only_image_ids_are_drawn_even_when_text_ids_dominate():
    model = make_model(1)
    with torch.no_grad():  # every non-image id gets a logit far above every image id
        t = model.transformer
        t.final_layernorm.weight.zero_()
        t.final_layernorm.bias.fill_(1.0)
        t.word_embeddings.weight[:IMAGE_TOKENS].normal_(0, 0.1)
        t.word_embeddings.weight[IMAGE_TOKENS:].fill_(5.0)
    results = model.generate(PROMPTS, num_images=2, top_k=0, seed=3, progress=False)
    codes = torch.stack([r.codes for r in results])
    assert codes.min() >= 0 and codes.max() < IMAGE_TOKENS
    assert len(codes.unique()) > 4  # drawn from the image ids' own (near-uniform) distribution


@pytest.mark.parametrize("guidance", [None, 3.0])
def test_cached_greedy_loop_matches_full_forwards(model, guidance):
    prompts = PROMPTS[:2]
    results = model.generate(prompts, temperature=0.0, guidance_scale=guidance, progress=False)
    for r, prompt in zip(results, prompts):
        assert r.codes.flatten().tolist() == greedy_direct(model, prompt, guidance)


def test_guidance_one_is_off_and_guidance_changes_samples(model):
    plain = model.generate(PROMPTS[0], num_images=2, seed=1, progress=False)
    one = model.generate(PROMPTS[0], num_images=2, seed=1, guidance_scale=1.0, progress=False)
    guided = model.generate(PROMPTS[0], num_images=2, seed=1, guidance_scale=4.0, progress=False)
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(plain, one))
    assert not all(torch.equal(a.codes, b.codes) for a, b in zip(plain, guided))


def test_guidance_warns_for_a_model_trained_without_caption_dropout():
    model = make_model(metadata={"training": {"caption_dropout": 0.0}})
    with pytest.warns(UserWarning, match="caption dropout"):
        model.generate(PROMPTS[0], guidance_scale=2.0, progress=False)


def test_top_k_one_is_greedy(model):
    greedy = model.generate(PROMPTS[0], temperature=0.0, progress=False)[0].codes
    top1 = model.generate(PROMPTS[0], top_k=1, seed=123, progress=False)[0].codes
    assert torch.equal(greedy, top1)


def test_temperature_none_is_the_model_recommendation(model, tmp_path):
    assert model.default_temperature == 1.0  # no recommendation: CogView's
    model.metadata["sampling"] = {"temperature": 0.5}
    try:
        assert model.default_temperature == 0.5
        by_default = model.generate("a red circle", num_images=2, seed=3, progress=False)
        explicit = model.generate("a red circle", num_images=2, seed=3, temperature=0.5, progress=False)
        assert all(torch.equal(a.codes, b.codes) for a, b in zip(by_default, explicit))
        model.save_pretrained(tmp_path / "m")  # the recommendation travels with the directory
        assert CogView.from_pretrained(tmp_path / "m").default_temperature == 0.5
        model.metadata["sampling"] = {"temperature": "hot"}
        with pytest.raises(ValueError, match="temperature"):
            model.generate("a red circle", progress=False)
    finally:
        model.metadata.pop("sampling")


def test_sampling_follows_the_model_distribution():
    """First code of many images vs the model's top-k softmax at the prompt's end (chi-square)."""
    model = make_model(2)
    tok = model.tokenizer
    layout = tok.text_to_image(PROMPTS[0])
    prompt = layout.tokens[: layout.prompt_len].tolist()
    n = 3000
    codes, invalid = sample_image_codes(model.transformer, [prompt] * n, list(range(n)), num_new=1,
                                        image_tokens=IMAGE_TOKENS, pad_id=tok.pad_id, top_k=5)
    assert not invalid.any()
    with torch.no_grad():
        logits = model.transformer(torch.tensor([prompt]))[0, -1, :IMAGE_TOKENS].double()
    top = logits.topk(5)
    probs = torch.zeros(IMAGE_TOKENS, dtype=torch.float64)
    probs[top.indices] = torch.softmax(top.values, 0)
    counts = torch.bincount(codes[:, 0], minlength=IMAGE_TOKENS).double()
    assert counts[probs == 0].sum() == 0
    expected = probs[probs > 0] * n
    chi2 = float(((counts[probs > 0] - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # 4 degrees of freedom: p ~ 0.0004


@pytest.mark.parametrize("guidance", [None, 2.5])
def test_lean_cpu_step_equals_decode_step(model, guidance):
    # The fused step runs decode_step's kernels but for the projections, whose rounding differs
    # (tests/test_sandwich_decode_step.py holds it to that); here no draw moves.
    tok = model.tokenizer
    prompts = [tok.text_to_image(p) for p in PROMPTS]
    prompts = [x.tokens[: x.prompt_len].tolist() for x in prompts]
    uncond = [tok.text_to_image("").tokens[:3].tolist()] * 3 if guidance else None
    kw = dict(num_new=SIDE * SIDE, image_tokens=IMAGE_TOKENS, pad_id=tok.pad_id, top_k=0,
              uncond_prompts=uncond, guidance_scale=guidance)
    lean, _ = sample_image_codes(model.transformer, prompts, [1, 2, 3], lean=True, **kw)
    plain, _ = sample_image_codes(model.transformer, prompts, [1, 2, 3], lean=False, **kw)
    assert torch.equal(lean, plain)
    cache = model.transformer.new_cache(2, 8)
    step = lean_cpu_step(model.transformer, cache, pack=False)
    assert step is not None
    tokens, start = torch.tensor([[3], [5]]), torch.tensor([0, 4])
    with torch.inference_mode():
        got = step(tokens, start[:, None], start)
        want = model.transformer.decode_step(tokens, start[:, None], model.transformer.new_cache(2, 8), start,
                                             return_hidden=True)[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    model.transformer.layers[0].attention.attention_fn = lambda *a: None  # a custom layer: no lean path
    try:
        assert lean_cpu_step(model.transformer, cache) is None
    finally:
        model.transformer.layers[0].attention.attention_fn = None


def test_over_long_prompt_is_truncated_with_a_warning(model):
    long = " ".join(["a big red circle on the left"] * 20)
    with pytest.warns(TextTruncatedWarning):
        results = model.generate(long, progress=False)
    assert results[0].codes.shape == (SIDE, SIDE)


# ---------------------------------------------------------------------------------------------
# Caption score, reranking, captioning, completion
# ---------------------------------------------------------------------------------------------


def test_score_equals_direct_computation(model):
    codes = random_codes(3)
    texts = ["a red circle", "一个蓝色的正方形在左边，背景是白色。", "a big blue square at the top on the left"]
    got = model.score(codes, texts)
    want = [score_direct(model, c, t) for c, t in zip(codes, texts)]
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    long = " ".join(["a big red circle on the left"] * 10)  # truncated to the budget: fills every position
    with pytest.warns(TextTruncatedWarning):
        got_long = float(model.score(codes[0], long))
    budget = CONFIG.transformer.max_positions - SIDE * SIDE - 3
    truncated = model.tokenizer.decode_text(model.tokenizer.encode_text(long)[:budget])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TextTruncatedWarning)
        assert got_long == pytest.approx(score_direct(model, codes[0], truncated), rel=1e-5, abs=1e-4)
    one = model.score(codes, "a red circle")  # one text for every image
    torch.testing.assert_close(one[0], got[0])
    assert torch.equal(model.score(codes[1], texts[1]), model.score(codes[1:2], texts[1:2]))


def test_rerank_returns_the_best_candidates_best_first(model):
    n = 6
    candidates = model.generate(PROMPTS[:2], num_images=n, seed=4, progress=False)
    best = model.generate(PROMPTS[:2], num_images=2, rerank=n, seed=4, progress=False)
    assert len(best) == 4
    for p, prompt in enumerate(PROMPTS[:2]):
        mine = best[2 * p: 2 * p + 2]
        pool = candidates[n * p: n * p + n]
        scores = model.score(torch.stack([c.codes for c in pool]), prompt)
        order = scores.argsort(descending=True)[:2].tolist()
        assert [r.index for r in mine] == order
        assert all(torch.equal(r.codes, pool[j].codes) for r, j in zip(mine, order))
        assert mine[0].score >= mine[1].score
        torch.testing.assert_close(torch.tensor([r.score for r in mine]), scores[order])


def greedy_caption_direct(model, codes, max_tokens: int, end: bool) -> list[int]:
    tok = model.tokenizer
    ids = [tok["[BASE]"], tok["[BOI1]"]] + codes.flatten().tolist() + [tok["[EOI1]"], tok["[ROI1]"]]
    allowed = torch.zeros(model.config.transformer.vocab_rows, dtype=torch.bool)
    allowed[IMAGE_TOKENS: IMAGE_TOKENS + tok.num_pieces] = True
    if end:
        allowed[tok["[SEP]"]] = True
    out = []
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model.transformer(torch.tensor([ids + out]))[0, -1].float()
        token = int(logits.masked_fill(~allowed, float("-inf")).argmax())
        out.append(token)
        if token == tok["[SEP]"]:
            break
    return out


def test_caption_greedy_matches_full_forwards(model):
    codes = random_codes(3, seed=1)
    captions = model.caption(codes, max_tokens=6)
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    for c, text in zip(codes, captions):
        assert text == model.tokenizer.decode_text(greedy_caption_direct(model, c, 6, end=False))
    full = model.caption(codes[:1])  # default length: the whole text budget, up to the last position
    budget = CONFIG.transformer.max_positions - SIDE * SIDE - 3
    assert full[0] == model.tokenizer.decode_text(greedy_caption_direct(model, codes[0], budget, end=False))
    sampled = model.caption(codes, max_tokens=6, temperature=1.0, top_k=20, seed=2)
    assert sampled == model.caption(codes, max_tokens=6, temperature=1.0, top_k=20, seed=2, batch_size=1)


def test_caption_stops_at_the_end_marker():
    model = make_model(3, metadata={"training": {"caption_end": True}})
    tok = model.tokenizer
    codes = random_codes(2, seed=2)
    direct = [greedy_caption_direct(model, c, 8, end=True) for c in codes]
    captions = model.caption(codes, max_tokens=8)
    assert captions == [tok.decode_text(d[:-1] if d[-1] == tok["[SEP]"] else d) for d in direct]
    # a model that always prefers [SEP] gives empty captions
    with torch.no_grad():
        t = model.transformer
        t.final_layernorm.weight.zero_()
        t.final_layernorm.bias.fill_(1.0)
        t.word_embeddings.weight[tok["[SEP]"]].fill_(5.0)
    assert model.caption(codes, max_tokens=8) == ["", ""]
    assert all(len(c) > 0 for c in model.caption(codes, max_tokens=3, end=False))


def test_complete_keeps_the_kept_rows(model):
    source = random_codes(1, seed=5)[0]
    for keep in (0, 1, 3):
        results = model.complete(source, keep_rows=keep, prompt="a red circle", num_images=3, seed=1, progress=False)
        assert len(results) == 3
        for r in results:
            assert torch.equal(r.codes[:keep], source[:keep])
        assert not torch.equal(results[0].codes[keep:], results[1].codes[keep:])
    greedy = model.complete(source, keep_rows=2, prompt=PROMPTS[0], temperature=0.0, progress=False)[0]
    assert greedy.codes.flatten().tolist() == greedy_direct(model, PROMPTS[0], kept=source[:2].flatten().tolist())
    guided = model.complete(source, keep_rows=2, prompt=PROMPTS[0], temperature=0.0, guidance_scale=2.0,
                            progress=False)[0]
    assert guided.codes.flatten().tolist() == greedy_direct(model, PROMPTS[0], 2.0, source[:2].flatten().tolist())


def test_images_in_pil_and_tensor_form(model):
    results = model.generate(PROMPTS[0], num_images=2, progress=False)
    images = [r.image for r in results]
    pil_scores = model.score(images, PROMPTS[0])
    tensors = torch.stack([pil_to_tensor(i) for i in images])
    torch.testing.assert_close(model.score(tensors, PROMPTS[0]), pil_scores)
    assert len(model.caption(images, max_tokens=2)) == 2
    assert len(model.complete(images[0], keep_rows=1, progress=False)) == 1


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_errors(model):
    from PIL import Image

    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate(["a red circle", "  "], progress=False)
    with pytest.raises(ValueError, match="prompts"):
        model.generate([], progress=False)
    with pytest.raises(ValueError, match="rerank"):
        model.generate("a", num_images=4, rerank=2, progress=False)
    with pytest.raises(ValueError, match="top_p"):
        model.generate("a", top_p=1.5, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        model.generate("a", temperature=-1, progress=False)
    wrong = Image.new("RGB", (CONFIG.image_size + 4, CONFIG.image_size))
    with pytest.raises(ValueError, match=f"takes {CONFIG.image_size}x{CONFIG.image_size}"):
        model.caption([wrong])
    with pytest.raises(ValueError, match="takes"):
        model.score(torch.rand(1, 3, 8, 8), "a")
    with pytest.raises(ValueError, match="code grid"):
        model.score(torch.zeros(SIDE + 1, SIDE + 1, dtype=torch.long), "a")
    with pytest.raises(ValueError, match="outside"):
        model.score(torch.full((SIDE, SIDE), IMAGE_TOKENS, dtype=torch.long), "a")
    with pytest.raises(ValueError, match="text 0 is empty"):
        model.score(random_codes(1), "")
    with pytest.raises(ValueError, match="keep_rows"):
        model.complete(random_codes(1)[0], keep_rows=SIDE)
    with pytest.raises(CheckpointNotFoundError):
        CogView.from_pretrained("/nonexistent/model/dir")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("model") / "tiny"
    model.save_pretrained(path)
    return path


def test_cli_generate_writes_images_grid_and_results(model_dir, tmp_path, model, capsys):
    out = tmp_path / "out"
    code = cli_main(["generate", "a red circle above a blue square", "-n", "3", "--out", str(out), "--model",
                     str(model_dir), "--seed", "5", "--top-k", "50", "--batch-size", "2", "--no-progress"])
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0000.png", "0001.png", "0002.png", "grid.png", "results.json"]
    record = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in record["images"]] == [image_seed(5, "a red circle above a blue square", j)
                                                     for j in range(3)]
    from PIL import Image

    api = model.generate("a red circle above a blue square", num_images=3, seed=5, top_k=50, progress=False)
    with Image.open(out / "0001.png") as png:
        assert torch.equal(pil_to_tensor(png), pil_to_tensor(api[1].image))
    out2 = tmp_path / "rerank"
    assert cli_main(["generate", "a", "b", "-n", "2", "--rerank", "3", "--guidance", "2", "--out", str(out2),
                     "--model", str(model_dir), "--no-progress"]) == 0
    scores = [r["score"] for r in json.loads((out2 / "results.json").read_text())["images"]]
    assert len(scores) == 4 and scores[0] >= scores[1] and scores[2] >= scores[3]


def test_cli_caption_and_evaluate(model_dir, tmp_path, capsys, model):
    from PIL import Image

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for i, (size, caption) in enumerate([(16, "a red circle"), (40, "a blue square\na square, blue"),
                                         (23, "一个红色的圆形")]):
        folder = data / "sub" if i == 2 else data
        Image.new("RGB", (size, size), (200, 10 * i, 30)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption, encoding="utf-8")
    Image.new("RGB", (16, 16)).save(data / "no_caption.png")
    assert cli_main(["caption", str(data / "img0.png"), str(data / "img1.png"), "--model", str(model_dir),
                     "--max-tokens", "3", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(data / "img0.png") + "\t")
    report_file = tmp_path / "report.json"
    assert cli_main(["evaluate", str(data), "--model", str(model_dir), "--json", str(report_file),
                     "--no-progress"]) == 0
    report = json.loads(report_file.read_text())
    assert report["images"] == 3 and report["captions"] == 4 and report["without_caption"] == 1
    assert report["caption_loss"] > 0 and report["perplexity"] > 1 and report["text_tokens"] > 4
    # the loss is the per-token mean of the caption scores
    assert report["mean_score"] * report["captions"] == pytest.approx(-report["caption_loss"] * report["text_tokens"],
                                                                      rel=1e-4)
    from cogview.data import load_image

    pairs = [(data / "img0.png", "a red circle"), (data / "img1.png", "a blue square"),
             (data / "img1.png", "a square, blue"), (data / "sub" / "img2.png", "一个红色的圆形")]
    direct = [float(model.score(load_image(path, CONFIG.image_size), text)) for path, text in pairs]
    assert report["mean_score"] == pytest.approx(sum(direct) / 4, rel=1e-4)
    shapes = evaluate_captions(model, {"name": "shapes", "num_samples": 3}, progress=False)
    assert shapes["images"] == 3 and shapes["caption_loss"] > 0


def test_cli_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COGVIEW_MODEL", raising=False)
    monkeypatch.setattr("cogview.assets.DEFAULT_MODEL", tmp_path / "no-default-model")  # a build without one
    assert cli_main(["generate", "a red circle", "--out", str(tmp_path / "x")]) == 1
    assert "no embedded default model" in capsys.readouterr().err
    assert cli_main(["generate", "a red circle", "--out", str(tmp_path / "x"), "--model", str(tmp_path / "nope")]) == 1
    assert "model directory not found" in capsys.readouterr().err
    assert cli_main(["caption", str(tmp_path / "missing.png"), "--model", str(tmp_path / "nope")]) == 1


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_graph_loop_matches_eager_and_is_batch_invariant():
    model = make_model()
    model.to("cuda")
    tok = model.tokenizer
    prompts = [tok.text_to_image(p) for p in PROMPTS]
    prompts = [x.tokens[: x.prompt_len].tolist() for x in prompts]
    seeds = [11, 12, 13]
    kw = dict(num_new=SIDE * SIDE, image_tokens=IMAGE_TOKENS, pad_id=tok.pad_id, top_k=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # capture must succeed
        graph, _ = sample_image_codes(model.transformer, prompts, seeds, cuda_graph=True, **kw)
    eager, _ = sample_image_codes(model.transformer, prompts, seeds, cuda_graph=False, **kw)
    single, _ = sample_image_codes(model.transformer, prompts[1:2], seeds[1:2], cuda_graph=True, **kw)
    assert torch.equal(graph, eager)
    assert torch.equal(single[0], graph[1])
    greedy = model.generate(PROMPTS[0], temperature=0.0, progress=False)[0].codes.flatten().tolist()
    assert greedy == greedy_direct(model, PROMPTS[0])

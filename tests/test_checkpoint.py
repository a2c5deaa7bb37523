"""Model directories and checkpoint files: bit-exact save/load round trips, loading by assignment onto
the meta device, dtype handling, safetensors interoperability, atomic writes, and clear errors for
missing, truncated, damaged or mismatched files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cogview.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    SafetensorsFile,
    atomic_write_bytes,
    save_safetensors,
)
from cogview.models import CogViewConfig, CogViewTransformer, VQVAE, presets
from cogview.pipeline import (
    CogView,
    load_transformer,
    load_vqvae,
    read_model_directory,
    save_model_dir,
)
from cogview.tokenizer import CogViewTokenizer
from tests._captions import tiny_text_model

TINY = presets["test-tiny"]
CONFIG = CogViewConfig(TINY.transformer.replace(text_tokens=400), TINY.vqvae, "tiny-test")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_model(seed: int = 0) -> CogView:
    torch.manual_seed(seed)
    model = CogView.from_config(CONFIG, tiny_text_model())
    with torch.no_grad():  # non-trivial LayerNorm parameters and codebook statistics
        for p in model.transformer.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
        model.vqvae.quantizer.cluster_size.uniform_(0, 5)
    return model.eval()


def saved(tmp_path, name="model", **kwargs):
    model = make_model()
    path = model.save_pretrained(tmp_path / name, **kwargs)
    return model, path


def assert_states_equal(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model, path = saved(tmp_path, metadata={"trained_steps": 12, "caption_dropout": 0.1})
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "tokenizer.model", "vqvae.safetensors"]
    again = CogView.from_pretrained(path)
    assert again.config == model.config and again.name == "tiny-test"
    assert again.metadata == {"trained_steps": 12, "caption_dropout": 0.1}
    assert_states_equal(model.transformer.state_dict(), again.transformer.state_dict())
    assert_states_equal(model.vqvae.state_dict(), again.vqvae.state_dict())
    assert again.tokenizer == model.tokenizer and again.tokenizer.image_len == 16
    tokens = torch.randint(0, CONFIG.transformer.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.equal(model.transformer(tokens), again.transformer(tokens))
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(model.vqvae.encode(images), again.vqvae.encode(images))
    # saved again, the weights are the same bytes (only the save id differs)
    again.save_pretrained(tmp_path / "again")
    with SafetensorsFile(path / "model.safetensors") as a, SafetensorsFile(tmp_path / "again" / "model.safetensors") as b:
        assert all(torch.equal(a.read(k), b.read(k)) for k in a.keys())


def test_loaded_parameters_are_real_trainable_and_unshared(tmp_path):
    _, path = saved(tmp_path)
    model = CogView.from_pretrained(path)
    params = list(model.transformer.parameters()) + list(model.vqvae.parameters())
    assert all(p.device.type == "cpu" and p.requires_grad for p in params)
    assert not model.transformer.training and not model.vqvae.training
    pointers = [p.data_ptr() for p in model.transformer.parameters()]
    assert len(set(pointers)) == len(pointers)
    loss = model.transformer(torch.randint(0, 100, (1, 8))).float().logsumexp(-1).mean()
    loss.backward()
    assert model.transformer.word_embeddings.weight.grad is not None


def test_loading_builds_on_meta_and_never_initialises(tmp_path, monkeypatch):
    _, path = saved(tmp_path)

    def guard(original):
        def initialise(tensor, *args, **kwargs):
            # torch.nn layers run their init on the meta tensors too (free); real memory must not be touched
            if tensor.device.type != "meta":
                raise AssertionError("weights were initialised on a real device while loading")
            return original(tensor, *args, **kwargs)
        return initialise

    for name in ("normal_", "kaiming_uniform_", "uniform_", "zeros_", "ones_"):
        monkeypatch.setattr(torch.nn.init, name, guard(getattr(torch.nn.init, name)))
    real_randn = torch.randn

    def randn(*args, **kwargs):  # the VQ-VAE's codebook init
        if torch.device(kwargs.get("device") or torch.get_default_device()).type != "meta":
            raise AssertionError("torch.randn on a real device while loading")
        return real_randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", randn)
    model = CogView.from_pretrained(path)
    assert all(p.device.type == "cpu" for p in model.transformer.parameters())


def test_dtypes(tmp_path):
    model, path = saved(tmp_path)
    bf16 = CogView.from_pretrained(path, dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in bf16.transformer.parameters())
    assert torch.equal(bf16.transformer.word_embeddings.weight, model.transformer.word_embeddings.weight.bfloat16())
    assert bf16.vqvae.encoder.blocks[0].weight.dtype == torch.float32
    half_vq = CogView.from_pretrained(path, dtype=torch.float16, vqvae_dtype=torch.bfloat16)
    assert half_vq.vqvae.encoder.blocks[0].weight.dtype == torch.bfloat16
    assert half_vq.vqvae.quantizer.embed.dtype == torch.float32  # the codebook stays float32
    # stored in bf16: loads back as bf16 by default, float32 on request
    model.save_pretrained(tmp_path / "stored-bf16", dtype=torch.bfloat16)
    info = read_model_directory(tmp_path / "stored-bf16")
    assert info.files["model.safetensors"]["dtype"] == "bfloat16"
    stored = CogView.from_pretrained(tmp_path / "stored-bf16")
    assert stored.dtype == torch.bfloat16
    assert_states_equal(stored.transformer.state_dict(), bf16.transformer.state_dict())
    assert CogView.from_pretrained(tmp_path / "stored-bf16", dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        CogView.from_pretrained(path, dtype="int3")


def test_component_loaders_and_vqvae_only_directories(tmp_path):
    model, path = saved(tmp_path)
    transformer = load_transformer(path, dtype="fp16")
    assert isinstance(transformer, CogViewTransformer) and transformer.word_embeddings.weight.dtype == torch.float16
    vq_dir = save_model_dir(tmp_path / "vq", vqvae=model.vqvae, metadata={"epochs": 3})
    assert sorted(os.listdir(vq_dir)) == ["config.json", "vqvae.safetensors"]
    info = read_model_directory(vq_dir)
    assert not info.has_transformer and info.vqvae_config == CONFIG.vqvae and info.metadata == {"epochs": 3}
    vq = load_vqvae(vq_dir)
    assert isinstance(vq, VQVAE)
    assert_states_equal(model.vqvae.state_dict(), vq.state_dict())
    # on CPU the convolutions are loaded channels-last (a faster kernel, the same images); on request not
    def spatial_conv(vqvae):  # (a 1x1 kernel is contiguous in both layouts)
        return next(m.weight for m in vqvae.decoder.modules() if getattr(m, "kernel_size", (1, 1)) != (1, 1))

    assert spatial_conv(vq).is_contiguous(memory_format=torch.channels_last) and not spatial_conv(vq).is_contiguous()
    plain = load_vqvae(vq_dir, channels_last=False)
    assert spatial_conv(plain).is_contiguous()
    codes = torch.randint(0, CONFIG.vqvae.codebook_size, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    images = torch.rand(2, 3, CONFIG.vqvae.image_size, CONFIG.vqvae.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(vq.decode(codes), plain.decode(codes), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vq.encode(images), plain.encode(images), rtol=0, atol=0)
    save_model_dir(tmp_path / "vq-again", vqvae=vq)  # channels-last weights save like any others
    assert_states_equal(model.vqvae.state_dict(), load_vqvae(tmp_path / "vq-again").state_dict())
    with pytest.raises(CheckpointNotFoundError, match="VQ-VAE only"):
        CogView.from_pretrained(vq_dir)
    # state dicts (e.g. gathered from FSDP) need the config
    out = save_model_dir(tmp_path / "sd", vqvae=model.vqvae.state_dict(), transformer=model.transformer.state_dict(),
                         tokenizer=model.tokenizer, config=model.config)
    assert_states_equal(model.transformer.state_dict(), CogView.from_pretrained(out).transformer.state_dict())
    with pytest.raises(CheckpointMismatchError, match="save_model_dir: transformer.*missing: layers.1"):
        partial = {k: v for k, v in model.transformer.state_dict().items() if not k.startswith("layers.1.")}
        save_model_dir(tmp_path / "bad", vqvae=model.vqvae, transformer=partial, tokenizer=model.tokenizer,
                       config=model.config)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="pass `config`"):
        save_model_dir(tmp_path / "x", vqvae=model.vqvae.state_dict())
    with pytest.raises(ValueError, match="needs its `tokenizer`"):
        save_model_dir(tmp_path / "x", vqvae=model.vqvae, transformer=model.transformer)


def test_tokenizer_must_fit_the_model():
    other = CogViewTokenizer(tiny_text_model(), image_tokens=64)
    model = make_model()
    with pytest.raises(ValueError, match="does not match the transformer"):
        CogView(model.transformer, model.vqvae, other)


# ---------------------------------------------------------------------------------------------
# safetensors files
# ---------------------------------------------------------------------------------------------


def test_our_files_are_plain_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).bfloat16(),
               "d": torch.tensor(1.5, dtype=torch.float16), "e": torch.zeros(0, 4), "f": torch.tensor([True, False]),
               "g": torch.randn(4, 6).t()}  # non-contiguous
    save_safetensors(tmp_path / "x.safetensors", tensors, {"note": "hi"})
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata()["note"] == "hi"
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert f.has_checksums
        for k, v in tensors.items():
            got = f.read(k)
            assert got.dtype == v.dtype and torch.equal(got, v), k
    # and files written by the safetensors package read back here (nothing to verify without checksums)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "y.safetensors"))
    with SafetensorsFile(tmp_path / "y.safetensors") as f:
        assert not f.has_checksums
        assert all(torch.equal(f.read(k), v) for k, v in tensors.items())


def test_save_casts_floating_tensors_only(tmp_path):
    save_safetensors(tmp_path / "x.safetensors", {"w": torch.randn(4), "i": torch.arange(3)}, dtype=torch.float16)
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        assert f.dtype("w") == torch.float16 and f.dtype("i") == torch.int64
    with pytest.raises(ValueError, match="meta device"):
        save_safetensors(tmp_path / "m.safetensors", {"w": torch.empty(2, device="meta")})


def test_atomic_writes_leave_the_old_file_on_failure(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors(path, {"w": torch.ones(3)})
    before = path.read_bytes()

    class Exploding(dict):
        calls = 0

        def __getitem__(self, key):
            Exploding.calls += 1
            if Exploding.calls > 2:  # fails while the data is being written
                raise RuntimeError("disk on fire")
            return super().__getitem__(key)

    with pytest.raises(RuntimeError, match="disk on fire"):
        save_safetensors(path, Exploding(w=torch.zeros(3), v=torch.zeros(5)))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["x.safetensors"]  # no temporary file left behind
    atomic_write_bytes(tmp_path / "new" / "file.bin", b"abc")
    assert (tmp_path / "new" / "file.bin").read_bytes() == b"abc"


def test_saving_into_an_existing_directory_keeps_other_files(tmp_path):
    model, path = saved(tmp_path)
    (path / "metrics.jsonl").write_text("{}\n")
    other = make_model(seed=1)
    other.save_pretrained(path)
    loaded = CogView.from_pretrained(path)
    assert_states_equal(other.transformer.state_dict(), loaded.transformer.state_dict())
    assert (path / "metrics.jsonl").read_text() == "{}\n"


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="not found") as info:
        CogView.from_pretrained(tmp_path / "nope")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="config.json is missing"):
        CogView.from_pretrained(tmp_path / "empty")
    for name in ("model.safetensors", "vqvae.safetensors", "tokenizer.model"):
        _, path = saved(tmp_path, name=f"without-{name}")
        (path / name).unlink()
        with pytest.raises(CheckpointNotFoundError, match=f"{name} is missing"):
            CogView.from_pretrained(path)


def test_truncated_weights(tmp_path):
    _, path = saved(tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 100, 5, 0):
        file.write_bytes(data[:cut])
        with pytest.raises(CheckpointCorruptError, match="truncated|not a safetensors"):
            CogView.from_pretrained(path)


def test_damaged_weights(tmp_path):
    _, path = saved(tmp_path)
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    flipped = bytearray(data)
    flipped[-10] ^= 0x40  # one bit in the last tensor's data
    file.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointCorruptError, match="checksum mismatch in 'final_layernorm.bias'"):
        CogView.from_pretrained(path)
    CogView.from_pretrained(path, verify=False)  # readable when asked not to verify
    header = bytearray(data)
    header[12] = ord("}")  # break the JSON header
    file.write_bytes(bytes(header))
    with pytest.raises(CheckpointCorruptError, match="damaged header"):
        CogView.from_pretrained(path)
    file.write_bytes(b"garbage" * 100)
    with pytest.raises(CheckpointCorruptError):
        CogView.from_pretrained(path)


def test_damaged_config_json(tmp_path):
    _, path = saved(tmp_path)
    config = path / "config.json"
    original = json.loads(config.read_text())
    config.write_text("{not json")
    with pytest.raises(CheckpointCorruptError, match="not valid JSON"):
        CogView.from_pretrained(path)
    config.write_text(json.dumps({**original, "format": "something-else"}))
    with pytest.raises(CheckpointCorruptError, match="not a cogview model config"):
        CogView.from_pretrained(path)
    config.write_text(json.dumps({**original, "format_version": 99}))
    with pytest.raises(CheckpointError, match="newer than this cogview supports"):
        CogView.from_pretrained(path)
    config.write_text(json.dumps({**original, "transformer": {**original["transformer"], "hidden_size": 63}}))
    with pytest.raises(CheckpointError, match="invalid model config.*not a multiple of num_heads"):
        CogView.from_pretrained(path)


def test_config_that_does_not_match_the_weights(tmp_path):
    _, path = saved(tmp_path)
    config = path / "config.json"
    original = json.loads(config.read_text())
    t = original["transformer"]
    config.write_text(json.dumps({**original, "transformer": {**t, "num_layers": 3}}))
    with pytest.raises(CheckpointMismatchError, match=r"missing: layers\.2\."):
        CogView.from_pretrained(path)
    config.write_text(json.dumps({**original, "transformer": {**t, "num_layers": 1}}))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected: layers\.1\."):
        CogView.from_pretrained(path)
    config.write_text(json.dumps({**original, "transformer": {**t, "hidden_size": 32, "mlp_size": 128}}))
    with pytest.raises(CheckpointMismatchError, match=r"word_embeddings.weight is \(\d+, 64\) but the config needs "
                                                      r"\(\d+, 32\)"):
        CogView.from_pretrained(path)
    # a tokenizer with more pieces than the config has text ids
    config.write_text(json.dumps({**original, "transformer": {**t, "text_tokens": 300, "vocab_rows": None}}))
    with pytest.raises(CheckpointMismatchError, match="tokenizer.model does not fit the config"):
        CogView.from_pretrained(path)


def test_mixed_directories_are_detected(tmp_path):
    _, path = saved(tmp_path, name="one")
    _, other = saved(tmp_path, name="two")
    (path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointMismatchError, match="different save"):
        CogView.from_pretrained(path)
    _, path = saved(tmp_path, name="three")
    (path / "tokenizer.model").write_bytes(CogViewTokenizer.train(["a b c d"] * 5, 300, image_tokens=32).model_bytes)
    with pytest.raises(CheckpointMismatchError, match="sha256 differs"):
        CogView.from_pretrained(path)


# ---------------------------------------------------------------------------------------------
# Memory: loading by assignment holds the weights once
# ---------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from cogview.models import CogViewTransformer, presets
    from cogview.pipeline import load_transformer
    def status_mb(key):  # VmRSS now, VmHWM peak (of this process image: ru_maxrss would include the parent's)
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024
    with torch.device("meta"):  # warm-up: the first meta-device construction sets up ~70 MB of torch machinery
        CogViewTransformer(presets["test-tiny"].transformer)
    try:  # reset the peak to now, so VmHWM measures the load alone
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = status_mb("VmRSS")
    model = load_transformer(sys.argv[1], dtype=sys.argv[2])
    peak = status_mb("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(base, peak, weights)
""")


def test_loading_does_not_hold_the_weights_twice(tmp_path):
    # ~150 MB of float32 weights, stored in fp16, loaded as bf16 (the 4B load in miniature)
    config = CogViewConfig(CONFIG.transformer.replace(num_layers=4, hidden_size=512, num_heads=8,
                                                      text_tokens=30000), CONFIG.vqvae.replace(codebook_size=32))
    transformer = CogViewTransformer(config.transformer)
    save_model_dir(tmp_path / "m", vqvae=VQVAE(config.vqvae), transformer=transformer,
                   tokenizer=CogViewTokenizer.for_config(tiny_text_model(), config), config=config, dtype="fp16")
    del transformer
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path / "m"), "bf16"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    base, peak, weights = map(float, run.stdout.split())
    assert weights > 25
    # one copy of the weights plus one tensor in flight (the largest is the embedding, ~1/2 of it here)
    assert peak - base < 1.7 * weights, f"load peak {peak - base:.0f} MB for {weights:.0f} MB of weights"

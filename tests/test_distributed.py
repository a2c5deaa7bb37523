"""Several processes on the CPU (gloo): DDP and FSDP2 runs match one process with the same global batch,
and their checkpoints (sharded under FSDP) resume in a single process.

Tolerance: the global batch is split across processes, so gradients are summed in another order; losses
of the first steps agree to a relative 1e-5 (measured: ~1e-7) and final parameters (AdamW, lr 2e-3, 4 steps) to 5e-5.
"""
from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cogview.data import ShapesDataset
from cogview.data.tokenize import tokenize_dataset
from cogview.training import train_transformer, train_vqvae

WORLD = 2
TIMEOUT_S = 240
QUIET = dict(progress=False, tensorboard=False, threads=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for kind, settings in jobs:
            (train_transformer if kind == "transformer" else train_vqvae)(**settings)
    finally:
        dist.destroy_process_group()


def _run_processes(jobs: list) -> None:
    context = mp.start_processes(_worker, args=(WORLD, _free_port(), jobs), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the {WORLD}-process run did not finish within {TIMEOUT_S} s")


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "training" / "metrics.jsonl").read_text().splitlines()]


def _close_states(a: dict, b: dict, atol: float = 5e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One session of 2-process runs (DDP and FSDP transformer, DDP VQ-VAE) and their 1-process twins."""
    root = tmp_path_factory.mktemp("dist")
    # No dead-code restarts here: they re-seed codes from rank 0's recent encoder outputs (half the batch),
    # so with restarts a multi-process run is valid but not the single-process one.
    vq = dict(data={"name": "shapes", "num_samples": 64, "resolution": 16}, model="test-x4", resolution=16, steps=4,
              batch_size=8, lr=3e-3, warmup_steps=1, log_every=1, checkpoint_every=2, grid_images=2,
              model_overrides={"restart_window": 0.0}, **QUIET)
    train_vqvae(output=str(root / "vq1"), **vq)
    from cogview.pipeline import load_vqvae

    tokens = root / "tokens"
    tokenize_dataset(ShapesDataset(32, resolution=16), load_vqvae(root / "vq1"), tokens, batch_size=16,
                     progress=False, log=None, vqvae_path=root / "vq1")
    tf = dict(data=str(tokens), model="test-tiny", steps=4, batch_size=8, lr=2e-3, warmup_steps=1, log_every=1,
              checkpoint_every=2, model_overrides={"text_tokens": 400, "max_positions": 80}, text_vocab_size=400,
              caption_ratio=0.3, caption_dropout=0.2, **QUIET)
    train_transformer(output=str(root / "tf1"), **tf)
    _run_processes([
        ("transformer", dict(tf, output=str(root / "tf_ddp"), distributed="ddp")),
        ("transformer", dict(tf, output=str(root / "tf_fsdp"), distributed="fsdp", accumulation=2)),
        ("vqvae", dict(vq, output=str(root / "vq_ddp"), distributed="ddp")),
        ("vqvae", dict(vq, output=str(root / "vq_fsdp"), distributed="fsdp")),
    ])
    return root, tf, vq


@pytest.mark.parametrize("name", ["tf_ddp", "tf_fsdp"])
def test_transformer_processes_match_one_process(runs, name):
    from cogview.pipeline import CogView

    root, _, _ = runs
    one, many = _metrics(root / "tf1"), _metrics(root / name)
    assert [r["step"] for r in many] == [1, 2, 3, 4]
    for a, b in zip(one, many):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert b["tok_per_s"] > 0
    single = CogView.from_pretrained(root / "tf1")
    multi = CogView.from_pretrained(root / name)
    assert single.tokenizer == multi.tokenizer
    _close_states(single.transformer.state_dict(), multi.transformer.state_dict())
    if name == "tf_fsdp":  # sharded checkpoint: one data file per process
        files = list((root / name / "training" / "checkpoints" / "step-00000004").glob("*.distcp"))
        assert len(files) == WORLD


@pytest.mark.parametrize("name", ["tf_ddp", "tf_fsdp"])
def test_multi_process_checkpoints_resume_in_one_process(runs, name, tmp_path):
    from cogview.pipeline import load_transformer

    root, tf, _ = runs
    checkpoint = root / name / "training" / "checkpoints" / "step-00000002"
    train_transformer(**dict(tf, output=str(tmp_path / "resumed"), resume=str(checkpoint)))
    resumed, one = _metrics(tmp_path / "resumed"), _metrics(root / "tf1")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(one[2:], resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    _close_states(load_transformer(root / "tf1").state_dict(), load_transformer(tmp_path / "resumed").state_dict())


@pytest.mark.parametrize("name", ["vq_ddp", "vq_fsdp"])
def test_vqvae_processes_match_one_process(runs, name, tmp_path):
    from cogview.pipeline import load_vqvae

    root, _, vq = runs
    one, many = _metrics(root / "vq1"), _metrics(root / name)
    for a, b in zip(one, many):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    # The EMA codebook statistics are all-reduced: every process kept the single-process codebook.
    _close_states(load_vqvae(root / "vq1").state_dict(), load_vqvae(root / name).state_dict(), atol=1e-4)
    assert (root / name / "training" / "samples" / "recon-00000004.png").is_file()
    train_vqvae(**dict(vq, output=str(tmp_path / "resumed"),
                       resume=str(root / name / "training" / "checkpoints" / "step-00000002")))
    assert [r["step"] for r in _metrics(tmp_path / "resumed")] == [3, 4]


def test_torchrun_cli_fsdp_then_resume_in_one_process(runs, tmp_path):
    """The documented path: `torchrun ... -m cogview.cli train --distributed fsdp`, stopped early, then the
    sharded checkpoint finished by a plain single-process `cogview train --resume`."""
    import subprocess
    import sys

    from cogview.cli import main
    from cogview.pipeline import load_transformer

    root, tf, _ = runs
    out = tmp_path / "run"
    flags = ["--data", tf["data"], "--output", str(out), "--model", "test-tiny", "--model-overrides",
             json.dumps(tf["model_overrides"]), "--text-vocab-size", "400", "--steps", "4", "--batch-size", "8",
             "--lr", "2e-3", "--warmup-steps", "1", "--log-every", "1", "--checkpoint-every", "2",
             "--caption-ratio", "0.3", "--caption-dropout", "0.2", "--no-progress", "--no-tensorboard",
             "--threads", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", "-m",
           "cogview.cli", "train", *flags, "--distributed", "fsdp", "--stop-at", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent), env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "training" / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert not (out / "config.json").exists()
    assert main(["train", *flags, "--resume"]) == 0
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]
    for a, b in zip(_metrics(root / "tf1"), _metrics(out)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    _close_states(load_transformer(root / "tf1").state_dict(), load_transformer(out).state_dict())

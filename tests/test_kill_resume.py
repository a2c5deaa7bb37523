"""SIGKILL a training run at random moments and resume it (issue 14).

A real `cogview train-vqvae` process (tiny model, a checkpoint every step, so kills land inside
checkpoint writes as well as between them) is killed with SIGKILL twice, at random steps and random
moments within them, and resumed with --resume each time. After every kill, no checkpoint may be
half-written: each `step-N/` folder is complete (trainer.json, every file its .metadata names, at
its full length, and the rank file), `latest` names a complete one, and only `.tmp` folders may be
partial. The resumed run must end with exactly the parameters (and logged losses) of an
uninterrupted run.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
STEPS = 12
SETTINGS = {
    "model": "test-x4", "resolution": 16, "steps": STEPS, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2,
    "log_every": 1, "checkpoint_every": 1, "keep_checkpoints": 2, "grid_images": 0, "progress": False,
    "tensorboard": False, "threads": 1, "data": {"name": "shapes", "num_samples": 64, "resolution": 16},
    # Frequent dead-code restarts: the global RNG and the quantizer's buffers must resume exactly too.
    "model_overrides": {"restart_window": 0.5},
}


def _metrics(run: Path) -> list[dict]:
    path = run / "training" / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by the kill
            pass
    return records


def _check_checkpoints(directory: Path) -> list[str]:
    """Every non-.tmp checkpoint folder is complete; returns the complete ones' names."""
    from torch.distributed.checkpoint import FileSystemReader

    complete = []
    for folder in sorted(directory.glob("step-*")):
        if folder.name.endswith(".tmp"):
            continue  # a save in progress when the process died: ignored by resume
        assert (folder / "trainer.json").is_file(), f"{folder} has no trainer.json: half-written checkpoint"
        state = json.loads((folder / "trainer.json").read_text())
        assert state["step"] == int(folder.name.split("-")[1])
        assert (folder / "rank-00000.pt").is_file(), folder
        torch.load(folder / "rank-00000.pt", weights_only=True)
        metadata = FileSystemReader(str(folder)).read_metadata()
        for info in metadata.storage_data.values():
            data = folder / info.relative_path
            assert data.is_file() and data.stat().st_size >= info.offset + info.length, f"{data} is truncated"
        complete.append(folder.name)
    pointer = directory / "latest"
    if pointer.exists():
        assert pointer.read_text().strip() in complete, f"`latest` names {pointer.read_text()!r}, not {complete}"
    return complete


def _run_cli(config: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    """`cogview train-vqvae` in a process of its own, its output to `log` (a file: a pipe nobody reads
    could fill up and stall it)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "cogview.cli", "train-vqvae", "--config", str(config),
                                 "--output", str(out), *extra], cwd=str(ROOT), env=env, stdout=f,
                                stderr=subprocess.STDOUT)


def _kill_at(proc: subprocess.Popen, out: Path, step: int, delay: float, timeout: float = 900.0) -> int:
    """SIGKILL `proc` `delay` seconds after its metrics show `step`; returns the last logged step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the training run ended before step {step} (rc {proc.returncode})")
        logged = [r["step"] for r in _metrics(out)]
        if logged and max(logged) >= step:
            break
        time.sleep(0.005)
    else:
        proc.kill()
        pytest.fail(f"no step {step} within {timeout}s")
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    return max(r["step"] for r in _metrics(out))


def test_sigkill_and_resume_ends_with_the_uninterrupted_parameters(tmp_path):
    from cogview.pipeline import load_vqvae
    from cogview.training import train_vqvae
    from cogview.training.state import CheckpointManager
    from cogview.training.distributed import DistEnv

    config = tmp_path / "vq.json"
    config.write_text(json.dumps(SETTINGS))
    full = tmp_path / "full"
    previous_threads = torch.get_num_threads()
    try:
        train_vqvae(output=str(full), **SETTINGS)
    finally:
        torch.set_num_threads(previous_threads)

    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    out = tmp_path / "killed"
    checkpoints = out / "training" / "checkpoints"
    kill_steps = sorted(rng.sample(range(2, STEPS - 1), 2))
    for round_, step in enumerate(kill_steps):
        proc = _run_cli(config, out, tmp_path / f"round{round_}.log", *(["--resume"] if round_ else []))
        delay = rng.uniform(0.0, 0.06)
        reached = _kill_at(proc, out, step, delay)
        complete = _check_checkpoints(checkpoints)
        assert complete, f"killed at step {reached} (asked {step}, +{delay:.3f}s) with no complete checkpoint"
        latest = CheckpointManager(checkpoints, DistEnv()).latest()
        assert latest is not None and latest.name == complete[-1]
        assert not (out / "vqvae.safetensors").exists() and not (out / "config.json").exists()
    proc = _run_cli(config, out, tmp_path / "final.log", "--resume")
    proc.wait(timeout=900)
    output = (tmp_path / "final.log").read_text()
    assert proc.returncode == 0, output
    assert "resumed from" in output
    _check_checkpoints(checkpoints)

    a, b = load_vqvae(full).state_dict(), load_vqvae(out).state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"after kills at steps {kill_steps} these differ from the uninterrupted run: {different}"
    # The metrics of the killed run (lines after each resumed checkpoint are rewritten) equal the full run's.
    assert [(r["step"], r["loss"]) for r in _metrics(out)] == [(r["step"], r["loss"]) for r in _metrics(full)]


def test_resume_ignores_partial_checkpoints(tmp_path):
    """A leftover .tmp folder, a checkpoint folder without its trainer.json and a `latest` naming a folder
    that is gone are never resumed from: the newest complete checkpoint is."""
    from cogview.training.distributed import DistEnv
    from cogview.training.state import CheckpointManager

    directory = tmp_path / "checkpoints"
    for step, complete in ((3, True), (4, True), (5, False)):
        folder = directory / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / ".metadata").write_bytes(b"x")
        if complete:
            (folder / "trainer.json").write_text(json.dumps({"step": step, "position": step * 8}))
    (directory / "step-00000006.tmp").mkdir()
    (directory / "step-00000006.tmp" / "trainer.json").write_text("{}")
    manager = CheckpointManager(directory, DistEnv())
    (directory / "latest").write_text("step-00000005\n")  # incomplete
    assert manager.latest().name == "step-00000004"
    (directory / "latest").write_text("step-00000009\n")  # gone
    assert manager.latest().name == "step-00000004"
    (directory / "latest").write_bytes(b"\xff\xfe garbage")
    assert manager.latest().name == "step-00000004"
    (directory / "latest").unlink()
    assert manager.latest().name == "step-00000004"
    (directory / "latest").write_text("step-00000003\n")  # a complete one: as named
    assert manager.latest().name == "step-00000003"
    assert manager.resolve(str(tmp_path / "checkpoints")).name == "step-00000003"
    with pytest.raises(FileNotFoundError):
        manager.resolve(str(directory / "step-00000005"))

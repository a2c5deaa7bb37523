"""Resumable training checkpoints: torch.distributed.checkpoint for model + optimizer, small files for the rest.

    OUTPUT/training/checkpoints/
        step-00000500/
            .metadata, __*.distcp    model and optimizer state (torch.distributed.checkpoint; sharded under
                                     FSDP, so no process ever holds a full copy; re-shards on load, so a
                                     checkpoint of N processes resumes in M)
            trainer.json             step, data position, scheduler, loss scaler, metrics state, config
            rank-00000.pt ...        per-process state: RNG states, the VQ-VAE quantizer's restart bookkeeping
                                     (tensors only; read with torch.load(weights_only=True))
        latest                       the name of the newest complete checkpoint

Atomicity: every process writes into `step-N.tmp/`; after a barrier rank 0 adds trainer.json, renames the
folder to `step-N/` and then rewrites `latest` (itself atomically). A crash at any point leaves the
previous checkpoint and `latest` intact; a leftover `.tmp` folder is ignored and cleared by the next save.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from cogview.checkpoint import atomic_write_text
from cogview.training.distributed import DistEnv, barrier, broadcast_object

__all__ = ["CheckpointManager", "rng_state", "set_rng_state", "full_model_state_dict"]

LATEST = "latest"
TRAINER_FILE = "trainer.json"


def rng_state() -> dict[str, torch.Tensor]:
    """The process's RNG states (torch CPU and CUDA, numpy's and Python's global generators) as tensors."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    state["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    state["numpy_pos"] = torch.tensor([np_state[2], np_state[3]], dtype=torch.int64)
    state["numpy_gauss"] = torch.tensor([np_state[4]], dtype=torch.float64)
    py = random.getstate()
    state["python"] = torch.tensor(list(py[1]), dtype=torch.int64)
    state["python_version"] = torch.tensor([py[0]], dtype=torch.int64)
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy_keys" in state:
        pos = state["numpy_pos"].tolist()
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos[0]), int(pos[1]),
                             float(state["numpy_gauss"][0])))
    if "python" in state:
        random.setstate((int(state["python_version"][0]), tuple(int(v) for v in state["python"].tolist()), None))


def full_model_state_dict(model: torch.nn.Module, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) model state dict on the CPU of rank 0 (None elsewhere); a collective call
    under FSDP, so every rank must make it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return state if env.is_main else None


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    return ctx


class CheckpointManager:
    """Saves and finds resumable checkpoints in `directory` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, env: DistEnv, keep: int = 2):
        self.directory = Path(directory)
        self.env = env
        self.keep = keep

    @staticmethod
    def name(step: int) -> str:
        return f"step-{step:08d}"

    def latest(self) -> Path | None:
        pointer = self.directory / LATEST
        if not pointer.is_file():
            return None
        path = self.directory / pointer.read_text().strip()
        return path if (path / TRAINER_FILE).is_file() else None

    def resolve(self, resume) -> Path | None:
        """The checkpoint folder meant by --resume ('latest' / True, or a path); None when 'latest' finds none."""
        if resume in (None, False):
            return None
        if resume in (True, "latest", "auto"):
            return self.latest()
        path = Path(resume)
        if (path / TRAINER_FILE).is_file():
            return path
        if (path / "training" / "checkpoints" / LATEST).is_file():  # a run directory
            return CheckpointManager(path / "training" / "checkpoints", self.env).latest()
        if (path / LATEST).is_file():  # a checkpoints directory
            return CheckpointManager(path, self.env).latest()
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint (no {TRAINER_FILE}), run directory or "
                                f"checkpoints folder")

    # ---- save ----
    def save(self, step: int, model, optimizer, trainer_state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        final = self.directory / self.name(step)
        tmp = self.directory / (self.name(step) + ".tmp")
        if self.env.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier(self.env)
        ctx = _quiet()
        try:
            model_state, optim_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
        finally:
            ctx.__exit__(None, None, None)
        torch.save(rank_state, tmp / f"rank-{self.env.rank:05d}.pt")
        barrier(self.env)
        if self.env.is_main:
            state = dict(trainer_state, step=step, world_size=self.env.world_size,
                         has_optimizer_state=bool(optimizer.state))
            (tmp / TRAINER_FILE).write_text(json.dumps(state, indent=2, ensure_ascii=False) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(self.directory / LATEST, final.name + "\n")
            self._prune(keep_name=final.name)
        barrier(self.env)
        return final

    def _prune(self, keep_name: str) -> None:
        done = sorted(p for p in self.directory.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-self.keep]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)

    # ---- load ----
    def load(self, path: Path, model, optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore model and optimizer in place; returns (trainer_state, this rank's state). A checkpoint
        from the same number of processes restores each rank's own state; otherwise every rank gets
        rank 0's (RNG streams then differ from an uninterrupted run; the data order does not)."""
        trainer_state = json.loads((path / TRAINER_FILE).read_text())
        ctx = _quiet()
        try:
            if trainer_state.get("has_optimizer_state", True):
                model_state, optim_state = get_state_dict(model, optimizer)
                state = {"model": model_state, "optim": optim_state}
                dcp.load(state, checkpoint_id=str(path))
                set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            else:  # saved before the first optimizer step: nothing to restore there
                model_state = get_model_state_dict(model)
                state = {"model": model_state}
                dcp.load(state, checkpoint_id=str(path))
                set_model_state_dict(model, state["model"])
                optimizer.state.clear()
        finally:
            ctx.__exit__(None, None, None)
        own = path / f"rank-{self.env.rank:05d}.pt"
        same_world = trainer_state.get("world_size") == self.env.world_size
        rank_file = own if (same_world and own.is_file()) else path / "rank-00000.pt"
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=True) if rank_file.is_file() else {}
        rank_state["_same_world"] = same_world
        return trainer_state, rank_state

    def find_resume(self, resume) -> Path | None:
        """`resolve` on rank 0, shared with every rank (so all processes agree)."""
        path = self.resolve(resume) if self.env.is_main else None
        path = broadcast_object(str(path) if path is not None else None, self.env)
        return Path(path) if path is not None else None

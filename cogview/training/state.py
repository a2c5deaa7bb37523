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

Atomicity: every process writes into `step-N.tmp/`; after a barrier rank 0 adds trainer.json, fsyncs every
file, renames the folder to `step-N/` and then rewrites `latest` (itself atomically). A crash at any point
(even a SIGKILL or a power cut) leaves the previous checkpoint and `latest` intact; a leftover `.tmp` folder
is ignored and cleared by the next save. A checkpoint folder counts only when it has its trainer.json
(written last); when `latest` names none such, resuming takes the newest complete `step-N/` instead.
Loading a damaged checkpoint raises CheckpointCorruptError naming the file.
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
from torch.distributed.checkpoint.api import CheckpointException  # (a BaseException)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from cogview.checkpoint import CheckpointCorruptError, atomic_write_text, fsync_dir
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""


def _fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders themselves."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_dir(path)


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

    def complete(self) -> list[Path]:
        """The complete checkpoint folders (with their trainer.json), oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("step-*")
                      if p.is_dir() and not p.name.endswith(".tmp") and (p / TRAINER_FILE).is_file())

    def latest(self) -> Path | None:
        """The checkpoint `latest` names; the newest complete one when it names none (missing or unreadable
        pointer, or a folder that is gone or incomplete); None when there is no complete checkpoint."""
        pointer = self.directory / LATEST
        if pointer.is_file():
            try:
                name = pointer.read_text().strip()
            except (OSError, UnicodeDecodeError):
                name = ""
            path = self.directory / name
            if name and "/" not in name and (path / TRAINER_FILE).is_file():
                return path
        done = self.complete()
        return done[-1] if done else None

    def resolve(self, resume) -> Path | None:
        """The checkpoint folder meant by --resume ('latest' / True, or a path); None when 'latest' finds none."""
        if resume in (None, False):
            return None
        if resume in (True, "latest", "auto"):
            return self.latest()
        path = Path(resume)
        if (path / TRAINER_FILE).is_file():
            return path
        if (path / "training" / "checkpoints").is_dir():  # a run directory
            found = CheckpointManager(path / "training" / "checkpoints", self.env).latest()
            if found is not None:
                return found
        if (path / LATEST).is_file() or path.name == "checkpoints":  # a checkpoints directory
            found = CheckpointManager(path, self.env).latest()
            if found is not None:
                return found
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
            _fsync_tree(tmp)  # the data is on disk before the folder gets its final name
            if final.exists():  # (re-saving a step: the pointer must not name a folder that is going away)
                previous = [p for p in self.complete() if p != final]
                if previous:
                    atomic_write_text(self.directory / LATEST, previous[-1].name + "\n")
                shutil.rmtree(final)
            # The pointer first: until the rename it names no complete folder, so `latest()` falls back to
            # the newest complete one, and no kill can leave it naming an older checkpoint than that.
            atomic_write_text(self.directory / LATEST, final.name + "\n")
            os.replace(tmp, final)
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
        rank 0's (RNG streams then differ from an uninterrupted run; the data order does not).
        A damaged checkpoint raises CheckpointCorruptError naming the file."""
        trainer_file = path / TRAINER_FILE
        try:
            trainer_state = json.loads(trainer_file.read_text(encoding="utf-8"))
            if not isinstance(trainer_state, dict) or "step" not in trainer_state or "position" not in trainer_state:
                raise ValueError("not a trainer state (no step / position)")
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise CheckpointCorruptError(f"{trainer_file}: damaged training checkpoint ({error}); resume from "
                                         f"another checkpoint (pass its folder to --resume)") from None
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
        except CheckpointCorruptError:
            raise
        except (Exception, CheckpointException) as error:  # damaged .distcp / .metadata: say which checkpoint
            raise CheckpointCorruptError(f"{path}: the model/optimizer state of this training checkpoint cannot be "
                                         f"read ({type(error).__name__}: {_first_line(error)}); resume from another "
                                         f"checkpoint (pass its folder to --resume)") from error
        finally:
            ctx.__exit__(None, None, None)
        own = path / f"rank-{self.env.rank:05d}.pt"
        same_world = trainer_state.get("world_size") == self.env.world_size
        rank_file = own if (same_world and own.is_file()) else path / "rank-00000.pt"
        try:
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True) if rank_file.is_file() else {}
        except Exception as error:
            raise CheckpointCorruptError(f"{rank_file}: damaged training checkpoint ({type(error).__name__}: "
                                         f"{_first_line(error)})") from error
        rank_state["_same_world"] = same_world
        return trainer_state, rank_state

    def find_resume(self, resume) -> Path | None:
        """`resolve` on rank 0, shared with every rank (so all processes agree)."""
        path = self.resolve(resume) if self.env.is_main else None
        path = broadcast_object(str(path) if path is not None else None, self.env)
        return Path(path) if path is not None else None

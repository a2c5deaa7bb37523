"""The training loop shared by the VQ-VAE and transformer trainers.

One optimizer step = `accumulation` micro-batches on each of `world_size` processes, covering exactly
`batch_size` samples of the deterministic data stream (cogview.data.loader). The loss of a step is the
weighted mean over the whole global batch: each micro-batch reports its mean loss and its weight (images,
or the summed token weights of CogView's loss), the weights are summed over all micro-batches and
processes first (one all-reduce), and each micro-batch back-propagates mean * weight / total * world_size
(DDP and FSDP average gradients over processes). So a step computes the same gradient however the batch
is split, up to floating-point summation order.

Around it: AdamW with linear warm-up and cosine decay, gradient clipping, bf16 autocast or fp16 autocast
with a GradScaler, DDP or FSDP2 under torchrun, atomic resumable checkpoints (cogview.training.state)
every N steps, at the end, at --stop-at and on SIGINT/SIGTERM, metrics as JSONL (and TensorBoard when
installed), and a tqdm bar with loss and throughput.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cogview.data.loader import DataOrder, MicroBatchSampler, SkipTally, make_loader
from cogview.training.config import TrainConfig
from cogview.training.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    init_distributed,
    shutdown_distributed,
    wrap_model,
)
from cogview.training.state import CheckpointManager, rng_state, set_rng_state

__all__ = ["Trainer", "lr_multiplier", "MetricsWriter"]


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate factor at `step` (0-based: the factor used by optimizer step step+1): linear warm-up
    to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class MetricsWriter:
    """metrics.jsonl (one JSON object per logged step) and, when installed, TensorBoard events."""

    def __init__(self, directory: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = directory / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        directory.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():  # drop lines a crashed run wrote after the checkpoint
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
            self.path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(directory / "tensorboard"))
            except (ImportError, ModuleNotFoundError):
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _StopFlag:
    """Set by SIGINT/SIGTERM: the loop checkpoints at the end of the current step and stops."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: give up at once
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, previous)


class Trainer:
    """Base trainer. Subclasses implement:

    setup()                    build self.dataset and self.module (the loss module: forward(prepared) ->
                               (mean loss, {metric: mean}) ), self.shard_units (FSDP units)
    prepare(batch)             a collated micro-batch -> what forward takes (on the device)
    batch_weight(prepared)     the micro-batch's weight in the global mean (0: empty)
    batch_items(prepared)      what throughput counts (images, tokens)
    dummy(prepared)            a stand-in for an empty micro-batch when other processes need the collectives
    rank_state()/load_rank_state(state)      per-process state beyond RNGs
    extra_state()/load_extra_state(state)    JSON-able trainer state
    periodic(step, final)      sample grids (called on every process)
    export()                   write the model directory (called on every process; returns its path)
    """

    unit = "items"
    log_name = "train"

    def __init__(self, config: TrainConfig, *, log=print):
        if not config.output:
            raise ValueError("--output is required: the run directory")
        self.config = config
        self.output = Path(config.output)
        self.train_dir = self.output / "training"
        self._log = log
        self.env: DistEnv | None = None
        self.skips = SkipTally()  # this process's skipped items (examples for the report)
        self.skipped_total = 0  # all processes, all steps (kept on every process)
        self.shard_units: list[nn.Module] = []

    # ---- helpers for subclasses ----
    def log(self, message: str) -> None:
        if self._log and (self.env is None or self.env.is_main):
            self._log(f"[{self.log_name}] {message}")

    @property
    def device(self) -> torch.device:
        return self.env.device

    def autocast(self):
        precision = self.config.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # ---- hooks (defaults) ----
    def setup(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, batch: dict):  # pragma: no cover - abstract
        raise NotImplementedError

    def batch_weight(self, prepared) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def batch_items(self, prepared) -> float:
        return self.batch_weight(prepared)

    def dummy(self, prepared):
        raise RuntimeError(f"{type(self).__name__}: a micro-batch was empty on one process")

    def rank_state(self) -> dict[str, Any]:
        return {}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        pass

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def periodic(self, step: int, final: bool) -> None:
        pass

    def export(self) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe_skipped(self, index: int):
        path = getattr(self.dataset, "path", None)
        return path(index) if callable(path) else index

    # ---- optimizer ----
    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        c = self.config
        decay, no_decay = [], []
        for _, p in model.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        return torch.optim.AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.adam_eps)

    def _sync_context(self, model: nn.Module, sync: bool):
        from torch.nn.parallel import DistributedDataParallel as DDP

        if isinstance(model, DDP) and not sync:
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    # ---- the loop ----
    def run(self) -> dict[str, Any]:
        c = self.config
        env = self.env = init_distributed(c.device)
        stop = _StopFlag()
        try:
            if c.threads:
                torch.set_num_threads(int(c.threads))
            torch.manual_seed(c.seed)
            np.random.seed(c.seed % 2**32)
            random.seed(c.seed)
            self.setup()
            self.module.to(self.device)
            model = wrap_model(self.module, env, c.distributed, self.shard_units)
            self.model = model
            self.forward_model = torch.compile(model) if c.compile else model
            optimizer = self.build_optimizer(model)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_multiplier(s, c.warmup_steps, c.steps, c.min_lr_ratio))
            scaler = torch.amp.GradScaler(self.device.type, enabled=c.precision == "fp16")
            checkpoints = CheckpointManager(self.train_dir / "checkpoints", env, c.keep_checkpoints)

            step, position_base, resumed = 0, 0, None
            path = self._find_resume(checkpoints)
            if path is not None:
                trainer_state, rank_state = checkpoints.load(path, model, optimizer)
                step = int(trainer_state["step"])
                scheduler.load_state_dict(trainer_state["scheduler"])
                if trainer_state.get("scaler"):
                    scaler.load_state_dict(trainer_state["scaler"])
                if rank_state.get("rng"):
                    set_rng_state(rank_state["rng"])
                self.load_rank_state(rank_state)
                self.load_extra_state(trainer_state.get("extra", {}))
                self.skipped_total = int(trainer_state.get("skipped", 0))
                position_base = int(trainer_state["position"]) - step * c.batch_size
                resumed = step
                self.log(f"resumed from {path} at step {step}")
            if env.is_main:
                self.train_dir.mkdir(parents=True, exist_ok=True)
                (self.train_dir / "config.json").write_text(
                    json.dumps(self.config_record(), indent=2, ensure_ascii=False) + "\n")
            metrics = MetricsWriter(self.train_dir, env.is_main, c.tensorboard, resumed)

            order = DataOrder(len(self.dataset), seed=c.seed)
            sampler = MicroBatchSampler(order, c.batch_size, c.accumulation, env.rank, env.world_size,
                                        start_step=step, base_position=position_base)
            until = min(c.steps, int(c.stop_at)) if c.stop_at is not None else c.steps
            summary = self._loop(model, optimizer, scheduler, scaler, checkpoints, metrics, sampler, step, until,
                                 stop)
            metrics.close()
            return summary
        finally:
            stop.restore()
            shutdown_distributed(env)

    def _find_resume(self, checkpoints: CheckpointManager) -> Path | None:
        resume = self.config.resume
        error, path = None, None
        if resume in (None, False, ""):
            if self.env.is_main and checkpoints.latest() is not None:
                error = (f"{checkpoints.directory} holds checkpoints of an earlier run: pass --resume to continue "
                         f"it, or remove that folder (or pick another --output) to start over")
        elif self.env.is_main:
            try:
                path = checkpoints.resolve(resume)
            except FileNotFoundError as e:
                error = str(e)
        from cogview.training.distributed import broadcast_object

        error, path = broadcast_object((error, str(path) if path else None), self.env)
        if error:
            raise (FileNotFoundError if resume not in (None, False, "") else FileExistsError)(error)
        if path is None:
            self.log("no checkpoint to resume from: starting at step 0")
        return Path(path) if path else None

    def config_record(self) -> dict[str, Any]:
        import dataclasses

        return {"trainer": type(self).__name__, **dataclasses.asdict(self.config)}

    def _loop(self, model, optimizer, scheduler, scaler, checkpoints, metrics, sampler, step, until, stop):
        from tqdm import tqdm

        c, env = self.config, self.env
        loader = make_loader(self.dataset, sampler, num_workers=c.num_workers)
        batches = iter(loader)
        stop.install()
        bar = tqdm(total=until, initial=step, disable=not (c.progress and env.is_main), desc=self.log_name,
                   dynamic_ncols=True, unit="step")
        params = [p for p in model.parameters() if p.requires_grad]
        window = {"weight": 0.0, "items": 0.0, "steps": 0, "time": 0.0, "data": 0.0, "sums": {}}
        last_saved = None
        start_step = step
        t_run = time.perf_counter()
        interrupted = False
        last_loss = float("nan")
        while step < until:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(c.accumulation)]
            t_data = time.perf_counter() - t0
            skipped_now = 0
            for b in micro:
                self.skips.add(b["skipped"], self.describe_skipped)
                skipped_now += len(b["skipped"])
            prepared = [self.prepare(b) for b in micro]
            weights = [float(self.batch_weight(p)) for p in prepared]
            items = sum(float(self.batch_items(p)) for p in prepared)
            total = all_reduce_sum(torch.tensor([sum(weights)], dtype=torch.float64), env).item()
            model.train()
            sums: dict[str, torch.Tensor] = {}
            for i, (p, w) in enumerate(zip(prepared, weights)):
                if w == 0 and not env.distributed:
                    continue
                factor = (w / total * env.world_size) if total > 0 else 0.0
                if w == 0:
                    p, factor = self.dummy(p), 0.0
                with self._sync_context(model, i == len(prepared) - 1):
                    with self.autocast():
                        loss, values = self.forward_loss(p)
                    scaler.scale(loss * factor).backward()
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().double().cpu() * w
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            grad_norm = self._clip(params, c.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            # One all-reduce for the step's statistics and the stop flag.
            keys = sorted(sums)
            vector = torch.tensor([sum(weights), items, float(stop.requested), skipped_now] +
                                  [float(sums[k]) for k in keys], dtype=torch.float64)
            vector = all_reduce_sum(vector, env)
            step_weight, step_items, stop_votes = float(vector[0]), float(vector[1]), float(vector[2])
            self.skipped_total += int(vector[3])
            means = {k: float(vector[4 + j]) / max(step_weight, 1e-12) for j, k in enumerate(keys)}
            elapsed = time.perf_counter() - t0
            window["weight"] += step_weight
            window["items"] += step_items
            window["steps"] += 1
            window["time"] += elapsed
            window["data"] += t_data
            for j, k in enumerate(keys):
                window["sums"][k] = window["sums"].get(k, 0.0) + float(vector[4 + j])
            last_loss = means.get("loss", float("nan"))
            if env.is_main:
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", **{f"{self.unit}/s": f"{step_items / max(elapsed, 1e-9):.0f}"})
            if step % c.log_every == 0 or step == until:
                record = {"step": step, "lr": lr, "grad_norm": grad_norm,
                          **{k: v / max(window["weight"], 1e-12) for k, v in window["sums"].items()},
                          f"{self.unit}_per_s": window["items"] / max(window["time"], 1e-9),
                          "s_per_step": window["time"] / window["steps"],
                          "data_fraction": window["data"] / max(window["time"], 1e-9),
                          "samples": sampler.position(step), "elapsed_s": time.perf_counter() - t_run}
                if scaler.is_enabled():
                    record["loss_scale"] = float(scaler.get_scale())
                record.update(self.log_extra(step))
                metrics.write(record)
                window = {"weight": 0.0, "items": 0.0, "steps": 0, "time": 0.0, "data": 0.0, "sums": {}}
            interrupted = stop_votes > 0
            due = c.checkpoint_every and step % c.checkpoint_every == 0
            if due or interrupted or step == until:
                self._save(checkpoints, step, model, optimizer, scheduler, scaler, sampler)
                last_saved = step
            if c.sample_every and step % c.sample_every == 0 and step < c.steps:
                self.periodic(step, final=False)
            if interrupted:
                break
        bar.close()
        del batches, loader
        finished = step >= c.steps
        if finished and last_saved != step:
            self._save(checkpoints, step, model, optimizer, scheduler, scaler, sampler)
        skipped = self.skipped_total
        summary = {"step": step, "finished": finished, "interrupted": interrupted, "loss": last_loss,
                   "skipped": skipped, "seconds": time.perf_counter() - t_run, "steps_run": step - start_step}
        if finished:
            self.periodic(step, final=True)
            summary["model"] = str(self.export())
            self.log(f"done: {step} steps; model directory {summary['model']}")
        elif interrupted:
            self.log(f"interrupted at step {step}: checkpoint saved; continue with --resume")
        else:
            self.log(f"stopped at step {step} of {c.steps} (--stop-at): continue with --resume")
        if skipped:
            examples = f" (e.g. {', '.join(map(str, self.skips.examples[:5]))})" if self.skips.examples else ""
            self.log(f"skipped {skipped} missing or unreadable image(s){examples}")
        else:
            self.log("no images skipped")
        if env.is_main:
            with open(self.train_dir / "summary.json", "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
        barrier(env)
        return summary

    def log_extra(self, step: int) -> dict[str, Any]:
        return {}

    def forward_loss(self, prepared):
        return self.forward_model(prepared)

    @staticmethod
    def _clip(params, max_norm: float) -> float:
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def _save(self, checkpoints, step, model, optimizer, scheduler, scaler, sampler) -> None:
        trainer_state = {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled()
                         else None, "position": sampler.position(step), "global_batch": self.config.batch_size,
                         "skipped": self.skipped_total, "extra": self.extra_state(), "config": self.config_record()}
        rank_state = {"rng": rng_state(), **self.rank_state()}
        path = checkpoints.save(step, model, optimizer, trainer_state, rank_state)
        self.log(f"checkpoint {path}")

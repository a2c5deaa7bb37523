"""Shared benchmark machinery: interleaved timing, medians, bandwidth yardstick, reports.

Every bench script compares candidates on the same inputs in one run, interleaving them
(A B C A B C ...) so drift on a shared machine hits all of them alike, and reports medians and
ratios. Results go to stdout as a markdown table and to bench/results/<name>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cogview.cpu_allocator import auto_tune_cpu_allocator

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few repeats (CI rot check)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per candidate")
    parser.add_argument("--json", type=Path, default=None, help="where to write the JSON results")
    if extra:
        extra(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.malloc_tuning = auto_tune_cpu_allocator()
    if args.repeats is None:
        args.repeats = 3 if args.smoke else 15
    return args


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_once(fn: Callable[[], object], device: str, inner: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / inner


def compare(candidates: dict[str, Callable[[], object]], device: str, repeats: int,
            min_round_s: float = 0.02, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in interleaved rounds (A B A B ...).

    Each candidate first runs `warmup` times (compilation, caches); with min_round_s > 0 one more
    timed call sizes its rounds to at least that long, else a round is one call (calls of seconds)."""
    inner = {}
    for name, fn in candidates.items():
        for _ in range(warmup):
            fn()
        once = max(_time_once(fn, device, 1), 1e-7) if min_round_s > 0 else None
        inner[name] = max(1, int(min_round_s / once)) if once else 1
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            samples[name].append(_time_once(fn, device, inner[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


def copy_bandwidth(device: str, numel: int = 1 << 24, repeats: int = 7) -> float:
    """Measured bytes/s (read + write) of copying an fp32 tensor into a preallocated one: the practical
    ceiling. Not `x.clone()`: a fresh destination of tens of MB comes from pages the C library maps anew
    for every call on CPUs, and their page faults would make the yardstick itself slow."""
    x = torch.randn(numel, device=device)
    y = torch.empty_like(x)
    seconds = compare({"copy": lambda: y.copy_(x)}, device, repeats)["copy"]
    return 2 * x.numel() * x.element_size() / seconds


def machine() -> dict:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor()
            or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import cogview

        info["cpu_isa"] = cogview.ops.cpu_isa()
    except ImportError:
        pass
    return info


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(col, "")) for col in columns) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, args, rows: list[dict], columns: list[str], notes: str = "") -> None:
    print(f"\n## {name} ({'smoke' if args.smoke else 'full'}, device {args.device})\n")
    print(markdown_table(rows, columns))
    tuned = getattr(args, "malloc_tuning", False)
    print(f"\n(glibc malloc tuning {'on' if tuned else 'off'}: cogview.cpu_allocator; COGVIEW_MALLOC_TUNING=0 turns it off)")
    if notes:
        print("\n" + notes)
    path = args.json or RESULTS_DIR / f"{name}{'-smoke' if args.smoke else ''}-{args.device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bench": name, "machine": machine(), "malloc_tuning": tuned, "smoke": args.smoke,
                                "rows": rows},
                               indent=2))
    print(f"\n(results: {path})")

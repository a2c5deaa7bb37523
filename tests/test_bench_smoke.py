"""Every benchmark script runs at tiny sizes, so bench/ cannot rot."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_bench_script_smoke(script, tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH.parent), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--json", str(out)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if re.search(r"needs a (CUDA )?GPU", proc.stdout) and not torch.cuda.is_available():
        return  # GPU-only scripts say so and exit cleanly on a machine without one
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["rows"], f"{script.name} reported no rows"


def test_local_attention_bench_bfloat16_smoke(tmp_path):
    # the bf16 run adds the op with float arithmetic as a candidate where the dot products run
    import cogview

    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH.parent), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(BENCH / "local_attention.py"), "--smoke", "--dtype", "bfloat16",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(row["ours ms"] > 0 for row in rows)
    with_float = cogview.ops.local_attention_bf16_dot_available()
    assert all(("x float" in row) == with_float for row in rows)


def test_product_recorder_counts_and_replays():
    # bench/_products.py: the calls it records are the products that ran (not the elementwise work
    # around them), their multiply-adds are the shapes', and a replay runs them all
    sys.path.insert(0, str(BENCH))
    try:
        import _products
    finally:
        sys.path.remove(str(BENCH))
    import torch.nn.functional as F

    from cogview import ops

    x = torch.randn(2, 5, 16)
    w1, b1 = torch.randn(24, 16), torch.randn(24)
    w2 = torch.randn(8, 24)

    def work():
        h = ops.linear(x, w1, b1, activation="gelu_tanh")
        h = torch.relu(h) + 1
        return F.linear(h, w2) @ torch.randn(8, 1).expand(8, 3)  # (a self-overlapping layout)

    calls = _products.record_products(work)
    names = [call.func._schema.name for call in calls]
    assert len(calls) == 3 and "aten::add" not in names and "aten::relu" not in names
    assert _products.multiply_adds(calls) == 10 * 16 * 24 + 10 * 24 * 8 + 10 * 8 * 3
    assert _products.replay_seconds(calls, "cpu", rounds=2) > 0

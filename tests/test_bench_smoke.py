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

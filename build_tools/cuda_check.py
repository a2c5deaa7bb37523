"""CI's CUDA compile-and-link check, second half: after a CUDA build (no GPU needed), every op
that csrc/cuda/*.cu registers for CUDA must really have a CUDA kernel in the built cogview._C.

    COGVIEW_FORCE_CUDA=1 python setup.py build_ext --inplace
    PYTHONPATH=. python build_tools/cuda_check.py      # the built cogview must be importable

(`make cuda-check` builds out of tree and runs this against a staged copy of the package.)

The expected ops are read from the sources: each `<var>.impl("name", ...)` inside a
`TORCH_LIBRARY_IMPL(cogview, CUDA, <var>) { ... }` block. Exit status 0 when all are
registered, 1 otherwise (also when the build has no CUDA kernels or a source registers nothing).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"

_BLOCK = re.compile(r"TORCH_LIBRARY_IMPL\s*\(\s*cogview\s*,\s*CUDA\s*,\s*(\w+)\s*\)\s*\{")
_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


def _block_body(text: str, open_brace: int) -> str:
    depth = 0
    for i in range(open_brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : i]
    raise ValueError("unbalanced braces after TORCH_LIBRARY_IMPL(cogview, CUDA, ...)")


def cuda_ops_in_sources(cuda_dir: Path = CUDA_DIR) -> dict[str, list[str]]:
    """{source file name: [op names it registers for CUDA]} for every csrc/cuda/*.cu."""
    found: dict[str, list[str]] = {}
    for path in sorted(cuda_dir.glob("*.cu")):
        text = _COMMENTS.sub("", path.read_text())
        ops: list[str] = []
        for match in _BLOCK.finditer(text):
            var = re.escape(match.group(1))
            body = _block_body(text, match.end() - 1)
            ops += re.findall(rf"\b{var}\s*\.\s*impl\s*\(\s*\"([\w.]+)\"", body)
        found[path.name] = ops
    return found


def main() -> int:
    import torch

    import cogview  # loads cogview._C; must work without a GPU

    info = cogview._native.BUILD_INFO
    print(f"cogview {info['version']} built against torch {info['torch_version']}, "
          f"CUDA kernels {'ON' if info['cuda'] else 'OFF'}, archs {info['cuda_arch_list'] or '-'}; "
          f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU visible: {torch.cuda.is_available()}")
    failures: list[str] = []
    if not info["cuda"]:
        failures.append("this cogview._C was built without CUDA kernels (build with COGVIEW_FORCE_CUDA=1)")

    sources = cuda_ops_in_sources()
    if not sources:
        print("no csrc/cuda/*.cu sources: nothing to check")
    for name, ops in sources.items():
        if not ops:
            failures.append(f"{name}: no m.impl(...) inside TORCH_LIBRARY_IMPL(cogview, CUDA, m)")
        for op in ops:
            qualified = f"cogview::{op}"
            try:
                ok = torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA")
            except RuntimeError as error:  # no schema at all
                ok = False
                print(f"  {qualified}: {error}")
            print(f"  {'ok     ' if ok else 'MISSING'} {qualified:<36} CUDA  ({name})")
            if not ok:
                failures.append(f"{qualified} ({name}) has no CUDA kernel registered")

    total = sum(len(ops) for ops in sources.values())
    if failures:
        print(f"cuda_check: FAILED ({len(failures)} problem(s)):")
        for failure in failures:
            print(f"  - {failure}")
        return 1
    print(f"cuda_check: OK, {total} op(s) from {len(sources)} CUDA source(s) registered for CUDA")
    return 0


if __name__ == "__main__":
    sys.exit(main())

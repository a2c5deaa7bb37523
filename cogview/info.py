"""`python -m cogview.info`: what this build of cogview contains and which code runs where."""
from __future__ import annotations

import torch

from cogview._native import BUILD_INFO
from cogview.ops import _registry
from cogview.ops.linear import tile_linear_available
from cogview.ops.local_attention import local_attention_bf16_dot_available


def describe() -> str:
    info = BUILD_INFO
    lines = [
        f"cogview {info['version']}  (built against torch {info['torch_version']}, running torch {torch.__version__})",
        f"compiler: {info['compiler']}  via {info['build_tool']}  OpenMP: {'yes' if info['openmp'] else 'no'}",
        f"CUDA kernels: {'compiled for ' + (info['cuda_arch_list'] or '?') if info['cuda'] else 'not compiled'}"
        f"  (CUDA device visible: {'yes, ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'})",
        f"CPU ISAs compiled: {', '.join(info['cpu_isas'])}; usable here: {', '.join(_registry.usable_cpu_isas())}; "
        f"in use: {_registry.cpu_isa()}  (set COGVIEW_CPU_ISA to force one)",
        f"bf16 `linear` on AMX tiles: {'yes' if tile_linear_available() else 'no (F.linear)'}",
        f"bf16 `local_attention` on AVX512-BF16 dot products: "
        f"{'yes' if local_attention_bf16_dot_available() else 'no (float arithmetic)'}",
        "",
    ]
    width = max(len(op) for op in _registry.KERNELS) + 2
    lines.append(f"{'op':<{width}}{'cpu':<20}{'cuda':<20}")
    for op, devices in _registry.KERNELS.items():
        cells = ["kernel" if devices[d] else "reference (PyTorch)" for d in ("cpu", "cuda")]
        lines.append(f"{op:<{width}}{cells[0]:<20}{cells[1]:<20}")
    return "\n".join(lines)


def main() -> None:
    print(describe())


if __name__ == "__main__":
    main()

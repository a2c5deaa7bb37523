"""Builds `cogview._C`: pybind11 module + PyTorch custom ops (CPU always, CUDA when available).

Install torch first, then `pip install --no-build-isolation -e .`. Environment:
  COGVIEW_CPU_ONLY=1     never build CUDA kernels (wins over everything)
  COGVIEW_FORCE_CUDA=1   build CUDA kernels even if no GPU/nvcc is detected (compile checks)
  TORCH_CUDA_ARCH_LIST   CUDA archs; defaults to "8.0;9.0" when no GPU is visible
  COGVIEW_DEBUG=1        -O0 -g builds
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from build_tools import sources  # noqa: E402

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - build-time guidance
    sys.exit("cogview: install torch first, then `pip install --no-build-isolation -e .`")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _version() -> str:
    namespace: dict = {}
    exec((ROOT / "cogview" / "version.py").read_text(), namespace)
    return namespace["__version__"]


def _decide_cuda() -> tuple[bool, str]:
    if _flag("COGVIEW_CPU_ONLY"):
        return False, "COGVIEW_CPU_ONLY=1"
    if _flag("COGVIEW_FORCE_CUDA"):
        return True, "COGVIEW_FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, "this torch has no CUDA"
    if cpp_extension.CUDA_HOME is None:
        return False, "torch has CUDA but no CUDA toolkit (nvcc) was found; set CUDA_HOME"
    return True, f"torch has CUDA {torch.version.cuda} and nvcc is at {cpp_extension.CUDA_HOME}"


def _pip_cuda_include_dirs() -> list[str]:
    """Headers of a pip-installed CUDA toolkit (cuBLAS etc. for CUDA 13 builds of torch)."""
    found = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            candidate = Path(entry) / sub
            if candidate.is_dir():
                found.append(str(candidate))
    return found


def _write_build_info(path: Path, with_cuda: bool, arch_list: str, isas: list[str]) -> None:
    text = (ROOT / "csrc" / "build_info.h.in").read_text()
    defines = "\n".join(f"#define COGVIEW_ISA_{name.upper()}_COMPILED 1" for name in isas)
    values = {
        "COGVIEW_VERSION": _version(),
        "COGVIEW_TORCH_VERSION": torch.__version__.split("+")[0],
        "COGVIEW_WITH_CUDA": "1" if with_cuda else "0",
        "COGVIEW_CUDA_ARCH_LIST": arch_list,
        "COGVIEW_CPU_ISAS": ";".join(isas),
        "COGVIEW_BUILD_TOOL": "setup.py",
        "COGVIEW_ISA_DEFINES": defines,
    }
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:  # keep the timestamp: no needless rebuilds
        path.write_text(text)


def _compiler() -> list[str]:
    """The C++ compiler for the per-ISA kernels, behind ccache when installed (as torch does)."""
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    if shutil.which("ccache") and not os.environ.get("TORCH_NO_COMPILER_WRAPPER") and "ccache" not in compiler[0]:
        compiler = ["ccache"] + compiler
    return compiler


def _compile_isa_kernels(build_temp: Path, common_flags: list[str]) -> list[str]:
    """Compile csrc/cpu/kernels/*.cpp once per instruction set with ninja; return the objects.

    setuptools gives every source the same flags, so these torch-free translation units get a
    small ninja file of their own (parallel, incremental, with header dependencies).
    """
    out_dir = build_temp / "isa"
    out_dir.mkdir(parents=True, exist_ok=True)
    cxx = " ".join(shlex.quote(part) for part in _compiler())
    lines = [
        "ninja_required_version = 1.3",
        f"cxx = {cxx}",
        f"common = {' '.join(shlex.quote(f) for f in common_flags)}",
        "rule cxx",
        "  command = $cxx -MMD -MF $out.d $common $isaflags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX[$isa] $in",
    ]
    objects = []
    for isa, flags in sources.isa_flags().items():
        for src in sources.isa_kernel_sources():
            obj = out_dir / isa / (src.stem + ".o")
            objects.append(str(obj))
            lines.append(f"build {obj}: cxx {src}")
            lines.append(f"  isa = {isa}")
            lines.append(f"  isaflags = -DCOGVIEW_ISA={isa} {' '.join(flags)}")
    (out_dir / "build.ninja").write_text("\n".join(lines) + "\n")
    jobs = os.environ.get("MAX_JOBS")
    cmd = ["ninja", "-C", str(out_dir)] + (["-j", jobs] if jobs else [])
    subprocess.run(cmd, check=True)
    return objects


class BuildExtension(cpp_extension.BuildExtension):
    def build_extensions(self):
        ext = self.extensions[0]
        build_temp = Path(self.build_temp).resolve()
        opt = ["-O0", "-g"] if _flag("COGVIEW_DEBUG") else ["-O3"]
        isa_common = ["-std=c++20", "-fPIC", "-fopenmp-simd", "-fno-math-errno",
                      "-fvisibility=hidden", f"-I{ROOT / 'csrc'}"] + opt
        ext.extra_objects = list(ext.extra_objects or []) + _compile_isa_kernels(build_temp, isa_common)
        super().build_extensions()


def _extension():
    with_cuda, reason = _decide_cuda()
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        visible = torch.version.cuda is not None and torch.cuda.is_available()
        if not visible:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    isas = list(sources.isa_flags())
    # One generated header per configuration, so CPU-only and CUDA builds of one tree never mix.
    generated = ROOT / "build" / "generated" / ("cuda" if with_cuda else "cpu")
    _write_build_info(generated / "build_info.h", with_cuda, arch_list, isas)

    opt = ["-O0", "-g"] if _flag("COGVIEW_DEBUG") else ["-O3"]
    cxx_flags = ["-std=c++20", "-fopenmp", "-fvisibility=hidden"] + opt
    include_dirs = [str(ROOT / "csrc"), str(generated)]
    srcs = [str(p.relative_to(ROOT)) for p in sources.core_sources()]
    extra = {"cxx": cxx_flags}
    if with_cuda:
        srcs += [str(p.relative_to(ROOT)) for p in sources.cuda_sources()]
        include_dirs += _pip_cuda_include_dirs()
        extra["cxx"] = cxx_flags + ["-DCOGVIEW_WITH_CUDA_KERNELS=1"]
        extra["nvcc"] = opt + ["-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
                               "-DCOGVIEW_WITH_CUDA_KERNELS=1"]
        ext_type = cpp_extension.CUDAExtension
    else:
        ext_type = cpp_extension.CppExtension

    print(f"cogview: CUDA kernels {'ON' if with_cuda else 'OFF'} ({reason})")
    if with_cuda:
        print(f"cogview: TORCH_CUDA_ARCH_LIST={arch_list}  CUDA_HOME={cpp_extension.CUDA_HOME}")
    print(f"cogview: CPU ISAs {', '.join(isas)}; flags {' '.join(cxx_flags)}")
    return ext_type(
        name="cogview._C",
        sources=srcs,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )


setup(
    version=_version(),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

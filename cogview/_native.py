"""Loads the compiled extension `cogview._C` (op schemas + kernels) and checks it is current."""
from __future__ import annotations

import torch

from cogview.version import __version__

REBUILD_COMMAND = "pip install --no-build-isolation -e ."
_HOW_TO_REBUILD = (
    f"Rebuild it from the source checkout with the torch you run installed first: `{REBUILD_COMMAND}` "
    "(or `make install`)."
)

try:
    from cogview import _C
except ImportError as error:  # missing, or built against another torch (undefined symbols)
    raise ImportError(f"cogview's native extension cogview._C could not be loaded: {error}. {_HOW_TO_REBUILD}") from error


def _release(version: str) -> str:
    return version.split("+")[0]


BUILD_INFO: dict = dict(_C.build_info())

if _release(BUILD_INFO["torch_version"]) != _release(torch.__version__):
    raise ImportError(
        f"cogview._C was built against torch {BUILD_INFO['torch_version']} but torch "
        f"{torch.__version__} is installed: the binary interface differs. {_HOW_TO_REBUILD}"
    )
if BUILD_INFO["version"] != __version__:
    raise ImportError(
        f"cogview._C was built from cogview {BUILD_INFO['version']} but the Python package is "
        f"{__version__}: the extension is stale. {_HOW_TO_REBUILD}"
    )

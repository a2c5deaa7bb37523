"""cogview: CogView text-to-image generation in PyTorch, with hand-written C++/CUDA kernels."""
from cogview.version import __version__
from cogview import _native  # noqa: F401  (loads cogview._C: op schemas and kernels)
from cogview import ops

__all__ = ["__version__", "ops"]

"""cogview: CogView text-to-image generation in PyTorch, with hand-written C++/CUDA kernels."""
from cogview.version import __version__
from cogview import _native  # noqa: F401  (loads cogview._C: op schemas and kernels)
from cogview import ops

__all__ = ["__version__", "ops", "CogView", "CogViewTokenizer"]

# Imported on first use, so `import cogview` stays light (no sentencepiece / model code until needed).
_LAZY = {
    "CogView": ("cogview.pipeline", "CogView"),
    "CogViewTokenizer": ("cogview.tokenizer", "CogViewTokenizer"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cogview' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

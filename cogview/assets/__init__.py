"""Files shipped inside the package: the embedded default model (`default/`, a model directory).

    from cogview.assets import default_model_dir
    model = CogView.from_pretrained(default_model_dir())

It is trained by `make default-model` (recipes/default/, see the README's "The default model").
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_MODEL", "default_model_dir"]

DEFAULT_MODEL = Path(__file__).resolve().parent / "default"


def default_model_dir() -> Path:
    """The embedded default model's directory; FileNotFoundError when this build of cogview has none."""
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"this cogview has no embedded default model (expected {DEFAULT_MODEL}); "
                                f"build it with `make default-model`, or pass a model directory")
    return DEFAULT_MODEL

"""Smoke test of an installed (non-editable) wheel, run from outside the source tree."""
import pathlib
import subprocess
import sys
import tempfile

import torch

import cogview
from cogview import ops
from cogview.ops import reference

assert "site-packages" in pathlib.Path(cogview.__file__).as_posix(), f"not the installed wheel: {cogview.__file__}"
x, r = torch.randn(8, 257), torch.randn(8, 257)
w, b = torch.ones(257), torch.zeros(257)
got = ops.add_layer_norm(r, x, w, b, w, b)
want = reference.add_layer_norm(r, x, w, b, w, b)
for g, e in zip(got, want):
    torch.testing.assert_close(g, e)
subprocess.run([sys.executable, "-m", "cogview.info"], check=True)
# The embedded default model ships in the wheel and generates with no --model.
from cogview.assets import default_model_dir  # noqa: E402

assert "site-packages" in default_model_dir().as_posix()
out = pathlib.Path(tempfile.mkdtemp())
subprocess.run([sys.executable, "-m", "cogview.cli", "generate", "a red circle", "-n", "2", "--out", str(out),
                "--no-progress"], check=True)
assert (out / "grid.png").is_file()
print(f"wheel smoke test OK: cogview {cogview.__version__} from {pathlib.Path(cogview.__file__).parent}")

"""Checkpoint I/O: atomic writes, safetensors files written and read one tensor at a time with integrity
checks, and loading into models built on the meta device.

Model weights never go through pickle. `save_safetensors` streams tensors to disk one at a time (no
second copy of a 4B model in memory) and records a CRC-32 per tensor in the file's metadata;
`SafetensorsFile` reads the header, checks it against the file size (a truncated file is caught before
anything is read), reads each tensor straight into its own buffer (no memory map, so a load does not
pin the file in memory) and verifies its CRC. The files are plain safetensors: the `safetensors`
package reads ours, and we read its files (without CRCs there is nothing to verify).

Errors: everything raised for a bad checkpoint is a `CheckpointError` (a ValueError):
`CheckpointNotFoundError` (also a FileNotFoundError) for a missing file or directory,
`CheckpointCorruptError` for a truncated, damaged or foreign file, `CheckpointMismatchError` for
weights that do not fit the config (missing or unexpected tensors, wrong shapes).
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.nn as nn

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "SafetensorsFile",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_state_shapes",
    "load_into_meta_module",
    "save_safetensors",
    "dtype_from_name",
    "dtype_name",
]


class CheckpointError(ValueError):
    """A checkpoint cannot be used (base class of the errors below)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file or model directory does not exist."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is truncated, damaged (checksum mismatch) or not in the expected format."""


class CheckpointMismatchError(CheckpointError):
    """The weights do not fit the config: missing or unexpected tensors, or wrong shapes."""


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """fsync a folder (its entries survive a crash); best effort where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file next to `path` for writing; on a clean exit it is flushed, fsynced and
    renamed over `path` (os.replace), so readers see either the old file or the complete new one. On
    an exception the temporary file is removed and `path` is left untouched."""
    path = Path(path)
    if "w" not in mode:
        raise ValueError(f"atomic_write: mode must be a write mode, got {mode!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code
_ST_CODES = {code: dtype for dtype, code in _ST_DTYPES.items()}

_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def dtype_from_name(value) -> torch.dtype | None:
    """A torch dtype from a dtype, None, or a name ("bf16", "bfloat16", "fp16", "float32", ...)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
    raise ValueError(f"unknown dtype {value!r}; use one of float32, bfloat16, float16 (or bf16, fp16, fp32)")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw (little-endian) bytes of a contiguous CPU tensor, without a copy."""
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("cogview.checkpoint supports little-endian machines only (safetensors is little-endian)")


# ---------------------------------------------------------------------------------------------
# safetensors: writer
# ---------------------------------------------------------------------------------------------

CRC_METADATA_KEY = "cogview.crc32"
# CRC-32 of the tensor table (names, dtypes, shapes, byte ranges): damage there that keeps the byte ranges
# consistent (e.g. the shape of an empty tensor) is caught too.
HEADER_CRC_METADATA_KEY = "cogview.header_crc32"


def _table_crc(entries: Mapping[str, Mapping]) -> str:
    canonical = {name: {"dtype": e["dtype"], "shape": [int(s) for s in e["shape"]],
                        "data_offsets": [int(o) for o in e["data_offsets"]]} for name, e in entries.items()}
    return f"{zlib.crc32(json.dumps(canonical, sort_keys=True, separators=(',', ':')).encode()):08x}"
_MAX_HEADER = 100 * 1024 * 1024


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None, *, dtype: torch.dtype | None = None,
                     checksums: bool = True) -> None:
    """Write `tensors` to a safetensors file at `path`, atomically, one tensor at a time.

    dtype: cast floating-point tensors to it (integer/bool tensors are kept). metadata: str -> str
    pairs for the header's __metadata__. checksums: store a CRC-32 per tensor (verified on read).
    Tensors on any device are accepted; each is copied to the CPU on its own while writing.
    """
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("save_safetensors: metadata must map str to str")
    names = list(tensors)
    header: dict = {}
    offset = 0
    plan = []
    for name in names:
        tensor = tensors[name]
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"save_safetensors: invalid tensor name {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"save_safetensors: {name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.device.type == "meta":
            raise ValueError(f"save_safetensors: {name!r} is on the meta device (it has no data)")
        out_dtype = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
        if out_dtype not in _ST_DTYPES:
            raise ValueError(f"save_safetensors: {name!r} has dtype {out_dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * out_dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[out_dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        plan.append((name, out_dtype, nbytes))
        offset += nbytes

    crcs: dict[str, int] = {}
    if checksums:
        # Placeholder of the final width, so the header length is known before the data is written.
        crcs = {name: 0 for name in names}
    meta = dict(metadata or {})

    def encode_header() -> bytes:
        full = dict(meta)
        if checksums:
            full[CRC_METADATA_KEY] = json.dumps({n: f"{c:08x}" for n, c in crcs.items()}, separators=(",", ":"))
            full[HEADER_CRC_METADATA_KEY] = _table_crc(header)
        content = {"__metadata__": full} if full else {}
        content.update(header)
        raw = json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return raw + b" " * (-len(raw) % 8)  # pad with spaces to 8 bytes (aligned data)

    header_bytes = encode_header()
    with atomic_write(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, out_dtype, nbytes in plan:
            cpu = tensors[name].detach().to(device="cpu", dtype=out_dtype).contiguous()
            data = _as_bytes(cpu)
            assert len(data) == nbytes
            f.write(data)
            if checksums:
                crcs[name] = zlib.crc32(data)
            del cpu, data
        if checksums:  # rewrite the header with the real checksums (same length: fixed-width hex)
            final = encode_header()
            assert len(final) == len(header_bytes)
            f.seek(8)
            f.write(final)


# ---------------------------------------------------------------------------------------------
# safetensors: reader
# ---------------------------------------------------------------------------------------------


class SafetensorsFile:
    """A safetensors file opened for reading one tensor at a time.

        with SafetensorsFile(path) as st:
            st.keys(), st.shape(name), st.dtype(name), st.metadata
            tensor = st.read(name, device="cuda", dtype=torch.bfloat16)

    The header is validated on open (JSON, dtypes, shapes vs byte ranges, ranges contiguous and
    covering the data, file size): a truncated or damaged file raises CheckpointCorruptError before
    any tensor is read. `read` verifies the tensor's CRC-32 when the file carries them (verify=True).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointNotFoundError(f"checkpoint file not found: {self.path}")
        self._file = open(self.path, "rb")
        try:
            self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _corrupt(self, why: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"{self.path}: {why}")

    def _parse_header(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise self._corrupt(f"truncated or not a safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER:
            raise self._corrupt(f"not a safetensors file (header length {n})")
        if 8 + n > size:
            raise self._corrupt(f"truncated: the header needs {8 + n} bytes, the file has {size}")
        raw = self._file.read(n)
        try:
            content = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise self._corrupt(f"damaged header ({error})") from None
        if not isinstance(content, dict):
            raise self._corrupt("damaged header (not a JSON object)")
        metadata = content.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise self._corrupt("damaged header (__metadata__ is not an object)")
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in metadata.items()}
        entries = {}
        ranges = []
        if HEADER_CRC_METADATA_KEY in self.metadata and CRC_METADATA_KEY not in self.metadata:
            raise self._corrupt("damaged header: the tensor checksums are missing")  # (written together)
        if HEADER_CRC_METADATA_KEY in self.metadata:
            try:
                table_ok = _table_crc(content) == self.metadata[HEADER_CRC_METADATA_KEY]
            except (KeyError, TypeError, ValueError, AttributeError):
                table_ok = False
            if not table_ok:
                raise self._corrupt("damaged header: the tensor table does not match its checksum")
        for name, entry in content.items():
            try:
                code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
                shape = [int(s) for s in shape]
                begin, end = int(begin), int(end)
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"damaged header entry for {name!r}: {entry!r}") from None
            if code not in _ST_CODES:
                raise self._corrupt(f"{name!r} has an unsupported dtype {code!r}")
            dtype = _ST_CODES[code]
            numel = 1
            for s in shape:
                if s < 0:
                    raise self._corrupt(f"{name!r} has a negative dimension in {shape}")
                numel *= s
            expected = numel * dtype.itemsize
            if end - begin != expected or begin < 0:
                raise self._corrupt(f"{name!r}: byte range [{begin}, {end}) does not hold {code} {shape}")
            entries[name] = (dtype, tuple(shape), begin, end)
            ranges.append((begin, end, name))
        ranges.sort()
        position = 0
        for begin, end, name in ranges:
            if begin != position:
                raise self._corrupt(f"damaged header: the data of {name!r} starts at {begin}, expected {position}")
            position = end
        self._data_start = 8 + n
        data_size = size - self._data_start
        if data_size < position:
            raise self._corrupt(f"truncated: the tensors need {position} data bytes, the file has {data_size} "
                                f"(an interrupted copy or download?)")
        if data_size > position:
            raise self._corrupt(f"{data_size - position} unexpected bytes after the last tensor")
        self._entries = entries
        self._crcs: dict[str, int] = {}
        if CRC_METADATA_KEY in self.metadata:
            try:
                self._crcs = {k: int(v, 16) for k, v in json.loads(self.metadata[CRC_METADATA_KEY]).items()}
            except (ValueError, AttributeError, TypeError):
                raise self._corrupt("damaged checksum table in the header") from None
            if set(self._crcs) != set(entries):  # a damaged tensor name, or a damaged table
                raise self._corrupt("damaged header: the checksum table does not list the same tensors as the header")

    # ---- context manager ----
    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- header ----
    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry[1] for name, entry in self._entries.items()}

    @property
    def has_checksums(self) -> bool:
        return bool(self._crcs)

    # ---- data ----
    def read(self, name: str, *, device=None, dtype: torch.dtype | None = None, verify: bool = True) -> torch.Tensor:
        """Read one tensor (into a fresh CPU buffer, then moved/cast to `device`/`dtype`; floating-point
        dtype casts only)."""
        if name not in self._entries:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        stored, shape, begin, end = self._entries[name]
        tensor = torch.empty(shape, dtype=stored)
        if end > begin:
            view = _as_bytes(tensor)
            self._file.seek(self._data_start + begin)
            got = self._file.readinto(view)
            if got != end - begin:
                raise self._corrupt(f"truncated while reading {name!r} ({got} of {end - begin} bytes)")
            if verify and name in self._crcs and zlib.crc32(view) != self._crcs[name]:
                raise self._corrupt(f"checksum mismatch in {name!r}: the file is damaged")
            del view
        elif verify and self._crcs.get(name, 0) != 0:  # an empty tensor's checksum is crc32(b"") = 0
            raise self._corrupt(f"checksum mismatch in {name!r}: the file is damaged")
        if dtype is not None and tensor.is_floating_point() and dtype != stored:
            tensor = tensor.to(device=device, dtype=dtype) if device is not None else tensor.to(dtype)
        elif device is not None:
            tensor = tensor.to(device)
        return tensor

    def read_all(self, *, device=None, dtype: torch.dtype | None = None, verify: bool = True) -> dict[str, torch.Tensor]:
        return {name: self.read(name, device=device, dtype=dtype, verify=verify) for name in self._entries}

    def verify(self) -> None:
        """Read every tensor and check its checksum (raises CheckpointCorruptError)."""
        for name in self._entries:
            self.read(name, verify=True)


# ---------------------------------------------------------------------------------------------
# Loading into meta modules
# ---------------------------------------------------------------------------------------------


def check_state_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                       what: str) -> None:
    """Raise CheckpointMismatchError listing missing / unexpected names and wrong shapes."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [(k, tuple(found[k]), tuple(expected[k])) for k in expected
             if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return

    def listing(items, limit=6):
        items = list(items)
        text = ", ".join(map(str, items[:limit]))
        return text + (f", ... ({len(items)} in all)" if len(items) > limit else "")

    problems = []
    if wrong:
        problems.append("wrong shapes: " + listing(f"{k} is {tuple(f)} but the config needs {tuple(e)}"
                                                   for k, f, e in wrong))
    if missing:
        problems.append("missing: " + listing(missing))
    if unexpected:
        problems.append("unexpected: " + listing(unexpected))
    raise CheckpointMismatchError(f"{what}: the weights do not match the config; " + "; ".join(problems))


def load_into_meta_module(module: nn.Module, source: SafetensorsFile, *, what: str, device=None,
                          dtype_for: Callable[[str, torch.dtype], torch.dtype | None] | None = None,
                          verify: bool = True) -> nn.Module:
    """Fill `module` (built on the meta device) from `source` by assignment: every tensor is read on its
    own straight to `device` in the dtype `dtype_for(name, stored_dtype)` returns (None: as stored), so
    the model is never held twice. Names and shapes are checked against the module before any data is
    read. Returns the module (in eval mode)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_state_shapes(expected, source.shapes(), what)
    state = {}
    for name in expected:
        target = dtype_for(name, source.dtype(name)) if dtype_for is not None else None
        state[name] = source.read(name, device=device, dtype=target, verify=verify)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()

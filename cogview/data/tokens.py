"""Pre-tokenized image datasets: VQ-VAE codes in a memory-mapped file, written once, read by the trainer.

A token file is a directory:

    header.json     {"format": "cogview-tokens", "version": 1, "num_items": N, "code_shape": [h, w],
                     "dtype": "uint16", "codebook_size": K, "vqvae": {...VQVAEConfig...}, "source": {...}, ...}
    codes.bin       N x h x w codes, row-major, little-endian `dtype` (uint16 when K <= 65536, else int32)
    captions.jsonl  line i: the JSON list of caption alternatives of item i

`TokenFileWriter` writes one (into a temporary directory renamed into place on `close`, so a crash leaves
no half-written token file behind); `TokenDataset` maps it read-only with numpy.memmap.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

__all__ = ["TokenDataset", "TokenFileWriter", "is_token_file", "FORMAT"]

FORMAT = "cogview-tokens"
VERSION = 1


def is_token_file(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not (p / "header.json").is_file():
        return False
    try:
        return json.loads((p / "header.json").read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError):
        return False


def _dtype_for(codebook_size: int) -> str:
    return "uint16" if codebook_size <= 65536 else "int32"


class TokenFileWriter:
    """Writes a token file of at most `capacity` items; items are appended in order with `append`.

        with TokenFileWriter(path, capacity, (h, w), codebook_size, vqvae_config, source) as w:
            w.append(codes [B, h, w], captions [[...], ...])
    """

    def __init__(self, path: str | os.PathLike, capacity: int, code_shape: tuple[int, int], codebook_size: int,
                 vqvae: dict | None = None, source: dict | None = None, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"TokenFileWriter: {self.path} exists (pass overwrite=True / --overwrite)")
        self.capacity = int(capacity)
        self.code_shape = (int(code_shape[0]), int(code_shape[1]))
        self.codebook_size = int(codebook_size)
        self.dtype = _dtype_for(self.codebook_size)
        self.header = {"format": FORMAT, "version": VERSION, "code_shape": list(self.code_shape),
                       "dtype": self.dtype, "codebook_size": self.codebook_size, "vqvae": vqvae or {},
                       "source": source or {}}
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        row = self.code_shape[0] * self.code_shape[1]
        self._codes = np.memmap(self.tmp / "codes.bin", dtype=self.dtype, mode="w+",
                                shape=(max(1, self.capacity), row))
        self._captions = open(self.tmp / "captions.jsonl", "w", encoding="utf-8")
        self.count = 0
        self._closed = False

    def append(self, codes: torch.Tensor | np.ndarray, captions: list[list[str]]) -> None:
        codes = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
        codes = codes.reshape(codes.shape[0], -1)
        if codes.shape[0] != len(captions):
            raise ValueError(f"TokenFileWriter.append: {codes.shape[0]} code rows but {len(captions)} captions")
        if codes.shape[1] != self.code_shape[0] * self.code_shape[1]:
            raise ValueError(f"TokenFileWriter.append: rows of {codes.shape[1]} codes, expected {self.code_shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"TokenFileWriter.append: codes outside [0, {self.codebook_size})")
        n = codes.shape[0]
        if self.count + n > self.capacity:
            raise ValueError(f"TokenFileWriter.append: more than the {self.capacity} items announced")
        self._codes[self.count: self.count + n] = codes.astype(self.dtype)
        for caps in captions:
            self._captions.write(json.dumps(list(caps), ensure_ascii=False) + "\n")
        self.count += n

    def close(self, **extra_header) -> Path:
        """Finish: trim the codes to the items written, write the header, move into place."""
        if self._closed:
            return self.path
        self._closed = True
        self._codes.flush()
        del self._codes
        self._captions.close()
        row_bytes = self.code_shape[0] * self.code_shape[1] * np.dtype(self.dtype).itemsize
        os.truncate(self.tmp / "codes.bin", self.count * row_bytes)
        header = dict(self.header, num_items=self.count, **extra_header)
        (self.tmp / "header.json").write_text(json.dumps(header, indent=2, ensure_ascii=False) + "\n")
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            del self._codes
            self._captions.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "TokenFileWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TokenDataset(torch.utils.data.Dataset):
    """A token file, read-only: `ds[i]` = {codes: int64 [h*w], captions: list of str, index: i}."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not is_token_file(self.path):
            raise ValueError(f"TokenDataset: {self.path} is not a token file (no header.json with "
                             f"format {FORMAT!r}); make one with `cogview tokenize-images`")
        self.header = json.loads((self.path / "header.json").read_text())
        if self.header.get("version") != VERSION:
            raise ValueError(f"TokenDataset: {self.path} has version {self.header.get('version')}, expected {VERSION}")
        try:
            self.num_items = int(self.header["num_items"])
            self.code_shape = tuple(int(v) for v in self.header["code_shape"])
            self.codebook_size = int(self.header["codebook_size"])
            itemsize = np.dtype(self.header["dtype"]).itemsize
            if len(self.code_shape) != 2 or self.num_items < 0:
                raise ValueError("bad code_shape or num_items")
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"TokenDataset: {self.path / 'header.json'} is damaged ({type(error).__name__}: "
                             f"{error})") from None
        row = self.code_shape[0] * self.code_shape[1]
        if not (self.path / "codes.bin").is_file():
            raise ValueError(f"TokenDataset: {self.path / 'codes.bin'} is missing")
        size = (self.path / "codes.bin").stat().st_size
        if size != self.num_items * row * itemsize:
            raise ValueError(f"TokenDataset: {self.path / 'codes.bin'} has {size} bytes, expected "
                             f"{self.num_items} x {row} x {self.header['dtype']}")
        self._codes = (np.memmap(self.path / "codes.bin", dtype=self.header["dtype"], mode="r",
                                 shape=(self.num_items, row)) if self.num_items else np.zeros((0, row), np.uint16))
        captions_file = self.path / "captions.jsonl"
        self._captions = []
        try:
            with open(captions_file, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    caps = json.loads(line)
                    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                        raise ValueError("not a JSON list of strings")
                    self._captions.append(caps)
        except (UnicodeDecodeError, ValueError) as error:  # json.JSONDecodeError is a ValueError
            where = f" line {number}" if "number" in locals() else ""
            raise ValueError(f"TokenDataset: {captions_file}{where} is damaged ({error})") from None
        if len(self._captions) != self.num_items:
            raise ValueError(f"TokenDataset: {captions_file} has {len(self._captions)} caption lines for "
                             f"{self.num_items} items")

    def __len__(self) -> int:
        return self.num_items

    def codes(self, index: int) -> np.ndarray:
        codes = np.asarray(self._codes[int(index)], dtype=np.int64)
        if codes.size and int(codes.max()) >= self.codebook_size:  # a damaged codes.bin: never silent
            raise ValueError(f"TokenDataset: {self.path / 'codes.bin'} is damaged: item {int(index)} has code "
                             f"{int(codes.max())} >= the codebook size {self.codebook_size}")
        return codes

    def captions(self, index: int) -> list[str]:
        return list(self._captions[int(index)])

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        return {"codes": torch.from_numpy(self.codes(index)), "captions": self.captions(index), "index": index}

    def describe(self) -> dict:
        return {"name": "tokens", "path": str(self.path), "num_items": self.num_items,
                "code_shape": list(self.code_shape), "codebook_size": self.codebook_size}

"""Token shards on disk: flat little-endian uint16/uint32 files plus one JSON manifest.

Layout of a built data folder::

    manifest.json                  # written last: a folder without it is not a data set
    train-<source>-00000.bin ...   # raw token ids, dtype from the manifest
    val-<source>-00000.bin ...

Every file is written to a temporary name and renamed into place (``atomic_write``), so a crash
never leaves a truncated file under a final name. ``TokenShards`` maps the files of one split
(optionally of some sources only) read-only and exposes them as one token stream.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "mamba3-tokens-v1"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65,536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder + fsync + rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_tokens(path: Path, tokens: np.ndarray, dtype: np.dtype) -> int:
    """Write ``tokens`` (1-D ints) as ``dtype``; refuses ids that do not fit. Returns the count."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
        raise ValueError(f"token ids out of range for {dtype}: [{tokens.min()}, {tokens.max()}]")
    atomic_write(path, tokens.astype(dtype.newbyteorder("<"), copy=False).tobytes())
    return int(tokens.size)


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write(Path(folder) / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no {MANIFEST}: not a built data folder (run `mamba3 data build`)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


class TokenShards:
    """One split of a data folder as a single read-only token stream.

    Args:
        folder: a folder with ``manifest.json``.
        split: "train" or "val".
        sources: keep only these sources (default: all, in manifest order).

    ``len(shards)`` is the number of tokens; ``shards.read(start, length)`` returns int64 [length]
    (crossing file boundaries as needed).
    """

    def __init__(self, folder: Path, split: str, sources: Optional[Sequence[str]] = None):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if split not in self.manifest["splits"]:
            raise ValueError(f"split {split!r} not in {sorted(self.manifest['splits'])}")
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        files = self.manifest["splits"][split]["files"]
        if sources is not None:
            unknown = sorted(set(sources) - {f["source"] for f in files})
            if unknown:
                raise ValueError(f"sources {unknown} not in split {split!r} of {self.folder}")
            files = [f for f in files if f["source"] in sources]
        self.arrays = []
        for f in files:
            path = self.folder / f["path"]
            expect = f["num_tokens"] * dtype.itemsize
            if path.stat().st_size != expect:
                raise ValueError(f"{path}: {path.stat().st_size} bytes, manifest says {expect}")
            if f["num_tokens"]:
                self.arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"read({start}, {length}) outside a stream of {len(self)} tokens")
        out, pos, end = [], start, start + length
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while pos < end:
            a, base = self.arrays[i], int(self.offsets[i])
            take = min(end, base + len(a)) - pos
            out.append(np.asarray(a[pos - base: pos - base + take], dtype=np.int64))
            pos += take
            i += 1
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def concat_tokens(chunks: Iterable[np.ndarray]) -> np.ndarray:
    chunks = list(chunks)
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)

"""Tokenise documents in parallel into flat id arrays (one EOS after each document).

A tokenizer is named by a spec string so worker processes can rebuild it cheaply: ``"byte"``
(``mamba3.models.tokenizer.ByteTokenizer``: UTF-8 bytes 0..255, EOS 256, the ``tiny`` preset's
vocab of 257) or a path to a ``tokenizers`` JSON file (``load_tokenizer``; GPT-NeoX-20B comes from
``sources.fetch_neox_tokenizer``).
"""
from __future__ import annotations

import multiprocessing as mp
from typing import Optional, Sequence

import numpy as np

from ..models.tokenizer import ByteTokenizer, load_tokenizer
from .sources import tiny_documents


def get_codec(spec: str):
    """The tokenizer named by ``spec`` ("byte" or a JSON path); must have an EOS token."""
    tok = ByteTokenizer() if spec in ("byte", "bytes") else load_tokenizer(spec)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {spec!r} has no end-of-text token, needed between documents")
    return tok


_WORKER = None


def _init_worker(spec: str) -> None:
    global _WORKER
    _WORKER = (spec, get_codec(spec))


def _encode_doc(text: str) -> np.ndarray:
    spec, tok = _WORKER
    if spec in ("byte", "bytes"):  # same ids as ByteTokenizer.encode, without a Python list per byte
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    else:
        ids = np.asarray(tok.encode(text), dtype=np.int64)
    return np.append(ids, tok.eos_token_id)


def tokenize_documents(texts: Sequence[str], spec: str, *, workers: Optional[int] = None) -> np.ndarray:
    """Concatenated ids of ``texts`` in order, each followed by EOS. ``workers`` > 1 uses a process
    pool (each worker loads the tokenizer once); the result is identical for any worker count."""
    workers = workers if workers is not None else max(1, min(mp.cpu_count(), 8))
    if workers <= 1 or len(texts) < 2:
        _init_worker(spec)
        parts = [_encode_doc(t) for t in texts]
    else:
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(spec,)) as pool:
            parts = pool.map(_encode_doc, texts, chunksize=max(1, len(texts) // (4 * workers)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def tiny_tokens(split: str = "train") -> np.ndarray:
    """Byte-tokenised ids (int64, EOS 256 after each document) of the shipped tiny corpus."""
    return tokenize_documents([t for _, t in tiny_documents(split)], "byte", workers=1)

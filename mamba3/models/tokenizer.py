"""Tokenizers: a built-in byte-level one (no files) and any ``tokenizers`` JSON file.

Both expose ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``eos_token_id`` (or None) and ``decode_stream()`` for incremental decoding of generated ids.
"""
from __future__ import annotations

import codecs
import os
from typing import Iterable, Optional


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus ``<eos>`` = 256 when ``add_eos`` (vocab 257)."""

    def __init__(self, add_eos: bool = True):
        self.eos_token_id: Optional[int] = 256 if add_eos else None
        self.vocab_size = 257 if add_eos else 256
        self.name = "bytes"

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        if add_eos:
            if self.eos_token_id is None:
                raise ValueError("this ByteTokenizer has no eos token (add_eos=False at construction)")
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif not skip_special_tokens and i == self.eos_token_id:
                out.extend(b"<eos>")
        return out.decode("utf-8", errors="replace")

    def decode_stream(self) -> "_ByteStream":
        return _ByteStream(self)


class _ByteStream:
    """Incremental decoder: feed ids one at a time, get complete UTF-8 text pieces back."""

    def __init__(self, tok: ByteTokenizer):
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_id: int) -> str:
        return self.dec.decode(bytes([token_id])) if 0 <= token_id < 256 else ""


class HFTokenizer:
    """Wrapper around ``tokenizers.Tokenizer`` (a tokenizer.json file)."""

    def __init__(self, tok, eos_token: Optional[str] = None, name: str = "tokenizers"):
        self.tok = tok
        self.name = name
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = None
        for cand in ([eos_token] if eos_token else []) + ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]:
            i = tok.token_to_id(cand)
            if i is not None:
                self.eos_token_id = i
                break

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_eos:
            if self.eos_token_id is None:
                raise ValueError(f"tokenizer {self.name} has no known eos token")
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_stream(self) -> "_TextDiffStream":
        return _TextDiffStream(self)


class _TextDiffStream:
    """Incremental decoding for BPE: decode the ids since the last emitted piece and emit the
    new text once it no longer ends in an incomplete character."""

    def __init__(self, tok: HFTokenizer):
        self.tok, self.ids, self.emitted = tok, [], ""

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[len(self.emitted):], text
        if len(self.ids) > 64:  # keep the window small: restart from the emitted boundary
            self.ids, self.emitted = [], ""
        return new


def load_tokenizer(path: Optional[str] = None, eos_token: Optional[str] = None):
    """None / "bytes" -> ByteTokenizer; a tokenizer.json file (or a directory holding one) ->
    HFTokenizer (needs the ``tokenizers`` package)."""
    if path is None or path in ("bytes", "byte"):
        return ByteTokenizer()
    p = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(p):
        raise FileNotFoundError(f"tokenizer file not found: {p}")
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError("loading a tokenizer.json needs the 'tokenizers' package (pip install tokenizers)") from e
    return HFTokenizer(Tokenizer.from_file(p), eos_token=eos_token, name=os.path.basename(p))

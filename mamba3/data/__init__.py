"""Offline text data: registry sources (fetched at set-up time, checksummed), cleaning, parallel
tokenisation into uint16/uint32 token shards with a JSON manifest, and the shipped tiny corpus.

Build a corpus with ``mamba3 data build`` (``build.build_corpus``); read it with ``TokenShards``.
"""
from .build import BuildConfig, build_corpus, split_documents
from .shards import TokenShards, read_manifest, token_dtype, write_tokens
from .sources import SOURCES, Source, clean_text, strip_gutenberg, tiny_documents, verify_archive
from .loader import ArrayStream, WindowSampler, rank_indices
from .tokenize import get_codec, tokenize_documents


def tiny_tokens(split: str = "train"):
    """Byte-tokenised ids (numpy int64, EOS 256 after each document) of the shipped tiny corpus."""
    return tokenize_documents([t for _, t in tiny_documents(split)], "byte", workers=1)


__all__ = ["ArrayStream", "BuildConfig", "SOURCES", "WindowSampler", "rank_indices", "Source", "TokenShards", "build_corpus",
           "clean_text", "get_codec", "read_manifest", "split_documents", "strip_gutenberg", "tiny_documents",
           "tiny_tokens", "token_dtype", "tokenize_documents", "verify_archive", "write_tokens"]

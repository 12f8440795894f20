"""Offline text data: registry sources (fetched at set-up time, checksummed), cleaning, parallel
tokenisation into uint16/uint32 token shards with a JSON manifest, deterministic resumable
window batches, and the shipped tiny corpus.

Build a corpus with ``mamba3 data build`` (``build.build_corpus``); read it with ``TokenShards``.
"""
from .build import BuildConfig, build_corpus, split_documents
from .loader import ArrayStream, WindowSampler, rank_indices
from .shards import TokenShards, read_manifest, token_dtype, write_tokens
from .sources import SOURCES, Source, clean_text, strip_gutenberg, tiny_documents, verify_archive
from .tokenize import get_codec, tiny_tokens, tokenize_documents

__all__ = ["ArrayStream", "BuildConfig", "SOURCES", "Source", "TokenShards", "WindowSampler", "build_corpus",
           "clean_text", "get_codec", "rank_indices", "read_manifest", "split_documents", "strip_gutenberg",
           "tiny_documents", "tiny_tokens", "token_dtype", "tokenize_documents", "verify_archive", "write_tokens"]

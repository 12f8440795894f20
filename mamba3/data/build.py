"""Build a tokenised corpus: fetch -> verify SHA-256 -> extract -> clean -> split -> tokenise -> shards.

``build_corpus`` writes everything into a temporary sibling folder and renames it onto ``out`` only
after the manifest is written, so a failure (bad checksum, crash, Ctrl-C) leaves either the old
data folder or nothing, never a half-built one.

Train/validation split: per source and per document, by a hash of "<source>/<document name>", so it
does not depend on the order or number of other documents; every source keeps at least one
validation document (per-source perplexity stays comparable across genres, DATA.md section 1).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from .shards import FORMAT, token_dtype, write_manifest, write_tokens
from .sources import SOURCES, Source, clean_text, fetch, fetch_neox_tokenizer, verify_archive
from .tokenize import get_codec, tokenize_documents

DEFAULT_OUT = Path("data_cache/corpus")
DEFAULT_DOWNLOADS = Path("data_cache/downloads")
SHARD_TOKENS = 1 << 26  # 64 M tokens per file at most


@dataclasses.dataclass
class BuildConfig:
    sources: tuple = ("sotu",)          # names in SOURCES, or Source objects (tests)
    tokenizer: str = "byte"             # "byte" | "neox" | path to a tokenizers JSON
    out: Path = DEFAULT_OUT
    download_dir: Path = DEFAULT_DOWNLOADS
    val_fraction: float = 0.05          # of documents, per source (at least one document)
    min_chars: int = 64                 # documents shorter than this after cleaning are dropped
    workers: Optional[int] = None       # tokeniser processes (None: up to 8)
    allow_unpinned: bool = False        # accept an archive whose SHA-256 is not the pinned one

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.sources:
            raise ValueError("sources must name at least one source")
        for s in self.sources:
            if not isinstance(s, Source) and s not in SOURCES:
                raise ValueError(f"sources: unknown source {s!r}; known: {sorted(SOURCES)}")


def is_validation(source: str, doc: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{source}/{doc}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def split_documents(source: str, docs: list[tuple[str, str]], fraction: float):
    """(train_docs, val_docs), deterministic; at least one of each when there are >= 2 documents."""
    train = [d for d in docs if not is_validation(source, d[0], fraction)]
    val = [d for d in docs if is_validation(source, d[0], fraction)]
    if not val and len(docs) >= 2:  # move the train document with the smallest hash
        key = lambda d: hashlib.sha256(f"{source}/{d[0]}".encode()).digest()
        first = min(train, key=key)
        train.remove(first)
        val = [first]
    return train, val


def _resolve_tokenizer(spec: str, download_dir: Path, allow_unpinned: bool) -> str:
    if spec == "byte":
        return spec
    if spec == "neox":
        return str(fetch_neox_tokenizer(download_dir, allow_unpinned=allow_unpinned))
    if not Path(spec).is_file():
        raise ValueError(f"tokenizer must be 'byte', 'neox' or a tokenizers JSON file; {spec!r} is not a file")
    return spec


def build_corpus(cfg: BuildConfig, log=print) -> dict:
    """Build the data folder ``cfg.out``; returns its manifest."""
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        spec = _resolve_tokenizer(cfg.tokenizer, Path(cfg.download_dir), cfg.allow_unpinned)
        codec = get_codec(spec)
        dtype = token_dtype(codec.vocab_size)
        tok_entry = {"spec": cfg.tokenizer, "vocab_size": codec.vocab_size, "eos_id": codec.eos_token_id}
        if spec != "byte":  # keep the tokenizer with the data so the folder is self-contained
            shutil.copyfile(spec, tmp / "tokenizer.json")
            tok_entry["file"] = "tokenizer.json"
        manifest = {"format": FORMAT, "dtype": dtype.name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "tokenizer": tok_entry,
                    "val_fraction": cfg.val_fraction, "sources": {},
                    "splits": {"train": {"files": [], "num_tokens": 0}, "val": {"files": [], "num_tokens": 0}}}
        for src in cfg.sources:
            src = src if isinstance(src, Source) else SOURCES[src]
            archive = fetch(src, Path(cfg.download_dir))
            digest = verify_archive(archive, src.sha256, allow_unpinned=cfg.allow_unpinned)
            docs = [(name, clean_text(text)) for name, text in src.extract(archive)]
            docs = [d for d in docs if len(d[1]) >= cfg.min_chars]
            if not docs:
                raise ValueError(f"source {src.name!r}: no documents of >= {cfg.min_chars} characters in {archive}")
            entry = {"archive": src.archive, "sha256": digest, "licence": src.licence, "documents": {}}
            for split, part in zip(("train", "val"), split_documents(src.name, docs, cfg.val_fraction)):
                ids = tokenize_documents([t for _, t in part], spec, workers=cfg.workers)
                entry["documents"][split] = [n for n, _ in part]
                for k, start in enumerate(range(0, max(len(ids), 1), SHARD_TOKENS)):
                    name = f"{split}-{src.name}-{k:05d}.bin"
                    n = write_tokens(tmp / name, ids[start: start + SHARD_TOKENS], dtype)
                    manifest["splits"][split]["files"].append({"path": name, "source": src.name, "num_tokens": n})
                    manifest["splits"][split]["num_tokens"] += n
                log(f"{src.name}/{split}: {len(part)} documents, {len(ids):,} tokens")
            manifest["sources"][src.name] = entry
        write_manifest(tmp, manifest)  # last file: marks the folder complete
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

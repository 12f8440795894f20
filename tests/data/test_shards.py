"""Token shards, the tokenizer pool, the shipped tiny corpus and the window sampler."""
import numpy as np
import pytest

from mamba3.data import (ArrayStream, TokenShards, WindowSampler, rank_indices, tiny_documents, tiny_tokens,
                         token_dtype, tokenize_documents, write_tokens)
from mamba3.data.shards import FORMAT, write_manifest
from mamba3.models.tokenizer import ByteTokenizer


@pytest.mark.parametrize("vocab", [257, 50280, 128256])
def test_shards_return_exactly_what_was_written(tmp_path, vocab):
    rng = np.random.default_rng(0)
    dtype = token_dtype(vocab)
    assert dtype == (np.uint16 if vocab <= 65536 else np.uint32)
    parts = [rng.integers(0, vocab, n) for n in (37, 0, 100, 5)]
    files = []
    for i, p in enumerate(parts):
        write_tokens(tmp_path / f"train-s-{i}.bin", p, dtype)
        files.append({"path": f"train-s-{i}.bin", "source": "s" if i < 2 else "t", "num_tokens": len(p)})
    write_manifest(tmp_path, {"format": FORMAT, "dtype": dtype.name,
                              "splits": {"train": {"files": files, "num_tokens": 142}}})
    whole = np.concatenate(parts)
    sh = TokenShards(tmp_path, "train")
    assert len(sh) == len(whole)
    np.testing.assert_array_equal(sh.read(0, len(sh)), whole)
    for start, n in [(30, 20), (36, 1), (37, 100), (136, 6), (0, 0)]:  # reads across file boundaries
        np.testing.assert_array_equal(sh.read(start, n), whole[start: start + n])
    np.testing.assert_array_equal(TokenShards(tmp_path, "train", ["t"]).read(0, 105), whole[37:])
    with pytest.raises(IndexError):
        sh.read(140, 5)
    with pytest.raises(ValueError, match="split 'val' not in"):
        TokenShards(tmp_path, "val")
    with pytest.raises(ValueError, match="out of range"):
        write_tokens(tmp_path / "x.bin", np.array([70000]), np.dtype(np.uint16))
    assert not list(tmp_path.glob(".*tmp*"))


def test_truncated_shard_detected(tmp_path):
    write_tokens(tmp_path / "a.bin", np.arange(10), np.dtype(np.uint16))
    write_manifest(tmp_path, {"format": FORMAT, "dtype": "uint16",
                              "splits": {"train": {"files": [{"path": "a.bin", "source": "s", "num_tokens": 11}]}}})
    with pytest.raises(ValueError, match="manifest says 22"):
        TokenShards(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="mamba3 data build"):
        TokenShards(tmp_path / "nowhere", "train")


def test_tokenize_matches_byte_tokenizer_and_pool():
    texts = ["héllo wörld", "", "Mamba-3 ✓", "a" * 50]
    tok = ByteTokenizer()
    want = [i for t in texts for i in tok.encode(t, add_eos=True)]
    np.testing.assert_array_equal(tokenize_documents(texts, "byte", workers=1), want)
    np.testing.assert_array_equal(tokenize_documents(texts, "byte", workers=2), want)


def test_tiny_corpus():
    train, val = tiny_documents("train"), tiny_documents("val")
    assert len(train) == 10 and len(val) == 2
    assert not {n for n, _ in train} & {n for n, _ in val}
    assert 250_000 < sum(len(t) for _, t in train) < 400_000
    ids = tiny_tokens("val")
    assert (ids == 256).sum() == 2 and ids.max() == 256
    assert ByteTokenizer().decode(ids[:26].tolist()).startswith("Mr. Vice President")


def test_window_sampler_deterministic_and_partitioned():
    stream = ArrayStream(np.arange(1000))
    s = WindowSampler(stream, 10, seed=3)
    assert s.num_windows == 100
    epoch0 = sorted(s.window(g) for g in range(100))
    assert epoch0 == list(range(100))  # each window once per epoch
    a = s.batch(range(150, 160))
    b = WindowSampler(stream, 10, seed=3).batch(range(150, 160))  # a fresh sampler (resume)
    assert a.equal(b) and a.shape == (10, 10) and (a[:, 1:] - a[:, :-1] == 1).all()
    assert not a.equal(WindowSampler(stream, 10, seed=4).batch(range(150, 160)))
    # 2 ranks x 2 micro-steps x 3 cover the global batch exactly once
    got = sorted(i for k in range(2) for r in range(2) for i in rank_indices(24, 3, k, r, 2))
    assert got == list(range(24, 36))
    assert WindowSampler(stream, 10, shuffle=False).window(105) == 5
    with pytest.raises(ValueError, match="shorter than seq_len"):
        WindowSampler(ArrayStream(np.arange(5)), 10)

import pytest

from mamba3.models.tokenizer import ByteTokenizer, load_tokenizer


def test_byte_round_trip_and_eos():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓ 🙂"
    ids = tok.encode(text, add_eos=True)
    assert ids[-1] == 256 and tok.vocab_size == 257 and max(ids[:-1]) < 256
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False).endswith("<eos>")
    with pytest.raises(ValueError, match="no eos token"):
        ByteTokenizer(add_eos=False).encode("a", add_eos=True)


def test_byte_stream_decodes_multibyte_characters():
    tok = ByteTokenizer()
    ids = tok.encode("a✓🙂b")
    s = tok.decode_stream()
    pieces = [s.step(i) for i in ids]
    assert "".join(pieces) == "a✓🙂b"
    assert "" in pieces  # incomplete UTF-8 sequences are held back
    assert load_tokenizer("bytes").vocab_size == 257 and load_tokenizer(None).eos_token_id == 256


def test_load_tokenizers_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="JSON tokenizers need the optional tokenizers package")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    t.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path))  # a directory holding tokenizer.json
    assert tok.eos_token_id == 0
    ids = tok.encode("the lazy fox ✓")
    assert tok.decode(ids) == "the lazy fox ✓"
    s = tok.decode_stream()
    assert "".join(s.step(i) for i in ids) == "the lazy fox ✓"
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer(str(tmp_path / "nope.json"))

"""Byte-level BPE: special ids, exact round trips, stable hash, byte lengths, conversations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tfkit.data.tokenizer import SPECIAL_TOKENS, Tokenizer, render_conversation
from tfkit.errors import DataError

TEXTS = [
    "plain ASCII, with punctuation; and   spaces\tand tabs\n",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, עברית מימין לשמאל",
    "emoji 🎉👩‍👩‍👧 and combining e\u0301 and ZWJ, a NUL \x00 byte and \r\n CRLF",
    " leading space", "", "\n\n\n", "<|endoftext|> inside text",
]


def test_special_tokens_have_fixed_ids(tok):
    assert SPECIAL_TOKENS == ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.eot_id == 0 and tok.id_to_token(0) == "<|endoftext|>"
    assert tok.vocab_size == 512


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.uint16)) == text


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_merges_compress_english(tok, play):
    text = play.read_text()[:20000]
    ids = tok.encode(text)
    assert len(text.encode()) / len(ids) > 1.7  # 512-token BPE on the text it was trained on (bytes alone: 1.0)


def test_byte_lengths_sum_to_utf8_bytes(tok):
    lengths = tok.byte_lengths()
    assert lengths.dtype == np.int32 and lengths.shape == (tok.vocab_size,)
    assert lengths[:5].tolist() == [0, 0, 0, 0, 0]
    assert lengths[5:].min() >= 1
    for text in TEXTS:
        assert int(lengths[tok.encode(text)].sum()) == len(text.encode("utf-8")) - (
            len("<|endoftext|>") if "<|endoftext|>" in text else 0)
    for text in TEXTS:  # token_bytes shows the exact bytes, also of partial characters
        assert b"".join(tok.token_bytes(i) for i in tok.encode(text)) == text.encode("utf-8")


def test_save_load_keeps_hash_and_behaviour(tok, tmp_path):
    p = tmp_path / "tokenizer.json"
    tok.save(p)
    json.loads(p.read_text())  # an ordinary HF tokenizer.json
    again = Tokenizer.load(p)
    assert again.hash == tok.hash and len(tok.hash) == 64
    assert again.vocab_size == tok.vocab_size
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert [p.name] == [f.name for f in tmp_path.iterdir()]  # no temporary file left


def test_hash_differs_between_tokenizers(tok):
    other = Tokenizer.train(["some completely different text " * 50], 300)
    assert other.hash != tok.hash


def test_training_is_deterministic(play):
    a = Tokenizer.train_files([play], 400)
    b = Tokenizer.train([play], 400)
    assert a.hash == b.hash


def test_conversation_special_tokens_are_single_ids(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <there>"},
            {"role": "assistant", "content": "Hello!"}]
    text = render_conversation(msgs)
    assert text == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi <there><|end|>\n<|assistant|>\nHello!<|end|>\n"
    assert tok.render_conversation(msgs) == text
    ids = tok.encode(text)
    assert [i for i in ids if i < 5] == [1, 4, 2, 4, 3, 4]
    assert tok.decode(ids) == text
    assert render_conversation(msgs[:2], add_generation_prompt=True).endswith("<|end|>\n<|assistant|>\n")


@pytest.mark.parametrize("bad, match", [
    ([{"role": "robot", "content": "x"}], "messages\\[0\\] has role 'robot'"),
    ([{"role": "user", "content": 5}], "messages\\[0\\] content is int"),
    (["hello"], "messages\\[0\\] is not an object"),
])
def test_bad_conversations(bad, match):
    with pytest.raises(DataError, match=match):
        render_conversation(bad)


def test_vocab_size_bounds():
    with pytest.raises(DataError, match="vocab size 100 is out of range") as e:
        Tokenizer.train(["text"], 100)
    assert "--vocab-size" in e.value.hint
    with pytest.raises(DataError, match="no text to train"):
        Tokenizer.train(["", "  \n"], 300)


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(DataError, match="is empty"):
        Tokenizer.load(tmp_path / "empty.json")
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(DataError, match="not a valid tokenizer file") as e:
        Tokenizer.load(tmp_path / "bad.json")
    assert "tfkit tokenize" in e.value.hint

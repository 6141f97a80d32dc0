from dataclasses import astuple, fields
from pathlib import Path

import pytest

from data.shards import expand_sources, iter_documents
from data.tokenizer import SPECIAL_TOKEN_STRINGS, ByteTokenizer, SpecialTokens, build_tokenizer

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"

MIXED = (
    "Hello, мир! مرحبا بالعالم · नमस्ते दुनिया · 你好，世界 · 안녕하세요 · ᱥᱟᱱᱛᱟᱲᱤ · ⵜⴰⵎⴰⵣⵉⵖⵜ\n"
    "e\u0301 (e + combining acute) vs \u00e9, Z\u0351\u0325a\u0301\u0327l\u0336g\u0328o\u0303\n"
    "emoji: 👩🏽‍🚀 🇳🇬 🏳️‍🌈 1️⃣ \u200d\ufeff\u0000\r\n\tend"
)


@pytest.fixture(scope="module")
def tok() -> ByteTokenizer:
    return ByteTokenizer()


def test_round_trip_every_sample_document(tok: ByteTokenizer) -> None:
    documents = [d for path in expand_sources([str(SAMPLE_DIR)]) for d in iter_documents(path)]
    assert len(documents) > 1000
    for document in documents:
        ids = tok.encode(document.text)
        assert max(ids) < 256
        assert tok.decode(ids) == document.text, document.id


def test_round_trip_mixed_scripts_emoji_combining_marks(tok: ByteTokenizer) -> None:
    ids = tok.encode(MIXED, bos=True, eos=True)
    assert ids[0] == tok.special.bos and ids[-1] == tok.special.eos
    assert ids[1:-1] == list(MIXED.encode("utf-8"))
    assert tok.decode(ids[1:-1]) == MIXED
    assert tok.decode(ids) == "<|begin_of_text|>" + MIXED + "<|end_of_text|>"


def test_special_ids_fixed_distinct_and_after_the_bytes(tok: ByteTokenizer) -> None:
    assert list(SPECIAL_TOKEN_STRINGS) == [field.name for field in fields(SpecialTokens)]
    ids = astuple(tok.special)
    assert ids == tuple(range(256, 256 + len(SPECIAL_TOKEN_STRINGS)))
    assert len(set(ids)) == len(ids) == 11
    assert tok.vocab_size == 256 + 11 == max(ids) + 1
    assert (tok.special.bos, tok.special.eos, tok.special.pad) == (256, 257, 258)
    assert tok.special.frame_separator == 266


def test_special_strings_in_text_stay_bytes(tok: ByteTokenizer) -> None:
    text = "<|begin_of_text|>x<|patch|><|eot|>"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_decode_renders_every_special_by_name(tok: ByteTokenizer) -> None:
    for name, string in SPECIAL_TOKEN_STRINGS.items():
        token_id = getattr(tok.special, name)
        assert tok.decode([token_id]) == string
        assert tok.token_str(token_id) == string
    patch = tok.special.patch
    assert tok.decode([*b"ab", patch, patch, *b"c"]) == "ab<|patch|><|patch|>c"


def test_decode_joins_a_character_split_over_ids(tok: ByteTokenizer) -> None:
    astronaut = "👩🏽‍🚀"  # several code points of four and three bytes each
    ids = tok.encode(astronaut)
    assert len(ids) == len(astronaut.encode("utf-8")) > 4
    assert tok.decode(iter(ids)) == astronaut  # any iterable, one id at a time


def test_decode_replaces_only_invalid_bytes(tok: ByteTokenizer) -> None:
    euro = list("€".encode())  # E2 82 AC
    assert tok.decode(euro[:2]) == "\ufffd"  # a cut-off character
    assert tok.decode([*b"a", 0xFF, *b"b"]) == "a\ufffdb"
    # A special token between the bytes of one character splits it: both halves are invalid.
    assert tok.decode([euro[0], tok.special.eot, *euro[1:]]).count("\ufffd") >= 2


def test_token_str(tok: ByteTokenizer) -> None:
    assert tok.token_str(ord("A")) == "A"
    assert tok.token_str(ord(" ")) == " "
    assert tok.token_str(0x0A) == "<0x0A>"
    assert tok.token_str(0xE2) == "<0xE2>"


@pytest.mark.parametrize("bad_id", [-1, 267, 10**6])
def test_ids_outside_the_vocabulary_raise(tok: ByteTokenizer, bad_id: int) -> None:
    with pytest.raises(ValueError, match=str(bad_id)):
        tok.decode([65, bad_id])
    with pytest.raises(ValueError, match=str(bad_id)):
        tok.token_str(bad_id)


def test_build_tokenizer() -> None:
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match=r"'tiktoken'.*byte"):
        build_tokenizer("tiktoken")

"""The BPE adapters (tiktoken ranks file, HF tokenizer.json) against the byte tokenizer's
contract, on small vocabularies built here from the shipped sample corpus.

The ranks file holds all 256 single bytes (rank = byte value) and the merges a tiny
`tokenizers` BPE learns on part of the corpus. The tokenizer.json is made from the same ranks
the way the released Llama 4 tokenizer.json was made from tokenizer.model (every split of a
token into two ranked pieces is a merge, in rank order, the Llama 4 specials are added tokens),
so the two adapters, two independent BPE implementations, must give the same ids.
"""

from __future__ import annotations

import base64
import json
import pickle
import random
from dataclasses import astuple
from pathlib import Path

import fsspec
import pytest
import regex
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFRawTokenizer

from data.bpe_tokenizers import (
    FRAME_SEPARATOR_SLOT_NAME,
    LLAMA4_NUM_SPECIAL_TOKENS,
    LLAMA4_PAT_STR,
    LLAMA4_SPECIAL_OFFSETS,
    LLAMA4_SPECIAL_TOKEN_STRINGS,
    HFTokenizer,
    TiktokenTokenizer,
    llama4_special_tokens,
    split_like_reference,
)
from data.shards import Document, expand_sources, iter_documents
from data.tokenizer import ByteTokenizer, SpecialTokens, build_tokenizer

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"
NUM_MERGES = 384

# Our names of the named slots: the release's, plus <|frame_separator|> in its slot 82.
LLAMA4_NAMES = {
    "bos": "<|begin_of_text|>",
    "eos": "<|end_of_text|>",
    "pad": "<|finetune_right_pad|>",
    "eot": "<|eot|>",
    "image_start": "<|image_start|>",
    "image_end": "<|image_end|>",
    "image": "<|image|>",
    "patch": "<|patch|>",
    "tile_x_separator": "<|tile_x_separator|>",
    "tile_y_separator": "<|tile_y_separator|>",
    "frame_separator": "<|frame_separator|>",
}
# The release's 2048 names: ours, with slot 82 under its reserved name.
RELEASE_NAMES = list(LLAMA4_SPECIAL_TOKEN_STRINGS)
RELEASE_NAMES[82] = FRAME_SEPARATOR_SLOT_NAME


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: byte -> the character that stands for it."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in keep}
    shifted = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return chars


B2U = byte_level_alphabet()
U2B = {c: b for b, c in B2U.items()}


def llama4_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA4_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def write_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    lines = (f"{base64.b64encode(token).decode()} {rank}" for token, rank in ranks.items())
    path.write_text("\n".join(lines) + "\n")


def hf_tokenizer_json(
    ranks: dict[bytes, int], specials: list[str], *, bos_template: bool = True
) -> str:
    """A byte-level BPE tokenizer.json equivalent to `ranks`, specials as added tokens."""
    vocab = {"".join(B2U[b] for b in token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        splits = [(a, b) for a, b in splits if max(ranks.get(a, rank), ranks.get(b, rank)) < rank]
        splits.sort(key=lambda split: (ranks[split[0]], ranks[split[1]]))
        merges += [("".join(B2U[x] for x in a), "".join(B2U[x] for x in b)) for a, b in splits]
    tok = HFRawTokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = llama4_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if bos_template and "<|begin_of_text|>" in specials:  # as the release: "<bos> $A"
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
        )
    return tok.to_str()


@pytest.fixture(scope="module")
def documents() -> list[Document]:
    docs = [d for path in expand_sources([str(SAMPLE_DIR)]) for d in iter_documents(path)]
    assert len(docs) > 1000
    return docs


@pytest.fixture(scope="module")
def ranks(documents: list[Document]) -> dict[bytes, int]:
    """256 single bytes, then the merges a BPE learns on every 8th document (~280 KB)."""
    trainer = HFRawTokenizer(models.BPE())
    trainer.pre_tokenizer = llama4_pre_tokenizer()
    trainer.train_from_iterator(
        [d.text for d in documents[::8]],
        trainers.BpeTrainer(
            vocab_size=256 + NUM_MERGES,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    ranks = {bytes([b]): b for b in range(256)}
    for left, right in json.loads(trainer.to_str())["model"]["merges"]:
        ranks.setdefault(bytes(U2B[c] for c in left + right), len(ranks))
    assert len(ranks) > 256 + NUM_MERGES // 2
    return ranks


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, ranks: dict[bytes, int]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bpe")
    write_ranks(root / "tokenizer.model", ranks)
    (root / "tokenizer.json").write_text(hf_tokenizer_json(ranks, RELEASE_NAMES))
    return {"tiktoken": root / "tokenizer.model", "hf": root / "tokenizer.json"}


@pytest.fixture(scope="module")
def tik(files: dict[str, Path]) -> TiktokenTokenizer:
    return TiktokenTokenizer(str(files["tiktoken"]))


@pytest.fixture(scope="module")
def hf(files: dict[str, Path]) -> HFTokenizer:
    return HFTokenizer(str(files["hf"]))


@pytest.fixture(scope="module", params=["tiktoken", "hf"])
def bpe(request: pytest.FixtureRequest) -> TiktokenTokenizer | HFTokenizer:
    return request.getfixturevalue("tik" if request.param == "tiktoken" else "hf")


@pytest.fixture(scope="module")
def encoded(
    documents: list[Document], tik: TiktokenTokenizer, hf: HFTokenizer
) -> dict[str, list[list[int]]]:
    return {
        "tiktoken": [tik.encode(d.text) for d in documents],
        "hf": [hf.encode(d.text) for d in documents],
    }


# --- the Llama 4 layout --------------------------------------------------------------------


def test_layout_for_a_200000_rank_file_is_the_release_layout() -> None:
    assert 200000 + LLAMA4_NUM_SPECIAL_TOKENS == 202048
    assert llama4_special_tokens(200000) == SpecialTokens(
        bos=200000,
        eos=200001,
        pad=200018,
        eot=200008,
        image_start=200080,
        image_end=200081,
        image=200090,
        patch=200092,
        tile_x_separator=200084,
        tile_y_separator=200085,
        frame_separator=200082,
    )
    strings = LLAMA4_SPECIAL_TOKEN_STRINGS
    assert len(strings) == len(set(strings)) == 2048
    assert all(s.startswith("<|") and s.endswith("|>") for s in strings)
    assert {
        name: strings[offset] for name, offset in LLAMA4_SPECIAL_OFFSETS.items()
    } == LLAMA4_NAMES
    # Landmarks of Meta's list: FIM, the chat tokens, the block boundaries.
    assert strings[2:5] == ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")
    assert strings[5:7] == ("<|header_start|>", "<|header_end|>")
    assert strings[7] == "<|eom|>" and strings[16:18] == ("<|python_start|>", "<|python_end|>")
    assert strings[79] == "<|text_post_train_reserved_special_token_68|>"
    assert strings[83] == "<|vision_reserved_special_token_1|>"
    assert strings[91] == "<|vision_reserved_special_token_6|>"
    assert strings[1133] == "<|vision_reserved_special_token_1047|>"
    assert strings[1142:1144] == ("<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>")
    assert strings[1144] == "<|reserved_special_token_0|>"
    assert strings[2047] == "<|reserved_special_token_903|>"


def test_a_200000_rank_file_gives_the_release_ids(tmp_path: Path) -> None:
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"\xff%d" % i: i for i in range(256, 200000)})
    write_ranks(tmp_path / "tokenizer.model", ranks)
    tok = TiktokenTokenizer(str(tmp_path / "tokenizer.model"))
    assert tok.vocab_size == 202048
    assert (tok.special.bos, tok.special.eos, tok.special.eot, tok.special.pad) == (
        200000,
        200001,
        200008,
        200018,
    )
    assert (tok.special.image_start, tok.special.image_end, tok.special.image) == (
        200080,
        200081,
        200090,
    )
    assert (tok.special.tile_x_separator, tok.special.tile_y_separator) == (200084, 200085)
    assert tok.special.patch == 200092
    assert tok.token_str(200092) == "<|patch|>" and tok.token_str(202047).startswith("<|reserved")
    assert tok.encode("hi", bos=True) == [200000, ord("h"), ord("i")]
    assert tok.decode([200000, ord("h"), 200008]) == "<|begin_of_text|>h<|eot|>"


def test_tiktoken_specials_follow_the_last_rank(
    tik: TiktokenTokenizer, ranks: dict[bytes, int]
) -> None:
    base = len(ranks)
    assert tik.vocab_size == base + 2048
    assert astuple(tik.special) == tuple(base + o for o in LLAMA4_SPECIAL_OFFSETS.values())
    for name, string in LLAMA4_NAMES.items():
        token_id = getattr(tik.special, name)
        assert tik.token_str(token_id) == string
        assert tik.decode([token_id]) == string
    assert tik.token_str(base + 2047) == "<|reserved_special_token_903|>"


def test_pattern_is_o200k(tik: TiktokenTokenizer) -> None:
    # Digits in threes, contractions kept with their word, case runs split, newlines apart.
    assert regex.findall(LLAMA4_PAT_STR, "I'm HELLOworld 1234567 he'LL\n\n  x") == [
        "I'm",
        " HELLOworld",
        " ",
        "123",
        "456",
        "7",
        " he'LL",
        "\n\n",
        " ",
        " x",
    ]


# --- both adapters -------------------------------------------------------------------------


def test_round_trip_every_sample_document(
    bpe: TiktokenTokenizer | HFTokenizer,
    documents: list[Document],
    encoded: dict[str, list[list[int]]],
    ranks: dict[bytes, int],
) -> None:
    ids_per_doc = encoded["tiktoken" if isinstance(bpe, TiktokenTokenizer) else "hf"]
    for document, ids in zip(documents, ids_per_doc, strict=True):
        assert max(ids, default=0) < len(ranks), document.id  # no special from text
        assert bpe.decode(ids) == document.text, document.id
    num_bytes = sum(len(d.text.encode("utf-8")) for d in documents)
    assert sum(map(len, ids_per_doc)) < 0.8 * num_bytes  # the merges are used


def test_tiktoken_and_hf_give_the_same_ids(
    tik: TiktokenTokenizer, hf: HFTokenizer, encoded: dict[str, list[list[int]]]
) -> None:
    assert encoded["tiktoken"] == encoded["hf"]
    assert hf.vocab_size == tik.vocab_size
    assert hf.special == tik.special  # frame_separator: the release's reserved slot 82
    for token_id in range(tik.vocab_size):
        assert hf.token_str(token_id) == tik.token_str(token_id).replace(
            "<|frame_separator|>", FRAME_SEPARATOR_SLOT_NAME
        )


def test_special_strings_in_text_stay_text(
    bpe: TiktokenTokenizer | HFTokenizer, ranks: dict[bytes, int]
) -> None:
    text = (
        "a<|begin_of_text|>x<|patch|><|eot|> "
        + "".join(RELEASE_NAMES[::7])
        + "".join(LLAMA4_NAMES.values())
    )
    ids = bpe.encode(text)
    assert max(ids) < len(ranks)
    assert bpe.decode(ids) == text
    for string in LLAMA4_NAMES.values():
        assert max(bpe.encode(string)) < len(ranks)


def test_hf_library_alone_would_inject_specials(files: dict[str, Path], hf: HFTokenizer) -> None:
    raw = HFRawTokenizer.from_file(str(files["hf"]))
    assert hf.special.eot in raw.encode("x<|eot|>", add_special_tokens=False).ids
    assert hf.special.eot not in hf.encode("x<|eot|>")


def test_bos_eos_flags(bpe: TiktokenTokenizer | HFTokenizer) -> None:
    body = bpe.encode("Hello, мир")
    assert body and bpe.special.bos not in body  # the file's own "<bos> $A" is not applied
    assert bpe.encode("Hello, мир", bos=True) == [bpe.special.bos, *body]
    assert bpe.encode("Hello, мир", eos=True) == [*body, bpe.special.eos]
    ids = bpe.encode("Hello, мир", bos=True, eos=True)
    assert ids == [bpe.special.bos, *body, bpe.special.eos]
    assert bpe.decode(ids) == "<|begin_of_text|>Hello, мир<|end_of_text|>"
    assert bpe.encode("", bos=True, eos=True) == [bpe.special.bos, bpe.special.eos]


def test_decode_joins_a_character_split_over_ids(bpe: TiktokenTokenizer | HFTokenizer) -> None:
    astronaut = "👩🏽‍🚀"
    ids = bpe.encode(astronaut)
    assert len(ids) > 4
    assert bpe.decode(iter(ids)) == astronaut
    assert "\ufffd" in bpe.decode(ids[:1])  # a cut-off character


def test_token_str(bpe: TiktokenTokenizer | HFTokenizer, ranks: dict[bytes, int]) -> None:
    assert bpe.token_str(ord("A")) == "A"
    assert bpe.token_str(ord(" ")) == " "
    assert bpe.token_str(0x0A) == "<0x0A>"
    assert bpe.token_str(0xE2) == "<0xE2>"
    merged = {bpe.token_str(rank) for token, rank in ranks.items() if len(token) > 1}
    assert " the" in merged or " de" in merged


@pytest.mark.parametrize("offset", [-1, 0, 10**12])
def test_ids_outside_the_vocabulary_raise(
    bpe: TiktokenTokenizer | HFTokenizer, offset: int
) -> None:
    bad_id = -1 if offset < 0 else bpe.vocab_size + offset
    with pytest.raises(ValueError, match=str(bad_id)):
        bpe.decode([65, bad_id])
    with pytest.raises(ValueError, match=str(bad_id)):
        bpe.token_str(bad_id)


def test_pickles(bpe: TiktokenTokenizer | HFTokenizer) -> None:
    clone = pickle.loads(pickle.dumps(bpe))
    text = "Pickled for data-loader workers: ηλεκτρονικό <|eot|>"
    assert clone.encode(text, bos=True) == bpe.encode(text, bos=True)
    assert clone.special == bpe.special


def test_reads_through_fsspec(
    files: dict[str, Path], tik: TiktokenTokenizer, hf: HFTokenizer
) -> None:
    text = "Ẹ kú àárọ̀! Good morning."
    memory = fsspec.filesystem("memory")
    for local in files.values():
        memory.pipe(f"/bpe-test/{local.name}", local.read_bytes())
    try:
        for tok, name in ((tik, "tokenizer.model"), (hf, "tokenizer.json")):
            for url in (f"memory://bpe-test/{name}", files["tiktoken"].with_name(name).as_uri()):
                clone = type(tok)(url)
                assert clone.encode(text) == tok.encode(text) and clone.special == tok.special
    finally:
        memory.rm("/bpe-test", recursive=True)


# --- the reference's long-run cuts ---------------------------------------------------------


def reference_split(s: str, max_run: int) -> list[str]:
    """llama-models' `_split_whitespaces_or_nonwhitespaces`, as written there."""
    pieces, run, is_space, start = [], 0, s[0].isspace() if s else False, 0
    for i, char in enumerate(s):
        if is_space ^ char.isspace():
            run, is_space = 1, char.isspace()
        else:
            run += 1
            if run > max_run:
                pieces.append(s[start:i])
                start, run = i, 1
    return [*pieces, s[start:]]


def test_split_like_reference_matches_the_reference_loop() -> None:
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\n", "\u3000", "é", "\t"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) * rng.randint(1, 25) for _ in range(rng.randint(0, 12)))
        expected = [
            piece
            for start in range(0, len(text), 40)
            for piece in reference_split(text[start : start + 40], 7)
        ]
        assert list(split_like_reference(text, max_chars=40, max_run=7)) == expected, text


def test_long_runs_round_trip(tik: TiktokenTokenizer) -> None:
    text = "x" * 60_001 + " " * 30_000 + "y"
    ids = tik.encode(text)
    assert tik.decode(ids) == text
    assert ids == [i for piece in split_like_reference(text) for i in tik.encode(piece)]


# --- bad files, missing tokens, specs ------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("QUJD", "expected '<base64 token> <rank>'"),
        ("!!!! 256", "expected '<base64 token> <rank>'"),
        ("QUJD x", "expected '<base64 token> <rank>'"),
        ("QQ== 256", "token b'A' already has rank 65"),
        ("QUJD 300", "ranks are not 0..256"),
    ],
)
def test_bad_ranks_file(tmp_path: Path, line: str, reason: str) -> None:
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    path = tmp_path / "bad.model"
    path.write_text("\n".join([*lines, line]) + "\n")
    where = f"{path}:257: " if "rank>" in reason or "already" in reason else f"{path}: "
    with pytest.raises(ValueError, match=regex.escape(where + reason)):
        TiktokenTokenizer(str(path))


def test_ranks_file_without_every_byte(tmp_path: Path) -> None:
    path = tmp_path / "short.model"
    write_ranks(path, {bytes([b]): b for b in range(200)})
    with pytest.raises(ValueError, match=r"56 single bytes have no rank \(0xC8, 0xC9"):
        TiktokenTokenizer(str(path))


@pytest.mark.parametrize("missing", ["<|patch|>", "<|begin_of_text|>", "<|eot|>"])
def test_hf_missing_special_is_named(tmp_path: Path, ranks: dict[bytes, int], missing: str) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(hf_tokenizer_json(ranks, [s for s in RELEASE_NAMES if s != missing]))
    with pytest.raises(ValueError, match=regex.escape(f"{path}: the tokenizer has no '{missing}'")):
        HFTokenizer(str(path))


def test_hf_fallback_names(tmp_path: Path, ranks: dict[bytes, int]) -> None:
    base = len(ranks)
    path = tmp_path / "tokenizer.json"
    # Our names (as TiktokenTokenizer writes them): <|frame_separator|> found by name.
    path.write_text(hf_tokenizer_json(ranks, list(LLAMA4_SPECIAL_TOKEN_STRINGS)))
    assert HFTokenizer(str(path)).special.frame_separator == base + 82
    # Llama 3's pad name, and a frame separator of its own at the end.
    names = list(RELEASE_NAMES)
    names[18] = "<|finetune_right_pad_id|>"
    path.write_text(hf_tokenizer_json(ranks, [*names, "<|frame_separator|>"]))
    tok = HFTokenizer(str(path))
    assert tok.special.pad == base + 18
    assert tok.special.frame_separator == base + 2048
    assert tok.vocab_size == base + 2049
    # Neither frame-separator name: the error lists both.
    names = [s for s in RELEASE_NAMES if s != FRAME_SEPARATOR_SLOT_NAME]
    path.write_text(hf_tokenizer_json(ranks, names))
    with pytest.raises(ValueError, match=r"no '<\|frame_separator\|>' or '<\|vision_reserved_spec"):
        HFTokenizer(str(path))


def test_hf_not_a_tokenizer_json(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": 3}')
    with pytest.raises(ValueError, match=regex.escape(f"{path}: not a loadable tokenizer.json")):
        HFTokenizer(str(path))


def test_build_tokenizer_specs(
    files: dict[str, Path], tik: TiktokenTokenizer, hf: HFTokenizer
) -> None:
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    built = build_tokenizer(f"tiktoken:{files['tiktoken']}")
    assert isinstance(built, TiktokenTokenizer) and built.special == tik.special
    built = build_tokenizer(f"hf:{files['hf'].as_uri()}")  # the path may itself hold a colon
    assert isinstance(built, HFTokenizer) and built.special == hf.special


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tiktoken", "unknown tokenizer 'tiktoken'"),
        ("bytes", "unknown tokenizer 'bytes'"),
        ("byte:x", "unknown tokenizer 'byte:x'"),
        ("sentencepiece:/x.model", "unknown tokenizer 'sentencepiece:/x.model'"),
        ("", "unknown tokenizer ''"),
        ("tiktoken:", "tokenizer spec 'tiktoken:' names no file"),
        ("hf:", "tokenizer spec 'hf:' names no file"),
    ],
)
def test_build_tokenizer_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=regex.escape(message)) as error:
        build_tokenizer(spec)
    for form in ("'byte'", "'tiktoken:PATH'", "'hf:PATH'"):
        assert form in str(error.value)


def test_build_tokenizer_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        build_tokenizer(f"tiktoken:{tmp_path / 'nope.model'}")

import json
import random
import unicodedata
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from data.languages import LANGUAGES
from data.prepare import main
from data.sample_corpus import (
    CLDR_LOCALES,
    ISO_CODES_LOCALES,
    NUM_SHARDS,
    SAMPLE_LANGUAGES,
    SECTION_BYTES,
    SPECIMEN_IDS,
    UNCOVERED,
    _iso_codes_texts,
    _specimen_lines,
    sample_records,
    sample_sources,
)
from data.shards import expand_sources, iter_documents, write_documents

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"
# The shipped shards were built from the data in these packages (pinned in the dev extra);
# other versions may ship other data, and then a rebuild differs from the shipped corpus,
# legitimately.
SHIPPED_SOURCES = "babel 2.18.0, gflanguages 0.7.11, pycountry 26.2.16"

# Unicode character-name prefixes of the letters of each ISO 15924 script.
SCRIPT_LETTERS = {
    "Latn": ("LATIN",), "Cyrl": ("CYRILLIC",), "Arab": ("ARABIC",), "Deva": ("DEVANAGARI",),
    "Beng": ("BENGALI",), "Ethi": ("ETHIOPIC",), "Tibt": ("TIBETAN",), "Grek": ("GREEK",),
    "Gujr": ("GUJARATI",), "Hebr": ("HEBREW",), "Armn": ("ARMENIAN",), "Knda": ("KANNADA",),
    "Jpan": ("CJK", "HIRAGANA", "KATAKANA"), "Geor": ("GEORGIAN",), "Khmr": ("KHMER",),
    "Hang": ("HANGUL",), "Laoo": ("LAO",), "Mlym": ("MALAYALAM",), "Mymr": ("MYANMAR",),
    "Orya": ("ORIYA",), "Guru": ("GURMUKHI",), "Olck": ("OL CHIKI",), "Sinh": ("SINHALA",),
    "Taml": ("TAMIL",), "Telu": ("TELUGU",), "Thai": ("THAI",), "Tfng": ("TIFINAGH",),
    "Hans": ("CJK",), "Hant": ("CJK",),
}  # fmt: skip


@pytest.fixture(scope="module")
def shipped() -> list:
    files = expand_sources([str(SAMPLE_DIR / "sample-*.jsonl.zst")])
    assert [Path(f).name for f in files] == [
        f"sample-{i:05d}-of-{NUM_SHARDS:05d}.jsonl.zst" for i in range(NUM_SHARDS)
    ]
    # No on_error: any invalid record fails the test with its file:line.
    return [document for path in files for document in iter_documents(path)]


def test_source_maps_target_registry_languages() -> None:
    for table in (CLDR_LOCALES, SPECIMEN_IDS, ISO_CODES_LOCALES):
        assert set(table) <= set(LANGUAGES)
        assert len(set(table.values())) == len(table)  # one source text per language
    assert len(CLDR_LOCALES) >= 150 and len(SPECIMEN_IDS) >= 170
    # A gflanguages id ends in its script; only Korean's `Kore` (Hangul + Hanja) differs.
    assert all(sid.endswith(code[3:]) for code, sid in SPECIMEN_IDS.items() if code != "kor_Hang")


def test_every_registry_language_is_covered_or_said_why_not() -> None:
    assert set(SAMPLE_LANGUAGES) | set(UNCOVERED) == set(LANGUAGES)
    assert not set(SAMPLE_LANGUAGES) & set(UNCOVERED)
    assert len(SAMPLE_LANGUAGES) >= 187


def test_shipped_sample_is_valid_multilingual_and_sized(shipped: list) -> None:
    per_language = Counter(d.lang for d in shipped)
    assert set(per_language) == set(SAMPLE_LANGUAGES)
    assert len({d.id for d in shipped}) == len(shipped)
    assert all(d.id.rsplit("-", 1)[0] == d.lang for d in shipped)
    sizes = [len(d.text.encode("utf-8")) for d in shipped]
    assert max(sizes) <= SECTION_BYTES
    assert 2_000_000 <= sum(sizes) <= 3_500_000


def test_shipped_sample_text_is_in_each_language_script(shipped: list) -> None:
    def in_script(document) -> float:
        prefixes = SCRIPT_LETTERS[LANGUAGES[document.lang].script]
        letters = [char for char in document.text if char.isalpha()]
        hits = sum(unicodedata.name(char, "").startswith(prefixes) for char in letters)
        return hits / len(letters) if letters else 1.0

    worst = min(shipped, key=in_script)
    assert in_script(worst) > 0.9, worst.id


def test_shipped_sample_has_no_english_under_other_labels(shipped: list) -> None:
    english = {line for d in shipped if d.lang == "eng_Latn" for line in d.text.split("\n")}
    assert english
    lines = [(d.id, line) for d in shipped if d.lang != "eng_Latn" for line in d.text.split("\n")]
    assert [(id_, line) for id_, line in lines if line in english] == []


def test_shipped_sample_is_what_the_builder_makes(shipped: list) -> None:
    if sample_sources() != SHIPPED_SOURCES:
        pytest.skip(f"built from {SHIPPED_SOURCES}, installed: {sample_sources()}")
    rebuilt = sorted((r["id"], r["lang"], r["text"]) for r in sample_records())
    assert rebuilt == sorted((d.id, d.lang, d.text) for d in shipped)


def test_sample_is_byte_identical_across_runs(tmp_path: Path, capsys) -> None:
    runs = [tmp_path / "first", tmp_path / "second"]
    for out in runs:
        assert main(["sample", "--out", str(out), "--max-languages", "12"]) == 0
    assert "12 languages" in capsys.readouterr().out
    first, second = (sorted(out.iterdir()) for out in runs)
    assert len(first) == NUM_SHARDS
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    documents = [d for p in first for d in iter_documents(str(p))]
    # The first 12 mix the sources: CLDR, gflanguages only (ace_Latn, arz_Arab, ayr_Latn), both.
    assert {d.lang for d in documents} == set(SAMPLE_LANGUAGES[:12])
    assert {"ace_Latn", "arz_Arab", "ayr_Latn"} <= {d.lang for d in documents}


def test_sample_seed_changes_selection_and_order() -> None:
    a = sample_records(seed=0, max_languages=3)
    b = sample_records(seed=1, max_languages=3)
    assert [r["id"] for r in a] == [r["id"] for r in b]  # same documents...
    assert [r["text"] for r in a] != [r["text"] for r in b]  # ...with other lines picked


def test_specimen_lines_keep_whole_sentences_and_drop_gap_notes() -> None:
    sample_text = SimpleNamespace(
        styles="Nnipa nyinaa",
        tester="Nnipa nyinaa wɔ ahofadi",
        specimen_48="Nnipa nyinaa wɔ ahofadi.",
        specimen_36="[Missing]",
        specimen_32="(preamble missing)",
        specimen_21="Nnipa nyinaa wɔ ahofadi.\nWɔn nyinaa wɔ nidi.",
        specimen_16="Wɔn nyinaa wɔ nidi.\n\n",
    )
    assert _specimen_lines(sample_text) == ["Nnipa nyinaa wɔ ahofadi.", "Wɔn nyinaa wɔ nidi."]


def test_iso_codes_keep_translations_and_drop_english_fallbacks() -> None:
    texts = _iso_codes_texts("crh", random.Random(0))
    assert len(texts) == 2  # countries, languages: iso-codes has no crh currencies or scripts
    assert all(0 < len(text.encode("utf-8")) <= SECTION_BYTES for text in texts)
    text = "\n".join(texts)
    assert "Germany" not in text and "Afghanistan" not in text  # untranslated: English
    assert text.count("ı") + text.count("ğ") > 50  # Crimean Tatar: Arnavutlıq, Afğanistan
    # iso-codes has an `ace` catalogue with no translation in it: every name would be English.
    assert _iso_codes_texts("ace", random.Random(0)) == []


def test_scan_counts_and_reports_bad_lines(tmp_path: Path, capsys) -> None:
    good = tmp_path / "good.jsonl.zst"
    write_documents(
        str(good),
        [
            {"id": "g-0", "lang": "eng_Latn", "text": "hello"},
            {"id": "g-1", "lang": "zho_Hans", "text": "你好"},
            {"id": "g-2", "lang": "xx_Nope", "text": "?"},
        ],
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "b-0", "lang": "eng_Latn", "text": "ok"}\n{broken\n')
    manifest_path = tmp_path / "manifest.json"
    rc = main(["scan", str(tmp_path), "--out", str(manifest_path)])
    assert rc == 1  # bad records make scan fail, after reading everything

    manifest = json.loads(manifest_path.read_text())
    assert manifest == json.loads(capsys.readouterr().out)
    assert manifest["total"] == {"documents": 4, "bytes": 5 + 6 + 1 + 2, "tokens": 14 + 4 * 2}
    assert manifest["languages"]["eng_Latn"] == {"documents": 2, "bytes": 7, "tokens": 11}
    assert manifest["languages"]["zho_Hans"] == {"documents": 1, "bytes": 6, "tokens": 8}
    assert manifest["unknown_languages"] == ["xx_Nope"]
    assert manifest["bad_records"]["count"] == 1
    (record,) = manifest["bad_records"]["listed"]
    assert (record["file"], record["line"]) == (str(bad), 2)
    assert record["reason"].startswith("malformed JSON")


def test_scan_prints_file_and_line_of_bad_records(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "b-0", "lang": "eng_Latn", "text": ""}\n')
    assert main(["scan", str(bad)]) == 1
    assert f"{bad}:1: empty text" in capsys.readouterr().err


def test_scan_of_shipped_sample_is_clean(capsys) -> None:
    assert main(["scan", str(SAMPLE_DIR)]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["bad_records"]["count"] == 0
    assert manifest["unknown_languages"] == []
    assert len(manifest["languages"]) >= 100


def test_scan_missing_source_fails_cleanly(tmp_path: Path, capsys) -> None:
    assert main(["scan", str(tmp_path / "nothing-*.jsonl")]) == 2
    assert "nothing-*.jsonl" in capsys.readouterr().err

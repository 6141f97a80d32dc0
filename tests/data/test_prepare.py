import json
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from data.languages import LANGUAGES
from data.prepare import CLDR_LOCALES, NUM_SHARDS, main, sample_records
from data.shards import expand_sources, iter_documents, write_documents

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"
# The shipped shards were built from this CLDR release (Babel 2.18.0); another Babel may ship
# other CLDR data, and then a rebuild differs from the shipped corpus, legitimately.
SHIPPED_CLDR = "47"

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


def test_cldr_map_targets_registry_languages() -> None:
    assert len(CLDR_LOCALES) >= 150
    assert set(CLDR_LOCALES) <= set(LANGUAGES)
    assert len(set(CLDR_LOCALES.values())) == len(CLDR_LOCALES)


def test_shipped_sample_is_valid_multilingual_and_sized(shipped: list) -> None:
    per_language = Counter(d.lang for d in shipped)
    assert set(per_language) <= set(LANGUAGES)
    assert len(per_language) >= 100
    assert len({d.id for d in shipped}) == len(shipped)
    assert all(d.id.rsplit("-", 1)[0] == d.lang for d in shipped)
    total_bytes = sum(len(d.text.encode("utf-8")) for d in shipped)
    assert 1_500_000 <= total_bytes <= 3_000_000


def test_shipped_sample_text_is_in_each_language_script(shipped: list) -> None:
    letters, in_script = Counter(), Counter()
    for document in shipped:
        prefixes = SCRIPT_LETTERS[LANGUAGES[document.lang].script]
        for char in document.text:
            if char.isalpha():
                letters[document.lang] += 1
                in_script[document.lang] += unicodedata.name(char, "").startswith(prefixes)
    worst = min(letters, key=lambda lang: in_script[lang] / letters[lang])
    assert in_script[worst] / letters[worst] > 0.9, worst


def test_shipped_sample_is_what_the_builder_makes(shipped: list) -> None:
    from babel.core import get_cldr_version

    if get_cldr_version() != SHIPPED_CLDR:
        pytest.skip(f"Babel has CLDR {get_cldr_version()}, the sample was built from CLDR 47")
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
    assert len({d.lang for d in documents}) == 12


def test_sample_seed_changes_selection_and_order() -> None:
    a = sample_records(seed=0, max_languages=3)
    b = sample_records(seed=1, max_languages=3)
    assert [r["id"] for r in a] == [r["id"] for r in b]  # same documents...
    assert [r["text"] for r in a] != [r["text"] for r in b]  # ...with other lines picked


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

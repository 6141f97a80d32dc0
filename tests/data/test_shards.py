import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import zstandard

from data.shards import (
    Document,
    DocumentError,
    expand_sources,
    iter_documents,
    write_documents,
)

RECORDS = [
    {"id": "a-0", "lang": "eng_Latn", "text": "Hello world.\nSecond line."},
    {"id": "a-1", "lang": "zho_Hans", "text": "你好，世界"},
    {"id": "a-2", "lang": "yor_Latn", "text": "Ẹ kú àárọ̀ 👋🏾"},
]
GOOD_LINE = json.dumps(RECORDS[0])


def read_back(path: str) -> list[tuple[str, str, str, int]]:
    return [(d.id, d.lang, d.text, d.line) for d in iter_documents(path)]


def expected(records: list[dict[str, str]]) -> list[tuple[str, str, str, int]]:
    return [(r["id"], r["lang"], r["text"], n) for n, r in enumerate(records, start=1)]


@pytest.fixture
def memory_dir() -> Iterator[str]:
    """A fresh memory:// folder; the memory filesystem is global, so clean it up."""
    root = f"memory://test-shards-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_round_trip_local(tmp_path: Path, suffix: str) -> None:
    path = str(tmp_path / "nested" / f"shard{suffix}")
    assert write_documents(path, RECORDS) == 3
    documents = list(iter_documents(path))
    assert [(d.id, d.lang, d.text, d.line) for d in documents] == expected(RECORDS)
    assert all(d.source == path and d.content is None for d in documents)
    magic = Path(path).read_bytes()[:4]
    assert (magic == b"\x28\xb5\x2f\xfd") == suffix.endswith(".zst")


def test_round_trip_memory_url(memory_dir: str) -> None:
    for suffix in (".jsonl", ".jsonl.zst"):
        write_documents(f"{memory_dir}/sub/shard{suffix}", RECORDS)
    files = expand_sources([f"{memory_dir}/sub/*"])
    assert [f.rsplit("/", 1)[1] for f in files] == ["shard.jsonl", "shard.jsonl.zst"]
    assert all(f.startswith("memory://") for f in files)
    for path in files:
        assert read_back(path) == expected(RECORDS)


def test_round_trip_file_url(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/shard.jsonl.zst"
    write_documents(url, RECORDS)
    (path,) = expand_sources([f"file://{tmp_path}"])
    assert path.startswith("file://") and path.endswith("shard.jsonl.zst")
    assert read_back(path) == expected(RECORDS)


def relative(files: list[str], root: Path) -> list[str]:
    return [str(Path(f).relative_to(root)) for f in files]


def test_expand_sources_is_sorted_and_deterministic(tmp_path: Path) -> None:
    for name in ["b.jsonl", "a.jsonl.zst", "c.jsonl", "sub/d.jsonl"]:
        write_documents(str(tmp_path / name), RECORDS[:1])
    (tmp_path / "notes.txt").write_text("not a shard")
    assert relative(expand_sources([f"{tmp_path}/*.jsonl"]), tmp_path) == ["b.jsonl", "c.jsonl"]
    # A directory gives its shards, recursively, and skips other files.
    assert relative(expand_sources([str(tmp_path)]), tmp_path) == [
        "a.jsonl.zst",
        "b.jsonl",
        "c.jsonl",
        "sub/d.jsonl",
    ]
    # Sources keep their order; a file named twice stays at its first place.
    mixed = [str(tmp_path / "c.jsonl"), f"{tmp_path}/*.jsonl*"]
    assert relative(expand_sources(mixed), tmp_path) == ["c.jsonl", "a.jsonl.zst", "b.jsonl"]


@pytest.mark.parametrize("pattern", ["missing.jsonl", "*.jsonl.zst", "missing_dir/*"])
def test_missing_source_is_named(tmp_path: Path, pattern: str) -> None:
    source = str(tmp_path / pattern)
    with pytest.raises(FileNotFoundError, match="matches no document file") as caught:
        expand_sources([source])
    assert source in str(caught.value)


def test_missing_memory_source(memory_dir: str) -> None:
    with pytest.raises(FileNotFoundError, match=memory_dir.split("://")[1]):
        expand_sources([f"{memory_dir}/*.jsonl"])


BAD_LINES = [
    ('{"id": "x", "lang": "eng_Latn", "text": "unterminated}', "malformed JSON"),
    ("[1, 2, 3]", "expected a JSON object, got array"),
    ('"just a string"', "expected a JSON object, got string"),
    ('{"lang": "eng_Latn", "text": "t"}', "missing field 'id'"),
    ('{"id": 7, "lang": "eng_Latn", "text": "t"}', "field 'id' must be a string, got number"),
    ('{"id": "", "lang": "eng_Latn", "text": "t"}', "field 'id' is empty"),
    ('{"id": "x", "text": "t"}', "missing field 'lang'"),
    ('{"id": "x", "lang": null, "text": "t"}', "field 'lang' must be a string, got null"),
    ('{"id": "x", "lang": "eng_Latn"}', "missing field 'text' (or 'content')"),
    ('{"id": "x", "lang": "eng_Latn", "text": ["t"]}', "field 'text' must be a string"),
    ('{"id": "x", "lang": "eng_Latn", "text": ""}', "empty text"),
    ('{"id": "x", "lang": "eng_Latn", "text": " \\n\\t"}', "empty text"),
    ('{"id": "x", "lang": "eng_Latn", "text": "a\\ud800b"}', "unpaired surrogate"),
    ('{"id": "x", "lang": "e", "text": "t", "content": []}', "both 'text' and 'content'"),
    ('{"id": "x", "lang": "e", "content": []}', "'content' must be a non-empty array"),
    ('{"id": "x", "lang": "e", "content": [{"type": "audio"}]}', "content[0] has type 'audio'"),
    ('{"id": "x", "lang": "e", "content": [{"type": "text"}]}', "content[0] is a text part"),
    ('{"id": "x", "lang": "e", "content": [{"type": "text", "text": ""}]}', "empty text"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
@pytest.mark.parametrize(("bad_line", "reason"), BAD_LINES)
def test_bad_record_error_names_file_and_line(
    tmp_path: Path, suffix: str, bad_line: str, reason: str
) -> None:
    # Two good lines, a blank one (blank lines are skipped but still counted), then the bad one.
    data = f"{GOOD_LINE}\n{GOOD_LINE}\n\n{bad_line}\n{GOOD_LINE}\n".encode()
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if suffix.endswith("zst") else data)
    with pytest.raises(DocumentError) as caught:
        list(iter_documents(str(path)))
    error = caught.value
    assert str(error).startswith(f"{path}:4: ")
    assert reason in str(error)
    assert (error.source, error.line) == (str(path), 4)


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD_LINE.encode() + b'\n{"id": "x", "lang": "e", "text": "caf\xe9"}\n')
    with pytest.raises(DocumentError, match=r"latin1\.jsonl:2: invalid UTF-8"):
        list(iter_documents(str(path)))


def test_on_error_skips_and_reports_every_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [GOOD_LINE, "{oops", GOOD_LINE, '{"id": "x"}', GOOD_LINE]
    path.write_text("\n".join(lines))  # no final newline: the last line still counts
    errors: list[DocumentError] = []
    documents = list(iter_documents(str(path), on_error=errors.append))
    assert [d.line for d in documents] == [1, 3, 5]
    assert [e.line for e in errors] == [2, 4]


def test_damaged_zstd_files_raise_with_file_and_line(tmp_path: Path) -> None:
    records = [
        {"id": str(i), "lang": "eng_Latn", "text": f"document {i} " * 40} for i in range(500)
    ]
    whole = tmp_path / "whole.jsonl.zst"
    write_documents(str(whole), records)
    blob = whole.read_bytes()
    truncated = tmp_path / "truncated.jsonl.zst"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DocumentError, match=r"truncated\.jsonl\.zst:\d+: corrupt zstd stream"):
        list(iter_documents(str(truncated)))
    garbage = tmp_path / "garbage.jsonl.zst"
    garbage.write_bytes(b"this was never zstd")
    with pytest.raises(DocumentError, match=r"garbage\.jsonl\.zst:1: corrupt zstd stream"):
        list(iter_documents(str(garbage)))


def test_concatenated_zstd_frames_are_one_shard(tmp_path: Path) -> None:
    parts = [tmp_path / "a.jsonl.zst", tmp_path / "b.jsonl.zst"]
    for part, records in zip(parts, (RECORDS[:2], RECORDS[2:]), strict=True):
        write_documents(str(part), records)
    joined = tmp_path / "joined.jsonl.zst"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    assert read_back(str(joined)) == expected(RECORDS)


def test_long_line_spanning_read_blocks(tmp_path: Path) -> None:
    long_text = "ü" * 300_000  # 600 KB of UTF-8, many read blocks
    records = [{"id": "long", "lang": "deu_Latn", "text": long_text}, RECORDS[1]]
    path = str(tmp_path / "long.jsonl.zst")
    write_documents(path, records)
    assert read_back(path) == expected(records)


def test_multimodal_record_keeps_parts_and_concatenates_text(tmp_path: Path) -> None:
    content = [
        {"type": "text", "text": "Look: "},
        {"type": "image", "image": "aGVsbG8="},
        {"type": "text", "text": "a cat."},
        {"type": "video", "frames": ["aGVsbG8="], "fps": 2.0},
    ]
    records = [
        {"id": "m-0", "lang": "eng_Latn", "content": content},
        {"id": "m-1", "lang": "eng_Latn", "content": [{"type": "image", "path": "x.png"}]},
    ]
    path = str(tmp_path / "mm.jsonl")
    write_documents(path, records)
    first, media_only = iter_documents(path)
    assert first == Document("m-0", "eng_Latn", "Look: a cat.", path, 1, tuple(content))
    assert media_only.text == "" and media_only.content == ({"type": "image", "path": "x.png"},)


def test_write_rejects_invalid_records(tmp_path: Path) -> None:
    path = str(tmp_path / "out.jsonl")
    with pytest.raises(DocumentError, match=r"out\.jsonl:2: empty text"):
        write_documents(path, [RECORDS[0], {"id": "x", "lang": "eng_Latn", "text": ""}])


def test_write_is_reproducible(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl.zst", tmp_path / "b.jsonl.zst"
    write_documents(str(a), RECORDS, level=19)
    write_documents(str(b), RECORDS, level=19)
    assert a.read_bytes() == b.read_bytes()


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text(GOOD_LINE)
    with pytest.raises(ValueError, match="not a document shard"):
        list(iter_documents(str(path)))

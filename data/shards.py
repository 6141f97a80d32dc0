"""Document shards: JSON Lines, plain or zstd-compressed, on any fsspec filesystem.

A shard is a `.jsonl` or `.jsonl.zst` file with one record per line:

    {"id": "...", "lang": "eng_Latn", "text": "..."}                    text record
    {"id": "...", "lang": "...", "content": [{"type": "text", ...}, ...]}  multimodal record

Readers stream: a `.jsonl.zst` shard is decompressed as it is read, never whole, so shards of
any size cost a buffer of memory. Every bad record raises `DocumentError` naming the file and
the 1-based line, so a bad shard can be found and fixed, never silently skipped.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import fsspec
import zstandard

SUFFIXES = (".jsonl", ".jsonl.zst")
TOKEN_SHARD_SUFFIX = ".tokens.zst"
"""Pre-tokenized shards (data/pretokenized.py), found in directories next to JSON shards."""
PART_TYPES = ("text", "image", "video")
_GLOB_CHARS = frozenset("*?[")
_READ_SIZE = 1 << 16
_JSON_TYPE_NAMES = (
    (bool, "boolean"),
    (int | float, "number"),
    (str, "string"),
    (list, "array"),
    (Mapping, "object"),
    (type(None), "null"),
)


class DocumentError(ValueError):
    """A record that is not a valid document; the message is `file:line: reason`."""

    def __init__(self, source: str, line: int, reason: str) -> None:
        super().__init__(f"{source}:{line}: {reason}")
        self.source = source
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class Document:
    id: str
    lang: str
    """FLORES-200 code as written in the record; checking it is the caller's policy."""
    text: str
    """The text; for a multimodal record, its text parts concatenated in order."""
    source: str
    """The file the record came from."""
    line: int
    """1-based line of the record in `source`."""
    content: tuple[Mapping[str, Any], ...] | None = None
    """A multimodal record's parts as written (media included); None for a text record.
    Text-only consumers read `text`; the media pipeline reads the parts from here."""


def expand_sources(sources: Sequence[str]) -> list[str]:
    """The shard files named by `sources`, in a deterministic order.

    Each source is a file, a directory (its `.jsonl`/`.jsonl.zst`/`.tokens.zst` files,
    recursively), or a
    glob, as a local path or an fsspec URL. Sources keep their given order; the files of one
    source are sorted; a file named twice is kept at its first place. A source that matches
    no file raises FileNotFoundError naming it.
    """
    files: list[str] = []
    for source in sources:
        files.extend(_expand_source(source))
    return list(dict.fromkeys(files))


def _expand_source(source: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(source)
    if _GLOB_CHARS.intersection(path):
        found = fs.glob(path, detail=True)
        matches = [p for p, info in found.items() if info["type"] == "file"]
    elif fs.isdir(path):
        matches = [p for p in fs.find(path) if p.endswith((*SUFFIXES, TOKEN_SHARD_SUFFIX))]
    elif fs.isfile(path):
        matches = [path]
    else:
        matches = []
    if not matches:
        raise FileNotFoundError(f"data source {source!r} matches no document file")
    # Keep URLs as URLs so each file opens on the same filesystem as its source.
    if "://" in source:
        return [fs.unstrip_protocol(p) for p in sorted(matches)]
    return sorted(matches)


def iter_documents(
    path: str, *, on_error: Callable[[DocumentError], None] | None = None
) -> Iterator[Document]:
    """The documents of one shard, in file order; blank lines are not records.

    A bad record raises DocumentError, unless `on_error` is given: then it receives the error
    and reading goes on (to count or log skips). A damaged file (corrupt zstd stream) always
    raises, since nothing after the damage can be trusted.
    """
    for line, raw in _iter_lines(path):
        if not raw.strip():
            continue
        try:
            document = _parse_line(raw, path, line)
        except DocumentError as error:
            if on_error is None:
                raise
            on_error(error)
            continue
        yield document


def write_documents(path: str, records: Iterable[Mapping[str, Any]], *, level: int = 3) -> int:
    """Write `records` to `path` (`.jsonl`, or `.jsonl.zst` compressed at zstd `level`).

    Every record is validated first, so what is written reads back; returns the count.
    Output is a pure function of the records and `level` (no timestamps), so reproducible.
    """
    count = 0
    with _open_for_writing(path, level) as out:
        for count, record in enumerate(records, start=1):
            parse_record(record, path, count)
            line = json.dumps(dict(record), ensure_ascii=False, separators=(",", ":"))
            out.write(line.encode("utf-8") + b"\n")
    return count


def parse_record(record: object, source: str, line: int) -> Document:
    """Validate one decoded JSON record and make it a Document (errors name source:line)."""
    if not isinstance(record, Mapping):
        raise DocumentError(source, line, f"expected a JSON object, got {_json_type(record)}")
    doc_id = _string_field(record, "id", source, line)
    lang = _string_field(record, "lang", source, line)
    if "content" in record:
        if "text" in record:
            raise DocumentError(source, line, "record has both 'text' and 'content'; give one")
        content = _content_parts(record["content"], source, line)
        text = "".join(part["text"] for part in content if part["type"] == "text")
        has_media = any(part["type"] != "text" for part in content)
    else:
        if "text" not in record:
            raise DocumentError(source, line, "missing field 'text' (or 'content')")
        content = None
        text = _string_field(record, "text", source, line)
        has_media = False
    if not has_media and not text.strip():
        raise DocumentError(source, line, "empty text")
    _check_encodable(text, source, line)
    return Document(doc_id, lang, text, source, line, content)


def _parse_line(raw: bytes, source: str, line: int) -> Document:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DocumentError(source, line, f"invalid UTF-8 at byte {error.start}") from None
    except json.JSONDecodeError as error:
        reason = f"malformed JSON: {error.msg} (column {error.colno})"
        raise DocumentError(source, line, reason) from None
    return parse_record(record, source, line)


def _string_field(record: Mapping[str, Any], key: str, source: str, line: int) -> str:
    if key not in record:
        raise DocumentError(source, line, f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        reason = f"field {key!r} must be a string, got {_json_type(value)}"
        raise DocumentError(source, line, reason)
    if key != "text" and not value:
        raise DocumentError(source, line, f"field {key!r} is empty")
    return value


def _content_parts(parts: object, source: str, line: int) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(parts, list) or not parts:
        reason = f"field 'content' must be a non-empty array, got {_json_type(parts)}"
        raise DocumentError(source, line, reason)
    for index, part in enumerate(parts):
        where = f"content[{index}]"
        if not isinstance(part, Mapping):
            raise DocumentError(source, line, f"{where} must be an object")
        if part.get("type") not in PART_TYPES:
            reason = f"{where} has type {part.get('type')!r}; expected one of {PART_TYPES}"
            raise DocumentError(source, line, reason)
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise DocumentError(source, line, f"{where} is a text part without a string 'text'")
    return tuple(parts)


def _check_encodable(text: str, source: str, line: int) -> None:
    # JSON can spell lone surrogates ("\ud800") that no UTF-8 tokenizer can encode; catch
    # them here, where the file and line are known, not deep inside a training step.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        reason = f"text has an unpaired surrogate at character {error.start}"
        raise DocumentError(source, line, reason) from None


def _json_type(value: object) -> str:
    # bool before number: in Python, True is an int.
    for kind, name in _JSON_TYPE_NAMES:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _is_compressed(path: str) -> bool:
    if path.endswith(".jsonl.zst"):
        return True
    if path.endswith(".jsonl"):
        return False
    raise ValueError(f"{path}: not a document shard; expected a name ending in {SUFFIXES}")


def _iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    compressed = _is_compressed(path)
    line = 0
    with fsspec.open(path, "rb") as raw:
        blocks = _zstd_blocks(raw) if compressed else iter(lambda: raw.read(_READ_SIZE), b"")
        try:
            for line, text in enumerate(_split_lines(blocks), start=1):
                yield line, text
        except zstandard.ZstdError as error:
            raise DocumentError(path, line + 1, f"corrupt zstd stream: {error}") from None


def _zstd_blocks(raw: BinaryIO) -> Iterator[bytes]:
    """The decompressed bytes of every zstd frame in `raw`, a block at a time.

    Frames follow one another (`cat a.zst b.zst` is a valid shard). A stream that ends inside
    a frame is a truncated file: that raises, where a plain stream reader would just stop and
    silently drop the documents that were cut off.
    """
    decompressor = zstandard.ZstdDecompressor()
    frame, in_frame = decompressor.decompressobj(), False
    while chunk := raw.read(_READ_SIZE):
        while chunk:
            yield frame.decompress(chunk)
            in_frame = not frame.eof
            if in_frame:
                break
            chunk, frame = frame.unused_data, decompressor.decompressobj()
    if in_frame:
        raise zstandard.ZstdError("the file ends inside a frame (truncated?)")


def _split_lines(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines (newline stripped) of a byte stream given in blocks; a line may span blocks."""
    pending: list[bytes] = []
    for block in blocks:
        *complete, rest = block.split(b"\n")
        if complete:
            yield b"".join([*pending, complete[0]])
            yield from complete[1:]
            pending = []
        pending.append(rest)
    tail = b"".join(pending)
    if tail:
        yield tail


@contextmanager
def _open_for_writing(path: str, level: int) -> Iterator[BinaryIO]:
    compressed = _is_compressed(path)
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(posixpath.dirname(fs_path), exist_ok=True)
    with fs.open(fs_path, "wb") as raw:
        if not compressed:
            yield raw
            return
        with zstandard.ZstdCompressor(level=level).stream_writer(raw, closefd=False) as out:
            yield out

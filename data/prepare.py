"""`python -m data.prepare`: build the sample corpus; scan and validate document shards.

    python -m data.prepare sample --out data/sample [--seed N] [--max-languages N]
    python -m data.prepare scan SOURCES... [--out manifest.json] [--tokenizer byte]
    python -m data.prepare tokenize SOURCES... --out DIR [--tokenizer byte]

`sample` writes the multilingual corpus that ships in `data/sample/` (data/sample_corpus.py
says from what).

`scan` reads shards and writes a JSON manifest: documents, bytes and tokens per language and
in total, images and videos with their block tokens, and the bad records with file:line and
reason (it reads on past them, counting).

`tokenize` writes one pre-tokenized `.tokens.zst` shard per input shard (data/pretokenized.py)
for the text documents; documents with media stay in the JSON shards.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec

from data.languages import LANGUAGES
from data.media import MediaConfig, MediaError, media_block
from data.pretokenized import tokenize_documents, write_token_shard
from data.sample_corpus import sample_sources, write_sample
from data.shards import (
    TOKEN_SHARD_SUFFIX,
    Document,
    DocumentError,
    expand_sources,
    iter_documents,
)
from data.tokenizer import Tokenizer, build_tokenizer

MAX_LISTED_BAD = 1000


# ------------------------------------------------------------------------------------ scan


def scan(sources: Sequence[str], tokenizer_name: str = "byte") -> dict[str, Any]:
    """A manifest of the documents in `sources`; bad records are counted, not fatal."""
    tokenizer = build_tokenizer(tokenizer_name)
    files = expand_sources(sources)
    per_language: dict[str, Counter[str]] = {}
    bad: list[DocumentError] = []
    for path in files:
        try:
            for document in iter_documents(path, on_error=bad.append):
                stats = per_language.setdefault(document.lang, Counter())
                stats["documents"] += 1
                stats["bytes"] += len(document.text.encode("utf-8"))
                stats["tokens"] += len(tokenizer.encode(document.text, bos=True, eos=True))
                _count_media(document, tokenizer, stats, bad)
        except DocumentError as error:  # a damaged file: the rest of it is unreadable
            bad.append(error)
    return _manifest(files, tokenizer_name, per_language, bad)


def _count_media(
    document: Document, tokenizer: Tokenizer, stats: Counter[str], bad: list[DocumentError]
) -> None:
    """Per modality: media parts and the tokens of their blocks (default MediaConfig)."""
    for part in document.content or ():
        if part["type"] == "text":
            continue
        try:
            block = media_block(part, tokenizer.special, MediaConfig())
        except MediaError as error:
            bad.append(DocumentError(document.source, document.line, f"{part['type']}: {error}"))
            continue
        stats[f"{part['type']}s"] += 1
        stats[f"{part['type']}_tokens"] += len(block.tokens)


def _manifest(
    files: list[str],
    tokenizer_name: str,
    per_language: dict[str, Counter[str]],
    bad: list[DocumentError],
) -> dict[str, Any]:
    total = sum(per_language.values(), Counter())
    return {
        "files": files,
        "tokenizer": tokenizer_name,
        "tokens_note": (
            "tokens: per document its text's tokens plus bos and eos; image_tokens / "
            "video_tokens: the media blocks' tokens (336-pixel tiles, up to 4 per image)"
        ),
        "total": dict(sorted(total.items())),
        "languages": {lang: dict(per_language[lang]) for lang in sorted(per_language)},
        "unknown_languages": sorted(lang for lang in per_language if lang not in LANGUAGES),
        "bad_records": {
            "count": len(bad),
            "listed": [
                {"file": e.source, "line": e.line, "reason": e.reason} for e in bad[:MAX_LISTED_BAD]
            ],
        },
    }


# ------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="build the multilingual sample corpus")
    sample.add_argument("--out", required=True, help="output directory (path or fsspec URL)")
    sample.add_argument("--seed", type=int, default=0, help="selects and orders documents")
    sample.add_argument(
        "--max-languages", type=_positive_int, help="only the first N languages (for tests)"
    )
    scan_cmd = commands.add_parser("scan", help="validate shards and write a manifest")
    scan_cmd.add_argument("sources", nargs="+", help="files, directories, globs or URLs")
    scan_cmd.add_argument("--out", help="write the manifest here (path or fsspec URL)")
    scan_cmd.add_argument("--tokenizer", default="byte", help="tokenizer that counts tokens")
    tokenize = commands.add_parser(
        "tokenize", help="write pre-tokenized .tokens.zst shards (text documents)"
    )
    tokenize.add_argument("sources", nargs="+", help="files, directories, globs or URLs")
    tokenize.add_argument("--out", required=True, help="output directory (path or fsspec URL)")
    tokenize.add_argument("--tokenizer", default="byte", help="the run's data.tokenizer")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run_sample(args: argparse.Namespace) -> int:
    from babel.core import get_cldr_version

    summary = write_sample(args.out, seed=args.seed, max_languages=args.max_languages)
    print(
        f"sample: {summary['languages']} languages, {summary['documents']} documents, "
        f"{summary['bytes']:,} bytes of UTF-8 text in {summary['shards']} shards under "
        f"{args.out} ({sample_sources()}, CLDR {get_cldr_version()}, seed {args.seed})"
    )
    return 0


def _run_scan(args: argparse.Namespace) -> int:
    manifest = scan(args.sources, args.tokenizer)
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    if args.out:
        with fsspec.open(args.out, "w", encoding="utf-8") as out:
            out.write(text)
    print(text, end="")
    for line in _problems(manifest):
        print(line, file=sys.stderr)
    # Non-zero on bad records, so `scan` can gate a pipeline step.
    return 1 if manifest["bad_records"]["count"] else 0


def _problems(manifest: dict[str, Any]) -> Iterator[str]:
    bad = manifest["bad_records"]
    for record in bad["listed"]:
        yield f"{record['file']}:{record['line']}: {record['reason']}"
    if bad["count"] > len(bad["listed"]):
        yield f"... and {bad['count'] - len(bad['listed'])} more bad records"
    for lang in manifest["unknown_languages"]:
        yield f"warning: language {lang!r} is not a FLORES-200 code"


def _run_tokenize(args: argparse.Namespace) -> int:
    """One `.tokens.zst` shard per input shard; documents with media stay in the JSON shards."""
    tokenizer = build_tokenizer(args.tokenizer)
    fs, out = fsspec.core.url_to_fs(args.out)
    fs.makedirs(out, exist_ok=True)
    for path in expand_sources(args.sources):
        stem = path.rsplit("/", 1)[-1].removesuffix(".zst").removesuffix(".jsonl")
        target = f"{args.out.rstrip('/')}/{stem}{TOKEN_SHARD_SUFFIX}"
        documents = list(iter_documents(path))
        written = write_token_shard(
            target, tokenize_documents(documents, tokenizer), args.tokenizer
        )
        print(f"{target}: {written} documents ({len(documents) - written} with media left out)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"sample": _run_sample, "scan": _run_scan, "tokenize": _run_tokenize}
    try:
        return commands[args.command](args)
    except FileNotFoundError as error:  # a mistyped source: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

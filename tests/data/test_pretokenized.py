"""Pre-tokenized shards: exact round trip, tokenizer check, same batches as the JSON shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data.loader import DataSpec, GlobalBatchLoader, RankSlice
from data.pretokenized import read_token_shard, tokenize_documents, write_token_shard
from data.shards import expand_sources, iter_documents, write_documents
from data.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def json_shards(tmp_path):
    records = [
        {"id": f"d{i}", "lang": lang, "text": f"{word} " * (5 + 7 * i)}
        for i, (lang, word) in enumerate(
            [("eng_Latn", "hello"), ("fra_Latn", "bonjour"), ("zho_Hans", "你好"),
             ("eng_Latn", "world"), ("fra_Latn", "monde"), ("zho_Hans", "世界")] * 3
        )
    ]  # fmt: skip
    write_documents(str(tmp_path / "a.jsonl.zst"), records[:9])
    write_documents(str(tmp_path / "b.jsonl"), records[9:])
    return tmp_path


def tokenize_to(directory, json_dir) -> None:
    for path in expand_sources([str(json_dir / "*.jsonl*")]):
        name = path.rsplit("/", 1)[1].split(".")[0]
        docs = tokenize_documents(iter_documents(path), ByteTokenizer())
        write_token_shard(str(directory / f"{name}.tokens.zst"), docs, "byte")


def test_round_trip_keeps_tokens_and_origins(json_shards, tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    tokenize_to(out, json_shards)
    docs = read_token_shard(str(out / "a.tokens.zst"), "byte")
    originals = list(iter_documents(str(json_shards / "a.jsonl.zst")))
    assert [d.id for d in docs] == [d.id for d in originals]
    for doc, original in zip(docs, originals, strict=True):
        expected = ByteTokenizer().encode(original.text, bos=True, eos=True)
        assert doc.tokens.tolist() == expected and doc.lang == original.lang
        assert (doc.source, doc.line) == (original.source, original.line)


def test_a_shard_from_another_tokenizer_is_refused(json_shards, tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    tokenize_to(out, json_shards)
    with pytest.raises(ValueError, match="tokenized with 'byte', but data.tokenizer is 'hf:x'"):
        read_token_shard(str(out / "a.tokens.zst"), "hf:x")


def test_loader_gives_the_same_batches_from_token_shards(json_shards, tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    tokenize_to(out, json_shards)

    def batches(sources: str) -> list:
        spec = DataSpec((sources,), "byte", seq_len=32, global_batch_size=4, seed=3)
        loader = GlobalBatchLoader(spec, RankSlice(0, 1))
        return [loader.next_batch() for _ in range(6)]

    from_json = batches(str(json_shards / "*.jsonl*"))
    from_tokens = batches(str(out))  # a directory: its .tokens.zst files
    for a, b in zip(from_json, from_tokens, strict=True):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.labels, b.labels)
        assert np.array_equal(a.document_ids, b.document_ids)


def test_prepare_tokenize_and_scan_cli(json_shards, tmp_path):
    from data.prepare import main, scan

    out = tmp_path / "cli"
    assert main(["tokenize", str(json_shards / "*.jsonl*"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.tokens.zst", "b.tokens.zst"]
    assert len(read_token_shard(str(out / "b.tokens.zst"), "byte")) == 9
    media = scan([str(REPO / "data" / "sample" / "media-*.jsonl.zst")])
    assert media["total"]["images"] >= 6 and media["total"]["videos"] == 1
    assert media["total"]["image_tokens"] > 144 * media["total"]["images"]


def test_mixture_counts_can_come_from_a_scan_manifest(json_shards, tmp_path):
    import json

    from data.prepare import scan

    manifest = scan([str(json_shards / "*.jsonl*")])
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    spec = DataSpec((str(json_shards / "*.jsonl*"),), "byte", 32, 4, seed=3, manifest=str(path))
    loader = GlobalBatchLoader(spec, RankSlice(0, 1))
    tokens = {lang: stats["tokens"] for lang, stats in manifest["languages"].items()}
    total = sum(tokens.values())
    assert loader.targets == pytest.approx({lang: n / total for lang, n in tokens.items()})
    manifest["tokenizer"] = "hf:other.json"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="re-run `python -m data.prepare scan`"):
        GlobalBatchLoader(spec, RankSlice(0, 1))

"""encode_document (data/encode.py): records -> bos, text and media-block tokens, eos."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from data.encode import encode_document, image_spans, split_tiles
from data.media import MediaConfig, media_block, sample_frame_indices
from data.sample_media import sample_media_records
from data.shards import Document, parse_record
from data.sources import BadDocument
from data.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
SPECIAL = TOKENIZER.special
SAMPLE_RECORDS = sample_media_records()


def sample_documents() -> list[Document]:
    return [parse_record(record, "media.jsonl", i + 1) for i, record in enumerate(SAMPLE_RECORDS)]


def text_document(text: str, lang: str = "eng_Latn", content=None) -> Document:
    return Document("d", lang, text, "docs.jsonl", 7, content)


def test_text_record_is_bos_utf8_bytes_eos():
    text = "Grüße, 東京 🚀"
    encoded = encode_document(text_document(text, "deu_Latn"), TOKENIZER, MediaConfig())
    assert encoded.tokens.dtype == np.int64
    assert encoded.tokens.tolist() == [SPECIAL.bos, *text.encode("utf-8"), SPECIAL.eos]
    assert (encoded.blocks, encoded.media) == ((), ())
    assert (encoded.lang, encoded.name) == ("deu_Latn", "docs.jsonl:7")


@pytest.mark.parametrize("config", [MediaConfig(), MediaConfig(max_tiles=1)], ids=["4", "1"])
def test_multimodal_records_become_one_block_per_image_and_video_frame(config):
    per_tile = config.tokens_per_tile
    multi_tile_blocks = 0
    for document in sample_documents():
        encoded = encode_document(document, TOKENIZER, config)
        tokens = encoded.tokens
        expected_tokens, expected_tiles, expected_blocks = [SPECIAL.bos], [], 0
        for part in document.content:
            if part["type"] == "text":
                expected_tokens += part["text"].encode("utf-8")
                continue
            block = media_block(part, SPECIAL, config)
            expected_tokens += block.tokens
            expected_tiles.append(block.tiles)
            if part["type"] == "video":
                kept = sample_frame_indices(
                    len(part["frames"]), part["fps"], config.video_fps, config.max_frames
                )
                expected_blocks += len(kept)
            else:
                expected_blocks += 1
        assert tokens.tolist() == [*expected_tokens, SPECIAL.eos]
        assert (encoded.lang, encoded.name) == (document.lang, f"media.jsonl:{document.line}")
        assert encoded.blocks == image_spans(tokens, SPECIAL)
        assert len(encoded.blocks) == len(encoded.media) == expected_blocks
        for (start, end), tiles in zip(encoded.blocks, encoded.media, strict=True):
            span = tokens[start:end]
            assert span[0] == SPECIAL.image_start and span[-1] == SPECIAL.image_end
            assert not np.isin(span[1:-1], [SPECIAL.image_start, SPECIAL.image_end]).any()
            assert int((span == SPECIAL.patch).sum()) == len(tiles) * per_tile
            assert tiles.shape[1:] == (3, config.tile_size, config.tile_size)
            multi_tile_blocks += len(tiles) > 1
        # The tiles are those of media_block, in order, split over the blocks.
        np.testing.assert_array_equal(np.concatenate(encoded.media), np.concatenate(expected_tiles))
        if any(part["type"] == "video" for part in document.content):
            assert len(encoded.blocks) == 3  # 6 frames at 2 fps sampled at 1 fps
            for (_, end), (start, _) in zip(encoded.blocks[:-1], encoded.blocks[1:], strict=True):
                assert start == end + 1 and tokens[end] == SPECIAL.frame_separator
    assert multi_tile_blocks > 0 if config.max_tiles > 1 else multi_tile_blocks == 0


def test_one_tile_image_block_is_147_tokens():
    document = sample_documents()[0]  # one exact 336x336 tile
    encoded = encode_document(document, TOKENIZER, MediaConfig(max_tiles=1))
    ((start, end),) = encoded.blocks
    assert end - start == 1 + 1 + 144 + 1
    assert encoded.tokens[start + 1] == SPECIAL.image


def test_image_part_read_from_a_path_encodes_like_the_inline_image(tmp_path):
    inline = SAMPLE_RECORDS[0]["content"][1]["image"]
    path = tmp_path / "card.png"
    path.write_bytes(base64.b64decode(inline))
    parts = [{"type": "text", "text": "x"}, {"type": "image", "path": str(path)}]
    from_path = encode_document(text_document("x", content=parts), TOKENIZER, MediaConfig())
    parts[1] = {"type": "image", "image": inline}
    from_inline = encode_document(text_document("x", content=parts), TOKENIZER, MediaConfig())
    np.testing.assert_array_equal(from_path.tokens, from_inline.tokens)
    np.testing.assert_array_equal(from_path.media[0], from_inline.media[0])


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (text_document("hello", lang="xxx_Latn"), "unknown_language"),
        (text_document("hello", lang="english"), "unknown_language"),
        (
            text_document(
                "see:",
                content=[
                    {"type": "text", "text": "see:"},
                    {"type": "image", "image": base64.b64encode(b"not an image").decode()},
                ],
            ),
            "bad_image",
        ),
        (
            text_document(
                "",
                content=[{"type": "video", "frames": ["@@not base64@@"], "fps": 1.0}],
            ),
            "bad_video",
        ),
        (text_document(""), "empty_document"),
        (text_document("", content=[{"type": "text", "text": ""}]), "empty_document"),
    ],
    ids=["unknown-code", "not-a-code", "bad-image", "bad-video", "empty-text", "empty-content"],
)
def test_bad_document_raises_with_a_countable_reason_naming_file_and_line(document, reason):
    with pytest.raises(BadDocument, match=rf"^docs\.jsonl:7: {reason}: ") as raised:
        encode_document(document, TOKENIZER, MediaConfig())
    assert raised.value.reason == reason


def test_image_spans_pairs_starts_and_ends_and_refuses_unbalanced_tokens():
    s, e, p = SPECIAL.image_start, SPECIAL.image_end, SPECIAL.patch
    tokens = np.array([1, s, p, e, 2, s, p, p, e, s, e, 3])
    assert image_spans(tokens, SPECIAL) == ((1, 4), (5, 9), (9, 11))
    assert image_spans(np.array([1, 2, 3]), SPECIAL) == ()
    for bad in ([1, s, p], [e, p, s], [s, e, e]):
        with pytest.raises(ValueError, match="unbalanced"):
            image_spans(np.array(bad), SPECIAL)


def test_split_tiles_gives_each_block_the_tiles_its_patches_fill():
    p = SPECIAL.patch
    tokens = np.array([0, 9, p, p, 9, 9, p, p, p, p, p, p, 9, 0])
    blocks = ((1, 5), (5, 13))
    tiles = [np.arange(1.0, 3.0)[:, None], np.arange(3.0, 5.0)[:, None]]  # four "tiles"
    first, second = split_tiles(tokens, blocks, tiles, p, tokens_per_tile=2)
    assert first.ravel().tolist() == [1.0]
    assert second.ravel().tolist() == [2.0, 3.0, 4.0]
    assert split_tiles(tokens[:1], (), [], p, 2) == ()
    with pytest.raises(ValueError, match="4 tiles in the tokens but 3 decoded"):
        split_tiles(tokens, blocks, [tiles[0], tiles[1][:1]], p, tokens_per_tile=2)

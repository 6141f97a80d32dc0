import base64
import io
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.languages import LANGUAGES
from data.media import (
    ImageBlock,
    MediaConfig,
    MediaError,
    best_fit_grid,
    decode_image,
    denormalize,
    image_block,
    image_tokens,
    media_block,
    patchify,
    resized_size,
    sample_frame_indices,
    tile_image,
    unpatchify,
    video_block,
)
from data.sample_media import sample_media_records, write_sample_media
from data.shards import iter_documents
from data.tokenizer import ByteTokenizer

SHIPPED = Path(__file__).resolve().parents[2] / "data" / "sample" / "media-00000-of-00001.jsonl.zst"
SPECIAL = ByteTokenizer().special
CONFIG = MediaConfig()
T = CONFIG.tile_size


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def runs(tokens: list[int]) -> list[tuple[int, int]]:
    """Run-length encoding: [(token, repeat), ...]."""
    return [(token, len(list(group))) for token, group in itertools.groupby(tokens)]


# ------------------------------------------------------------------------------------ tiling

# Expected grids and resized sizes: what transformers' Llama4ImageProcessor (get_best_fit,
# get_max_res_without_distortion with max_upscaling_size = 336) gives for these sizes, except
# where its float32 floor loses a pixel on an exact product (600x800 -> 503 there, 504 exact).
GRID_CASES = [
    # (height, width), max_tiles, grid, resized (height, width)
    ((336, 336), 4, (1, 1), (336, 336)),
    ((600, 800), 4, (2, 2), (504, 672)),
    ((800, 600), 4, (2, 2), (672, 504)),
    ((336, 672), 4, (1, 2), (336, 672)),
    ((500, 240), 4, (2, 1), (500, 240)),  # not upscaled past its own size: padded
    ((90, 120), 4, (1, 1), (252, 336)),  # smaller than a tile: upscaled to fit one
    ((100, 1000), 4, (1, 3), (100, 1000)),
    ((1000, 100), 4, (3, 1), (1000, 100)),
    ((600, 800), 1, (1, 1), (252, 336)),
    ((2000, 2000), 16, (4, 4), (1344, 1344)),
    ((2000, 2000), 4, (2, 2), (672, 672)),
    ((336, 1008), 2, (1, 2), (224, 672)),
    ((300, 2000), 16, (1, 6), (300, 2000)),
    ((1000, 700), 16, (3, 3), (1000, 700)),
    ((337, 337), 4, (2, 2), (337, 337)),  # any upscaling option beats downscaling
    ((335, 700), 4, (1, 3), (335, 700)),
    ((5000, 10), 4, (4, 1), (1344, 2)),
]


@pytest.mark.parametrize(("size", "max_tiles", "grid", "resized"), GRID_CASES)
def test_best_fit_grid_and_resize_follow_llama4(size, max_tiles, grid, resized) -> None:
    assert best_fit_grid(*size, T, max_tiles) == grid
    assert grid[0] * grid[1] <= max_tiles
    assert resized_size(*size, grid, T) == resized


@pytest.mark.parametrize(
    ("width", "height", "max_tiles", "grid"),
    [(336, 336, 4, (1, 1)), (672, 336, 4, (1, 2)), (800, 600, 4, (2, 2)), (240, 500, 4, (2, 1)),
     (800, 600, 1, (1, 1)), (1000, 100, 2, (1, 2))],
)  # fmt: skip
def test_tiles_and_global_thumbnail_last_iff_more_than_one(width, height, max_tiles, grid) -> None:
    image = random_image(width, height)
    config = MediaConfig(max_tiles=max_tiles)
    tiles, got_grid = tile_image(image, config)
    n = grid[0] * grid[1]
    assert got_grid == grid
    assert tiles.dtype == np.float32 and tiles.flags.c_contiguous
    assert tiles.shape == (n + (n > 1), 3, T, T)
    assert tiles.min() >= -1.0 and tiles.max() <= 1.0
    if n > 1:  # the last tile is the whole image squeezed to one tile
        thumbnail = np.asarray(image.resize((T, T), Image.Resampling.BILINEAR), np.float32)
        np.testing.assert_allclose(tiles[-1], thumbnail.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)


def test_tiles_are_row_major_and_padding_is_black() -> None:
    # 240 wide x 500 tall -> a 2x1 grid (672 x 336 canvas), not resized: right and bottom pad.
    image = random_image(240, 500, seed=3)
    tiles, grid = tile_image(image, CONFIG)
    assert grid == (2, 1) and len(tiles) == 3
    pixels = np.asarray(image, np.float32).transpose(2, 0, 1) / 127.5 - 1
    np.testing.assert_allclose(tiles[0][:, :, :240], pixels[:, :T], atol=1e-6)
    np.testing.assert_allclose(tiles[1][:, : 500 - T, :240], pixels[:, T:], atol=1e-6)
    assert (tiles[0][:, :, 240:] == -1).all()  # black, normalised
    assert (tiles[1][:, 500 - T :] == -1).all() and (tiles[1][:, :, 240:] == -1).all()

    # A 2x2 grid's tiles are (0,0) (0,1) (1,0) (1,1): check with an image that fills it exactly.
    quad = random_image(2 * T, 2 * T, seed=4)
    tiles, grid = tile_image(quad, CONFIG)
    assert grid == (2, 2)
    full = np.asarray(quad, np.float32).transpose(2, 0, 1) / 127.5 - 1
    for index, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        expected = full[:, row * T : (row + 1) * T, col * T : (col + 1) * T]
        np.testing.assert_allclose(tiles[index], expected, atol=1e-6)


def test_normalisation_uses_llama4_mean_and_std() -> None:
    # Llama4ImageProcessor: rescale 1/255, mean = std = 0.5: 0 -> -1, 255 -> 1.
    image = Image.new("RGB", (T, T), (0, 255, 51))
    (tile,) = tile_image(image, CONFIG)[0]
    np.testing.assert_allclose(tile[:, 0, 0], [-1.0, 1.0, 51 / 127.5 - 1], atol=1e-6)


# ------------------------------------------------------------------------------------ tokens


@pytest.mark.parametrize("grid", [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (4, 4)])
def test_token_block_layout_is_llama4s(grid) -> None:
    rows, cols = grid
    tokens = image_tokens(grid, SPECIAL, 144)
    n = rows * cols
    patch = (SPECIAL.patch, 144)
    expected = [(SPECIAL.image_start, 1)]
    if n > 1:
        for _ in range(rows):
            for col in range(cols):
                expected.append(patch)
                if col < cols - 1:
                    expected.append((SPECIAL.tile_x_separator, 1))
            expected.append((SPECIAL.tile_y_separator, 1))
    expected += [(SPECIAL.image, 1), patch, (SPECIAL.image_end, 1)]
    assert runs(tokens) == expected
    assert tokens.count(SPECIAL.patch) == 144 * (n + 1 if n > 1 else 1)
    assert tokens.count(SPECIAL.tile_x_separator) == (rows * (cols - 1) if n > 1 else 0)
    assert tokens.count(SPECIAL.tile_y_separator) == (rows if n > 1 else 0)


def test_token_block_as_text_for_a_2x2_image() -> None:
    # The string Llama4Processor._prompt_split_image writes for aspect ratio (2, 2).
    tokens = image_tokens((2, 2), SPECIAL, 2)
    p, x, y = "<|patch|>" * 2, "<|tile_x_separator|>", "<|tile_y_separator|>"
    expected = f"<|image_start|>{p}{x}{p}{y}{p}{x}{p}{y}<|image|>{p}<|image_end|>"
    assert ByteTokenizer().decode(tokens) == expected


def test_image_block_tiles_match_patch_runs() -> None:
    assert CONFIG.tokens_per_tile == 144 == (336 // 14) ** 2 // 4
    block = image_block(b64(encode(random_image(800, 600))), SPECIAL)
    assert isinstance(block, ImageBlock)
    patch_runs = [count for token, count in runs(block.tokens) if token == SPECIAL.patch]
    assert patch_runs == [144] * len(block.tiles) and len(block.tiles) == 5
    one = image_block(encode(random_image(T, T)), SPECIAL)
    assert len(one.tiles) == 1 and len(one.tokens) == 144 + 3


# ------------------------------------------------------------------------------------ pixels


def test_one_tile_png_round_trips_through_patches() -> None:
    image = random_image(T, T, seed=7)
    block = image_block(b64(encode(image, "PNG")), SPECIAL)
    (tile,) = block.tiles
    patches = patchify(tile, CONFIG.patch_size)
    assert patches.shape == (576, 3 * 14 * 14)
    back = denormalize(unpatchify(patches, CONFIG.patch_size))
    original = np.asarray(image, np.float32).transpose(2, 0, 1) / 255
    assert np.abs(back - original).max() <= 1 / 255


def test_patchify_is_row_major_and_channel_major_within_a_patch() -> None:
    tiles = np.random.default_rng(1).standard_normal((2, 3, 28, 42)).astype(np.float32)
    patches = patchify(tiles, 14)
    assert patches.shape == (2, 2 * 3, 3 * 14 * 14)
    # Patch (row 1, col 2) of tile 1 is index 1 * 3 + 2, flattened as (channel, y, x).
    np.testing.assert_array_equal(patches[1, 5], tiles[1, :, 14:28, 28:42].reshape(-1))
    square = tiles[:, :, :28, :28]
    np.testing.assert_array_equal(unpatchify(patchify(square, 14), 14), square)


def test_patchify_matches_torch_unfold() -> None:
    torch = pytest.importorskip("torch")
    tiles = np.random.default_rng(2).standard_normal((2, 3, 56, 56)).astype(np.float32)
    unfolded = torch.nn.functional.unfold(torch.from_numpy(tiles), kernel_size=14, stride=14)
    np.testing.assert_array_equal(patchify(tiles, 14), unfolded.permute(0, 2, 1).numpy())


def test_jpeg_decodes_close_to_its_source() -> None:
    y, x = np.mgrid[0:200, 0:300]
    pixels = np.stack([x * 255 // 299, y * 255 // 199, (x + y) * 255 // 498], -1).astype(np.uint8)
    data = encode(Image.fromarray(pixels, "RGB"), "JPEG", quality=95)
    image = decode_image(b64(data))
    assert image.mode == "RGB" and image.size == (300, 200)
    assert np.abs(np.asarray(image, np.int16) - pixels).mean() < 2
    assert decode_image(data).tobytes() == image.tobytes()  # raw bytes decode the same


def test_decode_converts_modes_and_composites_alpha_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    image = decode_image(encode(rgba))
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == (255, 255, 255) and image.getpixel((0, 0)) == (0, 0, 255)
    assert decode_image(encode(Image.new("L", (3, 2), 77))).getpixel((2, 1)) == (77, 77, 77)
    url = "data:image/png;base64," + b64(encode(Image.new("RGB", (2, 2), (1, 2, 3))))
    assert decode_image(url).getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"definitely not an image", "not a PNG/JPEG/WEBP image"),
        ("not base64 !!", "not valid base64"),
        (b64(b"\x00\x01\x02"), "not a PNG/JPEG/WEBP image"),
        (b"", "empty"),
        (encode(random_image(64, 64))[:200], "cannot decode image"),  # truncated PNG
        (encode(Image.new("RGB", (8, 8)), "GIF"), "not a PNG/JPEG/WEBP image"),
        (12345, "base64 text or bytes"),
    ],
)
def test_undecodable_image_raises_media_error(data, reason) -> None:
    with pytest.raises(MediaError, match=reason) as caught:
        image_block(data, SPECIAL)
    assert isinstance(caught.value, ValueError)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(random_image(30, 20), "JPEG", exif=exif)
    assert decode_image(data).size == (20, 30)


def test_oversized_image_is_refused_before_decoding(monkeypatch) -> None:
    monkeypatch.setattr("data.media.MAX_IMAGE_PIXELS", 399)
    decode_image(encode(random_image(19, 21)))
    with pytest.raises(MediaError, match="20x20 pixels is over the limit of 399"):
        decode_image(encode(random_image(20, 20)))


# ------------------------------------------------------------------------------------- video


@pytest.mark.parametrize(
    ("n_frames", "source_fps", "target_fps", "max_frames", "expected"),
    [
        (6, 2.0, 1.0, 8, [0, 2, 4]),  # fps 2 -> 1: every 2nd frame
        (20, 2.0, 1.0, 8, [0, 2, 4, 6, 8, 10, 12, 14]),  # capped at max_frames
        (7, 30.0, 10.0, 8, [0, 3, 6]),
        (5, 1.0, 2.0, 8, [0, 1, 2, 3, 4]),  # target above source: every frame, no duplicates
        (10, 2.5, 1.0, 8, [0, 3, 5, 8]),  # non-integer ratio: nearest frame to each second
        (1, 2.0, 1.0, 8, [0]),
        (0, 2.0, 1.0, 8, []),
        (9, 2.0, 1.0, 1, [0]),
    ],
)
def test_sample_frame_indices(n_frames, source_fps, target_fps, max_frames, expected) -> None:
    assert sample_frame_indices(n_frames, source_fps, target_fps, max_frames) == expected


def video_frames(n: int, width: int = 64, height: int = 48) -> list[str]:
    return [b64(encode(random_image(width, height, seed=i))) for i in range(n)]


def test_video_block_samples_frames_with_separators_between() -> None:
    frames = video_frames(6)
    block = video_block(frames, 2.0, SPECIAL)  # video_fps 1.0: frames 0, 2, 4
    singles = [image_block(frames[i], SPECIAL, MediaConfig(max_tiles=1)) for i in (0, 2, 4)]
    sep = [SPECIAL.frame_separator]
    assert block.tokens == singles[0].tokens + sep + singles[1].tokens + sep + singles[2].tokens
    assert block.tokens.count(SPECIAL.frame_separator) == 2
    assert block.tokens.count(SPECIAL.image_start) == 3
    np.testing.assert_array_equal(block.tiles, np.concatenate([s.tiles for s in singles]))

    capped = video_block(frames, 2.0, SPECIAL, MediaConfig(max_frames=2))
    assert len(capped.tiles) == 2 and capped.tokens.count(SPECIAL.frame_separator) == 1
    every = video_block(frames, 2.0, SPECIAL, MediaConfig(video_fps=2.0))
    assert len(every.tiles) == 6 and every.tokens.count(SPECIAL.frame_separator) == 5


def test_video_frames_are_single_tiles_unless_configured() -> None:
    frames = video_frames(2, width=672, height=336)
    assert len(video_block(frames, 1.0, SPECIAL).tiles) == 2
    wide = video_block(frames, 1.0, SPECIAL, MediaConfig(frame_max_tiles=2))
    assert len(wide.tiles) == 2 * 3  # 1x2 grid + global thumbnail per frame
    assert wide.tokens.count(SPECIAL.tile_x_separator) == 2


def test_bad_videos_raise_media_error() -> None:
    frames = video_frames(4)
    with pytest.raises(MediaError, match="video frame 2: .*not valid base64"):
        video_block(frames[:2] + ["@@@"] + frames[3:], 1.0, SPECIAL)
    with pytest.raises(MediaError, match="non-empty array"):
        video_block([], 2.0, SPECIAL)
    for fps in (0, -1.0, float("nan"), "2", True):
        with pytest.raises(MediaError, match="'fps' must be a positive number"):
            video_block(frames, fps, SPECIAL)


def test_media_block_dispatches_on_part_type(tmp_path: Path) -> None:
    data = encode(random_image(T, T))
    (tmp_path / "a.png").write_bytes(data)
    by_value = media_block({"type": "image", "image": b64(data)}, SPECIAL)
    by_path = media_block({"type": "image", "path": str(tmp_path / "a.png")}, SPECIAL)
    assert by_value.tokens == by_path.tokens
    np.testing.assert_array_equal(by_value.tiles, by_path.tiles)
    video = media_block({"type": "video", "frames": video_frames(3), "fps": 1.0}, SPECIAL)
    assert video.tokens.count(SPECIAL.frame_separator) == 2
    with pytest.raises(MediaError, match="cannot read image"):
        media_block({"type": "image", "path": str(tmp_path / "missing.png")}, SPECIAL)
    with pytest.raises(MediaError, match="needs a base64 string"):
        media_block({"type": "image"}, SPECIAL)
    with pytest.raises(MediaError, match="needs 'frames' and 'fps'"):
        media_block({"type": "video", "frames": []}, SPECIAL)
    with pytest.raises(MediaError, match="not a media part"):
        media_block({"type": "text", "text": "hi"}, SPECIAL)


def test_media_config_validates() -> None:
    with pytest.raises(ValueError, match="not a multiple"):
        MediaConfig(tile_size=300)
    with pytest.raises(ValueError, match="max_tiles"):
        MediaConfig(max_tiles=0)
    with pytest.raises(ValueError, match="pixel_shuffle_ratio"):
        MediaConfig(pixel_shuffle_ratio=0.3)
    for fps in (0.0, True, float("inf")):
        with pytest.raises(ValueError, match="video_fps"):
            MediaConfig(video_fps=fps)
    assert MediaConfig(pixel_shuffle_ratio=1.0).tokens_per_tile == 576


# ------------------------------------------------------------------------------------ sample


def media_parts(content):
    return [part for part in content if part["type"] != "text"]


def test_shipped_media_shard_validates_and_every_image_decodes() -> None:
    assert SHIPPED.exists() and SHIPPED.stat().st_size < 300_000
    documents = list(iter_documents(str(SHIPPED)))  # validates every record
    assert 6 <= len(documents) <= 10
    assert len({d.id for d in documents}) == len(documents)
    assert {d.lang for d in documents} <= set(LANGUAGES)
    assert {"eng_Latn", "fra_Latn", "zho_Hans"} <= {d.lang for d in documents}
    formats, grids, videos = set(), set(), []
    for document in documents:
        assert document.content is not None and document.text.strip()
        for part in media_parts(document.content):
            block = media_block(part, SPECIAL)
            assert block.tokens.count(SPECIAL.patch) == 144 * len(block.tiles)
            if part["type"] == "video":
                videos.append((len(part["frames"]), part["fps"], len(block.tiles)))
                continue
            raw = base64.b64decode(part["image"])
            formats.add(Image.open(io.BytesIO(raw)).format)
            grids.add(tile_image(decode_image(raw), CONFIG)[1])
    assert formats == {"PNG", "JPEG"}
    assert (2, 2) in grids and (1, 1) in grids and len(grids) >= 3
    assert videos == [(6, 2.0, 3)]


def test_shipped_media_shard_is_what_the_builder_makes() -> None:
    # Byte equality holds for the same Pillow/zlib/libjpeg; compare content and pixels instead.
    rebuilt = sample_media_records()
    shipped = list(iter_documents(str(SHIPPED)))
    assert [(r["id"], r["lang"]) for r in rebuilt] == [(d.id, d.lang) for d in shipped]
    for record, document in zip(rebuilt, shipped, strict=True):
        assert len(record["content"]) == len(document.content)
        for new, old in zip(record["content"], document.content, strict=True):
            assert new["type"] == old["type"]
            if new["type"] == "text":
                assert new["text"] == old["text"]
                continue
            new_images = new.get("frames", [new.get("image")])
            old_images = old.get("frames", [old.get("image")])
            pairs = zip(new_images, old_images, strict=True)
            for a, b in pairs:
                a_pixels, b_pixels = (np.asarray(decode_image(x), np.int16) for x in (a, b))
                assert a_pixels.shape == b_pixels.shape
                assert np.abs(a_pixels - b_pixels).max() <= 2


def test_write_sample_media_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "m.jsonl.zst", tmp_path / "b" / "m.jsonl.zst"
    assert write_sample_media(str(first)) == write_sample_media(str(second)) == 8
    assert first.read_bytes() == second.read_bytes()

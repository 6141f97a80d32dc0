"""Media: image and video parts of multimodal records -> early-fusion tokens and pixel tiles.

An image becomes tiles of `tile_size` pixels the way Llama 4's image processor makes them
(transformers `Llama4ImageProcessor`): the best-fit grid of at most `max_tiles` tiles is chosen
for the image's aspect ratio, the image is resized into that canvas without distortion (never
upscaled past one tile side unless it is smaller than that), padded black at the bottom and
right, and split into tiles row-major; an image of more than one tile gets a global thumbnail
(the whole image squeezed to one tile) appended LAST. Pixels are rescaled to [0, 1] and
normalised with Llama 4's mean and std (0.5 for every channel), so they lie in [-1, 1].

The token block of an image is what `Llama4Processor._prompt_split_image` writes:

    <|image_start|> [tile <|tile_x_separator|> tile ... <|tile_y_separator|>]*rows
                    <|image|> global-or-only-tile <|image_end|>

where each `tile` is `tokens_per_tile` `<|patch|>` tokens (144 = (336 / 14)^2 * 0.5^2: the
vision encoder's 576 patches, pixel-shuffled 2x2 into one token each). The tiles of an
`ImageBlock` are in the order their `<|patch|>` runs appear in its tokens, which is the order
the vision tower's features replace them.

A video is a list of frames: frames are sampled at `video_fps` (nearest source frame to each
target time, the first frame always kept), each becomes an image block (one tile by default),
and consecutive frames are separated by `<|frame_separator|>`.

No torch here: numpy and Pillow only, so data workers stay light.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from data.tokenizer import SpecialTokens

# Llama4ImageProcessor: rescale_factor 1/255, image_mean = image_std = [0.5, 0.5, 0.5].
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
RESCALE_FACTOR = 1.0 / 255.0
# Formats a record's image may be in; anything else is refused rather than handed to one of
# Pillow's many rarely exercised decoders.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# Resampling of Llama4ImageProcessor (torchvision bilinear with antialias, which follows PIL's).
RESAMPLE = Image.Resampling.BILINEAR
# Pillow's own decompression-bomb threshold (it warns above this, refuses at twice it).
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
_DATA_URL_MARK = ";base64,"


class MediaError(ValueError):
    """A media part that cannot be turned into tiles; the caller adds `file:line`."""


@dataclass(frozen=True)
class MediaConfig:
    tile_size: int = 336
    """Side of a square tile in pixels (the vision encoder's image size)."""
    patch_size: int = 14
    pixel_shuffle_ratio: float = 0.5
    """Pixel shuffle keeps ratio^2 of the patches as tokens (576 -> 144 at 0.5)."""
    max_tiles: int = 4
    """Most tiles of an image's grid; the global thumbnail comes on top of these."""
    video_fps: float = 1.0
    """Frames per second sampled from a video."""
    max_frames: int = 8
    """Most frames kept from one video."""
    frame_max_tiles: int = 1
    """`max_tiles` for a video frame: one tile keeps a frame at 144 tokens."""

    def __post_init__(self) -> None:
        for name in ("tile_size", "patch_size", "max_tiles", "max_frames", "frame_max_tiles"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"media.{name} must be a positive integer, got {value!r}")
        if self.tile_size % self.patch_size:
            raise ValueError(
                f"media.tile_size {self.tile_size} is not a multiple of "
                f"media.patch_size {self.patch_size}"
            )
        if not 0 < self.pixel_shuffle_ratio <= 1:
            raise ValueError(
                f"media.pixel_shuffle_ratio must be in (0, 1], got {self.pixel_shuffle_ratio}"
            )
        side = self.patches_per_side * self.pixel_shuffle_ratio
        if abs(side - round(side)) > 1e-9:
            raise ValueError(
                f"media.pixel_shuffle_ratio {self.pixel_shuffle_ratio} does not shuffle a "
                f"{self.patches_per_side}x{self.patches_per_side} patch grid to a whole grid"
            )
        fps = self.video_fps
        if isinstance(fps, bool) or not isinstance(fps, int | float) or not 0 < fps < math.inf:
            raise ValueError(f"media.video_fps must be a positive number, got {self.video_fps!r}")

    @property
    def patches_per_side(self) -> int:
        return self.tile_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """`<|patch|>` tokens of one tile: 144 for Llama 4 (24x24 patches, shuffled 2x2)."""
        return round(self.patches_per_side * self.pixel_shuffle_ratio) ** 2


@dataclass(frozen=True, eq=False)
class ImageBlock:
    """The tokens of one image (or video) and its tiles, in the order of their patch runs."""

    tokens: list[int]
    tiles: np.ndarray
    """(N, 3, tile_size, tile_size) float32, normalised."""


# ------------------------------------------------------------------------------------ decode


def decode_image(data: bytes | str) -> Image.Image:
    """An RGB image from base64 text (optionally a `data:` URL) or raw PNG/JPEG/WEBP bytes.

    Transparency is composited onto white (as transformers' `convert_to_rgb` does) and an EXIF
    orientation is applied (as its `load_image` does). Raises MediaError saying why not.
    """
    raw = _base64_bytes(data) if isinstance(data, str) else data
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise MediaError(f"image data must be base64 text or bytes, got {type(data).__name__}")
    raw = bytes(raw)
    if not raw:
        raise MediaError("image data is empty")
    try:
        with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as image:
            # Checked from the header, before decoding: one huge image would stall a worker.
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise MediaError(
                    f"image of {image.width}x{image.height} pixels is over the limit of "
                    f"{MAX_IMAGE_PIXELS} pixels"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
    except MediaError:
        raise
    except Image.UnidentifiedImageError:
        raise MediaError(
            f"cannot decode image: {len(raw)} bytes starting {raw[:8]!r} are not a "
            f"{'/'.join(IMAGE_FORMATS)} image"
        ) from None
    except Image.DecompressionBombError as error:
        raise MediaError(f"image too large to decode: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise MediaError(f"cannot decode image ({len(raw)} bytes): {error}") from None
    return _to_rgb(image)


def _base64_bytes(text: str) -> bytes:
    if text.startswith("data:") and _DATA_URL_MARK in text[:100]:
        text = text.split(_DATA_URL_MARK, 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise MediaError(f"image is not valid base64: {error}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# ------------------------------------------------------------------------------------ tiling


def best_fit_grid(height: int, width: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """The (rows, cols) tile grid, rows * cols <= max_tiles, an image of this size fits best.

    Llama 4's `get_best_fit`: each grid's canvas allows the distortion-free scale
    min(canvas_h / height, canvas_w / width). If some grid needs no downscaling, take the
    smallest such scale (the least upscaling), else the largest (the least downscaling); among
    grids with that scale, the smallest canvas (the least padding). Exact rational arithmetic,
    so ties are ties; the smallest-area grid at the chosen scale is always unique.
    """
    if height < 1 or width < 1:
        raise MediaError(f"image has no pixels ({width}x{height})")
    grids = [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles // r + 1)]
    scales = {
        grid: min(Fraction(grid[0] * tile_size, height), Fraction(grid[1] * tile_size, width))
        for grid in grids
    }
    fitting = [s for s in scales.values() if s >= 1]
    chosen = min(fitting) if fitting else max(scales.values())
    return min((g for g in grids if scales[g] == chosen), key=lambda g: g[0] * g[1])


def resized_size(height: int, width: int, grid: tuple[int, int], tile_size: int) -> tuple[int, int]:
    """(height, width) the image is resized to inside its grid's canvas, aspect kept.

    As Llama 4's processor: the target is the canvas, but never beyond the image's own size
    along a side unless that side is shorter than a tile (`max_upscaling_size`); the image is
    then scaled to the largest size that fits the target without distortion (the limiting
    side exact, the other floored). Integer arithmetic, so no float rounding.
    """
    target_h = min(max(height, tile_size), grid[0] * tile_size)
    target_w = min(max(width, tile_size), grid[1] * tile_size)
    if target_w * height < target_h * width:  # width limits: scale = target_w / width
        new_h, new_w = min(height * target_w // width, target_h), target_w
    else:
        new_h, new_w = target_h, min(width * target_h // height, target_w)
    return max(new_h, 1), max(new_w, 1)


def tile_image(image: Image.Image, config: MediaConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """Normalised tiles of an RGB image and its (rows, cols) grid.

    Tiles are (N, 3, tile_size, tile_size) float32: the grid's tiles row-major, then, when
    there is more than one, the global thumbnail (the whole image resized to one tile).
    """
    return _tile(image, config, config.max_tiles)


def _tile(image: Image.Image, config: MediaConfig, max_tiles: int):
    image = _to_rgb(image)
    size = config.tile_size
    width, height = image.size
    rows, cols = best_fit_grid(height, width, size, max_tiles)
    new_h, new_w = resized_size(height, width, (rows, cols), size)
    resized = image if (new_w, new_h) == image.size else image.resize((new_w, new_h), RESAMPLE)
    canvas = np.zeros((rows * size, cols * size, 3), dtype=np.uint8)  # black padding, as HF
    canvas[:new_h, :new_w] = np.asarray(resized, dtype=np.uint8)
    tiles = canvas.reshape(rows, size, cols, size, 3).transpose(0, 2, 1, 3, 4)
    tiles = tiles.reshape(rows * cols, size, size, 3)
    if rows * cols > 1:
        thumbnail = np.asarray(image.resize((size, size), RESAMPLE), dtype=np.uint8)
        tiles = np.concatenate([tiles, thumbnail[None]])
    return normalize(tiles), (rows, cols)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) pixels -> float32 (..., 3, H, W): rescaled to [0, 1], normalised."""
    if pixels.shape[-1] != 3:
        raise ValueError(f"expected RGB pixels (..., H, W, 3), got shape {pixels.shape}")
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)
    std = np.asarray(IMAGE_STD, dtype=np.float32)
    scaled = pixels.astype(np.float32) * np.float32(RESCALE_FACTOR)
    chw = np.moveaxis((scaled - mean) / std, -1, -3)
    return np.ascontiguousarray(chw, dtype=np.float32)


def denormalize(tiles: np.ndarray) -> np.ndarray:
    """float32 (..., 3, H, W) normalised tiles -> (..., 3, H, W) float32 pixels in [0, 1]."""
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGE_STD, dtype=np.float32)[:, None, None]
    return (tiles * std + mean).astype(np.float32)


def patchify(tiles: np.ndarray, patch_size: int) -> np.ndarray:
    """(..., C, H, W) -> (..., (H/p) * (W/p), C * p * p): patches row-major, each flattened
    channel-major (C, p, p), the layout of `torch.nn.Unfold` the Llama 4 vision encoder uses."""
    *lead, channels, height, width = tiles.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"tile of {height}x{width} pixels does not split into {p}x{p} patches")
    n = len(lead)
    blocks = tiles.reshape(*lead, channels, height // p, p, width // p, p)
    blocks = blocks.transpose(*range(n), n + 1, n + 3, n, n + 2, n + 4)
    return blocks.reshape(*lead, (height // p) * (width // p), channels * p * p)


def unpatchify(patches: np.ndarray, patch_size: int, channels: int = 3) -> np.ndarray:
    """The inverse of `patchify` for square tiles: (..., P, C * p * p) -> (..., C, H, W)."""
    *lead, n_patches, length = patches.shape
    p = patch_size
    side = math.isqrt(n_patches)
    if side * side != n_patches or length != channels * p * p:
        raise ValueError(
            f"patches of shape {patches.shape} are not a square tile of {channels}x{p}x{p} patches"
        )
    n = len(lead)
    blocks = patches.reshape(*lead, side, side, channels, p, p)
    blocks = blocks.transpose(*range(n), n + 2, n, n + 3, n + 1, n + 4)
    return blocks.reshape(*lead, channels, side * p, side * p)


# ------------------------------------------------------------------------------------ tokens


def image_tokens(grid: tuple[int, int], special: SpecialTokens, tokens_per_tile: int) -> list[int]:
    """The token block of an image tiled as `grid` (rows, cols), as `_prompt_split_image`.

    A multi-tile image lists its tiles row-major, `<|tile_x_separator|>` between the tiles of
    a row and `<|tile_y_separator|>` after every row, then `<|image|>` and the global tile; a
    one-tile image is `<|image_start|> <|image|> patches <|image_end|>`.
    """
    rows, cols = grid
    patches = [special.patch] * tokens_per_tile
    tokens = [special.image_start]
    if rows * cols > 1:
        for _ in range(rows):
            for col in range(cols):
                tokens += patches
                if col < cols - 1:
                    tokens.append(special.tile_x_separator)
            tokens.append(special.tile_y_separator)
    tokens.append(special.image)
    tokens += patches
    tokens.append(special.image_end)
    return tokens


def image_block(
    image: bytes | str | Image.Image, special: SpecialTokens, config: MediaConfig | None = None
) -> ImageBlock:
    """Tokens and tiles of one image given as base64 text, raw bytes, or a PIL image."""
    config = config or MediaConfig()
    return _image_block(image, special, config, config.max_tiles)


def _image_block(image, special: SpecialTokens, config: MediaConfig, max_tiles: int):
    if not isinstance(image, Image.Image):
        image = decode_image(image)
    tiles, grid = _tile(image, config, max_tiles)
    return ImageBlock(image_tokens(grid, special, config.tokens_per_tile), tiles)


# ------------------------------------------------------------------------------------- video


def sample_frame_indices(
    n_frames: int, source_fps: float, target_fps: float, max_frames: int
) -> list[int]:
    """Indices of the frames kept when sampling `n_frames` at `source_fps` down to
    `target_fps`: the nearest frame to each target time 0, 1/target_fps, ..., the first frame
    always, at most `max_frames`. Never more frames than the source has (no duplicates), so
    a target above the source rate keeps every frame. fps 2 -> 1 keeps every 2nd frame."""
    if n_frames < 1:
        return []
    step = max(source_fps / target_fps, 1.0)
    indices: list[int] = []
    while len(indices) < max_frames:
        index = math.floor(len(indices) * step + 0.5)
        if index >= n_frames:
            break
        indices.append(index)
    return indices


def video_block(
    frames: Sequence[bytes | str],
    fps: float,
    special: SpecialTokens,
    config: MediaConfig | None = None,
) -> ImageBlock:
    """Tokens and tiles of a video: sampled frames as image blocks (`config.frame_max_tiles`
    tiles each), `<|frame_separator|>` between consecutive frames, tiles in frame order."""
    config = config or MediaConfig()
    if isinstance(frames, str | bytes) or not isinstance(frames, Sequence) or not frames:
        raise MediaError("video 'frames' must be a non-empty array of base64 images")
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not 0 < fps < math.inf:
        raise MediaError(f"video 'fps' must be a positive number, got {fps!r}")
    tokens: list[int] = []
    tiles: list[np.ndarray] = []
    for position, index in enumerate(
        sample_frame_indices(len(frames), fps, config.video_fps, config.max_frames)
    ):
        try:
            block = _image_block(frames[index], special, config, config.frame_max_tiles)
        except MediaError as error:
            raise MediaError(f"video frame {index}: {error}") from None
        if position:
            tokens.append(special.frame_separator)
        tokens += block.tokens
        tiles.append(block.tiles)
    return ImageBlock(tokens, np.concatenate(tiles))


def media_block(
    part: Mapping[str, Any], special: SpecialTokens, config: MediaConfig | None = None
) -> ImageBlock:
    """The block of one media part of a multimodal record: `{"type": "image", "image": b64}`,
    `{"type": "image", "path": url}` (read through fsspec) or
    `{"type": "video", "frames": [...], "fps": f}`."""
    config = config or MediaConfig()
    kind = part.get("type")
    if kind == "video":
        if "frames" not in part or "fps" not in part:
            raise MediaError("a video part needs 'frames' and 'fps'")
        return video_block(part["frames"], part["fps"], special, config)
    if kind != "image":
        raise MediaError(f"not a media part: type {kind!r}")
    if isinstance(part.get("image"), str):
        return image_block(part["image"], special, config)
    if isinstance(part.get("path"), str):
        return image_block(_read_path(part["path"]), special, config)
    raise MediaError("an image part needs a base64 string 'image' or a string 'path'")


def _read_path(path: str) -> bytes:
    import fsspec  # only path parts need it

    try:
        with fsspec.open(path, "rb") as file:
            return file.read()
    except (OSError, ValueError) as error:
        raise MediaError(f"cannot read image {path!r}: {error}") from None

"""The shipped sample media corpus: images and a short video synthesised with numpy and Pillow.

`python -c "from data.sample_media import write_sample_media; write_sample_media(PATH)"` writes
`data/sample/media-00000-of-00001.jsonl.zst`: multimodal records in several languages whose
images cover the tiling cases of data/media.py (one exact tile, upscaling, wide, tall, 2x2,
transparency) and a 6-frame video at 2 fps.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def sample_media_records() -> list[dict[str, Any]]:
    """The sample multimodal corpus: images and a video synthesised with numpy and Pillow.

    Sizes cover one exact tile (336x336), a small image that is upscaled, a wide 1x2, a tall
    2x1 (padded), a 2x2 photo-like JPEG, an RGBA PNG; the video has 6 frames at 2 fps.
    """
    tile = _png(_scene(336, 336, seed=0, label="one tile 336x336"))
    photo = _jpeg(_scene(800, 600, seed=1, label="800x600 -> 2x2 tiles"))
    wide = _png(_scene(672, 336, seed=2, label="wide 672x336 -> 1x2"))
    tall = _jpeg(_scene(240, 500, seed=3, label="tall 240x500"))
    small = _png(_scene(120, 90, seed=4, label="120x90"))
    badge = _png(_badge(160, 160))
    frames = [_jpeg(_frame(192, 144, index), quality=80) for index in range(6)]
    text = _text_part
    records = [
        ("eng_Latn", [text("A synthetic test card, exactly one tile:\n"), _image(tile),
                      text("\nIt has a gradient, two shapes and a label.")]),
        ("fra_Latn", [text("Voici une image de 800 sur 600 pixels, découpée en quatre tuiles :\n"),
                      _image(photo),
                      text("\nLes couleurs changent doucement de gauche à droite.")]),
        ("zho_Hans", [text("这是一张宽图片，分成两块。\n"), _image(wide),
                      text("\n图片里有一个圆和一个方块。")]),
        ("spa_Latn", [text("Una imagen alta y estrecha:\n"), _image(tall),
                      text("\nY una imagen pequeña:\n"), _image(small), text("\nFin.")]),
        ("jpn_Jpan", [_image(badge), text("\n透明な背景の画像は白い背景に合成されます。")]),
        ("eng_Latn", [text("A short video of a ball moving from left to right, two frames "
                           "per second:\n"),
                      {"type": "video", "frames": frames, "fps": 2.0},
                      text("\nThe ball reaches the right edge in the last frame.")]),
        ("hin_Deva", [text("यह एक छोटा चित्र है:\n"), _image(small),
                      text("\nइसमें एक रंगीन ढलान है।")]),
        ("arb_Arab", [text("صورة اختبار مربعة:\n"), _image(tile), text("\nانتهى.")]),
    ]  # fmt: skip
    return [
        {"id": f"{lang}-media{index}", "lang": lang, "content": content}
        for index, (lang, content) in enumerate(records)
    ]


def write_sample_media(path: str) -> int:
    """Write the sample media corpus to `path` (`.jsonl.zst`); byte-identical across runs for
    a given Pillow/zlib/libjpeg. Returns the number of records."""
    from data.shards import write_documents  # fsspec + zstd only when writing

    return write_documents(path, sample_media_records(), level=19)


def _text_part(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _image(data: str) -> dict[str, str]:
    return {"type": "image", "image": data}


def _png(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False, compress_level=9)
    return base64.b64encode(out.getvalue()).decode("ascii")


def _jpeg(image: Image.Image, quality: int = 85) -> str:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, subsampling=2, optimize=False)
    return base64.b64encode(out.getvalue()).decode("ascii")


def _font() -> ImageFont.ImageFont:
    # The bitmap default font draws the same pixels everywhere; the FreeType one can vary.
    return ImageFont.load_default_imagefont()


def _scene(width: int, height: int, *, seed: int, label: str) -> Image.Image:
    """A smooth two-axis gradient with an ellipse, a rectangle and a text label."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    phase = seed * 0.7
    rgb = np.stack(
        [
            0.5 + 0.5 * np.cos(2.0 * np.pi * (u + phase)),
            v,
            0.5 + 0.5 * np.sin(np.pi * (u + v + phase)),
        ],
        axis=-1,
    )
    image = Image.fromarray(np.round(rgb * 255.0).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    w, h = width, height
    draw.ellipse([w * 0.1, h * 0.2, w * 0.45, h * 0.7], fill=(240, 200, 40), outline=(0, 0, 0))
    draw.rectangle([w * 0.55, h * 0.35, w * 0.9, h * 0.85], fill=(30, 60, 200), width=2)
    draw.text((4, 4), label, fill=(255, 255, 255), font=_font())
    return image


def _badge(width: int, height: int) -> Image.Image:
    """An RGBA image: a red disc on a transparent background."""
    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse([8, 8, width - 8, height - 8], fill=(200, 30, 30, 255))
    draw.text((width // 2 - 12, height // 2 - 5), "RGBA", fill=(255, 255, 255, 255), font=_font())
    return image


def _frame(width: int, height: int, index: int) -> Image.Image:
    """Video frame `index`: a ball that crosses the frame left to right over 6 frames."""
    image = Image.new("RGB", (width, height), (20, 90 + 20 * index, 60))
    draw = ImageDraw.Draw(image)
    radius = 18
    cx = radius + (width - 2 * radius) * index // 5
    cy = height // 2
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(250, 250, 250))
    draw.text((4, 4), f"frame {index}", fill=(255, 255, 0), font=_font())
    return image

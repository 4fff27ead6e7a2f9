"""The one image writer of the synthetic datasets: photos shaped like a real collection's files.

Real image sets are not 96x96 RGB PNGs: they are mostly JPEGs (some PNGs) of many aspect ratios (4:3, 3:4,
16:9, a few panoramas), a few greyscale, RGBA, palette or CMYK files, a few huge and a few tiny ones. A
renderer here only paints the *scene*: a square image of a given side (`paint(side) -> RGB image`);
`compose` puts it in the centre square of a canvas of the chosen size and draws clutter in the margins,
near the edges. So a centre crop (shortest edge, then the centre) keeps the whole scene, while a squash to
a square also shows the clutter and distorts the shapes: the two preprocessing paths see different inputs.

`choose_look(rng)` picks a file's look (size, format, mode); `save_image` writes it (with the faults the
fixtures plant: a missing or truncated file). Same rng state -> same look -> same bytes.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

JPEG_QUALITY = 90
# (width, height, weight) of the aspect ratios; 3:1 and 1:3 are the panoramas
ASPECTS = ((4, 3, 35), (3, 4, 15), (16, 9, 20), (1, 1, 12), (3, 2, 10), (3, 1, 5), (1, 3, 3))
SHORT_SIDES = (96, 120, 144, 192)  # ordinary files: the scene's side is one of these
LARGE_LONG_SIDE = 3000             # a very large file: long side 3000 (3000x2000 at 3:2), kept rare: slow to write
LARGE_MAX_PIXELS = 3000 * 2000     # ... and at most 6 MP (a square one is 2449x2449)
TINY_LONG_SIDE = 20                # a very small file (20x15 at 4:3): thumbnails, broken downloads
SIZE_CLASSES = (("ordinary", 97.9), ("large", 0.1), ("tiny", 2))  # large: each costs ~0.1 s a decode
# (format, mode, weight): mostly RGB JPEGs; greyscale and CMYK JPEGs, RGBA / palette / greyscale PNGs
ENCODINGS = (("JPEG", "RGB", 78), ("JPEG", "L", 3), ("JPEG", "CMYK", 2), ("PNG", "RGB", 10), ("PNG", "RGBA", 3),
             ("PNG", "P", 3), ("PNG", "L", 1))
EXTENSION = {"JPEG": ".jpg", "PNG": ".png"}
CLUTTER = ((95, 95, 95), (190, 180, 165), (60, 75, 90))  # margin clutter: none of the scenes' named colours


@dataclass(frozen=True)
class ImageLook:
    """How one image file looks: pixel size, file format and image mode."""
    width: int
    height: int
    format: str = "JPEG"
    mode: str = "RGB"

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def ext(self) -> str:
        return EXTENSION[self.format]

    @property
    def content_box(self) -> tuple[int, int, int]:
        """(left, top, side) of the centre square that holds the scene."""
        side = min(self.width, self.height)
        return (self.width - side) // 2, (self.height - side) // 2, side

    def to_dict(self) -> dict:
        return {"size": [self.width, self.height], "format": self.format, "mode": self.mode,
                "content_box": list(self.content_box)}


def _weighted(rng: random.Random, table):
    return rng.choices(table, weights=[row[-1] for row in table])[0]


def _pixel_size(rng: random.Random, aspect: tuple[int, int]) -> tuple[int, int]:
    aw, ah = aspect
    size_class = _weighted(rng, SIZE_CLASSES)[0]
    if size_class == "ordinary":
        short = rng.choice(SHORT_SIDES)
        long = round(short * max(aw, ah) / min(aw, ah))
    elif size_class == "large":
        ratio = max(aw, ah) / min(aw, ah)
        long = min(LARGE_LONG_SIDE, int((LARGE_MAX_PIXELS * ratio) ** 0.5))
        short = int(long / ratio)
    else:
        long = TINY_LONG_SIDE
        short = max(1, round(long * min(aw, ah) / max(aw, ah)))
    return (long, short) if aw >= ah else (short, long)


def choose_look(rng: random.Random, formats: tuple[str, ...] = ("JPEG", "PNG")) -> ImageLook:
    """A random look from the collection's mix; `formats` limits the file formats (VisDial and COCO files
    are JPEGs: they are named .jpg)."""
    aw, ah, _ = _weighted(rng, ASPECTS)
    width, height = _pixel_size(rng, (aw, ah))
    fmt, mode, _ = _weighted(rng, [row for row in ENCODINGS if row[0] in formats])
    return ImageLook(width, height, fmt, mode)


def _clutter(canvas: Image.Image, look: ImageLook, rng: random.Random) -> None:
    """Bars and blocks in the margins beside the centre square, some touching the image's outer edge."""
    left, top, side = look.content_box
    draw = ImageDraw.Draw(canvas)
    margins = []  # (box, whether its outer edge is at x (left / right margins) or at y)
    if left > 0:
        margins += [((0, 0, left, look.height), True), ((left + side, 0, look.width, look.height), True)]
    if top > 0:
        margins += [((0, 0, look.width, top), False), ((0, top + side, look.width, look.height), False)]
    for (x0, y0, x1, y1), outer_x in margins:
        w, h = x1 - x0, y1 - y0
        for _ in range(rng.randint(1, 3)):
            bw = max(1, round(w * rng.uniform(0.3, 0.9) if outer_x else w * rng.uniform(0.15, 0.6)))
            bh = max(1, round(h * rng.uniform(0.15, 0.6) if outer_x else h * rng.uniform(0.3, 0.9)))
            bx = x0 + rng.randint(0, w - bw)
            by = y0 + rng.randint(0, h - bh)
            if rng.random() < 0.5:  # against the image's outer edge
                if outer_x:
                    bx = x0 if x0 == 0 else x1 - bw
                else:
                    by = y0 if y0 == 0 else y1 - bh
            draw.rectangle((bx, by, bx + bw - 1, by + bh - 1), fill=rng.choice(CLUTTER))


def compose(look: ImageLook, background: tuple[int, int, int], paint: Callable[[int], Image.Image],
            rng: random.Random) -> Image.Image:
    """An RGB canvas of `look.size`: `background`, the scene `paint(side)` in the centre square, margin clutter."""
    canvas = Image.new("RGB", look.size, background)
    left, top, side = look.content_box
    scene = paint(side)
    if scene.size != (side, side):
        raise ValueError(f"paint({side}) returned a {scene.size} image")
    canvas.paste(scene, (left, top))
    _clutter(canvas, look, rng)
    return canvas


def encode(image: Image.Image, look: ImageLook) -> bytes:
    """The file's bytes: `image` (RGB) converted to the look's mode and saved in its format."""
    if look.mode == "P":
        converted = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    elif look.mode == "RGBA":
        converted = image.convert("RGBA")  # opaque: the loaders drop alpha (.convert("RGB"))
    else:
        converted = image.convert(look.mode)
    buffer = io.BytesIO()
    if look.format == "JPEG":
        converted.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        converted.save(buffer, format="PNG", compress_level=1)  # fast; the level does not change the pixels
    return buffer.getvalue()


def save_image(image: Image.Image, path: str | Path, look: ImageLook, fault: str | None = None,
               keep: float = 0.5) -> Path | None:
    """Write `image` as `look` to `path` (its suffix replaced by the look's); returns the path, or None for
    the `missing` fault (nothing written). `corrupt` keeps only the first `keep` fraction of the bytes."""
    path = Path(path).with_suffix(look.ext)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fault == "missing":
        return None
    data = encode(image, look)
    if fault == "corrupt":
        data = data[: max(1, int(len(data) * keep))]
    elif fault is not None:
        raise ValueError(f"unknown image fault {fault!r}")
    path.write_bytes(data)
    return path


# -- the test fixtures' looks ---------------------------------------------------------------------------
AWKWARD = ("greyscale", "cmyk", "tiny", "large", "panorama")  # what a few fixture files always are


def _awkward_look(rng: random.Random, kind: str, formats: tuple[str, ...]) -> ImageLook:
    fmt = "JPEG" if "JPEG" in formats else formats[0]
    if kind == "greyscale":
        return ImageLook(128, 96, fmt, "L")
    if kind == "cmyk" and fmt == "JPEG":
        return ImageLook(96, 128, "JPEG", "CMYK")
    if kind == "tiny":
        return ImageLook(TINY_LONG_SIDE, 15, fmt)
    if kind == "large":
        return ImageLook(3000, 2000, fmt)
    return ImageLook(3 * 96, 96, fmt)  # a panorama (or a CMYK file where only PNGs are allowed: RGB)


def fixture_looks(key: str, n: int, formats: tuple[str, ...] = ("JPEG",)) -> list[ImageLook]:
    """Looks of `n` fixture images (their own random stream, named by `key`, so the fixture's content does
    not depend on them): the collection's mix, with about one in three of the files (at most one of each)
    made awkward on purpose (greyscale, CMYK, 20x15, 3000x2000, 3:1), so that even a four-image fixture
    has one."""
    rng = random.Random(f"synth-looks:{key}")
    looks = [choose_look(rng, formats) for _ in range(n)]
    kinds = rng.sample(AWKWARD, len(AWKWARD))
    for position, kind in zip(rng.sample(range(n), min(n // 3, len(AWKWARD))), kinds):
        looks[position] = _awkward_look(rng, kind, formats)
    return looks


PNG_FAULT_MODES = ("P", "RGBA", "RGB")


def png_fault_look(look: ImageLook, k: int) -> ImageLook:
    """The `k`-th `png` fault's look: the same size as a PNG, in palette, RGBA or RGB mode by turns."""
    return ImageLook(look.width, look.height, "PNG", PNG_FAULT_MODES[k % len(PNG_FAULT_MODES)])

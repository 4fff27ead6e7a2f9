"""Photo-like image files as real collections have them, written with PIL alone (no project code): the
independent writer of the images that `tests/test_original_equivalence.py` feeds to the project and to the
reference implementation of the original (`original_fromage.py`)."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def photo_like(seed: int, size: tuple[int, int]) -> Image.Image:
    """An RGB picture with detail right up to its borders (noise over a gradient, a bright bar along the left
    edge), so that a centre crop and a squash of it differ."""
    w, h = size
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, w)[None, :, None] * torch.linspace(1, 0.2, h)[:, None, None]
    colour = torch.rand(1, 1, 3, generator=g)
    pixels = 255 * (0.6 * ramp * colour + 0.4 * torch.rand(h, w, 3, generator=g))
    pixels[:, : max(1, w // 10)] = torch.tensor([250.0, 240.0, 30.0])
    return Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy(), "RGB")


def awkward_image_files(directory) -> dict[str, Path]:
    """Image files as real collections have them: non-square, JPEG and PNG, in the modes L, RGBA, P, CMYK and
    RGB; tiny and panoramic. Keys name what is awkward about each file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rgba = photo_like(3, (320, 180)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))  # alpha from 0 (top) to 255 (bottom)
    files = {
        "rgb_4x3.jpg": photo_like(1, (400, 300)),
        "grey_3x4.jpg": photo_like(2, (150, 200)).convert("L"),
        "rgba_16x9.png": rgba,
        "palette_panorama.png": photo_like(4, (600, 200)).quantize(colors=32),
        "cmyk_4x3.jpg": photo_like(5, (320, 240)).convert("CMYK"),
        "tiny_rgb.png": photo_like(6, (20, 15)),
    }
    paths = {}
    for name, image in files.items():
        path = directory / name
        image.save(path, quality=90) if name.endswith(".jpg") else image.save(path)
        paths[name] = path
    return paths

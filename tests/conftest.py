"""Shared fixtures: tiny FROMAGe models built once per test session (offline, seeded)."""
from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from model import load_fromage, make_tiny

logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "fromage", seed=0)


@pytest.fixture(scope="session")
def tiny_vis4_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny4") / "fromage", seed=1, n_visual_tokens=4)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    torch.manual_seed(0)
    return load_fromage(tiny_dir, device="cpu", precision="fp32")


def solid_image(colour, size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, colour)


def striped_image(seed: int, size=(80, 60)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


@pytest.fixture(scope="session")
def images():
    return [solid_image((200, 30, 30)), solid_image((20, 20, 220), (30, 90)), striped_image(1), striped_image(2)]


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


def awkward_image_files(directory) -> dict[str, "Path"]:
    """Image files as real collections have them: non-square, JPEG and PNG, in the modes L, RGBA, P, CMYK and
    RGB; tiny and panoramic. Keys name what is awkward about each file."""
    from pathlib import Path

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


@pytest.fixture(scope="session")
def awkward_files(tmp_path_factory):
    return awkward_image_files(tmp_path_factory.mktemp("awkward"))


@pytest.fixture(scope="session")
def awkward_images(awkward_files):
    """The files of `awkward_image_files`, opened as a user opens them (`Image.open`, decoded, own mode)."""
    opened = {}
    for name, path in awkward_files.items():
        with Image.open(path) as img:
            img.load()
            opened[name] = img
    return opened

"""Shared fixtures: tiny FROMAGe models built once per test session (offline, seeded)."""
from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from model import load_fromage, make_tiny
from tests.reference.photos import awkward_image_files

logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _fresh_pixel_memo():
    """Every test starts without pixels decoded by an earlier one (the memo lives for the process)."""
    from model.images import PIXEL_MEMO

    PIXEL_MEMO.clear()
    yield
    PIXEL_MEMO.clear()


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

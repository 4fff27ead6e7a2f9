"""Image preprocessing exactly as the released notebooks feed CLIP: squash to 224x224, RGB, CLIP processor."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, UnidentifiedImageError

from .errors import FromageInputError

SQUASH_SIZE = (224, 224)  # the original resizes without keeping the aspect ratio, then lets CLIP crop (a no-op)


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file; a missing, truncated or non-image file is a FromageInputError."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise FromageInputError(path, "image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise FromageInputError(path, f"unreadable or corrupt image: {err}") from None


def pixel_values(processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) float32 pixel values for PIL images."""
    squashed = [img.resize(SQUASH_SIZE).convert("RGB") for img in images]
    return processor(squashed, return_tensors="pt").pixel_values

"""Image preprocessing exactly as the released notebooks feed CLIP: squash to 224x224, RGB, CLIP processor."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

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


def try_load(path: str | Path | None) -> tuple[Image.Image | None, str | None]:
    """(image, None) or (None, reason) for a missing or corrupt file: for data sets that skip such images."""
    if path is None or not Path(path).is_file():
        return None, "missing image"
    try:
        return load_image(path), None
    except FromageInputError:
        return None, "corrupt image"


def pixel_values(processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) float32 pixel values for PIL images."""
    squashed = [img.resize(SQUASH_SIZE).convert("RGB") for img in images]
    return processor(squashed, return_tensors="pt").pixel_values


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> (position, (3, H, W) pixel values or None, reason or None), decoded and resized where
    the DataLoader puts the work (its worker processes): JPEG decoding and resizing, not the vision tower,
    bound feature extraction on a large image set."""

    def __init__(self, paths: Sequence[str | Path], processor):
        self.paths, self.processor = list(paths), processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        image, reason = try_load(self.paths[position])
        return position, None if image is None else pixel_values(self.processor, [image])[0], reason


def collate_pixels(items) -> tuple[list[int], torch.Tensor | None, dict[int, str]]:
    """A batch of `ImageFiles` items -> (positions decoded, their stacked pixels, reason by failed position)."""
    ok = [(pos, px) for pos, px, _ in items if px is not None]
    failed = {pos: reason for pos, px, reason in items if px is None}
    return [pos for pos, _ in ok], (torch.stack([px for _, px in ok]) if ok else None), failed


def default_workers(n_images: int, batch_size: int) -> int:
    """Worker processes for decoding: none for a single batch (starting workers costs more than decoding it);
    else the cores beyond two, up to 8. The main process's own threads (vision tower, LM) keep two cores: on a
    2-core machine one or two workers made the VIST benchmark's pool encoding slower, not faster."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if n_images <= batch_size else max(0, min(8, cores - 2))


def pixel_batches(paths: Sequence[str | Path], processor, batch_size: int, workers: int | None = None,
                  pin_memory: bool = False) -> Iterator[tuple[list[int], torch.Tensor | None, dict[int, str]]]:
    """`collate_pixels` batches over `paths`, in order."""
    workers = default_workers(len(paths), batch_size) if workers is None else workers
    loader = torch.utils.data.DataLoader(ImageFiles(paths, processor), batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_pixels, pin_memory=pin_memory)
    yield from loader

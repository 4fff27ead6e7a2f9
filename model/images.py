"""Image files -> CLIP pixel values, with the preprocessing of the original code path being reproduced.

The original FROMAGe code prepares images in two ways (spec, "Inference behaviour"):

* ``crop`` — the model API (`generate_for_images_and_texts`, `get_log_lik_scores`), training and the CC3M-style
  validation: ``image.convert('RGB')`` handed to the CLIP processor as it is, which resizes the shortest edge to
  224 and centre-crops. This is how the model was trained, so every `corrected` protocol uses it too.
* ``squash`` — the VIST and VisDial evaluation scripts and the example notebook: ``image.resize((224, 224))``
  first (aspect ratio lost), *then* ``.convert('RGB')``, then the processor (whose crop is then a no-op). The order
  matters for non-RGB files: Pillow resizes a palette image with nearest-neighbour sampling and an RGBA image
  with premultiplied alpha before the alpha is dropped. The `paper` protocols of those tasks use it.

Files are decoded without any other change (no EXIF rotation, as in the original). Pillow's decompression-bomb
limit stays at its default: an image of more than 2 x `PIL.Image.MAX_IMAGE_PIXELS` pixels (about 179 Mpx) is
refused as "image too large" before it is decoded, like any other unreadable file.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from .errors import FromageInputError
from .files import file_stamp

CROP = "crop"
SQUASH = "squash"
PREPROCESSINGS = (CROP, SQUASH)
SQUASH_SIZE = (224, 224)  # the original scripts' resize, whatever the vision tower's input size
TOO_LARGE = "image too large"  # the skip reason for Pillow's DecompressionBombError


def check_preprocess(preprocess: str) -> str:
    if preprocess not in PREPROCESSINGS:
        raise ValueError(f"unknown image preprocessing {preprocess!r} (choose from {', '.join(PREPROCESSINGS)})")
    return preprocess


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file in its own mode (L, P, RGBA, CMYK, ...); a missing, truncated, oversized
    or non-image file is a FromageInputError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except FileNotFoundError:
        raise FromageInputError(path, "image file not found") from None
    except Image.DecompressionBombError as err:
        raise FromageInputError(path, f"{TOO_LARGE} for Pillow's default limit: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise FromageInputError(path, f"unreadable or corrupt image: {err}") from None


def load_image(path: str | Path) -> Image.Image:
    """An image file as RGB, the way the API and training see it (`open_image` then `.convert('RGB')`)."""
    return open_image(path).convert("RGB")


def try_open(path: str | Path | None) -> tuple[Image.Image | None, str | None]:
    """(image in its own mode, None) or (None, reason) for a file to skip: "missing image", "image too large"
    (Pillow's decompression-bomb limit) or "corrupt image" (any other decoding failure)."""
    if path is None or not Path(path).is_file():
        return None, "missing image"
    try:
        return open_image(path), None
    except FromageInputError as err:
        return None, TOO_LARGE if err.problem.startswith(TOO_LARGE) else "corrupt image"
    except Exception:  # noqa: BLE001 - a decoder bug on one odd file must not end the run: skip it, counted
        return None, "corrupt image"


def try_load(path: str | Path | None) -> tuple[Image.Image | None, str | None]:
    """`try_open`, converted to RGB."""
    image, reason = try_open(path)
    return (None if image is None else image.convert("RGB")), reason


def prepare(image: Image.Image, preprocess: str) -> Image.Image:
    """The RGB image the original hands to the CLIP processor on the code path `preprocess` (see the module doc)."""
    if check_preprocess(preprocess) == SQUASH:
        return image.resize(SQUASH_SIZE).convert("RGB")
    return image.convert("RGB")


def pixel_values(processor, images: Sequence[Image.Image], preprocess: str = CROP) -> torch.Tensor:
    """(N, 3, H, W) float32 pixel values of PIL images (any mode), prepared as `preprocess` says."""
    return processor([prepare(img, preprocess) for img in images], return_tensors="pt").pixel_values


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> (position, (3, H, W) pixel values or None, reason or None), decoded and resized where
    the DataLoader puts the work (its worker processes): JPEG decoding and resizing, not the vision tower,
    bound feature extraction on a large image set."""

    def __init__(self, paths: Sequence[str | Path], processor, preprocess: str = CROP):
        self.paths, self.processor, self.preprocess = list(paths), processor, check_preprocess(preprocess)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int):
        image, reason = try_open(self.paths[position])
        if image is None:
            return position, None, reason
        try:
            return position, pixel_values(self.processor, [image], self.preprocess)[0], None
        except Exception:  # noqa: BLE001 - e.g. a mode the conversion cannot handle: this file only is skipped
            return position, None, "corrupt image"


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


class PixelMemo:
    """Pixel values already prepared in this process, so that one evaluation run decodes each file once per
    preprocessing, not once per precision (each precision loads its own model, whose features differ, but whose
    processor prepares the same pixels). Keyed by the file (resolved path, size, mtime), the preprocessing and
    the processor's configuration, so a changed file or processor is decoded afresh. It holds at most
    `max_bytes` and then takes no more (no eviction: the tasks read their images in the same order at every
    precision, where a least-recently-used memo smaller than the set would never hit)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.enabled = max_bytes, 0, True
        self._pixels: dict[tuple, torch.Tensor] = {}

    @contextmanager
    def off(self):
        """Neither read nor fill the memo inside the block (work that reads each image once, such as building a
        retrieval set, would only take the room)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    @staticmethod
    def processor_key(processor) -> str:
        to_json = getattr(processor, "to_json_string", None)
        return to_json() if to_json else repr(processor)

    @staticmethod
    def file_key(path: str | Path | None, processor_key: str, preprocess: str) -> tuple | None:
        if path is None:
            return None
        resolved = Path(path).resolve()
        stamp = file_stamp(resolved)
        return None if stamp == "missing" else (str(resolved), stamp, preprocess, processor_key)

    def get(self, key: tuple | None) -> torch.Tensor | None:
        return None if key is None or not self.enabled else self._pixels.get(key)

    def put(self, key: tuple | None, pixels: torch.Tensor) -> None:
        size = pixels.numel() * pixels.element_size()
        if self.enabled and key is not None and key not in self._pixels and self.bytes + size <= self.max_bytes:
            self._pixels[key] = pixels
            self.bytes += size

    def clear(self) -> None:
        self._pixels.clear()
        self.bytes = 0


# 1 GiB: the embedded default's evaluation images at both preprocessings (about 0.5 GB); a real VIST pool at 224 px
# (0.6 MB a photo) fits in part
PIXEL_MEMO = PixelMemo(int(os.environ.get("FROMAGE_PIXEL_MEMO_BYTES", 1 << 30)))


def pixel_batches(paths: Sequence[str | Path], processor, batch_size: int, workers: int | None = None,
                  pin_memory: bool = False, preprocess: str = CROP
                  ) -> Iterator[tuple[list[int], torch.Tensor | None, dict[int, str]]]:
    """`collate_pixels` batches over `paths`: first those `PIXEL_MEMO` holds, then the others, decoded by
    `workers` DataLoader processes, in order (every batch names its positions)."""
    processor_key = PixelMemo.processor_key(processor)
    keys = [PixelMemo.file_key(p, processor_key, preprocess) for p in paths]
    memo = [PIXEL_MEMO.get(key) for key in keys]
    held = [i for i, pixels in enumerate(memo) if pixels is not None]
    for start in range(0, len(held), batch_size):
        positions = held[start:start + batch_size]
        pixels = torch.stack([memo[i] for i in positions])
        yield positions, (pixels.pin_memory() if pin_memory else pixels), {}
    todo = [i for i, pixels in enumerate(memo) if pixels is None]
    if not todo:
        return
    workers = default_workers(len(todo), batch_size) if workers is None else workers
    loader = torch.utils.data.DataLoader(ImageFiles([paths[i] for i in todo], processor, preprocess),
                                         batch_size=batch_size, num_workers=workers, collate_fn=collate_pixels,
                                         pin_memory=pin_memory)
    for positions, pixels, failed in loader:
        positions = [todo[p] for p in positions]
        for i, row in zip(positions, pixels if pixels is not None else ()):
            PIXEL_MEMO.put(keys[i], row.clone())
        yield positions, pixels, {todo[p]: reason for p, reason in failed.items()}

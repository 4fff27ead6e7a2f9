"""Training data: a CC3M-style TSV of (caption, image file) pairs, and the order in which it is read.

The TSV is read by the evaluation tasks' reader, `model.datasets.read_cc3m_rows` (as the original's pandas
reads it: a header with the columns `caption` and `image` in any order, other columns ignored, CSV quoting
honoured); image names are relative to an image directory and resolved as the tasks resolve them
(`model.datasets.resolve_image`: as given, then with an image extension).
Captions are tokenised like the original training code: BOS + caption + `[RET]`, at most `max_len`
tokens (a caption that does not fit is cut and keeps `[RET]` as its last token), padded to the batch's longest
(at most `max_len`: padding sits after [RET] under causal attention, so it changes no loss, only the cost).

The order is a pure function of (seed, micro-batch index): epoch e reads a permutation seeded with
seed + e, cut into global batches of `batch_size x world_size` (a last partial batch is dropped), and
rank r takes the r-th block of each global batch. So a run on W processes sees exactly the global
batches of a run on one process with a W times larger batch, and a resumed run only needs the number
of micro-batches already read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .datasets import ImageDir, read_cc3m_rows, resolve_image
from .errors import FromageInputError
from .images import try_load

MAX_LEN = 24  # the original's --max-len
PIXEL_CACHE_BYTES = 1 << 30  # decoded images kept in memory by a dataset read in the main process


def tokenize_caption(tokenizer, caption: str, ret_id: int, max_len: int = MAX_LEN) -> list[int]:
    """BOS + caption + [RET], cut to max_len tokens with [RET] kept last (as the original's truncation)."""
    ids = tokenizer(caption, add_special_tokens=True).input_ids[:max_len - 1]
    return ids + [ret_id]


class CaptionDataset(torch.utils.data.Dataset):
    """Item i: the CLIP pixel values of row i's image and its caption's token ids.

    An image that is missing or cannot be decoded is skipped: the item is taken from the next row of the
    file whose image can be read, and `skipped` counts how many rows were passed over. (The original
    picked a random row instead; either way the batch keeps its size, which the all-gather of the
    contrastive loss needs on every rank.)
    """

    def __init__(self, tsv: str | Path, image_dir: str | Path, tokenizer, processor, ret_id: int, max_len: int = MAX_LEN):
        self.tsv = Path(tsv)
        self.image_dir = Path(image_dir)
        self.images = ImageDir(self.image_dir)
        self.rows = [(row.caption, row.image) for row in read_cc3m_rows(self.tsv)]
        self.tokenizer = tokenizer
        self.processor = processor
        self.ret_id = ret_id
        self.max_len = max_len
        self._pixels: dict[int, torch.Tensor | None] = {}
        self._pixel_bytes = 0

    def __len__(self) -> int:
        return len(self.rows)

    def read_image(self, index: int) -> Image.Image | None:
        """The row's image, None when it is missing, unreadable or named outside the image directory (such a
        row is skipped like a missing image: one bad name should not stop a long run)."""
        try:
            path = resolve_image(self.images, self.rows[index][1], f"{self.tsv}, row {index}")
        except FromageInputError:
            return None
        return try_load(path)[0]  # any decoding failure (a bomb, a decoder bug) skips the row, as in evaluation

    def row_pixels(self, index: int) -> torch.Tensor | None:
        """The row's CLIP pixel values (None: unreadable), kept in memory up to PIXEL_CACHE_BYTES when read in
        the main process (`--workers 0`): every epoch reads every image again, and on 2 CPU cores decoding and
        resizing them was a fifth of a small model's training step. Workers keep no copy (one per worker)."""
        if index in self._pixels:
            return self._pixels[index]
        image = self.read_image(index)
        # Like the original training code: the CLIP processor as it is (resize the short side,
        # centre crop), not the 224x224 squash that the released inference notebooks use.
        pixels = None if image is None else self.processor([image], return_tensors="pt").pixel_values[0]
        size = 0 if pixels is None else pixels.numel() * pixels.element_size()
        if torch.utils.data.get_worker_info() is None and self._pixel_bytes + size <= PIXEL_CACHE_BYTES:
            self._pixels[index] = pixels
            self._pixel_bytes += size
        return pixels

    def __getitem__(self, index: int) -> dict:
        for skipped in range(len(self.rows)):
            row = (index + skipped) % len(self.rows)
            pixels = self.row_pixels(row)
            if pixels is not None:
                ids = tokenize_caption(self.tokenizer, self.rows[row][0], self.ret_id, self.max_len)
                return {"pixel_values": pixels, "input_ids": ids, "skipped": skipped}
        raise FromageInputError(self.image_dir, f"none of the {len(self.rows)} images named in {self.tsv} can be read")


@dataclass
class Batch:
    pixel_values: torch.Tensor  # (B, 3, H, W)
    input_ids: torch.Tensor     # (B, <= max_len) BOS, caption, [RET], then padding to the longest row
    lengths: torch.Tensor       # (B,) real tokens per row, [RET] included
    skipped: int                # unreadable images passed over while building this batch

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.pixel_values.to(device, non_blocking=True), self.input_ids.to(device, non_blocking=True),
                     self.lengths.to(device, non_blocking=True), self.skipped)

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        return Batch(self.pixel_values.pin_memory(), self.input_ids.pin_memory(), self.lengths.pin_memory(), self.skipped)


class Collate:
    """Pads token ids to the batch's longest row (at most max_len) with `pad_id` (padding only ever sits after
    the last real token)."""

    def __init__(self, pad_id: int, max_len: int = MAX_LEN):
        self.pad_id = pad_id
        self.max_len = max_len

    def __call__(self, items: list[dict]) -> Batch:
        width = min(self.max_len, max(len(item["input_ids"]) for item in items))
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        for row, item in enumerate(items):
            ids[row, :len(item["input_ids"])] = torch.tensor(item["input_ids"])
        lengths = torch.tensor([len(item["input_ids"]) for item in items])
        pixels = torch.stack([item["pixel_values"] for item in items])
        return Batch(pixels, ids, lengths, sum(item["skipped"] for item in items))


class ShardedBatches(torch.utils.data.Sampler):
    """Yields this rank's index lists for micro-batches start, start+1, ..., stop-1 (see the module doc)."""

    def __init__(self, num_rows: int, batch_size: int, world_size: int, rank: int, seed: int, start: int, stop: int):
        self.global_batch = batch_size * world_size
        if num_rows < self.global_batch:
            raise ValueError(f"{num_rows} rows are fewer than one global batch ({self.global_batch})")
        self.num_rows, self.batch_size, self.rank, self.seed = num_rows, batch_size, rank, seed
        self.batches_per_epoch = num_rows // self.global_batch
        self.start, self.stop = start, stop
        self._epoch, self._order = None, None

    def order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(self.seed + epoch))
        return self._order

    def indices(self, micro_batch: int) -> list[int]:
        epoch, position = divmod(micro_batch, self.batches_per_epoch)
        order = self.order(epoch)
        first = position * self.global_batch + self.rank * self.batch_size
        return order[first:first + self.batch_size].tolist()

    def __iter__(self):
        for micro_batch in range(self.start, self.stop):
            yield self.indices(micro_batch)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

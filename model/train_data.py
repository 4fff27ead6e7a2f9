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
of micro-batches already read. With `epoch_batches` (the original's `--steps-per-epoch`), an epoch is only
the first `epoch_batches` global batches of its permutation, as the original's loop breaks out of a freshly
shuffled DataLoader after 2000 batches.

Bad images: any failure to read a row's image (missing, outside the image directory, a decompression bomb,
a truncated file, an error of the image processor) skips that row, counted by reason, and the slot is filled
by a row drawn uniformly at random (as the original retries a random index), from a generator seeded with
(seed, micro-batch, slot, attempt): the draw is the same on every resume and on any number of processes,
and a block of unreadable rows spreads its replacements over the whole file.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .datasets import ImageDir, read_cc3m_rows, resolve_image
from .errors import FromageInputError
from .images import try_load

MAX_LEN = 24  # the original's --max-len
MAX_DRAWS = 1000  # random replacements tried for one slot before the data is declared unreadable
PIXEL_CACHE_BYTES = 1 << 30  # decoded images kept in memory by a dataset read in the main process


def tokenize_caption(tokenizer, caption: str, ret_id: int, max_len: int = MAX_LEN) -> list[int]:
    """BOS + caption + [RET], cut to max_len tokens with [RET] kept last (as the original's truncation)."""
    ids = tokenizer(caption, add_special_tokens=True).input_ids[:max_len - 1]
    return ids + [ret_id]


class CaptionDataset(torch.utils.data.Dataset):
    """Item i, or (i, draw key): the CLIP pixel values of row i's image and its caption's token ids.

    A row whose image cannot be used is skipped and replaced by a random row (the module docstring), drawn
    with `draw key` (a tuple of ints; `KeyedBatches` gives (micro-batch, slot)) and `seed`; `skipped` counts the
    rows passed over and `reasons` why. The batch keeps its size, which the all-gather of the contrastive loss
    needs on every rank.
    """

    def __init__(self, tsv: str | Path, image_dir: str | Path, tokenizer, processor, ret_id: int, max_len: int = MAX_LEN,
                 seed: int = 0):
        self.tsv = Path(tsv)
        self.image_dir = Path(image_dir)
        self.images = ImageDir(self.image_dir)
        self.rows = [(row.caption, row.image) for row in read_cc3m_rows(self.tsv)]
        self.tokenizer = tokenizer
        self.processor = processor
        self.ret_id = ret_id
        self.max_len = max_len
        self.seed = seed
        self._pixels: dict[int, tuple[torch.Tensor | None, str | None]] = {}
        self._pixel_bytes = 0

    def __len__(self) -> int:
        return len(self.rows)

    def pixels(self, index: int) -> tuple[torch.Tensor | None, str | None]:
        """`read_pixels`, kept in memory up to PIXEL_CACHE_BYTES when read in the main process (`--workers 0`):
        every epoch reads every image again, and on 2 CPU cores decoding and resizing them was a fifth of a small
        model's training step. Workers keep no copy (it would be one per worker)."""
        if index in self._pixels:
            return self._pixels[index]
        pixels, reason = self.read_pixels(index)
        size = 0 if pixels is None else pixels.numel() * pixels.element_size()
        if torch.utils.data.get_worker_info() is None and self._pixel_bytes + size <= PIXEL_CACHE_BYTES:
            self._pixels[index] = (pixels, reason)
            self._pixel_bytes += size
        return pixels, reason

    def read_pixels(self, index: int) -> tuple[torch.Tensor | None, str | None]:
        """(the row's CLIP pixel values, None) or (None, why the row is skipped). A name outside the image
        directory is skipped like a missing image (one bad name should not stop a long run); so is anything
        the decoder or the processor raises, as the original catches any exception."""
        try:
            path = resolve_image(self.images, self.rows[index][1], f"{self.tsv}, row {index}")
        except FromageInputError:
            return None, "bad image name"
        image, reason = try_load(path)  # missing, too large (a decompression bomb), corrupt or truncated
        if image is None:
            return None, reason
        try:
            # Like the original training code: the CLIP processor as it is (resize the short side, centre crop),
            # not the 224x224 squash that the released inference notebooks use.
            return self.processor([image], return_tensors="pt").pixel_values[0], None
        except Exception:  # noqa: BLE001 - one odd image must not end a long run: skipped and counted
            return None, "image processor error"

    def __getitem__(self, key: int | tuple) -> dict:
        row, draw_key = (key, (key,)) if isinstance(key, (int, np.integer)) else (key[0], tuple(key[1]))
        reasons: Counter = Counter()
        for attempt in range(MAX_DRAWS + 1):
            pixels, reason = self.pixels(row)
            if pixels is not None:
                ids = tokenize_caption(self.tokenizer, self.rows[row][0], self.ret_id, self.max_len)
                return {"pixel_values": pixels, "input_ids": ids, "skipped": sum(reasons.values()),
                        "reasons": reasons, "row": row}
            reasons[reason] += 1
            row = int(np.random.default_rng([self.seed, *draw_key, attempt]).integers(len(self.rows)))
        raise FromageInputError(self.image_dir, f"{MAX_DRAWS} random rows of {self.tsv} in a row had no usable image "
                                f"({', '.join(f'{n} {r}' for r, n in reasons.most_common())})",
                                "check --image-dir and the TSV's image column")


@dataclass
class Batch:
    pixel_values: torch.Tensor  # (B, 3, H, W)
    input_ids: torch.Tensor     # (B, <= max_len) BOS, caption, [RET], then padding to the longest row
    lengths: torch.Tensor       # (B,) real tokens per row, [RET] included
    skipped: int                # unreadable images passed over while building this batch
    reasons: Counter = field(default_factory=Counter)  # why, by reason

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.pixel_values.to(device, non_blocking=True), self.input_ids.to(device, non_blocking=True),
                     self.lengths.to(device, non_blocking=True), self.skipped, self.reasons)

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        return Batch(self.pixel_values.pin_memory(), self.input_ids.pin_memory(), self.lengths.pin_memory(), self.skipped,
                     self.reasons)


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
        reasons = sum((item.get("reasons", Counter()) for item in items), Counter())
        return Batch(pixels, ids, lengths, sum(item["skipped"] for item in items), reasons)


class ShardedBatches(torch.utils.data.Sampler):
    """Yields this rank's index lists for micro-batches start, start+1, ..., stop-1 (see the module doc)."""

    def __init__(self, num_rows: int, batch_size: int, world_size: int, rank: int, seed: int, start: int, stop: int,
                 epoch_batches: int | None = None):
        self.global_batch = batch_size * world_size
        if num_rows < self.global_batch:
            raise ValueError(f"{num_rows} rows are fewer than one global batch ({self.global_batch})")
        self.num_rows, self.batch_size, self.rank, self.seed = num_rows, batch_size, rank, seed
        self.batches_per_epoch = min(num_rows // self.global_batch, epoch_batches or num_rows)
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


class KeyedBatches(ShardedBatches):
    """`ShardedBatches` whose items carry their draw key (micro-batch, slot in the global batch), which
    `CaptionDataset` seeds the replacement of an unreadable row with."""

    def __iter__(self):
        for micro_batch in range(self.start, self.stop):
            first = self.rank * self.batch_size
            yield [(row, (micro_batch, first + slot)) for slot, row in enumerate(self.indices(micro_batch))]

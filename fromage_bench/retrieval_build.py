"""`fromage-bench build-retrieval-set`: the retrieval set `[RET]` retrieves from, embedded from image files.

Each image is embedded as the original's `extract_img_embs.py` does: `Image.open`, the CLIP processor (its
shortest-edge resize and centre crop, `model.images.CROP`) and `get_visual_embs(mode='retrieval')` (our
`project_images(features, "retrieval")[:, 0]`), not normalised. Files are decoded by DataLoader workers.

Resume and sharding: the path list is cut into chunks of `--chunk-size` images, fixed by the list alone (never by
the number of processes or by what is already done). Each finished chunk is written atomically to
`OUT/.partial/<key>.safetensors`, the key a digest of the model identity, the preprocessing, the precision, the
device type, the batch size and the chunk's names, files, sizes and modification times. A rerun computes only the
chunks whose file is missing; under torchrun those are dealt round-robin to the ranks, and rank 0 assembles the
set from the chunk files after a barrier. Every chunk is computed in the same batches however the run is split
or resumed, so the set is bit-identical to one uninterrupted process's. The set's files appear only once
every chunk is done; the partial directory is then removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm import tqdm

from model.datasets import ImageDir, read_cc3m_rows, resolve_image
from model.errors import FromageInputError
from model.files import atomic_write_bytes, atomic_write_text, file_stamp
from model.images import CROP, PIXEL_MEMO
from model.retrieval_set import RetrievalSet

CHUNK_SIZE = 1024
PARTIAL_DIR = ".partial"
SKIPPED_FILE = "retrieval_skipped.tsv"
# What `--images DIR` takes as an image file (any case); other files under DIR (READMEs, captions) are not images.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


# -- the image list -------------------------------------------------------------------------------------
@dataclass
class ImageList:
    """The images of a set: the names stored in it (relative to `image_root` where possible) and the files
    opened. Duplicates (the same normalised file) are kept once, at their first occurrence."""
    image_root: str
    source: str                 # what the list came from, for messages
    names: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    duplicates: int = 0
    _seen: set = field(default_factory=set, repr=False)

    def add(self, name: str) -> None:
        name = os.path.normpath(name)
        file = os.path.normpath(os.path.join(self.image_root, name))
        if file in self._seen:
            self.duplicates += 1
            return
        self._seen.add(file)
        self.names.append(PurePath(name).as_posix())
        self.files.append(file)

    def checked(self) -> "ImageList":
        if not self.names:
            raise FromageInputError(self.source, "no images to embed")
        return self


def images_under(directory: Path) -> ImageList:
    """Every image file under `directory`, recursively, symlinked folders and files followed, sorted by their path
    relative to `directory`. A folder linking back to one of its own ancestors is not entered again (the link
    loop ends there); a link to a folder elsewhere under `directory` is walked like a copy of it (its files are
    other paths). A broken link with an image name is listed, and skipped as missing."""
    if not directory.is_dir():
        raise FromageInputError(directory, "image directory not found")
    images = ImageList(os.path.abspath(directory), f"{directory} (--images)")
    for name in sorted(_image_names(directory, "", {os.path.realpath(directory)})):
        images.add(name)
    return images.checked()


def _image_names(root: Path, folder: str, ancestors: set[str]) -> list[str]:
    names = []
    for entry in os.scandir(root / folder):
        name = f"{folder}/{entry.name}" if folder else entry.name
        if entry.is_dir():  # follows links
            real = os.path.realpath(entry.path)
            if real not in ancestors:
                names += _image_names(root, name, ancestors | {real})
        elif entry.name.lower().endswith(IMAGE_SUFFIXES):
            names.append(name)
    return names


def images_of_tsv(tsv: Path, image_dir: Path) -> ImageList:
    """The `image` column of a CC3M-style TSV, names resolved under `image_dir` as training and evaluation
    resolve them (`model.datasets.resolve_image`: an extension may be appended or swapped)."""
    rows = read_cc3m_rows(tsv)
    directory = ImageDir(image_dir)
    images = ImageList(os.path.abspath(image_dir), str(tsv))
    for row in rows:
        file = resolve_image(directory, row.image, source=f"{tsv}, line {row.line}")
        images.add(str(file.relative_to(directory.root)))
    return images.checked()


def images_of_list(list_file: Path) -> ImageList:
    """One path per line (blank lines skipped); a relative path is relative to the list file's folder, so the
    list means the same from any working directory."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FromageInputError(list_file, "image list not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise FromageInputError(list_file, f"cannot read the image list: {err}") from None
    images = ImageList(os.path.abspath(list_file.parent), str(list_file))
    for line in lines:
        if line.strip():
            images.add(line.strip())
    return images.checked()


def collect_images(args) -> ImageList:
    if args.tsv is not None:
        if args.image_dir is None:
            raise FromageInputError("--tsv", "needs --image-dir (the folder the TSV's image names are under)")
        return images_of_tsv(args.tsv, args.image_dir)
    if args.image_dir is not None:
        raise FromageInputError("--image-dir", "only goes with --tsv")
    return images_under(args.images) if args.images is not None else images_of_list(args.list)


# -- building ------------------------------------------------------------------------------------------
@dataclass
class BuildSummary:
    out: Path
    embedded: int
    skipped: int
    duplicates: int
    chunks_computed: int  # by all processes
    chunks_resumed: int


def chunk_keys(fromage, images: ImageList, chunk_size: int, batch_size: int) -> list[tuple[str, range]]:
    """(key, positions) of each chunk: see the module docstring for what the key covers."""
    placement = fromage.placement
    head = [fromage.model_identity, CROP, placement.precision, placement.device.type, str(batch_size)]
    chunks = []
    for start in range(0, len(images.names), chunk_size):
        positions = range(start, min(start + chunk_size, len(images.names)))
        parts = head + [f"{images.names[i]}\x1e{images.files[i]}\x1e{file_stamp(images.files[i])}" for i in positions]
        chunks.append((hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32], positions))
    return chunks


def embed_chunk(fromage, files: list[str], batch_size: int, workers: int | None, bar) -> bytes:
    """A chunk's retrieval embeddings as safetensors bytes: "embeddings" (n, D) float32 (zero rows for
    unreadable files), "ok" (n,) uint8, and the skip reason of each unreadable position in the metadata."""
    embeddings = torch.zeros(len(files), fromage.model.args.shared_emb_dim)
    ok = torch.zeros(len(files), dtype=torch.uint8)
    reasons: dict[str, str] = {}
    with PIXEL_MEMO.off():  # each image is read once here
        for positions, features, failed in fromage.image_file_features(files, batch_size, workers, preprocess=CROP):
            if positions:
                embeddings[positions] = fromage.project_images(features, "retrieval")[:, 0].float().cpu()
                ok[positions] = 1
            reasons.update({str(p): r for p, r in failed.items()})
            bar.update(len(positions) + len(failed))
    return save({"embeddings": embeddings, "ok": ok}, metadata={"skipped": json.dumps(reasons)})


def read_chunk(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict[int, str]]:
    with safe_open(str(path), framework="pt") as f:
        reasons = json.loads(f.metadata()["skipped"])
        return f.get_tensor("embeddings"), f.get_tensor("ok").bool(), {int(p): r for p, r in reasons.items()}


def build_retrieval_set(fromage, images: ImageList, out: Path, *, batch_size: int = 32, workers: int | None = None,
                        chunk_size: int = CHUNK_SIZE, progress: bool = True) -> BuildSummary | None:
    """Embed `images` into a retrieval set in `out` (resumable, sharded under torchrun: the module docstring).
    Returns the summary on rank 0, None on the other ranks."""
    from . import __version__
    from .runner import ProcessGroupInfo, barrier

    group = ProcessGroupInfo.current()
    partial = out / PARTIAL_DIR
    partial.mkdir(parents=True, exist_ok=True)
    chunks = chunk_keys(fromage, images, chunk_size, batch_size)
    done = {key for key, _ in chunks if (partial / f"{key}.safetensors").is_file()}
    barrier(group)  # every rank has listed the finished chunks before any rank writes one
    todo = [(key, positions) for key, positions in chunks if key not in done]
    mine = todo[group.rank::group.world_size]
    with tqdm(total=sum(len(p) for _, p in mine), unit="img", desc="build-retrieval-set", dynamic_ncols=True,
              disable=not progress or group.rank != 0, file=sys.stderr) as bar:
        for key, positions in mine:
            data = embed_chunk(fromage, [images.files[i] for i in positions], batch_size, workers, bar)
            atomic_write_bytes(partial / f"{key}.safetensors", data)
    barrier(group)  # every chunk is on disk
    if group.rank != 0:
        return None
    rows, names, skipped = [], [], []
    for key, positions in chunks:
        embeddings, ok, reasons = read_chunk(partial / f"{key}.safetensors")
        rows.append(embeddings[ok])
        names += [images.names[i] for i, good in zip(positions, ok.tolist()) if good]
        skipped += [(images.files[positions[p]], reason) for p, reason in sorted(reasons.items())]
    write_skipped(out / SKIPPED_FILE, skipped)
    if not names:
        raise FromageInputError(images.source, f"none of its {len(images.names)} images could be read",
                                f"reasons in {out / SKIPPED_FILE}")
    placement, args = fromage.placement, fromage.model.args
    provenance = {"model_identity": fromage.model_identity, "preprocessing": CROP,
                  "built_with": {"precision": placement.precision, "device": str(placement.device),
                                 "fromage_bench": __version__, "opt_version": args.opt_version,
                                 "visual_encoder": args.visual_encoder, "batch_size": batch_size}}
    RetrievalSet(names, torch.cat(rows), images.image_root, provenance).save(out)
    shutil.rmtree(partial, ignore_errors=True)
    return BuildSummary(out, len(names), len(skipped), images.duplicates, len(todo), len(chunks) - len(todo))


def write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    """The sidecar of unreadable images: a TSV with the header `path<TAB>reason`, one row per skipped file
    (written even when empty, so that no stale list survives a rebuild)."""
    import pandas as pd

    table = pd.DataFrame(skipped, columns=["path", "reason"])
    atomic_write_text(path, table.to_csv(sep="\t", index=False, lineterminator="\n"))


# -- the command ---------------------------------------------------------------------------------------
def check_writable(out: Path) -> None:
    """Bad input unless `out` is, or can be created as, a writable directory; creates nothing."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FromageInputError(out, f"output directory cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FromageInputError(out, f"output directory is not writable ({existing})")


def cmd_build_retrieval_set(args) -> int:
    from .cli import _load, _relaunch_with_torchrun
    from .runner import default_rank_device, init_distributed

    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch_with_torchrun(args)
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--chunk-size", args.chunk_size, 1),
                               ("--image-workers", args.image_workers, 0)):
        if value is not None and value < least:
            raise FromageInputError(flag, f"must be >= {least}")
    images = collect_images(args)
    check_writable(args.out)
    group = init_distributed(args.device)
    if group.world_size > 1 and args.device is None:
        args.device = default_rank_device(group)
    fromage = _load(args)
    summary = build_retrieval_set(fromage, images, args.out, batch_size=args.batch_size, workers=args.image_workers,
                                  chunk_size=args.chunk_size, progress=not args.no_progress)
    if summary is not None:
        print(f"wrote a retrieval set of {summary.embedded} images to {summary.out} "
              f"({summary.skipped} unreadable skipped, listed in {summary.out / SKIPPED_FILE}; "
              f"{summary.duplicates} duplicate paths stored once; "
              f"{summary.chunks_resumed} of {summary.chunks_resumed + summary.chunks_computed} chunks resumed)")
    return 0


def add_build_retrieval_parser(sub) -> None:
    from .cli import _add_model_arguments

    p = sub.add_parser("build-retrieval-set", help="embed image files into a retrieval set for [RET] (resumable; "
                                                   "sharded with --nproc)")
    _add_model_arguments(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="every image file under DIR, recursively (links followed)")
    source.add_argument("--tsv", type=Path, help="a CC3M-style TSV: its `image` column, under --image-dir")
    source.add_argument("--list", type=Path, help="a file of image paths, one a line (relative ones are relative "
                                                  "to the list file's folder)")
    p.add_argument("--image-dir", type=Path, help="the folder the --tsv image names are under")
    p.add_argument("--out", type=Path, required=True, help="the retrieval set's directory")
    p.add_argument("--batch-size", type=int, default=32, help="images per vision-tower pass (default 32)")
    p.add_argument("--image-workers", type=int, help="processes decoding image files (default: the cores beyond "
                                                     "two, up to 8; 0 decodes in this process)")
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE,
                   help=f"images per resumable chunk (default {CHUNK_SIZE}); a rerun resumes at chunk granularity")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--nproc", type=int, help="run under torchrun with N processes (chunks sharded, same set)")
    p.set_defaults(func=cmd_build_retrieval_set)

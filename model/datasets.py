"""Readers of the dataset formats that evaluation (`tasks/`) and training both read: one reader per format.

* Image directories (`ImageDir`): a dataset names its images relative to an image directory. The rule is on
  the NAME: an absolute name or one with a `..` component is bad input; links are followed, so an image
  directory that is a symlink to shared storage, or that holds per-file symlinks, reads like a plain folder.
  Paths are returned as logical paths (the directory joined with the name, links not resolved).
* CC3M-style TSVs (`read_cc3m_rows`; `fromage_bench.synth.formats.write_cc3m_tsv` writes them): read with pandas as the original's
  `pd.read_csv(path, sep='\\t')` reads them, so CSV quoting is honoured (pandas writes a caption holding `"`
  or a tab quoted, its inner quotes doubled). Every field is read as the string written: a caption "nan" or
  "null" and an image "0001" stay so (the original let pandas turn the first two into NaN, which it then
  used as the caption "nan", and an image column of digits only into integers, 0001 -> 1).
* VIST story-in-sequence JSON (`load_stories`).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import NamedTuple

from .errors import FromageInputError, read_json

IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")


# -- image directories ------------------------------------------------------------------------------------
class ImageDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FromageInputError(self.root, "image directory missing")

    def path(self, relative: str, source: str | Path = "") -> Path:
        """The file for a dataset-relative name, links not resolved. An absolute name or one with a `..`
        component is bad input: it is judged by its text, so a symlinked folder or file is fine."""
        name = PurePath(relative)
        if name.is_absolute() or name.anchor or ".." in name.parts:
            raise FromageInputError(source or self.root, f"image path {relative!r} escapes the image directory "
                                                         f"{self.root}", "absolute names and '..' are not allowed")
        return self.root / name

    def find(self, stem: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> Path | None:
        """First existing `stem + ext` (VIST ships both .jpg and .png)."""
        for ext in extensions:
            p = self.path(stem + ext)
            if p.is_file():
                return p
        return None


def resolve_image(images: ImageDir, name: str, source: str) -> Path:
    """The file for a dataset-relative image name: as given, else with an image extension appended, else
    with its extension swapped; the as-given path when none exists. A name escaping the image directory
    is bad input (FromageInputError naming `source`)."""
    given = images.path(name, source=source)
    if given.is_file():
        return given
    candidates = [name + ext for ext in IMAGE_EXTENSIONS]
    suffix = Path(name).suffix
    if suffix:
        stem = name[: -len(suffix)]
        candidates += [stem + ext for ext in IMAGE_EXTENSIONS if ext != suffix]
    for candidate in candidates:
        path = images.path(candidate, source=source)
        if path.is_file():
            return path
    return given


def content_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- CC3M-style TSV ---------------------------------------------------------------------------------------
CC3M_COLUMNS = ("caption", "image")
CC3M_HINT = "expected a header line `caption<TAB>image`, as in CC3M's cc3m_val.tsv"


class CaptionRow(NamedTuple):
    line: int      # the line of the file the row starts on
    caption: str   # as written (quoting undone)
    image: str     # the image name, surrounding spaces removed


def read_cc3m_rows(tsv: str | Path) -> list[CaptionRow]:
    """The data rows of a CC3M-style TSV, read as pandas reads it (the original's reader).

    The header must have the columns `caption` and `image`, in any order; other columns are allowed and
    ignored (the original reads only those two). A row with more fields than the header, an empty or missing
    caption or image, a file that is not UTF-8 or whose quoting is broken is bad input naming the file and
    line. Blank lines (and lines of empty fields only) are skipped; a file without data rows is bad input.
    Captions are kept as written, surrounding spaces too (the original tokenised them so); image names lose
    theirs."""
    import pandas as pd

    tsv = Path(tsv)
    if not tsv.is_file():
        raise FromageInputError(tsv, "caption TSV not found", CC3M_HINT)
    leading_blank = _leading_blank_lines(tsv)
    try:
        # header=None: pandas would otherwise take a first data row with one field too many as an index.
        table = pd.read_csv(tsv, sep="\t", header=None, dtype=str, keep_default_na=False, skip_blank_lines=False,
                            skiprows=leading_blank, encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise FromageInputError(tsv, f"not UTF-8 text: {err}") from None
    except pd.errors.EmptyDataError:
        raise FromageInputError(tsv, "empty file", CC3M_HINT) from None
    except pd.errors.ParserError as err:
        raise _parser_error(tsv, err) from None
    header_line = leading_blank + 1
    columns = [str(c).strip() for c in table.iloc[0]]
    if not all(c in columns for c in CC3M_COLUMNS):
        raise FromageInputError(f"{tsv}, line {header_line}", f"missing or wrong header {columns!r}", CC3M_HINT)
    body = table.iloc[1:]
    lines = _record_lines(body, header_line + 1 + sum(str(c).count("\n") for c in table.iloc[0]))
    kept = ~(body.apply(lambda column: column.str.strip()) == "").all(axis=1)  # blank lines were read as rows
    captions, images = body[columns.index("caption")], body[columns.index("image")].str.strip()
    _raise_first_fault(tsv, lines, [(kept & (images == ""), "empty or missing image name"),
                                    (kept & (captions.str.strip() == ""), "empty caption")])
    rows = [CaptionRow(*row) for row in zip(lines[kept.to_numpy()].tolist(), captions[kept].tolist(),
                                            images[kept].tolist())]
    if not rows:
        raise FromageInputError(tsv, "no data rows after the header", CC3M_HINT)
    return rows


def _record_lines(body, first: int):
    """The file line each record starts on: a quoted field may span lines."""
    spans = 1 + sum(body[column].str.count("\n") for column in body.columns)
    return (first + spans.cumsum() - spans).to_numpy()


def _raise_first_fault(tsv: Path, lines, faults) -> None:
    """Bad input at the first row that any of the (row mask, problem) `faults` marks."""
    found = [(int(mask.to_numpy().argmax()), problem) for mask, problem in faults if mask.any()]
    if found:
        row, problem = min(found)
        raise FromageInputError(f"{tsv}, line {lines[row]}", problem, "each row is `caption<TAB>image`")


def _leading_blank_lines(path: Path) -> int:
    """How many blank lines open the file (pandas, told to keep blank lines, would take the first as header)."""
    count = 0
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.strip(b" \t\r\n") and raw.strip(b" \t\r\n") != b"\xef\xbb\xbf":
                break
            count += 1
    return count


def _parser_error(tsv: Path, err: Exception) -> FromageInputError:
    """pandas' tokenizer complaint as our one-line error. Its line numbers count records (blank lines included),
    which are the file's lines unless a quoted caption earlier in the file spans several lines."""
    fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(err))
    if fields:
        expected, line, saw = (int(g) for g in fields.groups())
        return FromageInputError(f"{tsv}, line {line}",
                                 f"expected {expected} tab-separated fields (as the header), got {saw}")
    return FromageInputError(tsv, f"malformed TSV: {str(err).strip()}",
                             "a field that starts with `\"` is quoted; a quote inside it is written `\"\"`")


# -- VIST story-in-sequence JSON --------------------------------------------------------------------------
STORY_LENGTH = 5
STORY_KEYS = ("story_id", "photo_flickr_id", "worker_arranged_photo_order", "text")


@dataclass(frozen=True)
class Story:
    story_id: str
    photo_ids: tuple[str, ...]  # in worker_arranged_photo_order
    captions: tuple[str, ...]

    @property
    def target(self) -> str:
        return self.photo_ids[-1]

    @property
    def context(self) -> tuple[str, ...]:
        return self.photo_ids[:-1]


def load_stories(path: Path) -> tuple[list[Story], list[str]]:
    """The stories of a SIS file (in order of first appearance) and the photo ids of its `images` list."""
    path = Path(path)
    data = read_json(path, "VIST story file not found")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise FromageInputError(path, "not a VIST story-in-sequence file: no 'annotations' list",
                                "expected the SIS val.story-in-sequence.json")
    listed: list[str] = []
    images = data.get("images", [])
    if isinstance(images, list):
        listed = [str(im["id"]) for im in images if isinstance(im, dict) and "id" in im]

    grouped: dict[str, list[dict]] = {}
    for index, ann in enumerate(data["annotations"]):
        if not (isinstance(ann, list) and len(ann) == 1 and isinstance(ann[0], dict)):
            story = ""
            if isinstance(ann, list) and ann and isinstance(ann[0], dict) and "story_id" in ann[0]:
                story = f" (story {ann[0]['story_id']})"
            raise FromageInputError(path, f"annotation {index}{story} is not a one-element list of an object")
        entry = ann[0]
        where = f"story {entry['story_id']}" if "story_id" in entry else f"annotation {index}"
        missing = [k for k in STORY_KEYS if k not in entry]
        if missing:
            raise FromageInputError(path, f"{where}: annotation {index} lacks {', '.join(missing)}")
        order = entry["worker_arranged_photo_order"]
        if isinstance(order, bool) or not isinstance(order, int):
            raise FromageInputError(path, f"{where}: worker_arranged_photo_order {order!r} is not an integer")
        if not isinstance(entry["text"], str):
            raise FromageInputError(path, f"{where}: text is not a string")
        grouped.setdefault(str(entry["story_id"]), []).append(entry)

    stories = []
    for story_id, entries in grouped.items():
        if len(entries) != STORY_LENGTH:
            raise FromageInputError(path, f"story {story_id} has {len(entries)} entries, expected {STORY_LENGTH}")
        entries = sorted(entries, key=lambda e: e["worker_arranged_photo_order"])
        orders = [e["worker_arranged_photo_order"] for e in entries]
        if len(set(orders)) != len(orders):
            raise FromageInputError(path, f"story {story_id} repeats a worker_arranged_photo_order: {orders}")
        stories.append(Story(story_id, tuple(str(e["photo_flickr_id"]) for e in entries),
                             tuple(e["text"] for e in entries)))
    return stories, listed

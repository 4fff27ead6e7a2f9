"""One writer per dataset file format, in the official layouts (see docs/miniworld.md and the reference spec).

The callers (the miniworld, `fromage_bench.miniworld`, and the test fixtures in `fromage_bench.synth`)
decide the content: captions, image names, stories, dialogues, options, relevance. These functions only
lay it out as the released files do, so that whatever realism one of them adds reaches both.

* CC3M: a TSV with header ``caption<TAB>image``, written by pandas as real exports are
  (`DataFrame.to_csv(sep="\\t", index=False)`: minimal quoting, so a caption with a ``"`` or a tab is quoted);
* COCO Karpathy: ``dataset_coco.json`` = ``{"images": [{filepath, filename, imgid, split, cocoid,
  sentids, sentences: [{tokens, raw, imgid, sentid}]}], "dataset": "coco"}``;
* VIST SIS: ``{"info", "type", "albums", "images", "annotations"}``, each annotation a one-element list;
* VisDial v1.0 val: ``{"version", "split", "data": {questions, answers, dialogs}}`` (indices into
  questions / answers) and the dense annotations ``[{image_id, round_id (1-based), gt_relevance[100]}]``.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

CC3M_HEADER = ("caption", "image")
TSV_EXTENSION_SHARE = 0.8  # released exports name most files with their extension; cc3m_val.tsv does not


def _write(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _hex(number: int, digits: int = 10) -> str:
    """A Flickr-style `secret` derived from an id (no random stream: the file follows from its content)."""
    return f"{(number * 2654435761 + 97) % 16 ** digits:0{digits}x}"


# -- CC3M -----------------------------------------------------------------------------------------------
def tsv_image_names(files: Sequence[str], rng: random.Random, share: float = TSV_EXTENSION_SHARE) -> list[str]:
    """The TSV's image column for file names: about `share` of them with their extension, the rest without."""
    return [name if rng.random() < share else Path(name).stem for name in files]


def write_cc3m_tsv(path: str | Path, captions: Sequence[str], images: Sequence[str]) -> Path:
    """`caption<TAB>image` rows (header first), via pandas as real exports."""
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    frame = pd.DataFrame({CC3M_HEADER[0]: list(captions), CC3M_HEADER[1]: list(images)}, columns=list(CC3M_HEADER))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, sep="\t", index=False, lineterminator="\n", encoding="utf-8")
    return path


# -- COCO (Karpathy split file) -------------------------------------------------------------------------
@dataclass(frozen=True)
class CocoImage:
    filepath: str   # "val2014" / "train2014"
    filename: str   # "COCO_val2014_000000123456.jpg"
    cocoid: int
    split: str      # "test", "val", "restval", "train"
    raws: tuple[str, ...]  # the sentences as written


def coco_filename(filepath: str, cocoid: int, ext: str = ".jpg") -> str:
    return f"COCO_{filepath}_{cocoid:012d}{ext}"


def karpathy_tokens(raw: str) -> list[str]:
    """Lower case, punctuation dropped, split on spaces (as the Karpathy file's `tokens`)."""
    return raw.lower().replace(",", " ").replace(".", " ").split()


def write_coco_karpathy_json(path: str | Path, images: Sequence[CocoImage]) -> Path:
    entries, sentid = [], 0
    for imgid, image in enumerate(images):
        sentences = []
        for raw in image.raws:
            sentences.append({"tokens": karpathy_tokens(raw), "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        entries.append({"filepath": image.filepath, "sentids": [s["sentid"] for s in sentences],
                        "filename": image.filename, "imgid": imgid, "split": image.split, "sentences": sentences,
                        "cocoid": image.cocoid})
    return _write(path, json.dumps({"images": entries, "dataset": "coco"}))


# -- VIST (story-in-sequence) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class VistPhoto:
    id: str
    album_id: str
    title: str
    tags: str
    taken: str            # "2015-01-10 12:00:00"
    ext: str = ".jpg"     # of the file (and of `url_o`)


@dataclass(frozen=True)
class VistAlbum:
    id: str
    title: str
    photo_ids: tuple[str, ...]
    description: str = "synthetic shapes"


@dataclass(frozen=True)
class VistStory:
    id: str
    photo_ids: tuple[str, ...]       # in story order
    texts: tuple[str, ...]           # `text`: lower case, space-tokenised
    original_texts: tuple[str, ...]  # `original_text`
    worker_id: str
    first_storylet: int
    file_order: tuple[int, ...] = (0, 1, 2, 3, 4)  # the order the annotations appear in (VIST is not always sorted)


def original_text(text: str) -> str:
    """VIST's `original_text` for a `text`: capitalised, no space before the punctuation."""
    text = text.replace(" .", ".").replace(" ,", ",")
    return text[0].upper() + text[1:]


def write_vist_sis(path: str | Path, description: str, albums: Sequence[VistAlbum], photos: Sequence[VistPhoto],
                   stories: Sequence[VistStory]) -> Path:
    albums_json = [{"description": album.description, "title": album.title, "farm": "1", "date_update": "1400000000",
                    "primary": album.photo_ids[0], "server": "1", "date_create": "1400000000",
                    "photos": str(len(album.photo_ids)), "secret": _hex(int(album.id)), "owner": "00000000@N00",
                    "vist_label": "shapes", "id": album.id} for album in albums]
    images_json = [{"datetaken": photo.taken, "license": "5", "title": photo.title, "text": "",
                    "album_id": photo.album_id, "longitude": "0", "latitude": "0",
                    "url_o": f"https://farm1.staticflickr.com/1/{photo.id}_{_hex(int(photo.id))}_o{photo.ext}",
                    "secret": _hex(int(photo.id)), "media": "photo", "id": photo.id, "tags": photo.tags}
                   for photo in photos]
    album_of = {photo.id: photo.album_id for photo in photos}
    annotations = []
    for story in stories:
        entries = [[{"original_text": story.original_texts[k], "album_id": album_of[pid], "photo_flickr_id": pid,
                     "setting": "first-2-pick-and-tell", "worker_id": story.worker_id, "story_id": story.id,
                     "tier": "story-in-sequence", "worker_arranged_photo_order": k, "text": story.texts[k],
                     "storylet_id": str(story.first_storylet + k)}]
                   for k, pid in enumerate(story.photo_ids)]
        annotations += [entries[k] for k in story.file_order]
    document = {"info": {"description": description, "version": "1"}, "type": "story_in_sequence",
                "albums": albums_json, "images": images_json, "annotations": annotations}
    return _write(path, json.dumps(document, indent=1))


# -- VisDial v1.0 val -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisdialRound:
    question: str              # VisDial style: lower case, no "?"
    answer: str
    options: tuple[str, ...]   # 100 answer texts; options[gt_index] == answer
    gt_index: int


@dataclass(frozen=True)
class VisdialDialogue:
    image_id: int
    caption: str
    rounds: tuple[VisdialRound, ...]
    dense_round: int                      # 1-based, as the dense annotations file
    relevance: tuple[float, ...]          # of that round's options


def visdial_image_name(image_id: int, ext: str = ".jpg") -> str:
    return f"VisualDialog_val2018_{image_id:012d}{ext}"


def write_visdial_val(dialogs_path: str | Path, dense_path: str | Path, answers: Sequence[str],
                      dialogues: Sequence[VisdialDialogue]) -> tuple[Path, Path]:
    """Both files; questions are indexed in order of first appearance, answers by their place in `answers`."""
    answer_index = {a: i for i, a in enumerate(answers)}
    questions: list[str] = []
    question_index: dict[str, int] = {}
    dialogs, dense = [], []
    for d in dialogues:
        rounds = []
        for r in d.rounds:
            if r.options[r.gt_index] != r.answer:
                raise ValueError(f"image {d.image_id}: options[{r.gt_index}] is not the answer {r.answer!r}")
            if r.question not in question_index:
                question_index[r.question] = len(questions)
                questions.append(r.question)
            rounds.append({"question": question_index[r.question], "answer": answer_index[r.answer],
                           "answer_options": [answer_index[o] for o in r.options], "gt_index": r.gt_index})
        dialogs.append({"image_id": d.image_id, "caption": d.caption, "dialog": rounds})
        dense.append({"image_id": d.image_id, "round_id": d.dense_round, "gt_relevance": list(d.relevance)})
    document = {"version": "1.0", "split": "val", "data": {"questions": questions, "answers": list(answers),
                                                            "dialogs": dialogs}}
    return _write(dialogs_path, json.dumps(document)), _write(dense_path, json.dumps(dense))

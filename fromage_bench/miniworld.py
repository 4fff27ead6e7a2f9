"""Miniworld: a small world of coloured shapes, and every dataset the benchmark reads, written from it.

A *scene* is 1-3 objects, each with a shape, a colour, a size (small / large) and a position (left, right,
top, bottom, middle: five cells of a 3x3 grid), laid out on a 96x96 grid and drawn with PIL, scaled, in the
centre square of a plain grey canvas whose size, aspect ratio, file format and mode vary like a real photo
collection's (mostly JPEG; see `fromage_bench.synth.images`; the margins hold clutter no text mentions).
Every text is generated from the scene it goes with, so text and pixels agree:

* captions ("a small red circle on the left and a large blue star in the middle.");
* five-image stories in which one object changes colour, moves or changes size at every step
  ("we saw a small red star on the left ." ... "finally the star turned blue ."): the fifth image follows
  from the first four images and the captions;
* ten-round question/answer dialogues about colours, shapes, counts, positions and sizes, with 100
  answer options per round (the answer, its equivalent phrasings, near misses of the same question type,
  random others) and dense relevance scores.

`write_miniworld(out, seed, scale)` writes them in the real datasets' layouts (see `fromage-bench tasks`):

    cc3m/cc3m_train.tsv, cc3m/training/*.jpg|png        FROMAGe's training pairs (captions, stories, dialogues)
    clip/clip_train.tsv, clip/training/*.jpg|png        the stand-in CLIP's pretraining pairs (captions only)
    cc3m/cc3m_val.tsv, cc3m/validation/*.jpg|png        image_text_retrieval / captioning (cc3m)
    coco/dataset_coco.json, coco/val2014/*.jpg          Karpathy-style test split (coco)
    vist/sis/val.story-in-sequence.json, vist/images/val/*.jpg|png        vist_retrieval
    vist/sis/train.story-in-sequence.json, vist/images/train/*.jpg|png    training stories (train --stories)
    visdial/visdial_1.0_val.json, visdial/visdial_1.0_val_dense_annotations.json,
    visdial/VisualDialog_val2018/*.jpg                                    visdial_retrieval / visdial_ranking
    miniworld/manifest.json        seed, scale, counts, the scene and the look (size, format, mode, scene box)
                                   of every image written
    miniworld/lm_train.jsonl       text documents for the stand-in LM (training captions, stories, dialogues)
    miniworld/lm_heldout.jsonl     the benchmark's own texts (val captions, VIST stories, VisDial dialogues)

The LM documents are lists of *segments*, each tokenised on its own and concatenated, with a BOS before the
first segment (``"bos": "first"``) or before every segment (``"each"``): this is how the tasks build their
prompts (a VIST caption tokenised on its own, a VisDial answer option appended to its "...\\nA: " context).

Same seed and scale -> byte-identical files. Images never touch the network or a font file.
"""
from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, ImageDraw

from .synth import formats, images

VERSION = 5  # 2: a VIST train split (vist/sis/train.story-in-sequence.json); 3: files like a real collection
            # (JPEG / PNG, many sizes and aspect ratios, odd modes; TSV names mostly with extension); 4: the stand-in
            # CLIP's own alt-text-style pretraining split (clip/clip_train.tsv); every other file is unchanged;
            # 5: VIST stories told over shared albums, as VIST's are (vist/; lm_heldout.jsonl follows the new stories)
IMAGE_SIZE = 96
CELL = IMAGE_SIZE // 3
BACKGROUND = (150, 150, 150)
BACKGROUND_NAME = "grey"
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220), "yellow": (240, 220, 30),
           "purple": (130, 40, 170), "orange": (245, 140, 20), "pink": (250, 140, 200), "brown": (120, 70, 20),
           "black": (15, 15, 15), "white": (250, 250, 250)}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring")
SIZES = ("small", "large")
RADIUS = {"small": 8, "large": 13}
JITTER = {"small": 3, "large": 1}
POSITIONS = ("left", "middle", "right", "top", "bottom")
GRID = {"left": (0, 1), "middle": (1, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2)}
PLACE = {"left": "on the left", "middle": "in the middle", "right": "on the right", "top": "at the top",
         "bottom": "at the bottom"}
TO_PLACE = {"left": "to the left", "middle": "to the middle", "right": "to the right", "top": "to the top",
            "bottom": "to the bottom"}
NUMBER_WORDS = ("none", "one", "two", "three", "four", "five")

SCALES = {  # counts of each dataset; `tiny` is for tests
    "tiny": dict(clip_train=120, train=120, val=24, coco=12, coco_other=3, stories=8, dialogues=6, lm_stories=60,
                 lm_dialogues=60, train_stories=16),
    # small: 400 val captions and 400 stories (200 and 60 before 2026-12-01) so that the embedded default's
    # headline metrics have 95 % intervals of at most +-5 points (issue 19); the training counts are unchanged
    "small": dict(clip_train=5000, train=5000, val=400, coco=100, coco_other=10, stories=400, dialogues=30,
                  lm_stories=800, lm_dialogues=800, train_stories=1000),
    "medium": dict(clip_train=20000, train=20000, val=1000, coco=500, coco_other=50, stories=300, dialogues=200,
                   lm_stories=4000, lm_dialogues=4000, train_stories=4000),
}

# file layout (relative to the data root), as the tasks and the training code read it
CC3M_TRAIN_TSV = "cc3m/cc3m_train.tsv"
CC3M_TRAIN_IMAGES = "cc3m/training"
CC3M_VAL_TSV = "cc3m/cc3m_val.tsv"
CC3M_VAL_IMAGES = "cc3m/validation"
# The stand-in CLIP's pretraining pairs, apart from FROMAGe's CC3M as CLIP's web pairs are: captions only
CLIP_TRAIN_TSV = "clip/clip_train.tsv"
CLIP_TRAIN_IMAGES = "clip/training"
COCO_JSON = "coco/dataset_coco.json"
VIST_JSON = "vist/sis/val.story-in-sequence.json"
VIST_IMAGES = "vist/images/val"
VIST_TRAIN_JSON = "vist/sis/train.story-in-sequence.json"  # training stories (`fromage-bench train --stories`)
VIST_TRAIN_IMAGES = "vist/images/train"
VISDIAL_JSON = "visdial/visdial_1.0_val.json"
VISDIAL_DENSE = "visdial/visdial_1.0_val_dense_annotations.json"
VISDIAL_IMAGES = "visdial/VisualDialog_val2018"
MANIFEST = "miniworld/manifest.json"
LM_TRAIN = "miniworld/lm_train.jsonl"
LM_HELDOUT = "miniworld/lm_heldout.jsonl"
N_OPTIONS = 100
N_ROUNDS = 10


# -- scenes ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str
    dx: int = 0  # small offsets from the cell centre (pixels); not part of any description
    dy: int = 0

    @property
    def look(self) -> tuple[str, str, str]:
        return self.size, self.colour, self.shape

    def to_list(self) -> list:
        return [self.shape, self.colour, self.size, self.position, self.dx, self.dy]


Scene = tuple[Obj, ...]  # sorted by POSITIONS order, at most one object per position


def scene_key(scene: Scene) -> tuple:
    """What the texts can say about a scene (no offsets)."""
    return tuple((o.shape, o.colour, o.size, o.position) for o in scene)


def _sorted(objects: Iterable[Obj]) -> Scene:
    return tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position)))


def _jitter(rng: random.Random, obj: Obj) -> Obj:
    j = JITTER[obj.size]
    return replace(obj, dx=rng.randint(-j, j), dy=rng.randint(-j, j))


def random_object(rng: random.Random, position: str) -> Obj:
    return _jitter(rng, Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), position))


def random_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    """1-3 objects (1: half of the scenes, 2: 30 %, 3: 20 %) in distinct cells; a quarter of the
    multi-object scenes repeat one look, so that counts above one occur."""
    n = n_objects or rng.choices((1, 2, 3), weights=(5, 3, 2))[0]
    positions = rng.sample(POSITIONS, n)
    objects = [random_object(rng, p) for p in positions]
    if n > 1 and rng.random() < 0.25:
        first = objects[0]
        objects[1] = _jitter(rng, Obj(first.shape, first.colour, first.size, objects[1].position))
    return _sorted(objects)


def unique_scenes(rng: random.Random, n: int, seen: set | None = None) -> list[Scene]:
    """`n` scenes whose descriptions differ from each other (and from `seen`): unambiguous retrieval targets."""
    seen = set() if seen is None else seen
    out = []
    while len(out) < n:
        scene = random_scene(rng)
        if scene_key(scene) not in seen:
            seen.add(scene_key(scene))
            out.append(scene)
    return out


def variant(scene: Scene, rng: random.Random) -> Scene:
    """A scene that differs from `scene` only in where things are or in which object has which colour
    (a hard negative for contrastive training): a single object moves; in a larger scene the objects
    swap places, two objects swap colours, or one object moves to an empty cell."""
    objects = list(scene)
    empty = [p for p in POSITIONS if all(o.position != p for o in objects)]
    choices = ["move"]
    if len(objects) > 1 and len({o.look for o in objects}) > 1:
        choices.append("swap_places")
    if len({o.colour for o in objects}) > 1:
        choices.append("swap_colours")
    kind = rng.choice(choices)
    if kind == "move":
        i = rng.randrange(len(objects))
        objects[i] = _jitter(rng, replace(objects[i], position=rng.choice(empty)))
    elif kind == "swap_places":
        i, j = rng.sample(range(len(objects)), 2)
        while objects[i].look == objects[j].look:
            i, j = rng.sample(range(len(objects)), 2)
        objects[i], objects[j] = (replace(objects[i], position=objects[j].position),
                                  replace(objects[j], position=objects[i].position))
    else:
        i, j = rng.sample(range(len(objects)), 2)
        while objects[i].colour == objects[j].colour:
            i, j = rng.sample(range(len(objects)), 2)
        objects[i], objects[j] = (replace(objects[i], colour=objects[j].colour),
                                  replace(objects[j], colour=objects[i].colour))
    return _sorted(objects)


# -- drawing --------------------------------------------------------------------------------------------
# Scenes are laid out on a 96x96 grid (IMAGE_SIZE) and drawn on a square of any `side`, scaled: the writer
# puts that square in the centre of a canvas of the file's own size (see fromage_bench.synth.images).
def _scale(side: int) -> float:
    return side / IMAGE_SIZE


def centre(obj: Obj, side: int = IMAGE_SIZE) -> tuple[int, int]:
    gx, gy = GRID[obj.position]
    k = _scale(side)
    return round((gx * CELL + CELL // 2 + obj.dx) * k), round((gy * CELL + CELL // 2 + obj.dy) * k)


def _radius(obj: Obj, side: int) -> int:
    return max(1, round(RADIUS[obj.size] * _scale(side)))


def _ring_width(r: int, side: int) -> int:
    return max(round(3 * _scale(side)), round(r * 0.4), 1)


def _star(cx: int, cy: int, r: int) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_object(draw: ImageDraw.ImageDraw, obj: Obj, side: int = IMAGE_SIZE) -> None:
    cx, cy = centre(obj, side)
    r = _radius(obj, side)
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        s = round(r * 0.85)
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif obj.shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif obj.shape == "cross":
        t = max(round(2 * _scale(side)), round(r * 0.35), 1)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    elif obj.shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=_ring_width(r, side))
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def probe_point(obj: Obj, side: int = IMAGE_SIZE) -> tuple[int, int]:
    """A pixel (of the `side` square) that drawing `obj` paints in its colour (the centre, except for the
    ring: on its band, and the triangle: below its centre)."""
    cx, cy = centre(obj, side)
    r = _radius(obj, side)
    if obj.shape == "ring":
        return cx + r - _ring_width(r, side) // 2, cy
    if obj.shape == "triangle":
        return cx, cy + r // 2
    return cx, cy


def render(scene: Scene, side: int = IMAGE_SIZE) -> Image.Image:
    """The scene on a plain `side` x `side` square (the content of every miniworld image file)."""
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        draw_object(draw, obj, side)
    return image


# -- captions -------------------------------------------------------------------------------------------
def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ss")) else "s")


def article(words: str) -> str:
    """'a' or 'an' + words."""
    return ("an " if words[0] in "aeiou" else "a ") + words


def phrase(obj: Obj, with_size: bool = True) -> str:
    size = f"{obj.size} " if with_size else ""
    return article(f"{size}{obj.colour} {obj.shape}")


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _groups(scene: Scene) -> list[list[Obj]]:
    """Objects of the same look, in scene order of first appearance."""
    groups: dict[tuple, list[Obj]] = {}
    for obj in scene:
        groups.setdefault(obj.look, []).append(obj)
    return list(groups.values())


def _group_phrase(group: list[Obj], with_size: bool, with_place: bool) -> str:
    first = group[0]
    size = f"{first.size} " if with_size else ""
    if len(group) == 1:
        text = article(f"{size}{first.colour} {first.shape}")
    else:
        text = f"{NUMBER_WORDS[len(group)]} {size}{first.colour} {plural(first.shape)}"
    if with_place:
        text += " " + " and ".join(PLACE[o.position] for o in group)
    return text


CAPTION_TEMPLATES = ("{items}.", "there {be} {items}.", "a drawing of {items}.", "{items} on a grey background.")


def caption(scene: Scene, rng: random.Random, template: int | None = None) -> str:
    """One caption of a scene. Templates 0-2 give every object's position, template 3 none; sizes are left
    out for three-object scenes (captions stay within the original's 24-token training length)."""
    template = rng.choices(range(len(CAPTION_TEMPLATES)), weights=(4, 3, 2, 1))[0] if template is None else template
    with_size = len(scene) < 3
    groups = _groups(scene)
    items = _join([_group_phrase(g, with_size, with_place=template != 3) for g in groups])
    be = "is" if len(groups[0]) == 1 else "are"
    return CAPTION_TEMPLATES[template].format(items=items, be=be)


# -- stories --------------------------------------------------------------------------------------------
STEP_OPENERS = ("then", "next", "after that", "finally")


@dataclass(frozen=True)
class Story:
    scenes: tuple[Scene, ...]
    sentences: tuple[str, ...]  # VIST `text` style: lower case, " ." at the end
    summary: str                # a sentence restating the final state (LM training text only)


def random_start(rng: random.Random) -> tuple[Obj, Obj | None]:
    """A story's first scene: a main object, and half the time a companion of another shape that stays put."""
    position = rng.choice(POSITIONS)
    main = random_object(rng, position)
    companion = None
    if rng.random() < 0.5:
        companion = random_object(rng, rng.choice([p for p in POSITIONS if p != position]))
        if companion.shape == main.shape:
            companion = replace(companion, shape=rng.choice([s for s in SHAPES if s != main.shape]))
    return main, companion


def random_story(rng: random.Random, start: tuple[Obj, Obj | None] | None = None) -> Story:
    """From `start` (default: a new `random_start`), at each of four steps the main object changes colour,
    moves to a free cell, or changes size."""
    main, companion = start if start is not None else random_start(rng)
    scene_of = lambda m: _sorted([m] + ([companion] if companion else []))  # noqa: E731
    first = f"we saw {phrase(main)} {PLACE[main.position]}"
    if companion:
        first += f" and {phrase(companion)} {PLACE[companion.position]}"
    scenes, sentences = [scene_of(main)], [first + " ."]
    for step in range(4):
        change = rng.choice(("colour", "move", "size"))
        opener = STEP_OPENERS[step]
        if change == "colour":
            colour = rng.choice([c for c in COLOURS if c != main.colour])
            main = replace(main, colour=colour)
            text = f"{opener} the {main.shape} turned {colour} ."
        elif change == "move":
            taken = {main.position} | ({companion.position} if companion else set())
            main = _jitter(rng, replace(main, position=rng.choice([p for p in POSITIONS if p not in taken])))
            text = f"{opener} the {main.shape} moved {TO_PLACE[main.position]} ."
        else:
            main = _jitter(rng, replace(main, size="large" if main.size == "small" else "small"))
            text = f"{opener} the {main.shape} {'grew' if main.size == 'large' else 'shrank'} ."
        scenes.append(scene_of(main))
        sentences.append(text)
    summary = f"now there is {phrase(main)} {PLACE[main.position]} ."
    return Story(tuple(scenes), tuple(sentences), summary)


original_text = formats.original_text  # VIST `original_text` of a `text`


# -- dialogues ------------------------------------------------------------------------------------------
# Every answer has a meaning; phrasings of the same meaning are equivalent (dense relevance 0.5).
def _colour_phrasings(c: str) -> list[str]:
    return [f"it is {c}", c, f"it's {c}"]


def _place_phrasings(p: str) -> list[str]:
    return [PLACE[p], f"it is {PLACE[p]}", p]


def _count_phrasings(k: int) -> list[str]:
    there = {0: "there are none", 1: "there is one"}.get(k, f"there are {NUMBER_WORDS[k]}")
    return [NUMBER_WORDS[k], str(k), there]


def _shape_phrasings(s: str) -> list[str]:
    return [f"a {s}", s, f"it is a {s}"]


def _size_phrasings(z: str) -> list[str]:
    return [f"it is {z}", z]


YES, NO = ["yes", "yes, there is", "yes, it is"], ["no", "no, there is not", "no, it is not"]
NOTHING = ["nothing", "there is nothing there"]
MISC = ["i can't tell", "maybe"]


def answer_meanings() -> list[tuple[tuple, list[str]]]:
    """(meaning, phrasings) of every answer the dialogues use; the first phrasing is the value's canonical one."""
    out: list[tuple[tuple, list[str]]] = []
    out += [(("colour", c), _colour_phrasings(c)) for c in list(COLOURS) + [BACKGROUND_NAME]]
    out += [(("place", p), _place_phrasings(p)) for p in POSITIONS]
    out += [(("count", k), _count_phrasings(k)) for k in range(4)]
    out += [(("shape", s), _shape_phrasings(s)) for s in SHAPES]
    out += [(("size", z), _size_phrasings(z)) for z in SIZES]
    out += [(("yes",), YES), (("no",), NO), (("nothing",), NOTHING), (("misc",), MISC)]
    out += [(("object", c, s), [article(f"{c} {s}")]) for c in COLOURS for s in SHAPES]
    return out


def answer_pool() -> list[str]:
    return list(dict.fromkeys(p for _, phrasings in answer_meanings() for p in phrasings))


MEANING_OF = {p: m for m, phrasings in answer_meanings() for p in phrasings}
PHRASINGS = {m: phrasings for m, phrasings in answer_meanings()}


@dataclass(frozen=True)
class QA:
    question: str     # VisDial style: lower case, no "?"
    answer: str
    near: tuple[str, ...]  # near misses: the same question type, wrong values


def _near(kind: str, value, phrasing_index: int) -> tuple[str, ...]:
    """The other values of a question type, in the same phrasing as the answer."""
    values = {"colour": list(COLOURS), "place": list(POSITIONS), "count": list(range(4)), "shape": list(SHAPES),
              "size": list(SIZES)}[kind]
    out = []
    for v in values:
        if v != value:
            phrasings = PHRASINGS[(kind, v)]
            out.append(phrasings[min(phrasing_index, len(phrasings) - 1)])
    return tuple(out)


def questions_for(scene: Scene) -> list[QA]:
    """Every question the dialogues may ask about `scene`, with its canonical answer and near misses."""
    out: list[QA] = []
    by_shape: dict[str, list[Obj]] = {}
    for obj in scene:
        by_shape.setdefault(obj.shape, []).append(obj)
    out.append(QA("how many shapes are there", NUMBER_WORDS[len(scene)], _near("count", len(scene), 0)))
    for shape in SHAPES:
        k = len(by_shape.get(shape, []))
        out.append(QA(f"how many {plural(shape)} are there", NUMBER_WORDS[k], _near("count", k, 0)))
    for shape, objs in by_shape.items():
        if len(objs) != 1:
            continue
        o = objs[0]
        out.append(QA(f"what colour is the {shape}", f"it is {o.colour}", _near("colour", o.colour, 0)))
        out.append(QA(f"where is the {shape}", PLACE[o.position], _near("place", o.position, 0)))
        out.append(QA(f"how big is the {shape}", f"it is {o.size}", _near("size", o.size, 0)))
        yes = o.size == "large"
        out.append(QA(f"is the {shape} large", "yes" if yes else "no", ("no" if yes else "yes", "maybe")))
    for o in scene:
        out.append(QA(f"what colour is the shape {PLACE[o.position]}", o.colour, _near("colour", o.colour, 1)))
        out.append(QA(f"what shape is {PLACE[o.position]}", f"a {o.shape}", _near("shape", o.shape, 0)))
        near = tuple(article(f"{c} {o.shape}") for c in COLOURS if c != o.colour)
        near += tuple(article(f"{o.colour} {s}") for s in SHAPES if s != o.shape)
        out.append(QA(f"what is {PLACE[o.position]}", article(f"{o.colour} {o.shape}"), near + ("nothing",)))
        out.append(QA(f"is there {article(f'{o.colour} {o.shape}')}", "yes, there is", ("no, there is not", "i can't tell")))
    empty = [p for p in POSITIONS if all(o.position != p for o in scene)]
    for p in empty:
        out.append(QA(f"what is {PLACE[p]}", "nothing", tuple(article(f"{c} {s}") for c in list(COLOURS)[:3] for s in SHAPES[:3])))
    looks = {(o.colour, o.shape) for o in scene}
    for c in COLOURS:  # absent objects of a present shape or colour: plausible but wrong
        for s in SHAPES:
            if (c, s) not in looks and (s in by_shape or any(o.colour == c for o in scene)):
                out.append(QA(f"is there {article(f'{c} {s}')}", "no, there is not", ("yes, there is", "i can't tell")))
    out.append(QA("what colour is the background", f"it is {BACKGROUND_NAME}", _near("colour", BACKGROUND_NAME, 0)))
    return out


def random_dialogue(rng: random.Random, scene: Scene, n_rounds: int = N_ROUNDS) -> list[QA]:
    """`n_rounds` distinct questions about the scene; two of ten ask about an absent object."""
    candidates = questions_for(scene)
    absent = [qa for qa in candidates if qa.answer == "no, there is not"]
    present = [qa for qa in candidates if qa not in absent]
    picked = rng.sample(present, min(len(present), n_rounds - (2 if n_rounds >= 4 else 0)))
    picked += rng.sample(absent, min(len(absent), n_rounds - len(picked)))
    rng.shuffle(picked)
    return picked


def answer_options(rng: random.Random, qa: QA, pool: Sequence[str]) -> tuple[list[str], int, list[float]]:
    """100 options (the answer, its equivalent phrasings, the near misses, random others; shuffled),
    the answer's index and each option's relevance (1 answer, 0.5 equivalent, 0 otherwise)."""
    meaning = MEANING_OF[qa.answer]
    equivalent = [p for p in PHRASINGS[meaning] if p != qa.answer]
    chosen = list(dict.fromkeys([qa.answer] + equivalent + list(qa.near)))[:N_OPTIONS]
    rest = [p for p in pool if p not in set(chosen)]
    chosen += rng.sample(rest, N_OPTIONS - len(chosen))
    rng.shuffle(chosen)
    relevance = [1.0 if p == qa.answer else 0.5 if MEANING_OF.get(p) == meaning else 0.0 for p in chosen]
    return chosen, chosen.index(qa.answer), relevance


# -- LM documents ---------------------------------------------------------------------------------------
def caption_doc(text: str) -> dict:
    return {"kind": "caption", "bos": "first", "segments": [text]}


def story_doc(sentences: Sequence[str], bos: str = "first") -> dict:
    return {"kind": "story", "bos": bos, "segments": list(sentences)}


def dialogue_docs(rng: random.Random, qas: Sequence[QA], cap: str | None, variant: str | None = None) -> dict:
    """A dialogue as the tasks present it: `chat` (caption line, then "Q: q?" / "A: a" lines), `ranking`
    (the context of a random round ending in "\\nA: ", then the answer as its own segment, as answer
    options are scored) or `retrieval` ("Q: q? A: a." joined by spaces, the retrieval query text)."""
    variant = variant or rng.choices(("chat", "ranking", "retrieval"), weights=(4, 4, 2))[0]
    head = f"{cap}\n" if cap else ""
    if variant == "chat":
        return {"kind": "dialogue", "bos": "first",
                "segments": [head + "\n".join(f"Q: {qa.question}?\nA: {qa.answer}" for qa in qas)]}
    if variant == "ranking":
        k = rng.randrange(len(qas))
        lines = [line for qa in qas[:k] for line in (f"Q: {qa.question}?", f"A: {qa.answer}")]
        lines.append(f"Q: {qas[k].question}?")
        return {"kind": "dialogue", "bos": "first", "segments": [head + "\n".join(lines) + "\nA: ", qas[k].answer]}
    return {"kind": "dialogue", "bos": "first",
            "segments": [" ".join(f"Q: {qa.question}? A: {qa.answer}." for qa in qas)]}


def doc_texts(doc: dict) -> list[str]:
    return list(doc["segments"])


# -- writers --------------------------------------------------------------------------------------------
class _Writer:
    """Writes the image files (through the one image writer, fromage_bench.synth.images) and texts, and
    records each image's scene and look for the manifest."""

    def __init__(self, root: Path, seed: int):
        self.root, self.seed = root, seed
        self.scenes: dict[str, list] = {}
        self.looks: dict[str, dict] = {}

    def image(self, stem: str, scene: Scene, formats: tuple[str, ...] = ("JPEG", "PNG")) -> str:
        """Write the image of `scene` at `stem` + the extension of its look; returns the relative path."""
        rng = random.Random(f"miniworld-image:{self.seed}:{stem}")  # the look: its own stream per file
        look = images.choose_look(rng, formats)
        picture = images.compose(look, BACKGROUND, lambda side: render(scene, side), rng)
        relative = stem + look.ext
        images.save_image(picture, self.root / relative, look)
        self.scenes[relative] = [o.to_list() for o in scene]
        self.looks[relative] = look.to_dict()
        return relative

    def path(self, relative: str) -> Path:
        return self.root / relative

    def text(self, relative: str, content: str) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        return path


def _rng(seed: int, name: str) -> random.Random:
    return random.Random(f"miniworld:{seed}:{name}")  # str seeds are hashed with SHA-512: stable across runs


# Requests for a picture, as a chat user types them; "{thing}" names the scene's first object.
REQUESTS = ("show me {thing}", "can you show me a picture of {thing}?", "show me a picture like this",
            "what is this?", "what do you see?", "find me a picture of {thing}")


def training_pair(rng: random.Random) -> tuple[Scene, str]:
    """A CC3M-style training pair. Like web alt-text, the texts vary in style: mostly captions of the whole
    scene (55 %), but also a story told up to the picture (23 %: "we saw a small red star on the left .",
    possibly followed by steps such as "then the star turned blue ." that name only what changed, so only the
    whole text pins the picture down), one to three question/answer rounds about it (14 %: "Q: what
    colour is the star? A: it is red.") and a chat request answered by a caption (9 %: "Q: show me a red
    star\nA: a small red star on the left.", the demo's and the notebook's `Q: ...\nA:` turn: a model trained on
    it answers such a request with a caption and `[RET]`, as FROMAGe does in dialogue)."""
    style = rng.choices(("caption", "story", "dialogue", "request"), weights=(12, 5, 3, 2))[0]
    if style == "story":
        story = random_story(rng)
        k = rng.randrange(len(story.scenes))
        return story.scenes[k], " ".join(story.sentences[:k + 1])
    scene = random_scene(rng)
    if style == "dialogue":
        qas = random_dialogue(rng, scene, rng.choice((1, 2, 2, 3)))
        return scene, " ".join(f"Q: {qa.question}? A: {qa.answer}." for qa in qas)
    if style == "request":
        thing = _group_phrase(_groups(scene)[0], with_size=False, with_place=False)
        return scene, f"Q: {rng.choice(REQUESTS).format(thing=thing)}\nA: {caption(scene, rng)}"
    return scene, caption(scene, rng)


def _cc3m(w: _Writer, rng: random.Random, n: int, tsv: str, image_dir: str,
          pairs: Sequence[Scene | tuple[Scene, str]]) -> list[str]:
    """Images + a `caption<TAB>image` TSV (most names with their extension, some without, as released
    files); a scene without a text gets a caption."""
    files, captions = [], []
    for i, item in enumerate(pairs[:n]):
        scene, text = item if isinstance(item[-1], str) else (item, None)
        name = f"{i}_{rng.randrange(10 ** 9, 10 ** 10)}"
        files.append(Path(w.image(f"{image_dir}/{name}", scene)).name)
        captions.append(caption(scene, rng) if text is None else text)
    names = formats.tsv_image_names(files, _rng(w.seed, f"{tsv}:names"))
    formats.write_cc3m_tsv(w.path(tsv), captions, names)
    return captions


def _coco(w: _Writer, rng: random.Random, n: int, n_other: int) -> None:
    splits = ["test"] * n
    for j in range(n_other):
        splits.insert(rng.randrange(len(splits) + 1), ("train", "restval", "val")[j % 3])
    scenes = unique_scenes(rng, len(splits))
    entries = []
    for imgid, (split, scene) in enumerate(zip(splits, scenes)):
        cocoid = 100000 + 37 * imgid + rng.randrange(30)
        filepath = "train2014" if split == "train" else "val2014"
        stem = formats.coco_filename(filepath, cocoid, ext="")
        filename = Path(w.image(f"coco/{filepath}/{stem}", scene, formats=("JPEG",))).name
        raws = tuple(caption(scene, rng, template=t % len(CAPTION_TEMPLATES) if t < 4 else None) for t in range(5))
        entries.append(formats.CocoImage(filepath, filename, cocoid, split, raws))
    formats.write_coco_karpathy_json(w.path(COCO_JSON), entries)


STORIES_PER_ALBUM = 5  # VIST tells several stories over each album: about five, by its published counts


def _vist(w: _Writer, rng: random.Random, n: int, json_path: str = VIST_JSON, image_dir: str = VIST_IMAGES,
          split: str = "val") -> list[Story]:
    """`n` stories over albums of at most STORIES_PER_ALBUM, as VIST's are: an album's stories start from the same
    scene and share the photo of every state they have in common, so the retrieval pool holds the album's
    other photos beside a story's own (with one album per story, the target would be the only photo of its
    album left in the pool once the story's own context is pushed out, and an image-only query would find it
    by the album's look alone)."""
    n_albums = -(-n // STORIES_PER_ALBUM)
    starts = [random_start(rng) for _ in range(n_albums)]
    stories = [random_story(rng, starts[s % n_albums]) for s in range(n)]  # dealt round: albums of 4 or 5
    photo_ids = iter(str(i) for i in rng.sample(range(1_000_000_000, 9_999_999_999), 5 * n))
    album_ids = [str(72157600000000000 + rng.randrange(10 ** 10)) for _ in range(n_albums)]
    story_ids = [str(40000 + 5 * i + rng.randrange(5)) for i in range(n)]
    photo_of: dict[tuple, str] = {}  # (album, scene) -> photo id: a state two stories share is one photo
    photos, album_photos, annotated = [], [[] for _ in range(n_albums)], []
    for s, story in enumerate(stories):
        a = s % n_albums
        pids: list[str] = []
        for k, scene in enumerate(story.scenes):
            key = (a, scene_key(scene))
            if photo_of.get(key) in pids:  # a story that comes back to a state gets a photo of its own
                key = (a, scene_key(scene), s, k)
            if key not in photo_of:
                pid = photo_of[key] = next(photo_ids)
                ext = Path(w.image(f"{image_dir}/{pid}", scene)).suffix
                photos.append(formats.VistPhoto(pid, album_ids[a], " ".join(o.shape for o in scene),
                                                " ".join(f"{o.colour} {o.shape}" for o in scene),
                                                f"2015-0{1 + a % 9}-1{len(album_photos[a]) % 10} 12:00:00", ext))
                album_photos[a].append(pid)
            pids.append(photo_of[key])
        annotated.append(formats.VistStory(story_ids[s], tuple(pids), story.sentences,
                                           tuple(original_text(t) for t in story.sentences),
                                           f"MINIWORLD{s % 7:02d}", 200000 + 5 * s))
    albums = [formats.VistAlbum(album_ids[a], f"album {a}", tuple(album_photos[a]), "miniworld shapes")
              for a in range(n_albums)]
    formats.write_vist_sis(w.path(json_path), f"miniworld VIST SIS {split} set (fromage-bench)", albums, photos,
                           annotated)
    return stories


def _visdial(w: _Writer, rng: random.Random, n: int) -> list[tuple[Scene, str, list[QA]]]:
    pool = answer_pool()
    dialogues, out = [], []
    for d, scene in enumerate(unique_scenes(rng, n)):
        image_id = 185000 + 37 * d + rng.randrange(30)
        w.image(f"{VISDIAL_IMAGES}/{formats.visdial_image_name(image_id, ext='')}", scene, formats=("JPEG",))
        cap = caption(scene, rng, template=0).rstrip(".")
        qas = random_dialogue(rng, scene)
        rounds, relevances = [], []
        for qa in qas:
            options, gt_index, relevance = answer_options(rng, qa, pool)
            rounds.append(formats.VisdialRound(qa.question, qa.answer, tuple(options), gt_index))
            relevances.append(relevance)
        round_id = rng.randint(1, len(qas))
        dialogues.append(formats.VisdialDialogue(image_id, cap, tuple(rounds), round_id,
                                                 tuple(relevances[round_id - 1])))
        out.append((scene, cap, qas))
    formats.write_visdial_val(w.path(VISDIAL_JSON), w.path(VISDIAL_DENSE), pool, dialogues)
    return out


def _jsonl(docs: Iterable[dict]) -> str:
    return "".join(json.dumps(d) + "\n" for d in docs)


def write_miniworld(out: str | Path, seed: int = 0, scale: str = "small", *, clean: bool = True,
                    **counts_override: int) -> dict:
    """Write every dataset under `out` (see the module docstring); returns the manifest (counts, paths).

    `clean` removes the directories this function writes first, so that a rerun leaves no stale files;
    keyword arguments override the scale's counts (train, val, coco, coco_other, stories, dialogues,
    lm_stories, lm_dialogues). Each dataset has its own random stream: changing one count leaves the
    other datasets as they were."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    unknown = set(counts_override) - set(SCALES[scale])
    if unknown:
        raise ValueError(f"unknown count(s) {', '.join(sorted(unknown))}; known: {', '.join(SCALES[scale])}")
    counts = {**SCALES[scale], **counts_override}
    root = Path(out)
    if clean:
        for top in ("cc3m", "clip", "coco", "vist", "visdial", "miniworld"):
            shutil.rmtree(root / top, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    w = _Writer(root, seed)

    # CC3M: validation scenes are distinct from each other; training scenes are free (repeats allowed)
    val_rng = _rng(seed, "cc3m_val")
    val_captions = _cc3m(w, val_rng, counts["val"], CC3M_VAL_TSV, CC3M_VAL_IMAGES, unique_scenes(val_rng, counts["val"]))
    train_rng = _rng(seed, "cc3m_train")
    train_pairs = [training_pair(train_rng) for _ in range(counts["train"])]
    train_captions = _cc3m(w, train_rng, counts["train"], CC3M_TRAIN_TSV, CC3M_TRAIN_IMAGES, train_pairs)
    _coco(w, _rng(seed, "coco"), counts["coco"], counts["coco_other"])
    stories = _vist(w, _rng(seed, "vist"), counts["stories"])
    _vist(w, _rng(seed, "vist_train"), counts["train_stories"], VIST_TRAIN_JSON, VIST_TRAIN_IMAGES, "train")
    dialogues = _visdial(w, _rng(seed, "visdial"), counts["dialogues"])
    # the stand-in CLIP's pretraining: plain captions of fresh scenes (written last: the other files stay as they were)
    clip_rng = _rng(seed, "clip_train")
    _cc3m(w, clip_rng, counts["clip_train"], CLIP_TRAIN_TSV, CLIP_TRAIN_IMAGES,
          [random_scene(clip_rng) for _ in range(counts["clip_train"])])

    # LM text: training documents (fresh stories and dialogues, never the benchmark's), held-out = benchmark text
    lm_rng = _rng(seed, "lm")
    train_docs = [caption_doc(c) for c in train_captions]
    for _ in range(counts["lm_stories"]):
        story = random_story(lm_rng)
        sentences = list(story.sentences) + ([story.summary] if lm_rng.random() < 0.5 else [])
        train_docs.append(story_doc(sentences, lm_rng.choice(("first", "each"))))
    for _ in range(counts["lm_dialogues"]):
        scene = random_scene(lm_rng)
        cap = caption(scene, lm_rng).rstrip(".") if lm_rng.random() < 0.5 else None
        train_docs.append(dialogue_docs(lm_rng, random_dialogue(lm_rng, scene), cap))
    lm_rng.shuffle(train_docs)
    held_rng = _rng(seed, "lm_heldout")
    heldout_docs = [caption_doc(c) for c in val_captions]
    heldout_docs += [story_doc(s.sentences) for s in stories]
    for _scene, _cap, qas in dialogues:
        heldout_docs.append(dialogue_docs(held_rng, qas, None, "chat"))
        heldout_docs.append(dialogue_docs(held_rng, qas, None, "ranking"))
        heldout_docs.append(dialogue_docs(held_rng, qas, None, "retrieval"))
    w.text(LM_TRAIN, _jsonl(train_docs))
    w.text(LM_HELDOUT, _jsonl(heldout_docs))

    manifest = {"generator": "fromage-bench miniworld", "version": VERSION, "seed": seed, "scale": scale,
                "counts": {"clip_train": counts["clip_train"], "cc3m_train": counts["train"], "cc3m_val": counts["val"],
                           "coco_test": counts["coco"],
                           "vist_stories": counts["stories"], "vist_train_stories": counts["train_stories"],
                           "visdial_dialogues": counts["dialogues"],
                           "lm_train_docs": len(train_docs), "lm_heldout_docs": len(heldout_docs),
                           "images": len(w.scenes)},
                "image_size": IMAGE_SIZE, "background": BACKGROUND_NAME, "colours": COLOURS, "shapes": list(SHAPES),
                "sizes": list(SIZES), "positions": list(POSITIONS),
                "scene_fields": ["shape", "colour", "size", "position", "dx", "dy"], "scenes": w.scenes,
                "looks": w.looks}
    w.text(MANIFEST, json.dumps(manifest, indent=0))
    return manifest


def read_lm_docs(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]

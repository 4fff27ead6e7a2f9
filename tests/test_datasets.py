"""The dataset readers shared by the tasks and training (`model.datasets`): image directories on shared storage
(symlinked folders and files read like plain ones), CC3M TSVs read as the original's pandas reads them, and the
layering rule that the model layer imports nothing from `tasks/` or `fromage_bench/`."""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pandas
import pytest

from fromage_bench.standins import read_pairs
from fromage_bench.synth.captions import write_cc3m, write_coco_karpathy
from fromage_bench.synth.visdial import write_visdial
from fromage_bench.synth.vist import IMAGE_DIR as VIST_IMAGES
from fromage_bench.synth.vist import write_vist
from model.datasets import ImageDir, read_cc3m_rows
from model.errors import FromageInputError
from model.train_data import CaptionDataset
from tasks import get_task
from tasks.base import RunContext
from tasks.caption_data import load_cc3m
from tasks.visdial import IMAGE_DIR as VISDIAL_IMAGES
from tests.conftest import solid_image

REPO = Path(__file__).resolve().parent.parent


# -- the image-name rule --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x.jpg", "a/../../x", "a/../b.jpg", "..", "/etc/passwd", "//host/x.jpg"])
def test_absolute_and_dot_dot_names_are_rejected(tmp_path, name):
    with pytest.raises(FromageInputError, match="escapes the image directory") as err:
        ImageDir(tmp_path).path(name, source="data.tsv, line 2")
    assert err.value.where == "data.tsv, line 2" and len(str(err.value).splitlines()) == 1


def test_symlinked_folders_and_files_are_followed_and_kept_unresolved(tmp_path):
    elsewhere, root = tmp_path / "shared", tmp_path / "images"
    (elsewhere / "val2014").mkdir(parents=True)
    solid_image("red").save(elsewhere / "val2014" / "a.jpg")
    solid_image("blue").save(elsewhere / "b.jpg")
    root.mkdir()
    (root / "val2014").symlink_to(elsewhere / "val2014", target_is_directory=True)
    (root / "b.jpg").symlink_to(elsewhere / "b.jpg")
    images = ImageDir(root)
    assert images.path("val2014/a.jpg") == root / "val2014" / "a.jpg"  # the logical path, not the target's
    assert images.path("b.jpg") == root / "b.jpg" and images.path("b.jpg").is_file()
    assert images.find("val2014/a") == root / "val2014" / "a.jpg"
    linked_root = tmp_path / "linked"
    linked_root.symlink_to(root, target_is_directory=True)  # the image directory itself a link
    assert ImageDir(linked_root).find("b") == linked_root / "b.jpg"


# -- tasks on image directories that are links ------------------------------------------------------------------
def _linked_copy(root: Path, image_dir: str, how: str, out: Path) -> Path:
    """A copy of data root `root` whose `image_dir` lives elsewhere: `dir` makes `image_dir` a symlink to it,
    `files` a plain folder of per-file symlinks into it (missing and corrupt images stay so)."""
    copy, store = out / "root", out / "storage" / "images"
    shutil.copytree(root, copy)
    store.parent.mkdir(parents=True)
    shutil.move(str(copy / image_dir), str(store))
    if how == "dir":
        (copy / image_dir).symlink_to(store, target_is_directory=True)
        return copy
    for file in sorted(store.rglob("*")):
        if file.is_file():
            link = copy / image_dir / file.relative_to(store)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(file)
    return copy


def _outcome(results) -> list:
    return [(r.setting, r.protocol, r.metrics, r.n_examples, r.skipped.counts) for r in results]


def _cc3m(root):
    write_cc3m(root, n=8, seed=5, missing=1, corrupt=1, png=1)
    return "cc3m/validation", "image_text_retrieval", "cc3m", ("standard",)


def _coco(root):  # the Karpathy file names `{filepath}/{filename}`: `coco/val2014` is the folder on shared storage
    write_coco_karpathy(root, n=6, seed=4, missing=1, corrupt=1, png=1)
    return "coco/val2014", "image_text_retrieval", "coco", ("standard",)


def _vist(root):
    write_vist(root, n=5, seed=0, missing=1, corrupt=1, png=1)
    return VIST_IMAGES, "vist_retrieval", "5cap4img", ("corrected",)


def _visdial(root):
    write_visdial(root, n=4, seed=1, n_rounds=3, missing=[1], corrupt=[2], png=[3])
    return VISDIAL_IMAGES, "visdial_retrieval", "val", ("corrected",)


@pytest.mark.parametrize("how", ["dir", "files"])
@pytest.mark.parametrize("dataset", [_cc3m, _coco, _vist, _visdial], ids=lambda f: f.__name__[1:])
def test_linked_image_directories_give_the_metrics_of_plain_folders(tiny, tmp_path, dataset, how):
    plain = tmp_path / "plain"
    image_dir, task, setting, protocols = dataset(plain)
    linked = _linked_copy(plain, image_dir, how, tmp_path / "linked")
    assert (linked / image_dir).is_symlink() == (how == "dir")

    def run(root):
        return _outcome(get_task(task).run(RunContext(model=tiny, data_root=root, progress=False, batch_size=4),
                                           setting, protocols))

    expected = run(plain)
    assert expected[0][3] > 0 and sum(expected[0][4].values()) == 2  # examples scored, the two faulty ones skipped
    assert run(linked) == expected


# -- CC3M TSVs as pandas writes and reads them ------------------------------------------------------------------
AWKWARD = [("a \"quoted\" word", "0001"), ("tab\tinside the caption", "x.jpg"), ("\"leading quote", "0_123"),
           ("nan", "nan"), ("null", "null.png"), ("ends with a quote\"", "0002"), ("café – 日本語 ✓", "0003"),
           ("\"\"", "0004"), ("  spaced  ", "0005")]


@pytest.fixture
def awkward_tsv(tmp_path):
    """A TSV written by pandas (`to_csv(sep='\\t', index=False)`, as CC3M-style files are), its images as files."""
    images = tmp_path / "images"
    images.mkdir()
    for i, (_, name) in enumerate(AWKWARD):
        file = images / (name if Path(name).suffix else name + ".jpg")
        solid_image((20 * i, 0, 0)).save(file)
    tsv = tmp_path / "val.tsv"
    pandas.DataFrame(AWKWARD, columns=["caption", "image"]).to_csv(tsv, sep="\t", index=False)
    return tsv, images


def test_tsv_is_read_as_pandas_reads_it(awkward_tsv):
    tsv, _ = awkward_tsv
    assert '"a ""quoted"" word"' in tsv.read_text(encoding="utf-8")  # pandas quoted it: a QUOTE_NONE reader keeps ""
    as_strings = pandas.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
    original = pandas.read_csv(tsv, sep="\t")  # the original's call: "nan", "null", "0001" become NaN, NaN, 1
    rows = read_cc3m_rows(tsv)
    assert [r.caption for r in rows] == as_strings["caption"].tolist() == [c for c, _ in AWKWARD]
    assert [r.image for r in rows] == as_strings["image"].tolist() == [i for _, i in AWKWARD]
    for ours, theirs in zip(rows, original["caption"]):
        assert ours.caption == theirs or (ours.caption in ("nan", "null") and pandas.isna(theirs))
    assert [r.line for r in rows] == list(range(2, 2 + len(AWKWARD)))


def test_task_training_and_standins_read_the_same_rows(awkward_tsv):
    tsv, images = awkward_tsv
    captions = [c for c, _ in AWKWARD]
    items = load_cc3m(tsv, images)
    assert [c for item in items for c in item.captions] == captions
    assert all(item.path.is_file() for item in items)  # with or without an extension in the TSV
    from transformers import CLIPImageProcessor

    dataset = CaptionDataset(tsv, images, tokenizer=None, processor=CLIPImageProcessor(), ret_id=0)
    assert dataset.rows == [(r.caption, r.image) for r in read_cc3m_rows(tsv)]
    assert all(dataset.read_pixels(i)[0] is not None for i in range(len(dataset)))
    assert read_pairs(tsv, images) == [(item.path, item.captions[0]) for item in items]


def test_the_tsv_writer_writes_what_pandas_reads_back(tmp_path):
    from fromage_bench.synth.formats import write_cc3m_tsv

    tsv = write_cc3m_tsv(tmp_path / "w.tsv", [c for c, _ in AWKWARD], [i for _, i in AWKWARD])
    read = pandas.read_csv(tsv, sep="\t", dtype=str, keep_default_na=False)
    assert list(read.itertuples(index=False, name=None)) == AWKWARD


def test_extra_columns_are_ignored_and_a_multi_line_caption_keeps_the_line_count(tmp_path):
    tsv = tmp_path / "val.tsv"
    tsv.write_text('url\timage\tcaption\nhttp://x\ta\t"two\nlines"\n\nhttp://y\tb\tnext\n', encoding="utf-8")
    rows = read_cc3m_rows(tsv)
    assert rows == [(2, "two\nlines", "a"), (5, "next", "b")]


# -- layering ---------------------------------------------------------------------------------------------------
def _imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def test_model_layer_imports_nothing_from_tasks_or_the_harness():
    upward = []
    for path in sorted((REPO / "model").rglob("*.py")):
        for line, module in _imported_modules(path):
            top = module.split(".")[0]
            if top in ("tasks", "fromage_bench") or module.startswith(".."):  # `..` leaves the package
                upward.append(f"{path.relative_to(REPO)}:{line}: {module}")
    assert not upward

"""`fromage-bench build-retrieval-set` (fromage_bench/retrieval_build.py) and the retrieval-set provenance
(model/retrieval_set.py): the set equals the original recipe's embeddings computed independently
(tests/reference/original_fromage.py) on awkward files; a killed build resumes to the same bytes and two torchrun
processes give the same bytes as one; a set built by another model is refused unless accepted; unreadable files
are skipped and listed, duplicates stored once, bad input is one line, exit 2 and nothing written; and
`generate` retrieves from a built set."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fromage_bench.cli import main
from model import RetrievalSet, load_fromage, make_tiny
from model.errors import FromageInputError
from model.retrieval_set import EMBEDDINGS_FILE, PATHS_FILE
from tests.reference.original_fromage import OriginalStyleFromage
from tests.reference.photos import awkward_image_files
from tests.reference.tiny_release import write_tiny_release_dir
from tests.subprocesses import REPO, child_env, sigkill_when

SKIPPED = "retrieval_skipped.tsv"


@pytest.fixture(scope="module")
def indep_dir(tmp_path_factory):
    """A release directory written by the independent writer: the recipe check must not share our loader's bugs."""
    return write_tiny_release_dir(tmp_path_factory.mktemp("indep") / "m", seed=7)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("other") / "m", seed=3)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Awkward photos in a subfolder, a symlinked file, a symlinked folder, a corrupt JPEG, a broken link (missing
    file) and a non-image file."""
    root = tmp_path_factory.mktemp("photos")
    awkward_image_files(root / "sub")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (root / "link.jpg").symlink_to(root / "sub" / "rgb_4x3.jpg")
    (root / "gone.png").symlink_to(root / "does-not-exist.png")
    linked = tmp_path_factory.mktemp("elsewhere")
    awkward_image_files(linked)
    (root / "linked_folder").symlink_to(linked)
    (root / "notes.txt").write_text("not an image")
    return root


def build(*args) -> int:
    return main(["build-retrieval-set", "--device", "cpu", "--precision", "fp32", "--no-progress", *map(str, args)])


def paths_meta(out: Path) -> dict:
    return json.loads((out / PATHS_FILE).read_text())


def read_skipped(out: Path) -> set[tuple[str, str]]:
    table = pd.read_csv(out / SKIPPED, sep="\t", dtype=str, keep_default_na=False)
    return set(zip(table["path"], table["reason"]))


# -- the recipe ---------------------------------------------------------------------------------------------
def test_set_equals_the_original_recipe_on_awkward_files(indep_dir, photo_dir, tmp_path, capsys):
    out = tmp_path / "set"
    assert build("--model-dir", indep_dir, "--images", photo_dir, "--out", out, "--batch-size", 3,
                 "--chunk-size", 4) == 0
    printed = capsys.readouterr().out
    retrieval = RetrievalSet.load(out)
    expected_names = sorted(
        [f"sub/{n}" for n in os.listdir(photo_dir / "sub")] + [f"linked_folder/{n}" for n in os.listdir(photo_dir / "sub")]
        + ["link.jpg"])
    assert retrieval.paths == expected_names
    assert retrieval.image_root == str(photo_dir)

    reference = OriginalStyleFromage(indep_dir)
    with torch.no_grad():  # extract_img_embs.py: Image.open, processor on .convert('RGB'), get_visual_embs(retrieval)
        want = torch.cat([reference.retrieval_image_embeddings([Image.open(retrieval.resolve(i))])
                          for i in range(len(retrieval))])
    torch.testing.assert_close(retrieval.embeddings, want, atol=1e-5, rtol=0)
    assert (retrieval.embeddings.norm(dim=1) - 1).abs().max() > 1e-3  # stored as computed, not normalised

    assert read_skipped(out) == {(str(photo_dir / "corrupt.jpg"), "corrupt image"),
                                 (str(photo_dir / "gone.png"), "missing image")}
    assert "2 unreadable skipped" in printed
    assert not (out / ".partial").exists()

    meta = paths_meta(out)
    model = load_fromage(indep_dir, device="cpu", precision="fp32")
    assert meta["model_identity"] == model.model_identity and meta["preprocessing"] == "crop"
    assert meta["count"] == len(expected_names)
    assert meta["built_with"]["precision"] == "fp32" and meta["built_with"]["device"] == "cpu"


def test_tsv_input_resolves_names_like_training_and_stores_duplicates_once(tiny_dir, tmp_path, capsys):
    images = tmp_path / "training"
    files = awkward_image_files(images)
    tsv = tmp_path / "train.tsv"
    # an extension appended (grey_3x4), the same file named twice and spelled two ways, a missing file
    names = ["rgb_4x3.jpg", "grey_3x4", "rgb_4x3.jpg", "./tiny_rgb.png", "grey_3x4.jpg", "missing.jpg"]
    pd.DataFrame({"caption": [f"caption {i}" for i in range(len(names))], "image": names}).to_csv(
        tsv, sep="\t", index=False)
    out = tmp_path / "set"
    assert build("--model-dir", tiny_dir, "--tsv", tsv, "--image-dir", images, "--out", out) == 0
    assert "2 duplicate paths stored once" in capsys.readouterr().out
    assert RetrievalSet.load(out).paths == ["rgb_4x3.jpg", "grey_3x4.jpg", "tiny_rgb.png"]
    assert read_skipped(out) == {(str(images / "missing.jpg"), "missing image")}
    assert files  # the fixture wrote them


def test_list_input_is_relative_to_the_list_file_and_normalises_spelling(tiny_dir, tmp_path, monkeypatch):
    files = awkward_image_files(tmp_path / "lists" / "img")
    listing = tmp_path / "lists" / "images.txt"
    listing.write_text("img/rgb_4x3.jpg\n./img/rgb_4x3.jpg\n\nimg//sub/../grey_3x4.jpg\n"
                       f"{files['tiny_rgb.png']}\n{tmp_path / 'lists' / 'img' / 'rgb_4x3.jpg'}\n")
    monkeypatch.chdir(tmp_path)  # not the list's folder
    out = tmp_path / "set"
    assert build("--model-dir", tiny_dir, "--list", listing, "--out", out) == 0
    retrieval = RetrievalSet.load(out)
    assert retrieval.paths == ["img/rgb_4x3.jpg", "img/grey_3x4.jpg", str(files["tiny_rgb.png"])]
    assert [Path(retrieval.resolve(i)).resolve() for i in range(3)] == [
        files["rgb_4x3.jpg"].resolve(), files["grey_3x4.jpg"].resolve(), files["tiny_rgb.png"].resolve()]


# -- provenance ---------------------------------------------------------------------------------------------
def test_identity_ignores_precision_and_backbone_spelling_but_not_the_model(tiny_dir, other_dir):
    fp32 = load_fromage(tiny_dir, device="cpu", precision="fp32")
    bf16 = load_fromage(tiny_dir, device="cpu", precision="bf16", visual_model=str((tiny_dir / "clip").resolve()),
                        opt_version=str((tiny_dir / "opt").resolve()))
    assert fp32.fingerprint != bf16.fingerprint  # the cache key does see the precision
    assert fp32.model_identity == bf16.model_identity
    assert load_fromage(other_dir, device="cpu", precision="fp32").model_identity != fp32.model_identity


@pytest.fixture(scope="module")
def tiny_set(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyset")
    awkward_image_files(root / "img")
    assert build("--model-dir", tiny_dir, "--images", root / "img", "--out", root / "set") == 0
    return root / "set"


def generate(model_dir, retrieval_set, *extra) -> list[str]:
    return ["generate", "--model-dir", str(model_dir), "--retrieval-set", str(retrieval_set), "--device", "cpu",
            "--text", "a photo of a yellow bar [RET]", "--num-words", "0", *extra]


def test_a_set_built_by_another_model_is_refused_unless_accepted(tiny_dir, other_dir, tiny_set, capsys):
    ours = load_fromage(tiny_dir, device="cpu").model_identity
    theirs = load_fromage(other_dir, device="cpu", retrieval_set=None).model_identity
    capsys.readouterr()
    assert main(generate(other_dir, tiny_set)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and str(tiny_set / PATHS_FILE) in lines[0]
    assert ours in lines[0] and theirs in lines[0] and "--accept-foreign-retrieval-set" in lines[0]
    assert captured.out == ""
    assert main(generate(other_dir, tiny_set, "--accept-foreign-retrieval-set")) == 0
    with pytest.raises(FromageInputError, match="built by model"):
        load_fromage(other_dir, device="cpu", retrieval_set=tiny_set)
    assert load_fromage(other_dir, device="cpu", retrieval_set=tiny_set, accept_foreign_retrieval_set=True
                        ).retrieval_set is not None


def test_a_set_of_another_preprocessing_is_refused(tiny_dir, tiny_set, tmp_path):
    squashed = tmp_path / "squashed"
    shutil.copytree(tiny_set, squashed)
    meta = paths_meta(squashed)
    meta["preprocessing"] = "squash"
    (squashed / PATHS_FILE).write_text(json.dumps(meta))
    with pytest.raises(FromageInputError, match="prepared by 'squash'"):
        load_fromage(tiny_dir, device="cpu", retrieval_set=squashed)


def test_sets_without_provenance_still_load_saying_so(tiny_dir, tmp_path, caplog):
    plain = RetrievalSet(["a.jpg", "b.jpg"], torch.randn(2, 32), image_root=str(tmp_path)).save(tmp_path / "plain")
    old = tmp_path / "old"  # the format before provenance: a bare list of paths
    shutil.copytree(plain, old)
    (old / PATHS_FILE).write_text(json.dumps(["a.jpg", "b.jpg"]))
    for directory in (plain, old):
        caplog.clear()
        assert load_fromage(tiny_dir, device="cpu", retrieval_set=directory).retrieval_set.paths == ["a.jpg", "b.jpg"]
        assert any("provenance unknown" in r.getMessage() and str(directory) in r.getMessage() for r in caplog.records)


def test_converted_pickles_record_their_source_and_load_with_unknown_provenance(tiny_dir, tmp_path, caplog):
    pkl = tmp_path / "cc3m_embeddings_0.pkl"
    pkl.write_bytes(pickle.dumps({"paths": ["u1", "u2"], "embeddings": np.ones((2, 32), dtype=np.float32)}))
    assert main(["convert-embeddings", str(pkl), "--out", str(tmp_path / "out"), "--trust-pickle"]) == 0
    meta = paths_meta(tmp_path / "out")
    assert meta["source"] == "original pickle" and "model_identity" not in meta and meta["count"] == 2
    assert len(load_fromage(tiny_dir, device="cpu", retrieval_set=tmp_path / "out").retrieval_set) == 2
    assert "provenance unknown (original pickle)" in caplog.text


def test_generate_retrieves_from_a_built_set(tiny_dir, tiny_set, capsys):
    assert main(generate(tiny_dir, tiny_set)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    retrieved = [line for line in lines if line.startswith("<")]
    assert len(retrieved) == 1 and "1 retrieved image" in retrieved[0]
    path = retrieved[0].split(": ", 1)[1].rstrip(">")
    retrieval = RetrievalSet.load(tiny_set)
    assert path in [retrieval.resolve(i) for i in range(len(retrieval))]


# -- bad input ---------------------------------------------------------------------------------------------
def _bad_checkpoint(tmp_path: Path, tiny_dir: Path) -> Path:
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_dir, broken)
    (broken / "pretrained_ckpt.pth.tar").write_bytes(b"truncated")
    return broken


@pytest.mark.parametrize("case", ["missing_dir", "empty_list", "out_under_a_file", "wrong_checkpoint", "tsv_alone"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tiny_dir, tmp_path, capsys):
    images = tmp_path / "img"
    awkward_image_files(images)
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "out"
    model, source, named = tiny_dir, ["--images", images], None
    if case == "missing_dir":
        source, named = ["--images", tmp_path / "nope"], tmp_path / "nope"
    elif case == "empty_list":
        source, named = ["--list", tmp_path / "empty.txt"], tmp_path / "empty.txt"
    elif case == "out_under_a_file":
        out = named = tmp_path / "a_file" / "set"
    elif case == "wrong_checkpoint":
        model = _bad_checkpoint(tmp_path, tiny_dir)
        named = model / "pretrained_ckpt.pth.tar"
    elif case == "tsv_alone":
        source, named = ["--tsv", tmp_path / "empty.txt"], "--tsv"
    assert build("--model-dir", model, *source, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(named) in err[0], err
    assert not out.exists()


# -- resume and sharding --------------------------------------------------------------------------------------
def build_command(model_dir: Path, images: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "fromage_bench", "build-retrieval-set", "--model-dir", str(model_dir),
            "--images", str(images), "--out", str(out), "--device", "cpu", "--no-progress", "--chunk-size", "2",
            "--batch-size", "2", "--image-workers", "0", *extra]


def run_build(cmd: list[str]) -> str:
    done = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def set_bytes(out: Path) -> tuple[bytes, bytes, bytes]:
    return tuple((out / name).read_bytes() for name in (EMBEDDINGS_FILE, PATHS_FILE, SKIPPED))


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory, photo_dir):
    """26 files: the awkward photos four times over, with the corrupt and the missing one (13 chunks of 2)."""
    root = tmp_path_factory.mktemp("many")
    for copy in range(4):
        awkward_image_files(root / f"copy{copy}")
    shutil.copy(photo_dir / "corrupt.jpg", root / "copy1" / "corrupt.jpg")
    (root / "copy2" / "gone.jpg").symlink_to(root / "not-there.jpg")
    return root


@pytest.fixture(scope="module")
def clean_build(tiny_dir, many_photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "set"
    run_build(build_command(tiny_dir, many_photos, out))
    return out


@pytest.mark.slow
def test_a_killed_build_resumes_to_the_same_set(tiny_dir, many_photos, clean_build, tmp_path):
    out = tmp_path / "killed"
    cmd = build_command(tiny_dir, many_photos, out)
    chunks = lambda: len(list((out / ".partial").glob("*.safetensors")))  # noqa: E731
    sigkill_when(cmd, lambda: chunks() >= 2, "two chunks were written", timeout=90)
    assert not (out / PATHS_FILE).exists() and not (out / EMBEDDINGS_FILE).exists()
    written = chunks()
    assert 2 <= written < 13

    printed = run_build(cmd)
    assert f"{written} of 13 chunks resumed" in printed
    assert set_bytes(out) == set_bytes(clean_build)
    assert not (out / ".partial").exists()


@pytest.mark.slow
def test_two_processes_give_the_single_process_set(tiny_dir, many_photos, clean_build, tmp_path):
    out = tmp_path / "two"
    printed = run_build(build_command(tiny_dir, many_photos, out, "--nproc", "2"))
    assert "0 of 13 chunks resumed" in printed
    assert set_bytes(out) == set_bytes(clean_build)
    assert len(RetrievalSet.load(out)) == 24

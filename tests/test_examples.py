"""The notebook's four examples (examples/*.py) run on the tiny model with a retrieval set of awkward photos:
each exits 0; concept composition shows, for each [RET], the set's 3 best images for the query computed here;
the dialogues ask every question with the whole conversation before it, as the notebook does; bad input is one
line and exit status 2."""
from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fromage_bench.synth.formats import write_cc3m_tsv
from model import RetrievalSet
from model.images import load_image

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
RETRIEVAL = re.compile(r"^  Retrieval #(\d): (.+) (\d+)x(\d+)(, saved as (.+))?$")


@pytest.fixture(scope="module")
def retrieval_set(tiny, awkward_files, tmp_path_factory) -> Path:
    paths = [str(p) for p in awkward_files.values()]
    embeddings = tiny.encode_images([load_image(p) for p in paths], mode="retrieval")
    return RetrievalSet(paths, embeddings).save(tmp_path_factory.mktemp("set"))


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import common as module

    return module


def run_script(name: str, *args) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def run_in_process(name: str, *args, monkeypatch) -> int:
    """The script as `python examples/NAME ARGS` runs it, in this process (faster than a subprocess)."""
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *map(str, args)])
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as `python examples/NAME` puts the script's folder first
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return stopped.value.code


def squashed(path) -> Image.Image:
    """The notebook's utils.get_image_from_url after its download."""
    return Image.open(path).resize((224, 224)).convert("RGB")


def top3(tiny, retrieval_set: Path, prompt: list) -> list[str]:
    """The set's 3 best images for the prompt's [RET]: cosine similarity of normalised embeddings."""
    stored = RetrievalSet.load(retrieval_set)
    query = tiny.retrieval_embeddings([prompt])[0]
    scores = F.normalize(stored.embeddings.float(), dim=1) @ query
    return [stored.paths[i] for i in scores.topk(3).indices.tolist()]


def retrieval_blocks(stdout: str) -> list[list[re.Match]]:
    """The retrieved-image lines after each 'Model generated outputs:' line."""
    blocks = []
    for block in stdout.split("Model generated outputs:\n")[1:]:
        lines = block.splitlines()[1:]  # the first is the caption ending in [RET]
        blocks.append([m for m in map(RETRIEVAL.match, lines[:3]) if m])
    return blocks


# -- the scripts, end to end ------------------------------------------------------------------------------
def test_concept_composition_shows_the_3_best_images_per_ret(tiny_dir, tiny, retrieval_set, awkward_files, tmp_path):
    image = awkward_files["cmyk_4x3.jpg"]
    done = run_script("concept_composition.py", "--model-dir", tiny_dir, "--retrieval-set", retrieval_set,
                      "--image", image, "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    blocks = retrieval_blocks(done.stdout)
    assert len(blocks) == 2  # the notebook's two prompts
    for text, block in zip(["watercolor drawing [RET]", "vector icon [RET]"], blocks):
        assert [int(m[1]) for m in block] == [1, 2, 3]
        assert [m[2] for m in block] == top3(tiny, retrieval_set, [squashed(image), text])
        for m in block:
            assert (int(m[3]), int(m[4])) == (224, 224)
            with Image.open(m[6]) as saved:
                assert Path(m[6]).parent == tmp_path and saved.size == (224, 224)
    assert len(list(tmp_path.iterdir())) == 6


@pytest.mark.parametrize("script,image,questions,first", [
    ("text_dialogue.py", None, 6, "I am thinking of an animal. It is brown and furry, and has a tail. What is it?"),
    ("image_dialogue.py", "grey_3x4.jpg", 5, "What is this image?"),
    ("image_question.py", "palette_panorama.png", 2, "What is this?"),
])
def test_dialogues_answer_every_question(tiny_dir, tiny, retrieval_set, awkward_files, script, image, questions, first):
    args = ["--model-dir", tiny_dir, "--retrieval-set", retrieval_set]
    done = run_script(script, *args, *(["--image", awkward_files[image]] if image else []))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    asked = [i for i, line in enumerate(lines) if line.startswith("Input:     ")]
    assert len(asked) == questions and lines[asked[0]] == "Input:     " + first
    assert all(lines[i + 1].startswith("FROMAGe:  ") for i in asked)
    if image:  # the input image is shown first, squashed as the notebook's get_image_from_url does
        assert lines[0] == f"<image {awkward_files[image]} 224x224>"


# -- the dialogue's context -------------------------------------------------------------------------------
def test_context_accumulates_as_the_notebook_does(common):
    retrieved = [Image.new("RGB", (4, 4))]
    text = common.ask("", "What is this?")
    assert text == "Q: What is this?\nA:"
    text = common.answered(text, [" A sofa. [RET]", retrieved, " a couch [RET]", retrieved])
    text = common.ask(text, "Where?")
    assert text == "Q: What is this?\nA: A sofa. [RET]  a couch [RET]\nQ: Where?\nA:"


class RecordingModel:
    """Answers every prompt with one canned caption and records what it was sent."""

    def __init__(self):
        self.prompts = []

    def generate_for_images_and_texts(self, prompt, **decoding):
        self.prompts.append((list(prompt), decoding))
        return [f" answer {len(self.prompts)}."]


def test_dialogue_sends_the_image_and_the_whole_conversation(common, capsys):
    image = Image.new("RGB", (224, 224))
    model = RecordingModel()
    common.dialogue(common.Example(model, image, ["Q1?", "Q2?"], None), ret_scale_factor=1.15, max_num_rets=3)
    (first, decoding), (second, _) = model.prompts
    assert first == [image, "Q: Q1?\nA:"]
    assert second == [image, "Q: Q1?\nA: answer 1.\nQ: Q2?\nA:"]
    assert decoding == {"num_words": 32, "ret_scale_factor": 1.15, "max_num_rets": 3}
    shown = capsys.readouterr().out.splitlines()[1:]
    assert shown == ["Input:     Q1?", "FROMAGe:   answer 1.", "Input:     Q2?", "FROMAGe:   answer 2."]


def test_example_images_are_squashed_as_the_notebook_does(common, awkward_files):
    for name in ("rgba_16x9.png", "palette_panorama.png", "cmyk_4x3.jpg"):
        ours = common.load_example_image(awkward_files[name])
        assert ours.mode == "RGB" and torch.equal(torch.tensor(list(ours.getdata())),
                                                  torch.tensor(list(squashed(awkward_files[name]).getdata())))


# -- the embedded default -------------------------------------------------------------------------------
def test_no_model_dir_runs_the_embedded_default(tiny_dir, tiny, retrieval_set, awkward_files, tmp_path, monkeypatch, capsys):
    """ensure_model's (model, retrieval set), the first readable miniworld validation image (the first row's
    file is corrupt), and the prompts adapted to the miniworld."""
    import fromage_bench.embedded as embedded

    cc3m = tmp_path / "data" / "cc3m"
    (cc3m / "validation").mkdir(parents=True)
    (cc3m / "validation" / "0_broken.jpg").write_bytes(awkward_files["rgb_4x3.jpg"].read_bytes()[:200])
    shutil.copy(awkward_files["grey_3x4.jpg"], cc3m / "validation" / "1_good.jpg")
    write_cc3m_tsv(cc3m / "cc3m_val.tsv", ["a red square.", "a blue ring."], ["0_broken.jpg", "1_good"])
    monkeypatch.setattr(embedded, "DEFAULT_WORK", tmp_path)
    monkeypatch.setattr(embedded, "ensure_model", lambda work, progress=True: (tiny_dir, retrieval_set),
                        raising=False)
    assert run_in_process("concept_composition.py", monkeypatch=monkeypatch) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"<image {cc3m / 'validation' / '1_good.jpg'} 224x224>"
    assert lines[2] == "a drawing of [RET]"


# -- bad input ------------------------------------------------------------------------------------------
def test_missing_image_is_one_line_and_exit_2(tiny_dir, tiny, retrieval_set, tmp_path):
    missing = tmp_path / "no such photo.jpg"
    done = run_script("image_question.py", "--model-dir", tiny_dir, "--retrieval-set", retrieval_set,
                      "--image", missing)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"image_question.py: error: {missing}: image file not found"]


@pytest.mark.parametrize("script,args,says", [
    ("text_dialogue.py", ["--model-dir", "{tmp}/missing"], "{tmp}/missing/model_args.json: missing"),
    ("image_dialogue.py", ["--model-dir", "{tiny}"], "--image: required with --model-dir"),
    ("concept_composition.py", ["--model-dir", "{tiny}", "--image", "{image}"], "--retrieval-set: required"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_dir, tiny, awkward_files, tmp_path, monkeypatch, capsys, script, args, says):
    fill = {"tmp": tmp_path, "tiny": tiny_dir, "image": awkward_files["rgb_4x3.jpg"]}
    assert run_in_process(script, *[a.format(**fill) for a in args], monkeypatch=monkeypatch) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith(f"{script}: error: {says.format(**fill)}")

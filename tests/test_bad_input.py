"""The bad-input table (docs/bad-input.md): every row is one clear line on stderr naming the file or
argument and the problem, exit status 2, no traceback, and no results file."""
import json
import pickle
import shutil

import pytest

from fromage_bench.cli import main
from fromage_bench.synth.captions import write_cc3m
from fromage_bench.synth.visdial import write_visdial
from fromage_bench.synth.vist import write_vist


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    write_vist(root, n=3, seed=2)
    write_visdial(root, n=2, seed=2)
    write_cc3m(root, n=4, seed=2)
    return root


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _visdial(root):
    return root / "visdial" / "visdial_1.0_val.json"


def _dense(root):
    return root / "visdial" / "visdial_1.0_val_dense_annotations.json"


def _vist(root):
    return root / "vist" / "sis" / "val.story-in-sequence.json"


def _tsv(root):
    return root / "cc3m" / "cc3m_val.tsv"


def _model_dir(case):
    return case["model"]


# Each case: (breaks the model dir or data, extra CLI arguments, task spec, text the error line must contain)
CASES = {
    "missing model_args.json": (lambda m, d: (m / "model_args.json").unlink(), [], "visdial_retrieval",
                                "model_args.json: missing"),
    "malformed model_args.json": (lambda m, d: (m / "model_args.json").write_text("{"), [], "visdial_retrieval",
                                  "malformed JSON"),
    "checkpoint without the expected keys": (
        lambda m, d: __import__("torch").save({"state_dict": {"x": __import__("torch").zeros(1)}},
                                              m / "pretrained_ckpt.pth.tar"), [], "visdial_retrieval",
        "checkpoint lacks"),
    "pickle retrieval set without --trust-pickle": (
        lambda m, d: (m / "pickles").mkdir(), None, None, "--trust-pickle"),
    "VisDial round without 100 options": (
        lambda m, d: _edit_json(_visdial(d), lambda j: j["data"]["dialogs"][0]["dialog"][0]["answer_options"].pop()),
        [], "visdial_ranking", "visdial_1.0_val.json"),
    "dense annotations not aligned with dialogues": (
        lambda m, d: _edit_json(_dense(d), lambda j: j.reverse()), [], "visdial_ranking",
        "visdial_1.0_val_dense_annotations.json"),
    "VIST story with other than 5 entries": (
        lambda m, d: _edit_json(_vist(d), lambda j: j["annotations"].pop()), [], "vist_retrieval:1cap",
        "val.story-in-sequence.json"),
    "empty TSV": (lambda m, d: _tsv(d).write_text(""), [], "image_text_retrieval:cc3m", "cc3m_val.tsv"),
    "headerless TSV": (lambda m, d: _tsv(d).write_text("a red square\t0_1\n"), [], "image_text_retrieval:cc3m",
                       "cc3m_val.tsv"),
    "TSV row with a field too many": (lambda m, d: _tsv(d).write_text("caption\timage\na red\tsquare\t0_1\n"), [],
                                      "image_text_retrieval:cc3m", "cc3m_val.tsv, line 2: expected 2 tab-separated"),
    "TSV with a quote never closed": (lambda m, d: _tsv(d).write_text('caption\timage\n"a red square\t0_1\n'), [],
                                      "image_text_retrieval:cc3m", "cc3m_val.tsv: malformed TSV"),
    "image path escaping the image directory": (
        lambda m, d: _tsv(d).write_text("caption\timage\na red square\t../../../etc/passwd\n"), [],
        "image_text_retrieval:cc3m", "escapes the image directory"),
    "unknown task": (lambda m, d: None, [], "no_such_task", "unknown task"),
    "unknown setting": (lambda m, d: None, [], "vist_retrieval:9cap", "unknown setting"),
    "unknown protocol": (lambda m, d: None, ["--protocol", "sloppy"], "visdial_ranking", "unknown protocol"),
    "unknown precision": (lambda m, d: None, ["--precisions", "fp4"], "visdial_ranking", "unknown precision"),
    "negative image workers": (lambda m, d: None, ["--image-workers", "-1"], "visdial_ranking", "--image-workers"),
    "CUDA on a machine without CUDA": (lambda m, d: None, ["--device", "cuda"], "visdial_retrieval",
                                       "CUDA was requested"),
    "output directory not writable": (lambda m, d: (d / "a-file").write_text("x"), ["--out-under-file"],
                                      "visdial_retrieval", "not writable"),
    "corrupt checkpoint file": (lambda m, d: (m / "pretrained_ckpt.pth.tar").write_bytes(b"PK\x03\x04broken"), [],
                                "visdial_retrieval", "pretrained_ckpt.pth.tar"),
    "malformed VisDial JSON": (lambda m, d: _visdial(d).write_text('{"data": [1,'), [], "visdial_retrieval",
                               "malformed JSON"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input(case, tiny_dir, clean_data, tmp_path, capsys):
    import torch

    if case.startswith("CUDA") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model, data = tmp_path / "model", tmp_path / "data"
    shutil.copytree(tiny_dir, model)
    shutil.copytree(clean_data, data)
    breaker, extra, tasks, message = CASES[case]
    breaker(model, data)
    out = tmp_path / "out"
    if extra is None:  # convert-embeddings case
        pkl = model / "pickles" / "cc3m_embeddings_0.pkl"
        pkl.write_bytes(pickle.dumps({"paths": ["x"], "embeddings": [[0.0] * 32]}))
        argv = ["convert-embeddings", str(pkl), "--out", str(out)]
    else:
        if "--out-under-file" in extra:
            extra = [a for a in extra if a != "--out-under-file"]
            out = data / "a-file" / "run"
        argv = ["eval", "--model-dir", str(model), "--data-root", str(data), "--out", str(out), "--tasks", tasks,
                "--no-progress", "--no-cache", *extra]
        if "--device" not in extra:
            argv += ["--device", "cpu"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fromage-bench: error: ") and "Traceback" not in err
    assert message in err
    assert not (out / "results.json").exists()

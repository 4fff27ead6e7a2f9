"""GILL (model/gill.py): a release directory written by an independent writer (tests/reference/tiny_gill_release.py)
loads with `load_gill`, and its `[IMG0]` retrieval embeddings, image embeddings, context-image tokens and
log-likelihoods equal an independent re-implementation of GILL's code (tests/reference/original_gill.py) on
awkward, non-square photo files; `make-tiny --family gill` writes a directory that loads; retrieval sets are built
through GILL's own `visual_fc` and a FROMAGe set is refused; bad releases are one clear error."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fromage_bench.cli import main
from fromage_bench.retrieval_build import build_retrieval_set, images_under
from model import RetrievalSet, load_fromage
from model.errors import FromageInputError
from model.family import source_state
from model.gill import Gill, is_gill_release, load_gill
from model.images import open_image
from model.loading import model_identity
from tests.reference.original_gill import OriginalStyleGill
from tests.reference.photos import awkward_image_files
from tests.reference.tiny_gill_release import NUM_TOKENS, OPT_EXTRA_ROWS, write_tiny_gill_release_dir
from tests.reference.tiny_release import write_tiny_release_dir

TOLERANCE = 1e-4
IMG_SUFFIX = "".join(f"[IMG{i}]" for i in range(NUM_TOKENS))


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return write_tiny_gill_release_dir(tmp_path_factory.mktemp("gill") / "g", seed=3)


@pytest.fixture(scope="module")
def pair(release):
    return load_gill(release, device="cpu", precision="fp32"), OriginalStyleGill(release)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    return awkward_image_files(tmp_path_factory.mktemp("photos"))


def _pil(photos, *names):
    return [open_image(photos[n]) for n in names]


def test_the_independent_release_loads_and_reports_its_decision_model(pair, release):
    gill, ref = pair
    assert is_gill_release(release)
    assert (gill.family, gill.retrieval_token) == ("gill", "[IMG0]")
    info = gill.release_info
    assert info["decision_model"] == {"path": str(release / "decision_model.pth.tar"), "in_features": 64, "classes": 2}
    decision = gill.decision_model[1]
    assert torch.equal(decision.weight, ref.decision_model[1].weight)
    # The generation mapper is the only thing not used; GILL's reference leaves exactly those keys unexpected.
    assert info["ignored_checkpoint_keys"] == sorted(ref.load_report.unexpected_keys)
    assert all(k.startswith("model.gen_text_hidden_fcs.") for k in info["ignored_checkpoint_keys"])


def test_img_tokens_are_single_tokens_and_the_grown_matrix_last_rows(pair, release):
    gill, ref = pair
    tokenizer = gill.tokenizer if hasattr(type(gill), "tokenizer") else gill.model.tokenizer
    rows = gill.model.input_embeddings.num_embeddings
    on_disk = json.loads((release / "opt" / "config.json").read_text())["vocab_size"]
    assert rows == len(tokenizer) == on_disk - OPT_EXTRA_ROWS + 1 + NUM_TOKENS  # grown, as GILL's OPT-6.7B
    assert gill.model.img_token_ids == ref.img_token_ids == list(range(rows - NUM_TOKENS, rows))
    assert tokenizer("a dog[IMG0]", add_special_tokens=False).input_ids[-1] == ref.img_token_ids[0]
    assert torch.equal(gill.model.input_embeddings.weight[-NUM_TOKENS:], ref.model.input_embeddings.weight[-NUM_TOKENS:])


def _five_cap_four_img(photos):
    images = _pil(photos, "rgb_4x3.jpg", "grey_3x4.jpg", "cmyk_4x3.jpg", "rgba_16x9.png")
    captions = ["We went to the park.", "a dog sits near the river", "Q: what color is the dog?\nA: brown",
                "The old man walks.", " It was big and red! "]
    prompt = []
    for i, caption in enumerate(captions):
        prompt.append(caption)
        if i < len(images):
            prompt.append(images[i])
    return prompt


def test_img0_retrieval_embeddings_equal_the_reference(pair, photos):
    """Queries ending in [IMG0] alone (what the tasks append) equal GILL's with all eight [IMG] tokens appended:
    text only, and interleaved with non-square photos (5cap4img's layout), in one padded batch."""
    gill, ref = pair
    prompts = [["a dog sits on the park."], ["We went to the garden and saw a cat. "], _five_cap_four_img(photos),
               _pil(photos, "palette_panorama.png") + ["a small bird"]]
    ours = gill.retrieval_embeddings([p[:-1] + [p[-1] + "[IMG0]"] for p in prompts], batch_size=3)
    expected = torch.stack([ref.retrieval_embedding(p) for p in prompts])
    assert (ours - expected).abs().max() < TOLERANCE
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(prompts)), atol=1e-5)
    assert (expected[0] - expected[1]).abs().max() > 0.05  # the yardstick tells the queries apart


def test_appending_all_eight_img_tokens_changes_nothing(pair, photos):
    gill, _ = pair
    prompt = _five_cap_four_img(photos)
    one = gill.retrieval_embeddings([prompt[:-1] + [prompt[-1] + "[IMG0]"]])
    eight = gill.retrieval_embeddings([prompt[:-1] + [prompt[-1] + IMG_SUFFIX]])
    assert (one - eight).abs().max() < 1e-6


def test_image_embeddings_through_gills_visual_fc_equal_the_reference(pair, photos):
    gill, ref = pair
    names = sorted(photos)
    features = torch.cat([f for _, f, _ in gill.image_file_features([photos[n] for n in names], workers=0)])
    ours = gill.project_images(features, "retrieval")[:, 0]
    expected = ref.retrieval_image_embeddings(_pil(photos, *names))
    assert (ours - expected).abs().max() < TOLERANCE


def test_squashed_rgb_and_grey_jpegs_equal_gills_own_squash(pair, photos):
    """GILL's scripts squash after converting to RGB, FROMAGe's before: the same for RGB and greyscale files."""
    gill, ref = pair
    names = ["rgb_4x3.jpg", "grey_3x4.jpg"]
    features = torch.cat([f for _, f, _ in gill.image_file_features([photos[n] for n in names], workers=0,
                                                                   preprocess="squash")])
    expected = ref.retrieval_image_embeddings(_pil(photos, *names), squash=True)
    assert (gill.project_images(features, "retrieval")[:, 0] - expected).abs().max() < TOLERANCE


def test_context_images_become_n_visual_tokens_as_in_gill(pair, photos):
    gill, ref = pair
    images = _pil(photos, "rgb_4x3.jpg", "tiny_rgb.png")
    features = gill.image_features(images)
    ours = gill.project_images(features, "captioning")
    expected = ref.get_visual_embs(torch.stack([ref.pixel_values(im) for im in images]), "captioning")
    assert ours.shape == expected.shape == (2, 4, 64)
    assert (ours - expected).abs().max() < TOLERANCE


def test_log_likelihood_equals_gills_get_log_likelihood_scores(pair, photos):
    gill, ref = pair
    prompt = _pil(photos, "grey_3x4.jpg") + ["Q: what is it?\nA:", " a dog [IMG0] in the park"]
    assert abs(gill.get_log_lik_scores(prompt) - ref.get_log_likelihood_scores(prompt)) < TOLERANCE


def test_ddp_prefixed_checkpoint_without_decision_model_loads_the_same(tmp_path, pair):
    gill, _ = pair
    other = load_gill(write_tiny_gill_release_dir(tmp_path / "g", seed=3, decision_model=False, ddp_prefix=True),
                      device="cpu", precision="fp32")
    assert other.decision_model is None and other.release_info["decision_model"] is None
    prompt = [["a cat runs in the kitchen[IMG0]"]]
    assert torch.equal(other.retrieval_embeddings(prompt), gill.retrieval_embeddings(prompt))


def test_generation_is_refused_and_not_a_capability(pair):
    gill, _ = pair
    assert "generate" not in gill.capabilities
    assert {"image_retrieval", "interleaved_query", "score_continuations"} <= gill.capabilities
    with pytest.raises(NotImplementedError, match="Stable Diffusion"):
        gill.generate([["a dog"]], 4)
    with pytest.raises(NotImplementedError):
        gill.generate_for_images_and_texts(["a dog"], num_words=4)


def test_make_tiny_family_gill_writes_a_release_that_loads(tmp_path, capsys):
    assert main(["make-tiny", "--family", "gill", "--out", str(tmp_path / "g")]) == 0
    assert "GILL" in capsys.readouterr().out
    assert is_gill_release(tmp_path / "g") and (tmp_path / "g" / "decision_model.pth.tar").is_file()
    gill = load_gill(tmp_path / "g", device="cpu")
    assert isinstance(gill, Gill) and gill.model.args.n_visual_tokens == 4
    assert gill.retrieval_embeddings([["a red circle[IMG0]"]]).shape == (1, 32)
    assert main(["make-tiny", "--out", str(tmp_path / "f")]) == 0
    assert not is_gill_release(tmp_path / "f")  # FROMAGe's layout is not GILL's
    assert not is_gill_release(tmp_path / "missing")


def test_retrieval_set_built_through_gills_visual_fc_and_a_fromage_set_refused(tmp_path, pair, photos):
    gill, ref = pair
    images = images_under(next(iter(photos.values())).parent)
    build_retrieval_set(gill, images, tmp_path / "gill_set", workers=0, progress=False)
    built = RetrievalSet.load(tmp_path / "gill_set")
    expected = ref.retrieval_image_embeddings([open_image(f) for f in images.files])
    assert (built.embeddings - expected).abs().max() < TOLERANCE
    assert built.provenance["model_identity"] == gill.model_identity
    gill.set_retrieval_set(built)  # its own set loads

    fromage = load_fromage(write_tiny_release_dir(tmp_path / "f", seed=3), device="cpu", precision="fp32")
    build_retrieval_set(fromage, images, tmp_path / "fromage_set", workers=0, progress=False)
    foreign = RetrievalSet.load(tmp_path / "fromage_set")
    assert foreign.embeddings.shape[1] == built.embeddings.shape[1]  # same width: only provenance tells them apart
    with pytest.raises(FromageInputError, match="built by model"):
        gill.set_retrieval_set(foreign)


def test_model_identity_records_a_non_fromage_family(pair):
    gill, _ = pair
    model = gill.model
    parts = (model.args, "digest", model.visual_model.config, model.feature_extractor, False, 0)
    fromage_identity = model_identity(*parts)
    assert model_identity(*parts, family="fromage") == fromage_identity  # FROMAGe identities unchanged
    assert model_identity(*parts, family="gill") != fromage_identity


# -- bad releases: one clear error naming the file ---------------------------------------------------------------
def _copy(release: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(release, target)
    return target


def test_missing_checkpoint_is_named(release, tmp_path):
    broken = _copy(release, tmp_path)
    (broken / "pretrained_ckpt.pth.tar").unlink()
    with pytest.raises(FromageInputError, match="pretrained_ckpt.pth.tar.*missing.*GILL"):
        load_gill(broken, device="cpu")


def test_checkpoint_without_img_rows_is_named(release, tmp_path):
    broken = _copy(release, tmp_path)
    path = broken / "pretrained_ckpt.pth.tar"
    state = torch.load(path, weights_only=True)
    del state["state_dict"]["model.input_embeddings.weight"]
    torch.save(state, path)
    with pytest.raises(FromageInputError, match="model.input_embeddings.weight"):
        load_gill(broken, device="cpu")


def test_unsupported_retrieval_map_mode_is_named(release, tmp_path):
    broken = _copy(release, tmp_path)
    args = json.loads((broken / "model_args.json").read_text())
    args["ret_text_fc_mode"] = "gill_mapper"
    (broken / "model_args.json").write_text(json.dumps(args))
    with pytest.raises(FromageInputError, match="model_args.json.*ret_text_fc_mode"):
        load_gill(broken, device="cpu")


def test_foreign_decision_model_is_named(release, tmp_path):
    broken = _copy(release, tmp_path)
    torch.save({"state_dict": {"weight": torch.zeros(2, 64)}}, broken / "decision_model.pth.tar")
    with pytest.raises(FromageInputError, match="decision_model.pth.tar"):
        load_gill(broken, device="cpu")


def test_cli_builds_a_gill_set_and_refuses_a_fromage_set_for_gill(tmp_path, release, photos, capsys):
    """`build-retrieval-set` and `info` load a GILL directory as GILL (not as a FROMAGe release missing its keys)."""
    image_dir = str(next(iter(photos.values())).parent)
    assert main(["build-retrieval-set", "--model-dir", str(release), "--images", image_dir,
                 "--out", str(tmp_path / "gill_set"), "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", "--model-dir", str(release), "--device", "cpu", "--retrieval-set", str(tmp_path / "gill_set")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["retrieval_set_size"] == len(photos) and info["trained_parameters"] > 0
    assert info["release"]["decision_model"]["in_features"] == 64
    fromage_dir = write_tiny_release_dir(tmp_path / "f", seed=3)
    assert main(["build-retrieval-set", "--model-dir", str(fromage_dir), "--images", image_dir,
                 "--out", str(tmp_path / "fromage_set"), "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", "--model-dir", str(release), "--device", "cpu",
                 "--retrieval-set", str(tmp_path / "fromage_set")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "retrieval_paths.json" in err[0] and "built by model" in err[0]


def test_cli_generate_refuses_gill_in_one_line(release, capsys):
    assert main(["generate", "--model-dir", str(release), "--device", "cpu", "--text", "a dog"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(release) in err[0] and "cannot generate" in err[0]


@pytest.mark.parametrize("keys", [{"num_tokens": 8}, {"gen_token_idx": [5, 6]}, {"shared_emb_dim": 256}, None])
def test_is_gill_release_agrees_with_family_detection(tmp_path, keys):
    from model.loading import detect_family

    if keys is None:
        (tmp_path / "model_args.json").write_text("{not json")
        assert not is_gill_release(tmp_path)
        return
    (tmp_path / "model_args.json").write_text(json.dumps({"opt_version": "opt", **keys}))
    assert is_gill_release(tmp_path) == (detect_family(tmp_path) == "gill")


# -- GILL rows through `fromage-bench eval` ------------------------------------------------------------------------
GILL_PAPER_5CAP4IMG = {"R@1": 20.3, "R@5": 45.0, "R@10": 53.7}  # GILL's paper, VIST 5cap4img (issue 17)


@pytest.fixture(scope="module")
def gill_eval(tmp_path_factory, release):
    from fromage_bench.synth.visdial import write_visdial
    from fromage_bench.synth.vist import write_vist

    root = tmp_path_factory.mktemp("gill-data")
    vist = write_vist(root, n=4, seed=2, png=1)
    write_visdial(root, n=3, seed=0, n_rounds=2)
    out = root / "out"
    tasks = "vist_retrieval:1cap,vist_retrieval:5cap,vist_retrieval:5cap4img,visdial_retrieval,visdial_ranking"
    assert main(["eval", "--model-dir", str(release), "--data-root", str(root), "--tasks", tasks, "--out", str(out),
                 "--no-progress", "--no-cache", "--precision", "fp32", "--device", "cpu"]) == 0
    return json.loads((out / "results.json").read_text()), out, vist


def test_eval_gives_gill_rows_with_gills_paper_numbers(gill_eval, release):
    results, _, _ = gill_eval
    assert results["model"] == {"family": "gill", "label": "gill", "source": str(release),
                                "source_state": source_state(release)}
    cells = {(r["task"], r["setting"], r["protocol"]): r for r in results["records"]}
    expected = {(t, s, p) for t, s in [("vist_retrieval", "1cap"), ("vist_retrieval", "5cap"),
                                       ("vist_retrieval", "5cap4img"), ("visdial_retrieval", "val"),
                                       ("visdial_ranking", "val")] for p in ("paper", "corrected")}
    assert set(cells) == expected
    assert all(r["status"] == "ok" and r["metrics"] for r in cells.values())
    for cell, record in cells.items():
        assert record["paper"] == (GILL_PAPER_5CAP4IMG if cell == ("vist_retrieval", "5cap4img", "paper") else None)
    for protocol in ("paper", "corrected"):
        assert "not in GILL's paper" in cells[("visdial_ranking", "val", protocol)]["extra"]["paper_note"]


def test_gill_vist_ranks_are_the_reference_ranks(gill_eval, pair):
    """The corrected 5cap4img cell's ranks, recomputed with the independent GILL re-implementation: query = the
    five captions interleaved with the four context photos (BOS once) + all eight [IMG] tokens, pool = every story
    photo through visual_fc (centre crop), cosine; the story's own context photos are not candidates (the task
    masks them, as FROMAGe's VIST script does)."""
    _, out, vist = gill_eval
    _, ref = pair

    def photo(pid):
        return open_image(next(vist["image_dir"].glob(f"{pid}.*")))

    pool = list(vist["pool"])
    pool_embs = torch.nn.functional.normalize(ref.retrieval_image_embeddings([photo(p) for p in pool]), dim=1)
    lines = (out / "predictions" / "vist_retrieval-5cap4img-corrected-fp32.jsonl").read_text().splitlines()
    assert lines
    for line in lines:
        pred = json.loads(line)
        prompt = []
        for i, caption in enumerate(pred["captions"]):
            prompt.append(caption)
            if i < len(pred["context"]):
                prompt.append(photo(pred["context"][i]))
        scores = pool_embs @ ref.retrieval_embedding(prompt)
        target = scores[pool.index(pred["target"])]
        candidates = torch.tensor([p not in pred["context"] for p in pool])
        assert pred["rank"] == 1 + int((scores[candidates] > target).sum())

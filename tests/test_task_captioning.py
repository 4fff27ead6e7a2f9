"""captioning: metric wiring against pycocoevalcap called directly and torchmetrics (the Java steps run a
few times per module, METEOR's JVM once), generation choices, and end-to-end runs on synthetic files."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from fromage_bench.synth.captions import write_cc3m, write_coco_karpathy
from model import FromageInputError
from tasks import captioning
from tasks.base import REGISTRY, RunContext
from tasks.captioning import (TASK, caption_metrics, caption_prefix, clean_caption, meteor_scorer, prompt_prefix_ids,
                              run, score_tokenized, shortest_first, torchmetrics_bleu)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer and METEOR need Java")
BLEU_TOLERANCE = 0.02  # points: pycocoevalcap's 1e-15 numerator floor, (1e-15)^(1/4) * 100 ~ 0.018 (see captioning.py)

CANDIDATES = {"1": "A red circle on a white background.", "2": "two blue squares next to a tree",
              "3": "a dog runs on the green grass", "4": "Yellow STRIPES, on a black wall!"}
MULTI_REFS = {"1": ["a red circle on white", "There is a red ball in the picture.", "red circle, white backdrop"],
              "2": ["Two blue squares beside a big tree.", "blue boxes and a tree", "two squares near a tree"],
              "3": ["A dog running on grass.", "the dog runs across a green lawn", "a brown dog on the grass"],
              "4": ["yellow stripes on a black wall", "stripes of yellow paint", "a black wall with yellow lines"]}
SINGLE_REFS = {k: v[:1] for k, v in MULTI_REFS.items()}


@pytest.fixture(scope="module")
def metric_runs():
    """All Java work of the metric tests, once: our function on both reference sets, and pycocoevalcap's
    tokenizer called directly on the same inputs."""
    ours = {name: caption_metrics(CANDIDATES, refs) for name, refs in (("multi", MULTI_REFS), ("single", SINGLE_REFS))}
    tok = PTBTokenizer()
    direct_refs = tok.tokenize({k: [{"caption": c} for c in v] for k, v in MULTI_REFS.items()})
    direct_cands = tok.tokenize({k: [{"caption": c}] for k, c in CANDIDATES.items()})
    return ours, direct_refs, direct_cands


@needs_java
def test_metrics_equal_pycocoevalcap_called_directly(metric_runs):
    ours, gts, res = metric_runs
    metrics, per_key, extra = ours["multi"]
    assert set(metrics) == set(TASK.metrics)
    assert extra["tokenized_candidates"] == {k: v[0] for k, v in res.items()}
    assert res["4"] == ["yellow stripes on a black wall"]  # lower-cased, punctuation dropped
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor, meteor_each = meteor_scorer().compute_score(gts, res)  # pycocoevalcap's own Meteor object
    rouge, _ = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    for n in range(4):
        assert metrics[f"BLEU-{n + 1}"] == pytest.approx(100 * bleu[n], abs=1e-9)
    assert metrics["METEOR"] == pytest.approx(100 * meteor, abs=1e-9)
    assert metrics["ROUGE-L"] == pytest.approx(100 * rouge, abs=1e-9)
    assert metrics["CIDEr"] == pytest.approx(100 * cider, abs=1e-9)
    assert per_key["3"]["CIDEr"] == pytest.approx(100 * cider_each[2]) and per_key["1"]["METEOR"] == pytest.approx(100 * meteor_each[0])
    assert 0 < metrics["BLEU-4"] < metrics["BLEU-1"] < 100 and metrics["CIDEr"] > 0


@needs_java
def test_torchmetrics_bleu_agrees_with_pycocoevalcap(metric_runs):
    ours, gts, res = metric_runs
    for name in ("single", "multi"):
        metrics, _, extra = ours[name]
        assert extra["torchmetrics_bleu4"] == extra["torchmetrics_bleu"]["BLEU-4"]
        for n in (1, 2, 3, 4):
            assert abs(extra["torchmetrics_bleu"][f"BLEU-{n}"] - metrics[f"BLEU-{n}"]) <= BLEU_TOLERANCE, (name, n)
    # the one real difference on multi-reference data is the tie-break of the "closest" reference length:
    # a candidate of 6 tokens between references of 5 and 7 tokens
    cands = ["a b c d e f", "x y z w v u"]
    refs = [["a b c d e f g", "a b c d e"], ["x y z w v u t", "x y z w v"]]
    py, _ = Bleu(4).compute_score({"0": refs[0], "1": refs[1]}, {"0": cands[:1], "1": cands[1:]}, verbose=0)
    assert 100 * py[3] == pytest.approx(100.0)  # pycocoevalcap takes the shorter (5): no brevity penalty
    assert torchmetrics_bleu(cands, refs)[4] == pytest.approx(100 * torch.exp(torch.tensor(1 - 14 / 12)).item(), abs=1e-4)
    assert torchmetrics_bleu(cands, [shortest_first(r) for r in refs])[4] == pytest.approx(100.0, abs=1e-4)


@needs_java
def test_hand_checkable_scores():
    # candidate identical to its single reference: every BLEU and ROUGE-L is 100 (already tokenised text)
    same = {"0": "a red circle on a white background", "1": "two blue squares near a tree"}
    metrics, per_key = score_tokenized(same, {k: [v] for k, v in same.items()})
    for n in (1, 2, 3, 4):
        assert metrics[f"BLEU-{n}"] == pytest.approx(100.0, abs=1e-6)
    assert metrics["ROUGE-L"] == pytest.approx(100.0)
    assert torchmetrics_bleu(list(same.values()), [[v] for v in same.values()])[1] == pytest.approx(100.0)
    # half the unigrams right, same length as the reference: BLEU-1 = 50
    metrics, _ = score_tokenized({"0": "a red dog runs"}, {"0": ["a red cat sits"]})
    assert metrics["BLEU-1"] == pytest.approx(50.0, abs=1e-6)


def test_clean_caption_and_prompt_choices(tiny):
    assert clean_caption(" a dog on a beach. It is sunny") == "a dog on a beach."
    assert clean_caption(" a dog on a beach ") == "a dog on a beach"
    assert clean_caption("") == ""
    assert caption_prefix(SimpleNamespace(extra={"input_prompt": "A picture of"})) == "A picture of"
    assert caption_prefix(SimpleNamespace(extra={})) is None
    tok = tiny.model.tokenizer
    ids = prompt_prefix_ids(tok, "A picture of")
    assert ids.dtype == torch.long and tok.bos_token_id not in ids.tolist() and tok.decode(ids) == "A picture of"
    assert prompt_prefix_ids(tok, None) is None


def test_registered_with_both_settings():
    assert REGISTRY["captioning"] is TASK
    assert TASK.settings == ("cc3m", "coco") and TASK.default_setting == "cc3m" and TASK.protocols == ("standard",)
    assert TASK.metrics == ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


# -- end to end ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    cc3m = write_cc3m(root, n=5, seed=5, missing=1, corrupt=1, png=1)
    coco = write_coco_karpathy(root, n=3, seed=6, corrupt=1, png=1)
    return root, cc3m, coco


def _check_bleu_cross_check(result):
    if max(len(p["tokenized"].split()) for p in result.predictions) >= 4:
        assert abs(result.extra["torchmetrics_bleu4"] - result.metrics["BLEU-4"]) <= BLEU_TOLERANCE


@needs_java
def test_cc3m_end_to_end_matches_one_image_generation(tiny, data):
    root, cc3m, _ = data
    (result,) = run(RunContext(model=tiny, data_root=root, progress=False, batch_size=8), "cc3m", ("standard",))
    assert result.protocol == "standard" and result.paper is None
    assert result.n_examples == 3 and result.skipped.counts == {"missing image": 1, "corrupt image": 1}
    assert set(result.metrics) == set(TASK.metrics)
    assert all(m >= 0 for m in result.metrics.values())
    _check_bleu_cross_check(result)
    kept = [name for name in cc3m["ids"] if name not in cc3m["missing"] + cc3m["corrupt"]]
    assert [p["image_id"] for p in result.predictions] == kept
    refs = dict(zip(cc3m["ids"], cc3m["captions"]))
    assert all(p["references"] == [refs[p["image_id"]]] for p in result.predictions)
    # the batched path against the one-image original API (greedy, [RET] forbidden, stop at newline)
    from PIL import Image
    for p in result.predictions[:1]:
        image = Image.open(cc3m["files"][p["image_id"]]).convert("RGB")
        alone = tiny.generate_for_images_and_texts([image], num_words=32, min_word_tokens=32)
        assert p["caption"] == alone[0].strip()
    json.dumps(result.predictions)


@needs_java
def test_coco_end_to_end_with_prompt_prefix(tiny, data, monkeypatch):
    root, _, coco = data
    monkeypatch.setitem(tiny.model.args.extra, "input_prompt", "A picture of")
    (result,) = run(RunContext(model=tiny, data_root=root, progress=False, batch_size=8, limit=2), "coco", ("standard",))
    faulty = set(coco["corrupt"]) & set(coco["ids"][:2])
    assert result.n_examples == 2 - len(faulty) and result.skipped.total == len(faulty)
    assert result.extra["prompt_prefix"] == "A picture of" and result.extra["n_references"] == 5 * result.n_examples
    assert all(len(p["references"]) == 5 for p in result.predictions)
    _check_bleu_cross_check(result)
    from PIL import Image
    p = result.predictions[0]
    image = Image.open(coco["files"][p["image_id"]]).convert("RGB")
    prefix = prompt_prefix_ids(tiny.model.tokenizer, "A picture of")
    alone = tiny.generate_for_images_and_texts([image, prefix], num_words=32, min_word_tokens=32)
    assert p["caption"] == alone[0].strip()


def test_missing_java_is_a_clear_error_before_model_work(data, monkeypatch):
    root, _, _ = data
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    with pytest.raises(FromageInputError, match="METEOR"):
        run(RunContext(model=None, data_root=root, progress=False), "cc3m", ("standard",))


@needs_java
def test_bad_tsv_is_an_input_error(tiny, tmp_path):
    write_cc3m(tmp_path, n=2)
    (tmp_path / "cc3m" / "cc3m_val.tsv").write_text("caption\timage\nno tab here\n")
    with pytest.raises(FromageInputError, match="cc3m_val.tsv, line 2"):
        run(RunContext(model=tiny, data_root=tmp_path, progress=False), "cc3m", ("standard",))

"""visdial_retrieval and visdial_ranking: data loading and validation, the original's query texts, both
protocols end to end (tiny model and controlled fake models), and each quirk of the `paper` protocol."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fromage_bench.synth.visdial import write_visdial
from model.errors import FromageInputError
from model.scoring import ContinuationScores
from tasks import visdial as vd
from tasks.base import RunContext
from model.images import try_load
from tasks.metrics import ranks_from_scores, visdial_ndcg


# -- helpers --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """5 dialogues: #1 has no image file, #2 a truncated JPEG, #3 a .png instead of the .jpg."""
    root = tmp_path_factory.mktemp("visdial")
    return root, write_visdial(root, n=5, seed=0, missing=[1], corrupt=[2], png=[3])


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """4 dialogues of 3 rounds (keeps the tiny model's ranking runs quick): #1 missing, #2 corrupt, #3 .png."""
    root = tmp_path_factory.mktemp("visdial_short")
    return root, write_visdial(root, n=4, seed=1, n_rounds=3, missing=[1], corrupt=[2], png=[3])


class FakeModel:
    """Just the model API the tasks use, with controlled outputs.

    Images get features 0, 1, 2, ... in the order they are decoded (= dialogue order of the readable ones), the
    same for each preprocessing asked for (recorded in `preprocessings`);
    `image_table[k]` is the retrieval embedding of image k; `text_table[k]` the [RET] embedding of the k-th
    query. An option's summed log-prob is minus its length in characters, its token count its word count."""

    def __init__(self, image_table=None, text_table=None):
        self.image_table, self.text_table = image_table, text_table
        self.preprocessings: list[str] = []
        self.queries: list = []
        self.calls: list[dict] = []

    def image_file_features(self, paths, batch_size=32, workers=None, preprocess="crop"):
        self.preprocessings.append(preprocess)
        readable = [pos for pos, path in enumerate(paths) if try_load(path)[0] is not None]
        failed = {pos: try_load(path)[1] for pos, path in enumerate(paths) if pos not in readable}
        yield readable, torch.arange(len(readable), dtype=torch.float32)[:, None], failed

    def project_images(self, features, mode="captioning"):
        idx = features[:, 0].long()
        if mode == "retrieval":
            return self.image_table[idx][:, None]
        return idx.float()[:, None, None].expand(-1, 2, 8).clone()  # (N, n_visual_tokens=2, D=8)

    def retrieval_embeddings(self, prompts, batch_size=16):
        start = len(self.queries)
        self.queries += prompts
        return self.text_table[start:start + len(prompts)]

    def encode_context(self, context, previous=None):
        return {"prompt": context, "previous": previous}

    def score_continuations(self, context, continuations, *, continuation_bos=False, shift=True, batch_size=None,
                            original_rounding=False):
        self.calls.append(dict(context=context, options=list(continuations), continuation_bos=continuation_bos,
                               shift=shift, batch_size=batch_size, original_rounding=original_rounding))
        sums = torch.tensor([-float(len(c)) for c in continuations])
        counts = torch.tensor([max(1, len(c.split())) for c in continuations])
        return ContinuationScores(sums, counts)


def dialogue(n_rounds=2, options=None, gt=0, index=0):
    options = options or tuple(f"option {j}" for j in range(vd.N_OPTIONS))
    rounds = tuple(vd.Round(f"question {r}", f"answer {r}", options, gt) for r in range(n_rounds))
    return vd.Dialogue(index, 1000 + index, "a caption", rounds)


def annotation(dialogue_index, round_id, relevance):
    rel = tuple(relevance) + (0.0,) * (vd.N_OPTIONS - len(relevance))
    return vd.DenseAnnotation(dialogue_index, 1000 + dialogue_index, round_id, rel)


# -- synthetic data -------------------------------------------------------------------------------------
def test_synth_is_deterministic_and_in_the_default_layout(tmp_path):
    a = write_visdial(tmp_path / "a", n=3, seed=4)
    b = write_visdial(tmp_path / "b", n=3, seed=4)
    c = write_visdial(tmp_path / "c", n=3, seed=5)
    assert a["dialogs"].read_bytes() == b["dialogs"].read_bytes()
    assert a["dense"].read_bytes() == b["dense"].read_bytes()
    assert a["dialogs"].read_bytes() != c["dialogs"].read_bytes()
    for task in vd.TASKS:
        task.check_files(tmp_path / "a")
    dialogues = vd.load_dialogues(a["dialogs"])
    assert [d.image_id for d in dialogues] == a["image_ids"]
    assert all(len(d.rounds) == 10 and len(set(r.options)) == 100 and r.options[r.gt_index] == r.answer
               for d in dialogues for r in d.rounds)
    dense = vd.load_dense(a["dense"], dialogues)
    assert [x.round_id for x in dense] == a["round_ids"]
    assert all(x.relevance[d.rounds[x.round_id - 1].gt_index] == 1.0 for x, d in zip(dense, dialogues))
    assert len({p.read_bytes() for p in a["image_paths"]}) == 3  # the pictures differ


# -- the original's texts -------------------------------------------------------------------------------
def test_query_and_context_texts_are_the_originals():
    d = vd.Dialogue(0, 7, "two cats on a sofa", (vd.Round("is it sunny", "yes", ("yes",) * 100, 0),
                                                vd.Round("how many cats", "2", ("2",) * 100, 0),
                                                vd.Round("are they asleep", "no", ("no",) * 100, 0)))
    assert vd.retrieval_text(d) == "Q: is it sunny? A: yes. Q: how many cats? A: 2. Q: are they asleep? A: no.[RET]"
    assert vd.ranking_context_text(d, 0) == "Q: is it sunny?\nA: "
    assert vd.ranking_context_text(d, 2) == "Q: is it sunny?\nA: yes\nQ: how many cats?\nA: 2\nQ: are they asleep?\nA: "


# -- end to end with the tiny model ---------------------------------------------------------------------
def test_retrieval_end_to_end_tiny(tiny, synth):
    root, info = synth
    ctx = RunContext(model=tiny, data_root=root, progress=False, batch_size=2)
    results = vd.RETRIEVAL.run(ctx, "val", ("paper", "corrected"))
    assert [r.protocol for r in results] == ["paper", "corrected"]
    kept = [info["image_ids"][i] for i in (0, 3, 4)]  # the .png of #3 is used
    for r in results:
        assert r.n_examples == 3 and r.skipped.counts == {"missing image": 1, "corrupt image": 1}
        assert [p["image_id"] for p in r.predictions] == kept
        assert all(sorted(p["top5"]) == sorted(kept) and 1 <= p["rank"] <= 3 for p in r.predictions)
        assert set(r.metrics) == set(vd.RETRIEVAL.metrics)
        assert r.paper == ({"R@1": 20.8, "R@5": 44.9, "R@10": 56.0} if r.protocol == "paper" else None)
        assert r.extra["paper_baselines"]["CLIP ViT-L/14"] == {"R@1": 17.7, "R@5": 38.9, "R@10": 50.2}
        assert r.metrics["R@5"] == 100.0
        json.dumps(r.predictions)
    assert results[0].extra["direction"] == "image->text" and results[1].extra["direction"] == "text->image"


def test_retrieval_limit_takes_the_first_dialogues(tiny, synth):
    root, info = synth
    ctx = RunContext(model=tiny, data_root=root, progress=False, limit=3)
    (result,) = vd.RETRIEVAL.run(ctx, "val", ("corrected",))
    assert result.n_examples == 1 and result.skipped.total == 2
    assert result.metrics["R@1"] == 100.0


def test_ranking_end_to_end_tiny(tiny, short):
    root, info = short
    ctx = RunContext(model=tiny, data_root=root, progress=False, batch_size=50)
    results = vd.RANKING.run(ctx, "val", ("paper", "corrected"))
    assert [r.protocol for r in results] == ["paper", "corrected"]
    for r in results:
        assert r.n_examples == 6 and r.skipped.counts == {"missing image": 1, "corrupt image": 1}
        assert r.extra["dialogues"] == 2
        assert {p["image_id"] for p in r.predictions} == {info["image_ids"][0], info["image_ids"][3]}
        assert len(r.predictions) == 6
        assert [(p["image_id"], p["round_id"]) for p in r.predictions[:2]] == [(info["image_ids"][0], 1),
                                                                                (info["image_ids"][0], 2)]
        assert all(len(p["top5"]) == 5 and 1 <= p["rank"] <= 100 for p in r.predictions)
        assert set(r.metrics) == set(vd.RANKING.metrics)
        assert all(0 <= r.metrics[k] <= 100 for k in ("MRR", "R@1", "R@5", "R@10", "R@20"))
        assert (r.paper or {}).get("NDCG") == (16.594 if r.protocol == "paper" else None)
        json.dumps(r.predictions)
    # the two protocols score differently (own BOS + unshifted sum vs shifted mean)
    assert [p["top5"] for p in results[0].predictions] != [p["top5"] for p in results[1].predictions]

    # and each is the model's scoring of that round's context: the original's for paper; for corrected the
    # context ends at "A:" and each option is scored with a leading space
    d = vd.load_dialogues(info["dialogs"])[0]
    visual = tiny.encode_images([try_load(info["image_paths"][0])[0]], "captioning")[0]
    r = 2
    paper_context = [visual, "\n".join(f"Q: {x.question}?\nA: {x.answer}" for x in d.rounds[:r])
                     + f"\nQ: {d.rounds[r].question}?\nA: "]
    corrected_context = [visual, paper_context[1][:-1]]
    assert corrected_context[1].endswith("?\nA:")
    direct = {"paper": tiny.score_continuations(paper_context, d.rounds[r].options, continuation_bos=True,
                                                shift=False).sum_logprob,
              "corrected": tiny.score_continuations(corrected_context, [" " + o for o in d.rounds[r].options],
                                                    continuation_bos=False, shift=True).mean_logprob}
    for result in results:
        scores = direct[result.protocol]
        assert result.predictions[r]["top5"] == torch.sort(scores, descending=True, stable=True).indices[:5].tolist()
        assert result.predictions[r]["rank"] == int(ranks_from_scores(scores[None], [d.rounds[r].gt_index])[0])


# -- input validation -----------------------------------------------------------------------------------
def _set(path, value):
    def mutate(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


ROUND = ["data", "dialogs", 1, "dialog", 3]
DIALOG_FAULTS = {
    "99 answer options": (lambda doc: doc["data"]["dialogs"][1]["dialog"][3]["answer_options"].pop(), "99 answer options"),
    "gt_index 100": (_set(ROUND + ["gt_index"], 100), "gt_index 100"),
    "gt_index -1": (_set(ROUND + ["gt_index"], -1), "gt_index -1"),
    "question index": (_set(ROUND + ["question"], 10 ** 6), "question index"),
    "answer index": (_set(ROUND + ["answer"], -3), "answer index"),
    "option index": (_set(ROUND + ["answer_options", 7], 10 ** 6), "answer option index"),
    "no data": (lambda doc: doc.pop("data"), "not a VisDial file"),
    "image_id string": (_set(["data", "dialogs", 0, "image_id"], "abc"), "image_id"),
}


@pytest.mark.parametrize("fault", sorted(DIALOG_FAULTS))
def test_bad_dialogue_file_names_the_file(tmp_path, fault):
    info = write_visdial(tmp_path, n=2)
    doc = json.loads(info["dialogs"].read_text())
    mutate, message = DIALOG_FAULTS[fault]
    mutate(doc)
    info["dialogs"].write_text(json.dumps(doc))
    with pytest.raises(FromageInputError, match=message) as err:
        vd.load_dialogues(info["dialogs"])
    assert "visdial_1.0_val.json" in str(err.value)


DENSE_FAULTS = {
    "image_id mismatch": (_set([1, "image_id"], 1), "not aligned"),
    "round_id 0": (_set([0, "round_id"], 0), "round_id 0 outside 1..10"),
    "round_id 11": (_set([1, "round_id"], 11), "round_id 11 outside 1..10"),
    "one missing": (lambda doc: doc.pop(), "1 dense annotations for 2 dialogues"),
    "short relevance": (lambda doc: doc[0]["gt_relevance"].pop(), "gt_relevance"),
    "entry not an object": (lambda doc: doc.__setitem__(0, "x"), "expected an object"),
}


@pytest.mark.parametrize("fault", sorted(DENSE_FAULTS))
def test_bad_dense_file_names_the_file(tmp_path, fault):
    info = write_visdial(tmp_path, n=2)
    doc = json.loads(info["dense"].read_text())
    mutate, message = DENSE_FAULTS[fault]
    mutate(doc)
    info["dense"].write_text(json.dumps(doc))
    with pytest.raises(FromageInputError, match=message) as err:
        vd.load_dense(info["dense"], vd.load_dialogues(info["dialogs"]))
    assert "visdial_1.0_val_dense_annotations.json" in str(err.value)


@pytest.mark.parametrize("role", ["dialogs", "dense"])
def test_malformed_json_fails_before_any_model_work(tmp_path, role):
    info = write_visdial(tmp_path, n=2)
    info[role].write_text(info[role].read_text()[:-40])
    ctx = RunContext(model=object(), data_root=tmp_path, progress=False)  # any model call would fail
    with pytest.raises(FromageInputError, match="malformed JSON") as err:
        vd.RANKING.run(ctx, "val", ("paper", "corrected"))
    assert info[role].name in str(err.value)


def test_missing_files_and_image_dir(tmp_path):
    info = write_visdial(tmp_path, n=2)
    ctx = RunContext(model=FakeModel(), data_root=tmp_path, progress=False)
    for p in info["image_paths"]:
        p.unlink()
    info["images"].rmdir()
    with pytest.raises(FromageInputError, match="VisualDialog_val2018"):
        vd.RETRIEVAL.run(ctx, "val", ("paper",))
    info["dense"].unlink()
    with pytest.raises(FromageInputError, match="dense_annotations.json: missing"):
        vd.RANKING.run(ctx, "val", ("paper",))


def test_no_readable_image_is_an_error(tmp_path):
    write_visdial(tmp_path, n=2, missing=[0, 1])
    ctx = RunContext(model=FakeModel(), data_root=tmp_path, progress=False)
    with pytest.raises(FromageInputError, match="none of the 2"):
        vd.RETRIEVAL.run(ctx, "val", ("paper",))


# -- quirk 1 (retrieval): the original ranks dialogues per image ----------------------------------------
# Rows: images, columns: dialogues; the target of image i is dialogue i.
HAND_SCORES = torch.tensor([[0.90, 0.80, 0.00],
                            [0.95, 0.70, 0.00],
                            [0.00, 0.00, 0.50]])


def test_retrieval_direction_quirk_on_a_hand_made_matrix():
    texts = torch.eye(3)  # unit [RET] embeddings: image x text = the image embeddings themselves
    paper = vd.retrieval_scores(HAND_SCORES, texts, "paper")
    corrected = vd.retrieval_scores(HAND_SCORES, texts, "corrected")
    assert torch.equal(paper, HAND_SCORES)  # raw image embeddings, rows = images
    assert torch.allclose(corrected, torch.nn.functional.normalize(HAND_SCORES, dim=1).T)  # rows = dialogues
    # image->text: image 0 -> dialogue 0 (1st), image 1 -> dialogue 0 before 1 (2nd), image 2 (1st)
    assert ranks_from_scores(paper, torch.arange(3)).tolist() == [1, 2, 1]
    # text->image: dialogue 0 -> image 1 first (2nd), dialogue 1 -> image 0 first (2nd), dialogue 2 (1st)
    assert ranks_from_scores(corrected, torch.arange(3)).tolist() == [2, 2, 1]


def test_retrieval_protocols_end_to_end_with_controlled_embeddings(synth):
    root, info = synth  # readable dialogues: #0, #3, #4
    model = FakeModel(image_table=HAND_SCORES * 7.0, text_table=torch.eye(3))  # scale: raw vs normalised
    ctx = RunContext(model=model, data_root=root, progress=False, batch_size=2)
    paper, corrected = vd.RETRIEVAL.run(ctx, "val", ("paper", "corrected"))
    assert model.queries == [[vd.retrieval_text(d)] for d in
                             [vd.load_dialogues(info["dialogs"])[i] for i in (0, 3, 4)]]
    assert paper.metrics["R@1"] == pytest.approx(200 / 3)
    assert paper.metrics["MRR"] == pytest.approx(100 * (1 + 0.5 + 1) / 3)
    assert corrected.metrics["R@1"] == pytest.approx(100 / 3)
    assert corrected.metrics["MRR"] == pytest.approx(100 * (0.5 + 0.5 + 1) / 3)
    assert corrected.metrics["mean_rank"] == pytest.approx(5 / 3)
    ids = [info["image_ids"][i] for i in (0, 3, 4)]
    assert paper.predictions[1]["top5"] == [ids[0], ids[1], ids[2]]      # dialogues ranked for image 1
    assert corrected.predictions[0]["top5"] == [ids[1], ids[0], ids[2]]  # images ranked for dialogue 0


# -- quirk 2 (ranking): own BOS, unshifted logits, summed vs mean log-prob ------------------------------
def test_option_scores_sum_vs_mean():
    scores = ContinuationScores(torch.tensor([-6.0, -3.0, -10.0]), torch.tensor([6, 1, 2]))
    assert vd.option_scores(scores, "paper").tolist() == [-6.0, -3.0, -10.0]
    assert vd.option_scores(scores, "corrected").tolist() == [-1.0, -3.0, -5.0]
    # the long ground truth (option 0) loses under the summed score and wins under the mean
    assert ranks_from_scores(vd.option_scores(scores, "paper")[None], [0]).tolist() == [2]
    assert ranks_from_scores(vd.option_scores(scores, "corrected")[None], [0]).tolist() == [1]
    assert (vd.SCORING["paper"].continuation_bos, vd.SCORING["paper"].shift) == (True, False)
    assert (vd.SCORING["corrected"].continuation_bos, vd.SCORING["corrected"].shift) == (False, True)


def test_ranking_arguments_and_scores_through_run(synth):
    """With a fake model (sum = -characters, tokens = words) the task's ranks follow each protocol's rule."""
    root, info = synth
    model = FakeModel()
    ctx = RunContext(model=model, data_root=root, progress=False, limit=1, batch_size=32, option_batch_size=7)
    paper, corrected = vd.RANKING.run(ctx, "val", ("paper", "corrected"))
    d = vd.load_dialogues(info["dialogs"])[0]
    # one call per round and protocol, `option_batch_size` options per pass. Each protocol's context (its own
    # image preprocessing: paper squashes, corrected crops) continues from its own previous round's context.
    assert len(model.calls) == 20
    assert model.preprocessings == ["squash", "crop"]
    for r in range(10):
        paper_call, corrected_call = model.calls[2 * r], model.calls[2 * r + 1]
        assert [(c["continuation_bos"], c["shift"], c["batch_size"], c["original_rounding"])
                for c in (paper_call, corrected_call)] == [(True, False, 7, True), (False, True, 7, False)]
        for k, call in enumerate((paper_call, corrected_call)):
            assert call["context"]["previous"] is (model.calls[2 * r - 2 + k]["context"] if r else None)
            visual, _ = call["context"]["prompt"]
            assert visual.shape == (2, 8) and visual.dtype == torch.float32
        paper_text, corrected_text = paper_call["context"]["prompt"][1], corrected_call["context"]["prompt"][1]
        assert paper_text == vd.ranking_context_text(d, r) and paper_text.endswith("?\nA: ")
        assert corrected_text == paper_text[:-1]
        assert paper_call["options"] == list(d.rounds[r].options)
        assert corrected_call["options"] == [" " + o for o in d.rounds[r].options]
    for r, rnd in enumerate(d.rounds):
        by_sum = torch.tensor([-float(len(o)) for o in rnd.options])
        by_mean = torch.tensor([-(len(o) + 1) / max(1, len(o.split())) for o in rnd.options])
        # paper: the original's ranking, the position in `topk(100)` of the float32 scores (its tie order)
        assert paper.predictions[r]["rank"] == by_sum.topk(100).indices.tolist().index(rnd.gt_index) + 1
        # corrected: ties by lower index
        s = by_mean
        expected = 1 + sum(1 for j, v in enumerate(s.tolist())
                           if v > s[rnd.gt_index] or (v == s[rnd.gt_index] and j < rnd.gt_index))
        assert corrected.predictions[r]["rank"] == expected
    assert [p["rank"] for p in paper.predictions] != [p["rank"] for p in corrected.predictions]


def test_empty_option_without_bos_ranks_last():
    model = FakeModel()
    options = ["yes", "", "no"] + ["x"] * 97
    paper = vd.score_options(model, ["ctx"], options, "paper", 100)
    corrected = vd.score_options(model, ["ctx"], options, "corrected", 100)
    assert model.calls[0]["options"] == options and " " not in model.calls[1]["options"]
    assert paper[1] == 0.0 and corrected[1] == -math.inf and corrected[0] == -4.0  # " yes": 4 characters, 1 word


# -- quirk 3 (ranking): dense annotations at flat round i*10 + round_id ---------------------------------
def test_dense_round_index_quirk():
    counts = [10, 10, 10]
    notes = [annotation(0, 3, [1.0]), annotation(1, 10, [1.0]), annotation(2, 10, [1.0])]
    assert vd.dense_rounds(notes, counts, "paper") == [(0, 3), (2, 0), None]  # one late; spill; past the end
    assert vd.dense_rounds(notes, counts, "corrected") == [(0, 2), (1, 9), (2, 9)]
    # with --limit 2 the original's loop stops before the second annotation's target
    assert vd.dense_rounds(notes[:2], counts[:2], "paper") == [(0, 3), None]


def test_dense_index_changes_ndcg_hand_computed():
    # one dialogue of 10 rounds; the annotation is for round_id 3 (round index 2): option 0 relevance 1, option 1 0.5
    note = annotation(0, 3, [1.0, 0.5])
    scores = {(0, r): torch.zeros(100) for r in range(10)}
    scores[(0, 2)] = torch.linspace(1.0, 0.0, 100)  # options 0, 1, 2, ... : the ideal order
    s = torch.linspace(1.0, 0.0, 100)
    s[0] = -1.0
    scores[(0, 3)] = s                                # option 1 first, option 0 last
    gt = {(0, r): 0 for r in range(10)}
    results = {}
    for protocol in ("paper", "corrected"):
        targets = vd.dense_rounds([note], [10], protocol)
        results[protocol] = vd.ranking_metrics(scores, gt, [note], targets)
    idcg = 1.0 + 0.5 / math.log2(3)
    assert results["corrected"][0]["NDCG"] == pytest.approx(100.0)
    assert results["paper"][0]["NDCG"] == pytest.approx(100 * 0.5 / idcg)  # top 2: option 1 then option 2 (0)
    assert results["paper"][2] == results["corrected"][2] == 1
    # MRR / R@k do not depend on the dense index: over all 10 rounds
    assert results["paper"][0]["MRR"] == results["corrected"][0]["MRR"]


def test_ranking_metrics_hand_computed():
    scores = {(0, 0): torch.tensor([3.0, 2.0, 1.0] + [0.0] * 97),   # gt 0 -> rank 1
              (0, 1): torch.tensor([3.0, 2.0, 1.0] + [0.0] * 97),   # gt 2 -> rank 3
              (1, 0): torch.tensor([0.0] * 100)}                    # gt 50, all tied -> rank 51 (ties by index)
    gt = {(0, 0): 0, (0, 1): 2, (1, 0): 50}
    metrics, ranks, n = vd.ranking_metrics(scores, gt, [], [])
    assert ranks == {(0, 0): 1, (0, 1): 3, (1, 0): 51}
    assert metrics["MRR"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 51) / 3)
    assert metrics["R@1"] == pytest.approx(100 / 3) and metrics["R@5"] == pytest.approx(200 / 3)
    assert metrics["mean_rank"] == pytest.approx(55 / 3)
    assert math.isnan(metrics["NDCG"]) and n == 0
    assert vd.top_k(scores[(1, 0)]) == [0, 1, 2, 3, 4]


def test_ndcg_uses_the_annotation_relevance():
    rel = [0.0] * 100
    rel[5], rel[9] = 1.0, 0.5
    note = annotation(0, 1, rel)
    row = torch.zeros(100)
    row[9], row[5] = 1.0, 0.5  # option 9 (relevance 0.5) first, option 5 (relevance 1) second
    metrics, _, _ = vd.ranking_metrics({(0, 0): row}, {(0, 0): 5}, [note], [(0, 0)])
    assert metrics["NDCG"] == pytest.approx(visdial_ndcg(row[None], torch.tensor([rel])))
    assert metrics["NDCG"] == pytest.approx(100 * (0.5 + 1 / math.log2(3)) / (1 + 0.5 / math.log2(3)))


def test_paper_retrieval_squashes_like_the_original_script_and_corrected_crops(tiny, tmp_path):
    """On non-square photos in odd modes: the paper protocol's ranks equal the original script's computation
    (open, resize to 224x224, then RGB, then the processor; image x text scores ranked per image); the corrected
    protocol's equal the cosine ranking of centre-cropped images."""
    import torch.nn.functional as F
    from PIL import Image

    from tests.reference.photos import photo_like

    info = write_visdial(tmp_path, n=4, seed=3)
    modes = ["RGB", "L", "RGBA", "P"]
    for k, path in enumerate(info["image_paths"]):  # the same names, now 4:3 / 3:4 photos in four modes
        image = photo_like(k, (320, 240) if k % 2 else (240, 320))
        image = image.quantize(16) if modes[k] == "P" else image.convert(modes[k])
        image.save(path, format="PNG")  # lossless: the mode survives
    ctx = RunContext(model=tiny, data_root=tmp_path, progress=False, batch_size=2)
    paper, corrected = vd.RETRIEVAL.run(ctx, "val", ("paper", "corrected"))
    m = tiny.model
    dialogues = vd.load_dialogues(info["dialogs"])
    with torch.inference_mode():
        text = torch.stack([m.text_hidden_fcs[0](m.lm(inputs_embeds=m.input_embeddings(
            m.tokenizer(vd.retrieval_text(d), return_tensors="pt").input_ids), output_hidden_states=True
        ).hidden_states[-1])[0, -1] for d in dialogues])
        text = F.normalize(text, dim=-1)

        def image_embs(prepare):
            pixels = m.feature_extractor([prepare(Image.open(p)) for p in info["image_paths"]],
                                         return_tensors="pt").pixel_values
            return m.get_visual_embs(pixels, mode="retrieval")[:, 0]

        squashed = image_embs(lambda im: im.resize((224, 224)).convert("RGB"))
        cropped = image_embs(lambda im: im.convert("RGB"))
    expected_paper = ranks_from_scores(squashed @ text.T, torch.arange(4)).tolist()
    expected_corrected = ranks_from_scores(text @ F.normalize(cropped, dim=-1).T, torch.arange(4)).tolist()
    assert [p["rank"] for p in paper.predictions] == expected_paper
    assert [p["rank"] for p in corrected.predictions] == expected_corrected
    assert not torch.allclose(squashed, cropped, atol=1e-3)  # the two preprocessings really differ here


# -- option scoring in chunks (--option-batch-size) -----------------------------------------------------
def test_option_chunk_size_changes_the_work_not_the_rankings(tiny, short):
    root, _ = short
    runs = {}
    for size in (100, 7, 1):
        ctx = RunContext(model=tiny, data_root=root, progress=False, option_batch_size=size, work={})
        tiny.counters.clear()
        results = vd.RANKING.run(ctx, "val", ("paper", "corrected"))
        runs[size] = ({r.protocol: ([(p["rank"], p["top5"]) for p in r.predictions], r.metrics) for r in results},
                      dict(tiny.counters))
    rounds = 6  # 2 readable dialogues x 3 rounds
    for size, (by_protocol, counters) in runs.items():
        assert by_protocol == runs[100][0]
        # one call per round and protocol, each in ceil(100 / size) forward passes
        assert counters["scoring_calls"] == rounds * 2
        assert counters["scoring_passes"] == rounds * 2 * -(-100 // size)
        assert counters["continuations_scored"] == rounds * 2 * 100
        assert counters["tokens_scored"] == runs[100][1]["tokens_scored"]


def test_option_scoring_halves_its_chunk_on_out_of_memory():
    class Tight(FakeModel):
        def score_continuations(self, context, continuations, **kw):
            if kw["batch_size"] > 25:
                self.calls.append({"oom": kw["batch_size"]})
                raise torch.OutOfMemoryError("CUDA out of memory")
            return super().score_continuations(context, continuations, **kw)

    model = Tight()
    options = [f"option {j}" for j in range(100)]
    scores = vd.score_options(model, ["ctx"], options, "corrected", 100)
    assert [c.get("oom", c.get("batch_size")) for c in model.calls] == [100, 50, 25]
    assert torch.equal(scores, vd.score_options(FakeModel(), ["ctx"], options, "corrected", 25))
    tried = []

    def always_oom(size):
        tried.append(size)
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):  # down to one option per pass, then it is a real error
        vd.halving_on_oom(always_oom, 4)
    assert tried == [4, 2, 1]


# -- corrected context: no lone-space token -------------------------------------------------------------
def test_corrected_context_ends_at_the_colon_and_options_carry_the_space(tiny):
    tok = tiny.model.tokenizer
    d = vd.Dialogue(0, 7, "", (vd.Round("is it sunny", "yes", ("yes",) * 100, 0),
                               vd.Round("how many cats", "two cats", ("two cats",) * 100, 0)))
    paper = tok(vd.ranking_context_text(d, 1, "paper")).input_ids
    corrected = tok(vd.ranking_context_text(d, 1, "corrected")).input_ids
    assert vd.ranking_context_text(d, 1, "corrected") == "Q: is it sunny?\nA: yes\nQ: how many cats?\nA:"
    assert tok.convert_ids_to_tokens(paper[-1]) == "Ġ"             # the original's artefact, kept in paper
    assert corrected == paper[:-1] and tok.convert_ids_to_tokens(corrected[-1]) == ":"
    from model.scoring import tokenize_continuations
    ids, lengths = tokenize_continuations(tiny.model, [" two cats", " yes"], with_bos=False)
    first = tok.convert_ids_to_tokens(ids[:, 0].tolist())
    assert all(t.startswith("Ġ") and len(t) > 1 for t in first)    # " two", " yes": a space-prefixed word
    assert tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ids[0, :lengths[0]].tolist())) == " two cats"


def test_corrected_and_next_round_contexts_reuse_the_prefix(tiny, images):
    """The next round's context shares all of this round's corrected context ("...A:") and all but the lone
    space of the paper one ("...A: "), protocol by protocol; reused caches score as fresh encodings."""
    from model.scoring import encode_context

    visual = tiny.encode_images([images[1]], "captioning")[0]
    visuals = {"paper": visual, "corrected": visual}
    options = tuple(f"{w} {j}" for j, w in enumerate(["red", "blue", "two", "no", "yes"] * 20))
    d = vd.Dialogue(0, 1, "", (vd.Round("what colour is it", "red", options, 0),
                               vd.Round("how many are there", "two squares", options, 0)))
    first = vd.round_contexts(tiny, visuals, d, 0, ("paper", "corrected"))
    assert first["paper"].reused == first["corrected"].reused == 0
    assert len(first["corrected"]) == len(first["paper"]) - 1
    second = vd.round_contexts(tiny, visuals, d, 1, ("paper", "corrected"), previous=first)
    assert second["corrected"].reused == len(first["corrected"])
    assert second["paper"].reused == len(first["paper"]) - 1
    for protocol in ("paper", "corrected"):
        fresh = encode_context(tiny.model, [visual, vd.ranking_context_text(d, 1, protocol)])
        torch.testing.assert_close(vd.score_options(tiny, second[protocol], options, protocol),
                                   vd.score_options(tiny, fresh, options, protocol), atol=1e-4, rtol=1e-5)


# -- paper numerics: the original's rounding and tie order ----------------------------------------------
def _original_ranks_and_ndcg(score_rows, gts, relevance_rows):
    """The original script's final loop, written out: `topk(100)` of the float32 scores on CPU, rank = the
    position of gt; NDCG via `scores.sort(1, descending=True)` (its scores_to_ranks), top k = non-zero count."""
    ranks = []
    for scores, gt in zip(score_rows, gts):
        _, preds = torch.tensor(scores).topk(100)
        ranks.append(preds.tolist().index(gt) + 1)
    ndcgs = []
    for scores, rel in zip(score_rows, relevance_rows):
        _, ranked_idx = torch.tensor(scores)[None].sort(1, descending=True)
        rel = torch.tensor(rel)
        k = int((rel != 0).sum())
        discounts = torch.log2(torch.arange(k).float() + 2)
        dcg = (rel[ranked_idx[0][:k]] / discounts).sum()
        best = (rel.sort(descending=True).values[:k] / discounts).sum()
        ndcgs.append(float(dcg / best))
    return ranks, 100 * sum(ndcgs) / len(ndcgs)


def test_paper_ranks_ties_in_the_originals_topk_order():
    g = torch.Generator().manual_seed(0)
    # summed losses as bf16 rounds them: a handful of distinct values over 100 options
    rows = [(-torch.randint(20, 26, (100,), generator=g).float() * 0.25) for _ in range(6)]
    gts = [3, 50, 99, 0, 17, 64]
    rels = [[float(torch.randint(0, 3, (1,), generator=g)) / 2 for _ in range(100)] for _ in rows]
    scores = {(0, r): row for r, row in enumerate(rows)}
    gt = {(0, r): gts[r] for r in range(6)}
    notes = [annotation(0, r + 1, rels[r]) for r in range(6)]
    targets = [(0, r) for r in range(6)]
    metrics, ranks, _ = vd.ranking_metrics(scores, gt, notes, targets, "paper")
    expected_ranks, expected_ndcg = _original_ranks_and_ndcg([r.tolist() for r in rows], gts, rels)
    assert [ranks[(0, r)] for r in range(6)] == expected_ranks
    assert metrics["NDCG"] == pytest.approx(expected_ndcg, abs=1e-4)  # the reference sums in float32
    assert metrics["MRR"] == pytest.approx(100 * sum(1 / x for x in expected_ranks) / 6)
    assert vd.top_k(rows[0], protocol="paper") == torch.tensor(rows[0].tolist()).topk(100).indices[:5].tolist()
    # the index rule (corrected) ranks these ties differently: the tie order matters
    by_index, by_index_ranks, _ = vd.ranking_metrics(scores, gt, notes, targets, "corrected")
    assert by_index_ranks != ranks and by_index["NDCG"] != metrics["NDCG"]


@pytest.fixture(scope="module")
def tiny_bf16(tiny_dir):
    from model import load_fromage

    return load_fromage(tiny_dir, device="cpu", precision="bf16")


def test_paper_scores_round_in_bf16_and_corrected_stays_float32(tiny_bf16, tiny, short, images):
    root, info = short
    d = vd.load_dialogues(info["dialogs"])[0]
    for model, low in ((tiny_bf16, True), (tiny, False)):
        visual = model.encode_images([images[0]], "captioning")[0]
        scores, _ = vd.score_round(model, {"paper": visual, "corrected": visual}, d, 1, ("paper", "corrected"), 100)
        paper_is_bf16 = torch.equal(scores["paper"], scores["paper"].bfloat16().float())
        assert paper_is_bf16 == low
        assert not torch.equal(scores["corrected"], scores["corrected"].bfloat16().float())
        if low:
            assert len(set(scores["paper"].tolist())) < 95  # ties
    ctx = RunContext(model=tiny_bf16, data_root=root, progress=False)
    paper, = vd.RANKING.run(ctx, "val", ("paper",))
    features, _, _ = vd._readable(ctx, root / vd.IMAGE_DIR, [d], ["squash"])  # the task's own image features
    visual = tiny_bf16.project_images(features["squash"][0][None], "captioning")[0]
    previous, by_round = None, []
    for r in range(len(d.rounds)):
        s, previous = vd.score_round(tiny_bf16, {"paper": visual}, d, r, ("paper",), 100, previous)
        by_round.append(s["paper"])
    for r, s in enumerate(by_round):
        assert paper.predictions[r]["rank"] == s.topk(100).indices.tolist().index(d.rounds[r].gt_index) + 1

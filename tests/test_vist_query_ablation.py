"""scripts/vist_query_ablation.py: its `full` variant is eval's 5cap4img corrected query (the same R@k as the task
on the same data, missing and corrupt photos included), and its text-free `photo 4 only` variant equals a ranking
computed here by hand from the pool's retrieval embeddings; bad input is one error line and exit status 2."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fromage_bench.synth.vist import write_vist
from model.datasets import ImageDir, load_stories
from tasks.base import RunContext
from tasks.vist import read_pool, run
from tests.subprocesses import REPO, child_env


@pytest.fixture(scope="module")
def ablation_module():
    spec = importlib.util.spec_from_file_location("vist_query_ablation", REPO / "scripts" / "vist_query_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_vist(tmp_path_factory.mktemp("vist"), n=8, seed=3, missing=1, corrupt=1, png=1, shuffled=True)


def test_full_variant_is_evals_corrected_query(tiny, synth, ablation_module):
    out = ablation_module.ablation(tiny, str(synth["root"]), batch_size=3)
    task = run(RunContext(model=tiny, data_root=synth["root"], progress=False, batch_size=4), "5cap4img",
               ("corrected",))[0]
    assert task.n_examples == 8 - len(synth["skipped"]) > 0
    for k in ("R@1", "R@5", "R@10"):
        assert out["full"][k] == pytest.approx(task.metrics[k])
    assert set(out) == {"full", "5cap (no photos)", "captions 1-4, photo 4, caption 5", "photo 4, caption 5",
                        "photo 4 only", "mean of photos 1-4"}


def test_photo_4_only_by_hand(tiny, synth, ablation_module):
    out = ablation_module.ablation(tiny, str(synth["root"]))
    stories, listed = load_stories(synth["json"])
    pool, features, failed = read_pool(tiny, stories, listed, ImageDir(synth["image_dir"]))
    emb = F.normalize(tiny.project_images(torch.stack([features["crop"][p] for p in pool]), "retrieval")[:, 0].float(),
                      dim=-1)
    col = {p: i for i, p in enumerate(pool)}
    ranks = []
    for story in (s for s in stories if not any(p in failed for p in s.photo_ids)):
        scores = emb @ emb[col[story.context[-1]]]
        others = [i for i in range(len(pool)) if pool[i] not in story.context]  # its own photos pushed out
        target = scores[col[story.target]]
        # 1 + candidates scoring higher, ties to the lower pool index (as the task ranks)
        ahead = [i for i in others if scores[i] > target or (scores[i] == target and i < col[story.target])]
        ranks.append(1 + len(ahead))
    for k in (1, 5, 10):
        assert out["photo 4 only"][f"R@{k}"] == pytest.approx(100 * sum(r <= k for r in ranks) / len(ranks))


def test_missing_story_file_is_one_error_line(tiny_dir, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "vist_query_ablation.py"), "--model-dir",
                           str(tiny_dir), "--data-root", str(tmp_path)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    # the last line (the backbones' loading bars come before it)
    missing = tmp_path / "vist" / "sis" / "val.story-in-sequence.json"
    assert done.stderr.strip().splitlines()[-1] == f"vist_query_ablation: error: {missing}: VIST story file not found"
    assert "Traceback" not in done.stderr and done.stdout == ""

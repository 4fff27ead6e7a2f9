"""Interleaved story queries for training (model/train_stories.py, `fromage-bench train --stories`)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from fromage_bench.synth.vist import write_vist
from fromage_bench.train_cli import main as train_main
from model import FromageInputError
from model.prompts import tokenize
from model.train_stories import StorySource, story_sequences
from model.training import TrainConfig, train
from tests.test_training import LOSS_COLUMNS, REPO, free_port, mean, read_metrics, write_colour_data


@pytest.fixture(scope="module")
def story_files(tmp_path_factory):
    return write_vist(tmp_path_factory.mktemp("stories"), n=12, seed=4, missing=1)


@pytest.fixture(scope="module")
def story_config(tiny_dir, story_files, tmp_path_factory):
    tsv, images = write_colour_data(tmp_path_factory.mktemp("colours"))
    return TrainConfig(model_dir=tiny_dir, train_tsv=tsv, image_dir=images, out=tmp_path_factory.mktemp("run") / "out",
                       steps=30, batch_size=8, lr=3e-3, warmup=5, save_every=15, seed=0, workers=0, progress=False,
                       stories=story_files["json"], story_images=story_files["image_dir"], story_batch=8)


@pytest.fixture(scope="module")
def story_run(story_config):
    return train(story_config)


def test_stories_with_a_missing_photo_are_left_out(tiny, story_files):
    source = StorySource(story_files["json"], story_files["image_dir"], tiny.model, batch_size=4)
    assert story_files["skipped"] and len(source) == 12 - len(story_files["skipped"])


def test_ranks_draw_blocks_of_the_global_story_batch(tiny, story_files):
    args = (story_files["json"], story_files["image_dir"], tiny.model)
    one = StorySource(*args, batch_size=6, world_size=1, rank=0, seed=2)
    two = [StorySource(*args, batch_size=3, world_size=2, rank=r, seed=2) for r in range(2)]
    for micro_batch in range(4):
        draws = one.draws(micro_batch)
        assert two[0].draws(micro_batch) + two[1].draws(micro_batch) == draws
        assert len({story for story, _, _ in draws}) == 6  # no story twice in a batch
        assert all(2 <= k <= 5 for _, k, _ in draws)
    assert one.draws(0) != one.draws(1)
    assert StorySource(*args, batch_size=6, seed=2).draws(3) == one.draws(3)  # a pure function of the index


def test_story_sequences_interleave_sentences_and_earlier_photos(tiny, story_files):
    model = tiny.model
    source = StorySource(story_files["json"], story_files["image_dir"], model, batch_size=4, seed=1)
    queries = source.queries(0)
    embeds, at = story_sequences(model, model.input_embeddings, queries)
    n_visual = model.args.n_visual_tokens
    ret = model.retrieval_token_idx
    for row, ((story, k, each_bos), sentences) in enumerate(zip(source.draws(0), queries.sentences)):
        assert len(sentences) == k and queries.targets[row] == k - 1
        texts = source.texts[story][:k]
        for i, (ids, text) in enumerate(zip(sentences, texts)):
            expected = tokenize(model, text, keep_bos=each_bos or i == 0).tolist() + ([ret] if i == k - 1 else [])
            assert ids.tolist() == expected
        position = 0
        photos = model.project_visual(queries.features[row], "captioning")
        for i, ids in enumerate(sentences):
            torch.testing.assert_close(embeds[row, position:position + len(ids)], model.input_embeddings(ids))
            position += len(ids)
            if i < k - 1:
                torch.testing.assert_close(embeds[row, position:position + n_visual], photos[i])
                position += n_visual
        assert int(at[row]) == position - 1  # the [RET] that ends sentence k
        assert torch.all(embeds[row, position:] == 0)


def test_story_features_are_the_vision_towers_of_the_five_photos(tiny, story_files):
    from model.images import load_image

    source = StorySource(story_files["json"], story_files["image_dir"], tiny.model, batch_size=4)
    photos = [load_image(p) for p in source.paths[3]]
    pixels = tiny.model.feature_extractor(photos, return_tensors="pt").pixel_values
    with torch.no_grad():
        torch.testing.assert_close(source.features(3), tiny.model.vision_features(pixels).float())


def test_training_on_stories_lowers_the_story_loss(story_run, story_config):
    history = story_run.history
    first, last = history[:6], history[-6:]
    assert mean(last, "story_loss") < mean(first, "story_loss") - 0.3
    assert mean(last, "retrieval_loss") < mean(first, "retrieval_loss")
    loss = [r["loss"] - r["caption_loss"] - r["retrieval_loss"] - r["ret_lm_loss"] for r in history]
    assert loss == pytest.approx([r["story_loss"] for r in history])  # weight 1: part of the total
    logged = read_metrics(story_config.out / "metrics.csv")
    assert [r["story_loss"] for r in logged] == [r["story_loss"] for r in history]


def test_resume_with_stories_continues_bit_for_bit(story_run, story_config, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(story_config.out, out)
    resumed = train(replace(story_config, out=out, resume=out / "checkpoints" / "step_0000015.pt"))
    for a, b in zip(story_run.history[15:], resumed.history):
        assert all(a[k] == b[k] for k in (*LOSS_COLUMNS, "story_loss")), (a, b)


def test_resume_refuses_other_stories_settings(story_run, story_config, tmp_path):
    with pytest.raises(FromageInputError, match="global_story_batch 8 \\(now 0\\)"):
        train(replace(story_config, out=tmp_path / "x", stories=None, story_images=None, resume=story_config.out))


def test_too_few_stories_is_one_error_naming_the_file(story_config, story_files, tmp_path, capsys):
    code = train_main(["--model-dir", str(story_config.model_dir), "--train-tsv", str(story_config.train_tsv),
                       "--image-dir", str(story_config.image_dir), "--out", str(tmp_path / "o"), "--steps", "1",
                       "--batch-size", "8", "--workers", "0", "--device", "cpu", "--no-progress",
                       "--stories", str(story_files["json"]), "--story-images", str(story_files["image_dir"]),
                       "--story-batch", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert str(story_files["json"]) in err[0] and f"{12 - len(story_files['skipped'])} usable stories" in err[0]
    assert not (tmp_path / "o").exists()


def test_stories_need_their_image_directory(story_config, story_files):
    with pytest.raises(FromageInputError, match="--stories"):
        train(replace(story_config, story_images=None))


@pytest.mark.slow
def test_two_processes_follow_the_single_process_story_trajectory(story_run, story_config, tmp_path):
    """2 processes x (batch 4, story batch 4) read the single-process run's global batches of 8 and 8."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "fromage_bench.train_cli", "train", "--model-dir", str(story_config.model_dir),
           "--train-tsv", str(story_config.train_tsv), "--image-dir", str(story_config.image_dir), "--out", str(out),
           "--steps", "6", "--batch-size", "4", "--lr", str(story_config.lr), "--warmup", str(story_config.warmup),
           "--stories", str(story_config.stories), "--story-images", str(story_config.story_images),
           "--story-batch", "4", "--save-every", "0", "--workers", "0", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    two = read_metrics(out / "metrics.csv")
    for a, b in zip(story_run.history[:6], two):
        for key in ("loss", "retrieval_loss", "story_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a, b)

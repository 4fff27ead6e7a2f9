"""Training at real scale, tested on tiny models on CPU (issue 21): a fresh start, the frozen backbones' precision,
logit_scale, bad images, validation through the evaluation tasks, exports the original can load, epochs.

Expectations are built independently of `model.training`: the initial state from transformers and torch directly,
the chance bound from the binomial distribution, the validation metrics from `fromage-bench eval`, the export's
outputs from the re-implementation of the original in tests/reference/.
"""
from __future__ import annotations

import json
import logging
import math
import pickle
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from fromage_bench.cli import main as cli_main
from fromage_bench.train_cli import main as train_main
from model import RetrievalSet, load_fromage, make_tiny
from model.checkpoint import CHECKPOINT_FILE, RET_ROW_KEY
from model.train_data import CaptionDataset, Collate, KeyedBatches, ShardedBatches
from model.training import (MAX_LOGIT_SCALE, Processes, TrainConfig, load_for_training, make_trainable, micro_step,
                            optimizer_step, train)
from tests.reference.original_fromage import OriginalStyleFromage
from tests.test_image_files import bomb_png
from tests.test_task_captioning import needs_java
from tests.test_training import COLOURS, read_metrics, write_colour_data

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    return write_colour_data(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module", params=[(64, 2), (96, 3)], ids=["opt-h64-l2", "opt-h96-l3"])
def tiny_backbones(request, tmp_path_factory):
    """Two tiny OPT sizes (hidden, layers), each with a CLIP vision tower: directories as a user has them."""
    hidden, layers = request.param
    return make_tiny(tmp_path_factory.mktemp(f"opt{hidden}") / "m", seed=3, hidden=hidden, layers=layers)


def fresh_config(backbones: Path, tsv: Path, images: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(model_dir=None, train_tsv=tsv, image_dir=images, out=out, init="fresh",
                    opt_version=str(backbones / "opt"), visual_model=str(backbones / "clip"), shared_emb_dim=32,
                    steps=3, batch_size=8, lr=3e-3, warmup=2, save_every=0, seed=5, workers=0, progress=False)
    return TrainConfig(**{**settings, **overrides})


# -- a fresh start -------------------------------------------------------------------------------------------
def independent_initial_state(backbones: Path, seed: int, shared: int) -> dict[str, torch.Tensor]:
    """What the original's main.py builds before its first step, from transformers and torch directly: seed,
    tokenizer with <|image|> and [RET], OPT, resize_token_embeddings, CLIP, then the maps in the original's order
    (text_hidden_fcs, visual_embeddings, visual_fc) with nn.Linear's default init, logit_scale log(1/0.07)."""
    from transformers import CLIPVisionModel, GPT2Tokenizer, OPTForCausalLM

    torch.manual_seed(seed)
    tokenizer = GPT2Tokenizer.from_pretrained(str(backbones / "opt"))
    tokenizer.add_special_tokens({"cls_token": "<|image|>"})
    tokenizer.add_tokens("[RET]")
    lm = OPTForCausalLM.from_pretrained(str(backbones / "opt"))
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    vision = CLIPVisionModel.from_pretrained(str(backbones / "clip"))
    text_fc = nn.Linear(lm.config.word_embed_proj_dim, shared)
    visual_embeddings = nn.Linear(vision.config.hidden_size, lm.config.word_embed_proj_dim)
    visual_fc = nn.Linear(vision.config.hidden_size, shared)
    ret = tokenizer.convert_tokens_to_ids("[RET]")
    saved = load_file(str(backbones / "opt" / "model.safetensors"))
    embedding = next(v for k, v in saved.items() if k.endswith("embed_tokens.weight"))
    return {"logit_scale": torch.tensor(math.log(1 / 0.07)),
            "text_hidden_fcs.0.0.weight": text_fc.weight, "text_hidden_fcs.0.0.bias": text_fc.bias,
            "visual_embeddings.weight": visual_embeddings.weight, "visual_embeddings.bias": visual_embeddings.bias,
            "visual_fc.weight": visual_fc.weight, "visual_fc.bias": visual_fc.bias,
            "ret_row": embedding[ret]}  # the pretrained row [RET] lands on when the resize shrinks the matrix


def test_fresh_start_equals_an_independently_built_initial_state(tiny_backbones, colour_data, tmp_path):
    tsv, images = colour_data
    cfg = fresh_config(tiny_backbones, tsv, images, tmp_path / "out")
    fromage, ret_row = load_for_training(cfg, Processes(0, 1, CPU, "fp32"))
    expected = independent_initial_state(tiny_backbones, seed=5, shared=32)
    ours = dict(fromage.model.named_parameters())
    for name, value in expected.items():
        got = ret_row if name == "ret_row" else ours[name]
        assert got.dtype == torch.float32 and torch.equal(got.detach(), value.detach()), name
    assert fromage.retrieval_set is None
    other_seed, _ = load_for_training(replace(cfg, seed=6), Processes(0, 1, CPU, "fp32"))
    assert not torch.equal(other_seed.model.visual_fc.weight, fromage.model.visual_fc.weight)


def test_fresh_start_trains_and_exports_for_either_opt_size(tiny_backbones, colour_data, tmp_path):
    tsv, images = colour_data
    out = tmp_path / "out"
    code = train_main(["train", "--init", "fresh", "--opt-version", str(tiny_backbones / "opt"), "--visual-model",
                       str(tiny_backbones / "clip"), "--shared-emb-dim", "32", "--train-tsv", str(tsv), "--image-dir",
                       str(images), "--out", str(out), "--steps", "3", "--batch-size", "8", "--warmup", "2",
                       "--workers", "0", "--device", "cpu", "--no-progress"])
    assert code == 0
    loaded = load_fromage(out / "release", device="cpu", precision="fp32")
    hidden = loaded.model.lm.config.hidden_size
    assert loaded.model.visual_embeddings.weight.shape == (hidden, 32)
    assert Path(loaded.model.args.opt_version) == (tiny_backbones / "opt").resolve()
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == [1, 2, 3]


def test_init_fresh_needs_both_backbones(colour_data, tmp_path, capsys):
    tsv, images = colour_data
    code = train_main(["train", "--init", "fresh", "--opt-version", "opt", "--train-tsv", str(tsv), "--image-dir",
                       str(images), "--out", str(tmp_path / "x"), "--device", "cpu"])
    assert code == 2 and "--init fresh: needs --opt-version and --visual-model" in capsys.readouterr().err


# -- memory: the frozen backbones in the training precision -----------------------------------------------------
def test_frozen_weights_load_in_bf16_and_no_fp32_copy_exists_during_a_step(tiny_dir, colour_data, tmp_path):
    tsv, images = colour_data
    cfg = TrainConfig(model_dir=tiny_dir, train_tsv=tsv, image_dir=images, out=tmp_path, batch_size=4, workers=0)
    procs = Processes(0, 1, CPU, "bf16")
    fromage, initial = load_for_training(cfg, procs)
    model = fromage.model
    frozen = {n: p for n, p in model.named_parameters() if n.startswith(("lm.", "visual_model."))}
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen.values())
    ret_row, params = make_trainable(model, initial)
    assert all(p.dtype == torch.float32 for p in params.values())
    saved = torch.load(tiny_dir / CHECKPOINT_FILE, weights_only=True)["state_dict"]
    assert torch.equal(ret_row.detach(), saved[RET_ROW_KEY].reshape(-1))  # the fp32 row, not the bf16 matrix's

    data = CaptionDataset(tsv, images, model.tokenizer, model.feature_extractor, model.retrieval_token_idx)
    batch = Collate(model.tokenizer.pad_token_id)([data[i] for i in range(4)])

    def shapes(tensors):
        out = {tuple(t.shape) for t in tensors if t.ndim == 2}
        return out | {s[::-1] for s in out}

    # A tensor autograd keeps with a frozen weight matrix's shape (and no trained tensor's, whose bf16 autocast
    # copies are expected) must be that weight itself: its storage, in bf16. Frozen fp32 weights under autocast
    # (the defect) keep a bf16 copy of every matrix instead (27 of them in this model), plain fp32 keeps fp32 ones.
    frozen_only = shapes(frozen.values()) - shapes(params.values())
    storages = {p.untyped_storage().data_ptr() for p in frozen.values()}
    kept = []  # (dtype, shape, whether the storage is a frozen parameter's) of what the backward pass will read

    def pack(t):
        kept.append((t.dtype, tuple(t.shape), t.untyped_storage().data_ptr() in storages))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        micro_step(model, ret_row, batch, False, cfg, procs, torch.amp.GradScaler("cpu", enabled=False))
    weights = [k for k in kept if k[1] in frozen_only]
    assert len(weights) >= 10  # the LM's linear layers (the vision tower runs without a graph)
    assert all(dtype == torch.bfloat16 and own for dtype, _, own in weights), [k for k in weights if not k[2]][:5]
    assert not any(k[0] == torch.float32 and k[1] in frozen_only for k in kept)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n in frozen)
    assert ret_row.grad is not None and params["visual_fc.weight"].grad.dtype == torch.float32


def test_bf16_training_exports_the_fp32_ret_row(tiny_dir, colour_data, tmp_path):
    tsv, images = colour_data
    result = train(TrainConfig(model_dir=tiny_dir, train_tsv=tsv, image_dir=images, out=tmp_path, steps=2,
                               batch_size=8, lr=3e-3, warmup=1, save_every=0, workers=0, progress=False,
                               device="cpu", precision="bf16"))
    assert all(math.isfinite(r["loss"]) for r in result.history)
    trained = torch.load(result.checkpoint, weights_only=True)["trainable"]["ret_row"]
    assert trained.dtype == torch.float32 and not torch.equal(trained, trained.bfloat16().float())
    exported = torch.load(result.release_dir / CHECKPOINT_FILE, weights_only=True)["state_dict"][RET_ROW_KEY]
    assert torch.equal(exported.reshape(-1), trained)
    # the model in memory is the export loaded at bf16 (maps cast after the export), and runs without autocast
    loaded = load_fromage(result.release_dir, device="cpu", precision="bf16")
    picture = Image.new("RGB", (50, 40), COLOURS["red"])
    prompts = [["A red circle.[RET]"], [picture, "A picture of a red square.[RET]"]]
    assert result.fromage.model.dtype == torch.bfloat16
    assert torch.equal(result.fromage.retrieval_embeddings(prompts), loaded.retrieval_embeddings(prompts))


# -- logit_scale ------------------------------------------------------------------------------------------
def test_logit_scale_is_fixed_by_default_and_learned_with_the_flag(tiny_dir, colour_data, tmp_path):
    tsv, images = colour_data
    base = TrainConfig(model_dir=tiny_dir, train_tsv=tsv, image_dir=images, out=tmp_path / "fixed", steps=3,
                       batch_size=8, lr=3e-2, warmup=1, save_every=0, workers=0, progress=False)
    initial = torch.load(tiny_dir / CHECKPOINT_FILE, weights_only=True)["state_dict"]["model.logit_scale"]
    fixed = train(base)
    assert "logit_scale" not in torch.load(fixed.checkpoint, weights_only=True)["trainable"]
    assert torch.equal(fixed.fromage.model.logit_scale.detach(), initial)
    learned = train(replace(base, out=tmp_path / "learned", learn_logit_scale=True))
    assert "logit_scale" in torch.load(learned.checkpoint, weights_only=True)["trainable"]
    assert not torch.equal(learned.fromage.model.logit_scale.detach(), initial)


def test_a_learned_logit_scale_is_clamped_at_log_100():
    scale = nn.Parameter(torch.tensor(math.log(100) - 0.01))
    row = nn.Parameter(torch.ones(4))
    params = {"logit_scale": scale, "ret_row": row}
    optimizer = torch.optim.AdamW(list(params.values()), lr=0.1)
    scale.grad, row.grad = torch.tensor(-1.0), torch.zeros(4)  # pushes the scale up by about lr
    cfg = TrainConfig(model_dir=None, train_tsv=Path("t"), image_dir=Path("i"), out=Path("o"))
    optimizer_step(optimizer, torch.amp.GradScaler("cpu", enabled=False), params, row, cfg, None)
    assert scale.item() == torch.tensor(MAX_LOGIT_SCALE).item()  # log 100 in float32 (without the clamp: 4.695)


# -- bad images ----------------------------------------------------------------------------------------------
BLOCK = range(10, 30)  # rows whose images are missing (a failed shard)
BOMB = 40              # a decompression bomb


@pytest.fixture(scope="module")
def awkward_training_data(tmp_path_factory):
    """60 rows written by pandas (a caption with a tab and quotes among them), non-square JPEGs and PNGs of
    several modes, a block of 20 missing images and a decompression bomb."""
    root = tmp_path_factory.mktemp("awkward_train")
    images = root / "images"
    images.mkdir()
    names = list(COLOURS)
    rows = []
    for i in range(60):
        colour = names[i % len(names)]
        name = f"im{i}.jpg" if i % 2 else f"im{i}.png"
        if i == BOMB:
            bomb_png(images / name.replace(".jpg", ".png"))
            name = name.replace(".jpg", ".png")
        elif i not in BLOCK:
            mode = ("RGB", "L", "P", "RGBA")[i % 4] if name.endswith(".png") else "RGB"
            Image.new("RGB", (40 + i, 30 + (i % 7)), COLOURS[colour]).convert(mode).save(images / name)
        caption = f'A {colour} "shape"\twith a tab.' if i == 3 else f"A {colour} shape number {i}."
        rows.append({"caption": caption, "image": name})
    tsv = root / "train.tsv"
    pd.DataFrame(rows).to_csv(tsv, sep="\t", index=False)
    return tsv, images


def binomial_upper(n: int, p: float, alpha: float) -> int:
    """The least k with P(Binomial(n, p) > k) <= alpha."""
    tail, k = 1.0, -1
    while tail > alpha:
        k += 1
        tail -= math.comb(n, k) * p ** k * (1 - p) ** (n - k)
    return k


def test_bad_rows_are_replaced_at_random_and_no_row_is_overdrawn(tiny, awkward_training_data):
    tsv, images = awkward_training_data
    model = tiny.model
    data = CaptionDataset(tsv, images, model.tokenizer, model.feature_extractor, model.retrieval_token_idx, seed=1)
    epochs, batch = 8, 12
    sampler = KeyedBatches(len(data), batch, 1, 0, seed=1, start=0, stop=epochs * len(data) // batch)
    served, reasons = Counter(), Counter()
    for keys in sampler:
        for key in keys:
            item = data[key]
            served[item["row"]] += 1
            reasons.update(item["reasons"])
    bad = set(BLOCK) | {BOMB}
    assert not bad & set(served)
    assert reasons["missing image"] >= len(BLOCK) * epochs and reasons["image too large"] >= epochs
    # Each good row is read once an epoch in its own slot, plus the replacement draws that land on it: each
    # replacement is uniform over the good rows, so the extra reads of one row are Binomial(replacements, 1/good).
    good = len(data) - len(bad)
    replacements = len(bad) * epochs
    bound = binomial_upper(replacements, 1 / good, alpha=1e-6 / good)  # over all rows together: 1e-6
    extra = {row: served[row] - epochs for row in served}
    assert max(extra.values()) <= bound, (max(extra.items(), key=lambda kv: kv[1]), bound)
    assert sum(extra.values()) == replacements
    again = data[(BLOCK[0], (3, 4))]  # the same key draws the same replacement (resume, other processes)
    assert again["row"] == data[(BLOCK[0], (3, 4))]["row"] and torch.equal(again["pixel_values"],
                                                                           data[(BLOCK[0], (3, 4))]["pixel_values"])


def test_training_goes_on_past_a_bomb_and_a_missing_block(tiny_dir, awkward_training_data, tmp_path, caplog):
    tsv, images = awkward_training_data
    cfg = TrainConfig(model_dir=tiny_dir, train_tsv=tsv, image_dir=images, out=tmp_path, steps=3, batch_size=20,
                      lr=3e-3, warmup=1, save_every=0, workers=0, progress=False)
    with caplog.at_level(logging.WARNING, logger="model.training"):
        result = train(cfg)  # 3 batches of 20 = every row of the first epoch, the bomb and the block among them
    assert [r["step"] for r in result.history] == [1, 2, 3]
    assert result.skipped_reasons["image too large"] >= 1 and result.skipped_reasons["missing image"] >= len(BLOCK)
    assert result.skipped_images == sum(result.skipped_reasons.values()) == result.history[-1]["skipped_images"]
    assert "replaced by a random row" in caplog.text and "image too large" in caplog.text


# -- the retrieval set stays behind -----------------------------------------------------------------------------
def test_training_loads_the_model_without_its_retrieval_set(tiny_dir, colour_data, tmp_path):
    tsv, images = colour_data
    model_dir = tmp_path / "with_set"
    shutil.copytree(tiny_dir, model_dir, symlinks=True)
    shutil.rmtree(model_dir / "opt"), shutil.rmtree(model_dir / "clip")
    (model_dir / "opt").symlink_to(tiny_dir / "opt")
    (model_dir / "clip").symlink_to(tiny_dir / "clip")
    RetrievalSet(["a.png", "b.png"], torch.randn(2, 32)).save(model_dir)
    assert load_fromage(model_dir, device="cpu").retrieval_set is not None  # inference does load it
    seen = []
    cfg = TrainConfig(model_dir=model_dir, train_tsv=tsv, image_dir=images, out=tmp_path / "out", steps=1,
                      batch_size=8, save_every=0, workers=0, progress=False,
                      validate=lambda fromage, step: seen.append((fromage.retrieval_set, fromage.emb_matrix)) or {})
    train(cfg)
    assert seen == [(None, None), (None, None)]  # before training and at the end


# -- validation ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def val_data(tmp_path_factory):
    """A CC3M-style validation TSV written by pandas: 6 images (one missing), one image with two captions."""
    root = tmp_path_factory.mktemp("val")
    images = root / "validation"
    images.mkdir()
    rows = []
    for i, colour in enumerate(["red", "green", "blue", "yellow", "purple", "black"]):
        if i != 4:
            Image.new("RGB", (60 - 3 * i, 44 + i), COLOURS[colour]).save(images / f"v{i}.jpg")
        rows.append({"caption": f"A {colour} circle.", "image": f"v{i}"})
    rows.append({"caption": "A red square.", "image": "v0"})
    tsv = root / "cc3m_val.tsv"
    pd.DataFrame(rows).to_csv(tsv, sep="\t", index=False)
    return tsv, images


@needs_java
def test_validation_metrics_equal_the_tasks_own(tiny_dir, colour_data, val_data, tmp_path):
    tsv, images = colour_data
    val_tsv, val_images = val_data
    out = tmp_path / "out"
    code = train_main(["train", "--model-dir", str(tiny_dir), "--train-tsv", str(tsv), "--image-dir", str(images),
                       "--out", str(out), "--steps", "4", "--batch-size", "8", "--lr", "3e-3", "--warmup", "1",
                       "--val-tsv", str(val_tsv), "--val-image-dir", str(val_images), "--val-every", "2",
                       "--val-batch-size", "4", "--save-every", "2", "--workers", "0", "--device", "cpu",
                       "--no-progress"])
    assert code == 0
    rows = read_metrics(out / "val_metrics.csv")
    assert [r["step"] for r in rows] == [0, 2, 4]
    names = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@5"]
    assert all(set(names) <= set(r) for r in rows)

    # The final validation is of the exported model: `fromage-bench eval` on the same files must agree.
    root = tmp_path / "data" / "cc3m"
    root.mkdir(parents=True)
    shutil.copy(val_tsv, root / "cc3m_val.tsv")
    (root / "validation").symlink_to(val_images)
    assert cli_main(["eval", "--model-dir", str(out / "release"), "--data-root", str(tmp_path / "data"),
                     "--out", str(tmp_path / "eval"), "--tasks", "captioning:cc3m,image_text_retrieval:cc3m",
                     "--precisions", "fp32", "--device", "cpu", "--no-cache", "--no-progress"]) == 0
    records = json.loads((tmp_path / "eval" / "results.json").read_text())["records"]
    evaluated = {k: v for r in records if r.get("status", "ok") == "ok" for k, v in r["metrics"].items()}
    for name in names:
        assert rows[-1][name] == pytest.approx(evaluated[name], abs=1e-9), name

    best = max(rows[1:], key=lambda r: (r["t2i_R@1"], -r["step"]))  # the first of the best after training began
    assert json.loads((out / "ckpt_best" / "best.json").read_text()) == {
        "step": int(best["step"]), "metric": "t2i_R@1", "value": best["t2i_R@1"]}
    assert load_fromage(out / "ckpt_best", device="cpu") is not None


def test_validation_resumes_its_best_and_leaves_the_generators_alone(tiny_dir, colour_data, tmp_path):
    tsv, images = colour_data
    scores = {0: 50.0, 2: 9.0, 4: 3.0, 6: 7.0}

    def validate(fromage, step):
        torch.rand(3), torch.randn(2)  # validation code may draw: training must not notice
        return {"t2i_R@1": scores[step], "i2t_R@1": 1.0}

    base = TrainConfig(model_dir=tiny_dir, train_tsv=tsv, image_dir=images, out=tmp_path / "a", steps=6, batch_size=8,
                       lr=3e-3, warmup=1, save_every=2, workers=0, progress=False, val_every=2)
    plain = train(base)
    validated = train(replace(base, out=tmp_path / "b", validate=validate))
    assert [r["loss"] for r in plain.history] == [r["loss"] for r in validated.history]
    states = [torch.load(r.checkpoint, weights_only=True)["ranks"][0]["rng"]["torch"] for r in (plain, validated)]
    assert torch.equal(*states)
    assert (validated.best.step, validated.best.score) == (2, 9.0)  # step 0's 50 came before training: no candidate
    out = tmp_path / "b"
    assert json.loads((out / "ckpt_best" / "best.json").read_text())["step"] == 2
    assert [r["step"] for r in read_metrics(out / "val_metrics.csv")] == [0, 2, 4, 6]

    resumed = train(replace(base, out=out, validate=validate, resume=out / "checkpoints" / "step_0000004.pt"))
    assert (resumed.best.step, resumed.best.score) == (2, 9.0)  # 7 at step 6 does not beat the restored 9
    assert [(r["step"], r["t2i_R@1"]) for r in read_metrics(out / "val_metrics.csv")] == [
        (0, 50.0), (2, 9.0), (4, 3.0), (6, 7.0)]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in plain.history[4:]]


def test_validation_flags_are_checked_before_any_model_work(tiny_dir, colour_data, tmp_path, capsys):
    tsv, images = colour_data
    common = ["train", "--model-dir", str(tiny_dir), "--train-tsv", str(tsv), "--image-dir", str(images),
              "--out", str(tmp_path / "x"), "--device", "cpu"]
    assert train_main(common + ["--val-tsv", str(tsv)]) == 2
    assert "--val-tsv: needs --val-image-dir" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("caption,image\nA cat.,cat.jpg\n")
    assert train_main(common + ["--val-tsv", str(bad), "--val-image-dir", str(images)]) == 2
    assert f"{bad}, line 1: missing or wrong header" in capsys.readouterr().err


# -- exports the original can load ---------------------------------------------------------------------------------
def test_an_export_and_its_original_pickle_load_in_the_reference(tiny_dir, colour_data, tmp_path, caplog):
    tsv, images = colour_data
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="model.training"):
        code = train_main(["train", "--model-dir", str(tiny_dir), "--train-tsv", str(tsv), "--image-dir", str(images),
                           "--out", str(out), "--steps", "3", "--batch-size", "8", "--lr", "3e-3", "--warmup", "1",
                           "--save-every", "0", "--workers", "0", "--device", "cpu", "--no-progress",
                           "--export-original-pickle"])
    assert code == 0
    # the tiny backbones are local directories .../opt and .../clip: the original's loader would not build the LM
    assert "opt_version" in caplog.text and "lacks 'facebook/opt'" in caplog.text and "lacks 'clip'" not in caplog.text
    release = out / "release"
    ours = load_fromage(release, device="cpu", precision="fp32")
    reference = OriginalStyleFromage(release)
    pictures = [Image.new("RGB", (50, 40), COLOURS["red"]), Image.new("RGB", (40, 66), COLOURS["blue"])]
    torch.testing.assert_close(reference.retrieval_image_embeddings(pictures),
                               ours.encode_images(pictures, "retrieval"), rtol=1e-5, atol=1e-6)
    prompt = [pictures[1], "A blue square."]
    assert reference.get_log_lik_scores(prompt) == pytest.approx(ours.get_log_lik_scores(prompt), rel=1e-5)

    pickles = sorted(release.glob("cc3m_embeddings*.pkl"))
    assert [p.name for p in pickles] == ["cc3m_embeddings.pkl"]
    with pickles[0].open("rb") as f:
        data = pickle.load(f)
    assert set(data) == {"paths", "embeddings"} and len(data["paths"]) == 16
    files = [Image.open(p).convert("RGB") for p in data["paths"]]
    assert sorted(Path(p).name for p in data["paths"]) == sorted(f"img{i}.png" for i in range(16))
    torch.testing.assert_close(torch.from_numpy(data["embeddings"]), reference.retrieval_image_embeddings(files),
                               rtol=1e-5, atol=1e-6)


def test_an_export_names_hub_backbones_by_their_hub_id(tiny_dir, colour_data, tmp_path, monkeypatch, caplog):
    """Backbones found in the Hugging Face cache by id are written as those ids, which the original's loader
    recognises ('facebook/opt', 'clip')."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    for repo, folder in (("facebook/opt-tiny", "opt"), ("openai/clip-tiny", "clip")):
        entry = cache / f"models--{repo.replace('/', '--')}"
        shutil.copytree(tiny_dir / folder, entry / "snapshots" / ("0" * 40))
        (entry / "refs").mkdir()
        (entry / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    tsv, images = colour_data
    with caplog.at_level(logging.WARNING, logger="model.training"):
        result = train(fresh_config(tiny_dir, tsv, images, tmp_path / "out", opt_version="facebook/opt-tiny",
                                    visual_model="openai/clip-tiny"))
    written = json.loads((result.release_dir / "model_args.json").read_text())
    assert (written["opt_version"], written["visual_encoder"]) == ("facebook/opt-tiny", "openai/clip-tiny")
    assert "original code's load_fromage" not in caplog.text


# -- epochs ----------------------------------------------------------------------------------------------------
def test_epoch_steps_take_the_first_batches_of_a_fresh_permutation_per_epoch():
    """The original: each epoch a freshly shuffled DataLoader, left after --steps-per-epoch batches."""
    sampler = ShardedBatches(50, 5, 1, 0, seed=7, start=0, stop=6, epoch_batches=2)
    expected = []
    for epoch in range(3):
        order = torch.randperm(50, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        expected += [order[0:5], order[5:10]]
    assert list(sampler) == expected
    assert ShardedBatches(50, 5, 1, 0, seed=7, start=0, stop=3).batches_per_epoch == 10  # default: a whole pass

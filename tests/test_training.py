"""Training (model/training.py, model/losses.py, model/train_data.py) on a tiny model, all on CPU.

One 40-step run is shared: it must lower both losses, a resume from its step-20 checkpoint must repeat
its steps 21-40 bit for bit, its export must reload with identical outputs, and a 2-process torchrun run
must follow its loss trajectory.
"""
from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from fromage_bench.train_cli import main as train_main
from model import FromageInputError, load_fromage
from model.checkpoint import CHECKPOINT_FILE, RET_ROW_KEY
from model.losses import IGNORE_INDEX, contrastive_loss, contrastive_loss_share, token_loss_share
from model.train_data import CaptionDataset, Collate, ShardedBatches, tokenize_caption
from model.training import (TrainConfig, caption_sequences, embed_text, lm_forward, make_trainable, retrieval_labels,
                            train)

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "purple": (140, 30, 170), "orange": (250, 140, 20), "black": (10, 10, 10), "white": (245, 245, 245)}
LOSS_COLUMNS = ("loss", "caption_loss", "retrieval_loss", "ret_lm_loss", "grad_norm", "lr")


def write_colour_data(root: Path, n: int = 16) -> tuple[Path, Path]:
    """n solid-colour images (PNG, named without their suffix in the TSV) and captions naming the colour."""
    images = root / "images"
    images.mkdir(parents=True)
    lines = ["caption\timage"]
    names = list(COLOURS)
    for i in range(n):
        colour, shape = names[i % len(names)], ("circle", "square")[i // len(names) % 2]
        Image.new("RGB", (48 + 2 * i, 40), COLOURS[colour]).save(images / f"img{i}.png")
        lines.append(f"A {colour} {shape}.\timg{i}")
    tsv = root / "train.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    return tsv, images


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and two threads on a busy 2-core machine can stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    return write_colour_data(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def base_config(tiny_dir, colour_data, tmp_path_factory):
    tsv, images = colour_data
    return TrainConfig(model_dir=tiny_dir, train_tsv=tsv, image_dir=images, out=tmp_path_factory.mktemp("run") / "out",
                       steps=40, batch_size=8, lr=3e-3, warmup=5, save_every=20, seed=0, workers=0, progress=False)


@pytest.fixture(scope="module")
def short_run(base_config):
    return train(base_config)


def read_metrics(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


# -- the recipe --------------------------------------------------------------------------------------------
def test_training_lowers_both_losses(short_run, base_config):
    history = short_run.history
    assert [r["step"] for r in history] == list(range(1, 41))
    first, last = history[:8], history[-8:]
    assert mean(last, "caption_loss") < mean(first, "caption_loss") - 0.5
    assert mean(last, "retrieval_loss") < 0.5 * mean(first, "retrieval_loss")
    assert mean(last, "ret_lm_loss") < mean(first, "ret_lm_loss")
    assert history[0]["lr"] == pytest.approx(3e-3 / 5) and history[-1]["lr"] == pytest.approx(3e-3)  # warm-up
    logged = read_metrics(base_config.out / "metrics.csv")
    assert [r["step"] for r in logged] == list(range(1, 41))
    assert all(logged[i][k] == history[i][k] for i in range(40) for k in LOSS_COLUMNS)  # full precision in the CSV


def test_spliced_ret_row_gets_the_gradient_of_the_tied_matrix_row(tiny_dir):
    """The original trains the whole tied embedding matrix and zeroes every row's gradient but [RET]'s; our
    separate row, spliced into the inputs and the [RET] logit, must get the same gradient."""
    model = load_fromage(tiny_dir, device="cpu", precision="fp32").model
    ret = model.retrieval_token_idx
    captions = [tokenize_caption(model.tokenizer, c, ret) for c in ("A red circle.", "A big blue square at the top.")]
    batch = Collate(model.tokenizer.pad_token_id, max_len=12)(
        [{"input_ids": c, "pixel_values": torch.zeros(1), "skipped": 0} for c in captions])
    ids, lengths = batch.input_ids, batch.lengths
    features = torch.randn(2, model.visual_model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def losses(text_embeds, run_lm):
        visual = model.project_visual(features, "captioning")
        embeds, labels = caption_sequences(visual, text_embeds, ids, ret, concat=True)
        caption = token_loss_share(run_lm(embeds)[0], labels)
        logits, hidden = run_lm(text_embeds)
        at_ret = model.retrieval_space(hidden)[torch.arange(2), lengths - 1]
        return caption + token_loss_share(logits, retrieval_labels(ids, lengths)) + at_ret.square().sum()

    ret_row, _ = make_trainable(model)
    losses(embed_text(model, ret_row, ids), lambda e: lm_forward(model, ret_row, e, hidden_states=True)).backward()

    weight = model.input_embeddings.weight
    weight.requires_grad_(True)
    def plain_lm(embeds):
        out = model.lm(inputs_embeds=embeds, output_hidden_states=True)
        return out.logits, out.hidden_states
    losses(model.input_embeddings(ids), plain_lm).backward()
    assert weight.grad[ret].abs().max() > 0
    torch.testing.assert_close(ret_row.grad, weight.grad[ret], rtol=1e-5, atol=1e-7)


def test_caption_sequences_layout_and_concatenation():
    ids = torch.tensor([[2, 10, 11, 99, 1, 1], [2, 20, 99, 1, 1, 1]])  # BOS, caption, [RET]=99, padding
    text = ids.unsqueeze(-1).float().expand(-1, -1, 3)
    visual = torch.full((2, 1, 3), -1.0)
    embeds, labels = caption_sequences(visual, text, ids, 99, concat=False)
    assert labels.tolist() == [[-100, 2, 10, 11, -100, -100, -100], [-100, 2, 20, -100, -100, -100, -100]]
    embeds, labels = caption_sequences(visual, text, ids, 99, concat=True)
    assert embeds.shape == (1, 14, 3)
    assert embeds[0, :, 0].tolist() == [-1, 2, 10, 11, -1, 2, 20, 99, 1, 1, 99, 1, 1, 1]
    assert labels[0].tolist() == [-100, 2, 10, 11, -100, 2, 20] + [-100] * 7
    assert retrieval_labels(ids, torch.tensor([4, 3])).tolist() == [[2, 10, 11, 99, -100, -100],
                                                                     [2, 20, 99, -100, -100, -100]]


def test_single_process_shares_are_the_plain_losses():
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    image = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(2.0)
    logits = scale.exp() * text @ image.T
    expected = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    torch.testing.assert_close(contrastive_loss(text, image, scale), expected)
    torch.testing.assert_close(contrastive_loss_share(text, image, scale), expected)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[3, 1, IGNORE_INDEX, 2, 0], [IGNORE_INDEX, 4, 4, IGNORE_INDEX, IGNORE_INDEX]])
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(token_loss_share(logits, labels), expected)


# -- resume and export -------------------------------------------------------------------------------------
def test_resume_continues_bit_for_bit(short_run, base_config, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(base_config.out, out)  # metrics.csv holds steps 1-40; resuming from 20 keeps 1-20
    resumed = train(replace(base_config, out=out, resume=out / "checkpoints" / "step_0000020.pt"))
    assert [r["step"] for r in resumed.history] == list(range(21, 41))
    for a, b in zip(short_run.history[20:], resumed.history):
        assert all(a[k] == b[k] for k in LOSS_COLUMNS), (a, b)
    assert [r["step"] for r in read_metrics(out / "metrics.csv")] == list(range(1, 41))
    uninterrupted = torch.load(short_run.release_dir / CHECKPOINT_FILE, weights_only=True)["state_dict"]
    continued = torch.load(resumed.release_dir / CHECKPOINT_FILE, weights_only=True)["state_dict"]
    assert list(uninterrupted) == list(continued)
    assert all(torch.equal(uninterrupted[k], continued[k]) for k in uninterrupted)
    a = torch.load(short_run.checkpoint, weights_only=True)
    b = torch.load(resumed.checkpoint, weights_only=True)
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])
    assert all(torch.equal(x, y) for k in a["optimizer"]["state"] for x, y in
               zip(a["optimizer"]["state"][k].values(), b["optimizer"]["state"][k].values()))


def test_resume_refuses_a_different_data_order(short_run, base_config, tmp_path):
    with pytest.raises(FromageInputError, match="global_batch 8 \\(now 4\\)"):
        train(replace(base_config, out=tmp_path / "x", batch_size=4, resume=base_config.out))


def test_export_reloads_with_identical_outputs(short_run, tiny_dir):
    trained = short_run.fromage
    loaded = load_fromage(short_run.release_dir, device="cpu", precision="fp32")
    images = [Image.new("RGB", (50, 40), COLOURS["red"]), Image.new("RGB", (40, 60), COLOURS["blue"])]
    prompts = [["A red circle.[RET]"], [images[0], "A picture of a blue square.[RET]"]]
    assert torch.equal(trained.retrieval_embeddings(prompts), loaded.retrieval_embeddings(prompts))
    for mode in ("captioning", "retrieval"):
        assert torch.equal(trained.encode_images(images, mode), loaded.encode_images(images, mode))
    prompt = [images[1], "A blue square."]
    assert trained.get_log_lik_scores(prompt) == loaded.get_log_lik_scores(prompt)

    # Only the [RET] row of the embedding matrix changed, and it is the trained row.
    saved = load_file(str(tiny_dir / "opt" / "model.safetensors"))
    pretrained = next(v for k, v in saved.items() if k.endswith("embed_tokens.weight"))
    ret = loaded.model.retrieval_token_idx
    others = [i for i in range(loaded.model.input_embeddings.num_embeddings) if i != ret]
    for model in (trained.model, loaded.model):
        assert torch.equal(model.input_embeddings.weight[others], pretrained[others])
    row = torch.load(short_run.checkpoint, weights_only=True)["trainable"]["ret_row"]
    exported = torch.load(short_run.release_dir / CHECKPOINT_FILE, weights_only=True)["state_dict"][RET_ROW_KEY]
    assert torch.equal(exported, row.reshape(1, -1))
    assert torch.equal(loaded.model.input_embeddings.weight[ret], row)
    initial = load_fromage(tiny_dir, device="cpu", precision="fp32").model.input_embeddings.weight[ret]
    assert not torch.equal(row, initial)
    assert Path(loaded.model.args.opt_version).is_absolute() and Path(loaded.model.args.visual_encoder).is_absolute()
    assert trained.fingerprint != load_fromage(tiny_dir, device="cpu").fingerprint


# -- data ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, problem", [
    ("", "empty file"),
    ("text\tfile\nA cat.\tcat.jpg\n", "line 1: missing or wrong header"),
    ("caption\timage\nA cat.\tcat.jpg\textra\n", "line 2: expected 2 tab-separated fields .*, got 3"),
    ("caption\timage\n\tcat.jpg\n", "line 2: empty caption"),
    ("caption\timage\n", "no data rows"),
])
def test_malformed_tsv_names_the_file(tmp_path, content, problem):
    tsv = tmp_path / "bad.tsv"
    tsv.write_text(content)
    with pytest.raises(FromageInputError, match=problem) as err:
        CaptionDataset(tsv, tmp_path, tokenizer=None, processor=None, ret_id=0)
    assert err.value.where.startswith(str(tsv))


def test_cli_reports_a_malformed_tsv(tiny_dir, tmp_path, capsys):
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("caption,image\nA cat.,cat.jpg\n")
    (tmp_path / "images").mkdir()
    code = train_main(["train", "--model-dir", str(tiny_dir), "--train-tsv", str(tsv), "--image-dir",
                       str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2
    assert f"{tsv}, line 1: missing or wrong header" in capsys.readouterr().err


def test_unreadable_images_are_skipped_and_counted(tiny, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (30, 30), "red").save(images / "a.jpg")
    (images / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (30, 30), "blue").save(images / "c.png")
    tsv = tmp_path / "t.tsv"
    tsv.write_text("image\tcaption\na\tA red one.\nbroken.png\tBroken.\nmissing\tGone.\nc.png\tA blue one.\n")
    model = tiny.model
    data = CaptionDataset(tsv, images, model.tokenizer, model.feature_extractor, model.retrieval_token_idx)
    items = [data[i] for i in range(4)]
    # rows 2 and 3 are replaced by random readable rows (1 or 4), drawn again while the draw is unreadable
    assert [item["row"] for item in items][::3] == [0, 3] and {items[1]["row"], items[2]["row"]} <= {0, 3}
    assert [item["skipped"] for item in items][::3] == [0, 0] and items[1]["skipped"] >= 1 and items[2]["skipped"] >= 1
    assert items[1]["reasons"]["corrupt image"] == 1 and items[2]["reasons"]["missing image"] >= 1
    batch = Collate(model.tokenizer.pad_token_id)(items)
    longest = max(len(item["input_ids"]) for item in items)  # padded to the longest row, not to max_len 24
    assert longest < 24 and batch.input_ids.shape == (4, longest)
    assert batch.skipped == items[1]["skipped"] + items[2]["skipped"]
    assert batch.reasons == items[1]["reasons"] + items[2]["reasons"]
    assert batch.input_ids[0, batch.lengths[0] - 1] == model.retrieval_token_idx


def test_long_captions_keep_ret_last(tiny):
    tok, ret = tiny.model.tokenizer, tiny.model.retrieval_token_idx
    ids = tokenize_caption(tok, "a red circle " * 20, ret, max_len=24)
    assert len(ids) == 24 and ids[0] == tok.bos_token_id and ids[-1] == ret
    assert tokenize_caption(tok, "A red circle.", ret) == tok("A red circle.[RET]").input_ids


def test_ranks_read_blocks_of_the_global_batch():
    one = ShardedBatches(20, 8, 1, 0, seed=3, start=0, stop=5)
    two = [ShardedBatches(20, 4, 2, r, seed=3, start=0, stop=5) for r in range(2)]
    assert [a + b for a, b in zip(*two)] == list(one)
    assert list(ShardedBatches(20, 8, 1, 0, seed=3, start=2, stop=5)) == list(one)[2:]
    batches = list(one)
    assert sorted(batches[0] + batches[1]) == sorted(set(batches[0] + batches[1]))  # an epoch has no repeats
    assert batches[2] != batches[0]  # a new epoch, a new permutation


# -- several processes -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_follow_the_single_process_trajectory(short_run, base_config, tmp_path):
    """2 processes x batch 4 = the single-process run's global batch of 8 (same examples, same pairs for
    caption concatenation, same coin flips). The losses agree to float32 rounding: the only difference is
    the order in which per-example gradients are summed (within a process, then across the two), about
    1e-7 relative per step; 1e-4 leaves room for that to grow over 6 Adam steps."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "fromage_bench.train_cli", "train", "--model-dir", str(base_config.model_dir),
           "--train-tsv", str(base_config.train_tsv), "--image-dir", str(base_config.image_dir), "--out", str(out),
           "--steps", "6", "--batch-size", "4", "--lr", str(base_config.lr), "--warmup", str(base_config.warmup),
           "--save-every", "0", "--workers", "0", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    two = read_metrics(out / "metrics.csv")
    one = short_run.history[:6]
    assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(one, two):
        for key in ("loss", "caption_loss", "retrieval_loss", "ret_lm_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a, b)
    assert (out / "release" / CHECKPOINT_FILE).is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_autocast_steps_and_export(base_config, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    result = train(replace(base_config, out=tmp_path / precision, steps=4, save_every=0, device="cuda",
                           precision=precision))
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in result.history)
    assert result.history[0]["caption_loss"] == pytest.approx(7.4, abs=0.5)  # the fp32 CPU run starts at 7.41
    loaded = load_fromage(result.release_dir, device="cuda", precision=precision)  # the backbones trained at it
    prompts = [["A red circle.[RET]"]]
    torch.testing.assert_close(loaded.retrieval_embeddings(prompts), result.fromage.retrieval_embeddings(prompts))

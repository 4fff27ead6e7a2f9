"""The embedded default's speed-ups change the cost, not what is learnt (issue 18): captions padded to the
batch's longest row give the losses and gradients of padding to max_len; decoded training images kept in
memory are the pixels a fresh read gives; the stand-in text tower on length groups gives the embeddings of
one padded batch."""
from __future__ import annotations

import torch
from PIL import Image

from fromage_bench import standins
from model import load_fromage
from model import train_data
from model.train_data import CaptionDataset, Collate, tokenize_caption
from model.training import TrainConfig, make_trainable, micro_step, set_train_mode, setup_processes

CAPTIONS = ["A red circle.", "A big blue square at the top left of the picture, next to a small green star.",
            "Two shapes.", "A yellow triangle below a purple circle."]


def test_padding_to_the_longest_row_gives_the_losses_and_gradients_of_padding_to_max_len(tiny_dir):
    model = load_fromage(tiny_dir, device="cpu", precision="fp32").model
    ret = model.retrieval_token_idx
    items = [{"input_ids": tokenize_caption(model.tokenizer, c, ret, 40), "pixel_values": torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(i)),
              "skipped": 0} for i, c in enumerate(CAPTIONS)]
    trimmed = Collate(model.tokenizer.pad_token_id, max_len=40)(items)
    longest = max(len(item["input_ids"]) for item in items)
    assert trimmed.input_ids.shape == (4, longest) and longest < 40
    padded = trimmed.__class__(trimmed.pixel_values, torch.nn.functional.pad(
        trimmed.input_ids, (0, 40 - longest), value=model.tokenizer.pad_token_id), trimmed.lengths, 0)
    cfg = TrainConfig(model_dir=tiny_dir, train_tsv=tiny_dir, image_dir=tiny_dir, out=tiny_dir, max_len=40)
    procs = setup_processes("cpu", "fp32")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ret_row, params = make_trainable(model)
    set_train_mode(model)

    def run(batch, concat):
        for p in [ret_row, *params.values()]:
            p.grad = None
        shares = micro_step(model, ret_row, batch, concat, cfg, procs, scaler)
        return shares, {name: p.grad.clone() for name, p in [("ret", ret_row), *params.items()]}

    for concat in (False, True):
        (short_loss, short_grads), (long_loss, long_grads) = run(trimmed, concat), run(padded, concat)
        torch.testing.assert_close(short_loss, long_loss, rtol=1e-5, atol=1e-6)
        for name, grad in long_grads.items():
            torch.testing.assert_close(short_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_decoded_images_are_kept_in_the_main_process_up_to_the_limit(tiny, tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for name, size in (("a.jpg", (40, 30)), ("b.png", (30, 50)), ("c.jpg", (64, 64))):
        Image.new("RGB", size, "red").save(images / name)
    tsv = tmp_path / "t.tsv"
    tsv.write_text("image\tcaption\na\tA red one.\nb.png\tAnother.\nc\tA third.\n")
    model = tiny.model
    data = CaptionDataset(tsv, images, model.tokenizer, model.feature_extractor, model.retrieval_token_idx)
    first = data[0]["pixel_values"]
    fresh = model.feature_extractor([Image.open(images / "a.jpg")], return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(first, fresh, rtol=0, atol=0)
    (images / "a.jpg").unlink()  # kept: read again without the file
    torch.testing.assert_close(data[0]["pixel_values"], first, rtol=0, atol=0)

    monkeypatch.setattr(train_data, "PIXEL_CACHE_BYTES", first.numel() * first.element_size())
    data = CaptionDataset(tsv, images, model.tokenizer, model.feature_extractor, model.retrieval_token_idx)
    data[1], data[2]  # only the first fits
    (images / "c.jpg").unlink()
    item = data[2]  # c was not kept: its row is replaced by a random draw until one is readable (a is gone too): b
    assert item["row"] == 1 and item["skipped"] >= 1 and item["reasons"]["missing image"] == item["skipped"]
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as in a DataLoader worker
    data = CaptionDataset(tsv, images, model.tokenizer, model.feature_extractor, model.retrieval_token_idx)
    data[1]
    assert data._pixels == {}


def test_the_text_tower_on_length_groups_gives_one_padded_batchs_embeddings_and_gradients(tmp_path):
    from transformers import GPT2Tokenizer

    from model.tiny import save_trained_tokenizer

    save_trained_tokenizer(tmp_path / "tokenizer", vocab_size=60)
    settings = standins.VisionSettings(hidden=16, layers=1, heads=2, text_hidden=16, text_layers=2, embed_dim=8)
    clip, clip_tokenizer = standins.new_clip_model(GPT2Tokenizer.from_pretrained(str(tmp_path / "tokenizer")), settings)
    tower = standins.ClipText(clip).train()
    generator = torch.Generator().manual_seed(1)
    eos = clip_tokenizer.eos_token_id  # CLIP pools at the first EOS, so every list ends with one
    ids = [torch.randint(4, 40, (n,), generator=generator).tolist() + [eos] for n in (3, 17, 1, 9, 30, 5, 12)]

    grouped = standins.embed_texts_by_length(tower, ids, pad_id=1, groups=3)
    grouped.square().sum().backward()
    grouped_grads = [p.grad.clone() for p in tower.parameters()]
    tower.zero_grad()
    whole = tower(*standins._pad(ids, 1))
    whole.square().sum().backward()

    torch.testing.assert_close(grouped, whole, rtol=1e-5, atol=1e-6)  # in the lists' order
    for grad, p in zip(grouped_grads, tower.parameters()):
        torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-6)

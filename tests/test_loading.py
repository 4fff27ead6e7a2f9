"""load_fromage: release directories, backbone resolution, the [RET] row, and clear errors on bad input."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fromage_bench.cli import main
from model import FromageInputError, load_fromage, make_tiny
from model.checkpoint import CHECKPOINT_FILE


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_resize_shrinks_to_the_tokenizer_and_keeps_existing_rows(tiny, tiny_dir):
    saved = load_file(str(tiny_dir / "opt" / "model.safetensors"))
    original = next(v for k, v in saved.items() if k.endswith("embed_tokens.weight"))
    rows = tiny.model.input_embeddings.weight
    n = len(tiny.model.tokenizer)
    assert original.shape[0] > n and rows.shape[0] == n
    ret = tiny.model.retrieval_token_idx
    keep = [i for i in range(n) if i != ret]  # every row but [RET] is the pretrained row, unchanged
    assert torch.equal(rows[keep], original[keep])


def test_ret_row_comes_from_the_checkpoint(tiny, tiny_dir):
    ckpt = torch.load(tiny_dir / CHECKPOINT_FILE, weights_only=True)["state_dict"]
    row = tiny.model.input_embeddings.weight[tiny.model.retrieval_token_idx]
    assert torch.equal(row, ckpt["ret_input_embeddings.weight"].squeeze())
    assert torch.equal(tiny.model.visual_fc.weight, ckpt["model.visual_fc.weight"])
    assert tiny.model.logit_scale.item() == pytest.approx(ckpt["model.logit_scale"].item())


def test_four_visual_tokens_and_unknown_keys(tiny_vis4_dir, tmp_path, images):
    d = _copy(tiny_vis4_dir, tmp_path / "m")
    args = json.loads((d / "model_args.json").read_text())
    args.update(use_image_embed_norm=False, use_text_embed_layernorm=False, some_future_key=[1, 2])
    (d / "model_args.json").write_text(json.dumps(args))
    m = load_fromage(d, device="cpu")
    emb = m.encode_images(images[:2], "captioning")
    assert emb.shape == (2, 4, m.model.lm.config.word_embed_proj_dim)
    assert m.model.args.extra["some_future_key"] == [1, 2]


def test_overrides_and_relative_paths(tiny_dir, tmp_path):
    other = tmp_path / "elsewhere"
    shutil.copytree(tiny_dir / "opt", other / "my-opt")
    d = tmp_path / "release"
    d.mkdir()
    for name in ("model_args.json", CHECKPOINT_FILE):
        shutil.copy(tiny_dir / name, d / name)
    with pytest.raises(FromageInputError, match="not found"):
        load_fromage(d, device="cpu")  # "opt" and "clip" do not exist next to this copy
    m = load_fromage(d, opt_version=str(other / "my-opt"), visual_model=str(tiny_dir / "clip"), device="cpu")
    assert m.model.args.opt_version == str(other / "my-opt")


def test_hugging_face_ids_resolve_from_the_local_cache_only(tiny_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    for repo, sub in (("models--facebook--opt-tiny", "opt"), ("models--openai--clip-tiny", "clip")):
        snapshot = cache / repo / "snapshots" / "0123456789abcdef"
        shutil.copytree(tiny_dir / sub, snapshot)
        (cache / repo / "refs").mkdir()
        (cache / repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    d = tmp_path / "release"
    d.mkdir()
    for name in ("model_args.json", CHECKPOINT_FILE):
        shutil.copy(tiny_dir / name, d / name)
    m = load_fromage(d, opt_version="facebook/opt-tiny", visual_model="openai/clip-tiny", device="cpu")
    assert m.model.lm.config.hidden_size == 64
    with pytest.raises(FromageInputError, match="local Hugging Face cache"):
        load_fromage(d, opt_version="facebook/opt-not-downloaded", visual_model="openai/clip-tiny", device="cpu")


def test_loading_is_deterministic(tiny_dir, images):
    a, b = load_fromage(tiny_dir, device="cpu"), load_fromage(tiny_dir, device="cpu")
    prompt = [images[0], "A red"]
    assert a.get_log_lik_scores(prompt) == b.get_log_lik_scores(prompt)
    assert a.fingerprint == b.fingerprint


def test_make_tiny_is_deterministic_for_a_seed(tmp_path):
    a, b, c = (make_tiny(tmp_path / n, seed=s) for n, s in (("a", 3), ("b", 3), ("c", 4)))
    ck = lambda d: torch.load(d / CHECKPOINT_FILE, weights_only=True)["state_dict"]  # noqa: E731
    assert all(torch.equal(ck(a)[k], ck(b)[k]) for k in ck(a))
    assert not torch.equal(ck(a)["model.visual_fc.weight"], ck(c)["model.visual_fc.weight"])
    assert (a / "opt" / "vocab.json").read_bytes() == (b / "opt" / "vocab.json").read_bytes()


def test_release_round_trip(tiny, tiny_dir, tmp_path, images):
    from model.checkpoint import save_release

    out = tmp_path / "export"
    save_release(tiny.model, out)
    for sub in ("opt", "clip"):  # the export references its backbones; put them beside it
        (out / sub).symlink_to(tiny_dir / sub, target_is_directory=True)
    again = load_fromage(out, device="cpu")
    prompt = [images[2], "A blue [RET]"]
    assert again.get_log_lik_scores(prompt) == tiny.get_log_lik_scores(prompt)
    assert torch.equal(again.retrieval_embeddings([prompt]), tiny.retrieval_embeddings([prompt]))
    assert torch.equal(again.generate([prompt], 8).token_ids, tiny.generate([prompt], 8).token_ids)


# -- bad input: one clear error naming the file ------------------------------------------------------
def _broken(tiny_dir, tmp_path, breaker):
    d = _copy(tiny_dir, tmp_path / "broken")
    breaker(d)
    return d


def _rewrite_ckpt(transform):
    def breaker(d):
        sd = torch.load(d / CHECKPOINT_FILE, weights_only=True)["state_dict"]
        torch.save(transform(sd), d / CHECKPOINT_FILE)
    return breaker


class Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


BAD_DIRS = {
    "missing model_args.json": (lambda d: (d / "model_args.json").unlink(), "model_args.json: missing"),
    "malformed JSON": (lambda d: (d / "model_args.json").write_text("{not json"), "model_args.json: malformed JSON"),
    "JSON not an object": (lambda d: (d / "model_args.json").write_text("[1, 2]"), "expected a JSON object"),
    "bad n_visual_tokens": (lambda d: (d / "model_args.json").write_text(json.dumps(
        {"opt_version": "opt", "visual_encoder": "clip", "n_visual_tokens": 0})), "n_visual_tokens must be"),
    "missing checkpoint": (lambda d: (d / CHECKPOINT_FILE).unlink(), "pretrained_ckpt.pth.tar: missing"),
    "not a torch file": (lambda d: (d / CHECKPOINT_FILE).write_bytes(b"garbage"), "not a readable torch checkpoint"),
    "no state_dict": (_rewrite_ckpt(lambda sd: sd), "expected a dict with a 'state_dict' entry"),
    "missing keys": (_rewrite_ckpt(lambda sd: {"state_dict": {k: v for k, v in sd.items() if "visual_fc" not in k}}),
                     "checkpoint lacks model.visual_fc.weight"),
    "wrong shape": (_rewrite_ckpt(lambda sd: {"state_dict": {**sd, "model.visual_embeddings.weight":
                                                              torch.zeros(256, 32)}}), "has shape (256, 32)"),
    "pickle payload refused": (_rewrite_ckpt(lambda sd: {"state_dict": sd, "evil": Evil()}), "refused"),
    "missing backbone": (lambda d: shutil.rmtree(d / "clip"), "clip: vision encoder (visual_encoder) not found"),
    "backbone without config": (lambda d: (d / "opt" / "config.json").unlink(), "config.json: missing"),
}


@pytest.mark.parametrize("case", BAD_DIRS, ids=list(BAD_DIRS))
def test_bad_model_directories_give_one_clear_line_and_exit_2(case, tiny_dir, tmp_path, capsys):
    breaker, message = BAD_DIRS[case]
    d = _broken(tiny_dir, tmp_path, breaker)
    with pytest.raises(FromageInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_fromage(d, device="cpu")
    capsys.readouterr()
    assert main(["info", "--model-dir", str(d), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert message.split(":")[0] in err
    assert "pickle code ran" not in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "fp8"}, "unknown precision"),
    ({"device": "cuda"}, "CUDA was requested"),
    ({"device": "tpu"}, "not a torch device|only cpu and cuda"),
])
def test_bad_device_or_precision(tiny_dir, kwargs, message):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(FromageInputError, match=message):
        load_fromage(tiny_dir, **kwargs)

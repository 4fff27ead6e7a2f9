"""int8 with random weights: planted outlier feature dimensions (so LLM.int8()'s outlier path runs, as it does for
trained OPT), their label in the profile records, and int8 weight bytes counted the same after the first forward."""
import json

import bitsandbytes as bnb
import pytest
import torch

from fromage_bench.cli import main
from fromage_bench.results import read_results
from model.backbones import load_language_model
from model.precision import (INT8_OUTLIER_THRESHOLD, PLANTED_OUTLIER_DIMS, Placement, quantize_linear_layers_int8,
                             weight_bytes)
from model.tiny import tiny_clip_config

CPU = torch.device("cpu")
LN_FED = ("q_proj", "k_proj", "v_proj", "fc1")  # inputs: the layer norms' outputs, where trained OPT's outliers are
MIXED = ("out_proj", "fc2")  # inputs: attention averages and ReLU outputs


@pytest.fixture(scope="module")
def small_opt_config(tmp_path_factory):
    """A small OPT in the shipped paper configuration's format (pre-layer-norm, biases, init_std 0.02)."""
    config = {"model_type": "opt", "activation_function": "relu", "do_layer_norm_before": True, "enable_bias": True,
              "layer_norm_elementwise_affine": True, "init_std": 0.02, "vocab_size": 1000,
              "max_position_embeddings": 128, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2,
              "hidden_size": 64, "ffn_dim": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
              "word_embed_proj_dim": 64, "dropout": 0.0, "attention_dropout": 0.0}
    path = tmp_path_factory.mktemp("opt") / "config.json"
    path.write_text(json.dumps(config))
    return path


def _random_lm(config_path, precision: str, outliers: str):
    torch.manual_seed(0)
    return load_language_model(None, Placement(CPU, precision), random_init_from=str(config_path),
                               int8_outliers=outliers)


def _tokens() -> torch.Tensor:
    ids = torch.randint(4, 1000, (3, 40), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 2
    return ids


def linear_inputs(lm) -> dict[str, torch.Tensor]:
    """|input| of every decoder linear layer for one batch, flattened to (tokens, features), via forward hooks."""
    seen, hooks = {}, []
    for name, module in lm.model.decoder.layers.named_modules():
        if name.rsplit(".", 1)[-1] in LN_FED + MIXED:
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: seen.__setitem__(name, args[0].detach().float().flatten(0, -2).abs())))
    with torch.inference_mode():
        lm(input_ids=_tokens())
    for hook in hooks:
        hook.remove()
    return seen


def _above_threshold(x: torch.Tensor) -> list[int]:
    """Feature columns LLM.int8() treats as outliers: any token with |x| >= 6."""
    return (x >= INT8_OUTLIER_THRESHOLD).any(dim=0).nonzero().flatten().tolist()


def test_planted_dimensions_exceed_the_threshold_at_the_layer_norm_fed_inputs(small_opt_config):
    lm = _random_lm(small_opt_config, "fp32", "planted")
    dims = lm.planted_outlier_dims
    assert len(dims) == PLANTED_OUTLIER_DIMS and len(set(dims)) == len(dims)
    others = [d for d in range(64) if d not in dims]
    inputs = linear_inputs(lm)
    assert len(inputs) == 6 * 3
    for name, x in inputs.items():
        if name.rsplit(".", 1)[-1] in LN_FED:
            assert x[:, dims].min() > INT8_OUTLIER_THRESHOLD, name  # every token, every layer
            assert x[:, others].max() < INT8_OUTLIER_THRESHOLD, name
        else:
            assert _above_threshold(x) == [], name


def test_without_planting_no_input_reaches_the_threshold(small_opt_config):
    lm = _random_lm(small_opt_config, "fp32", "none")
    assert lm.planted_outlier_dims == []
    assert {name: _above_threshold(x) for name, x in linear_inputs(lm).items() if _above_threshold(x)} == {}


def test_planting_moves_only_the_layer_norm_biases_in_the_planted_dimensions(small_opt_config):
    plain = dict(_random_lm(small_opt_config, "fp32", "none").named_parameters())
    planted = _random_lm(small_opt_config, "fp32", "planted")
    dims = planted.planted_outlier_dims
    for name, tensor in planted.named_parameters():
        changed = (tensor != plain[name]).nonzero().flatten().tolist() if tensor.dim() == 1 else \
            [] if torch.equal(tensor, plain[name]) else ["matrix"]
        is_layer_ln_bias = "layers." in name and "layer_norm.bias" in name
        assert changed == (dims if is_layer_ln_bias else []), name
        if is_layer_ln_bias:
            assert tensor[dims].abs().tolist() == [20.0] * len(dims)


@pytest.mark.parametrize("outliers", ["planted", "none"])
def test_int8_takes_the_outlier_path_in_the_planted_dimensions(small_opt_config, outliers):
    """bitsandbytes' own decision: the outlier columns each Linear8bitLt split off in its last forward."""
    lm = _random_lm(small_opt_config, "int8", outliers)
    with torch.inference_mode():
        lm(input_ids=_tokens())
    layers = {n: m for n, m in lm.model.decoder.layers.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert len(layers) == 6 * 3
    for name, layer in layers.items():
        expected = lm.planted_outlier_dims if name.rsplit(".", 1)[-1] in LN_FED else []
        assert layer.state.idx.tolist() == expected, name


def test_int8_weight_bytes_are_the_same_after_the_first_forward():
    """bitsandbytes keeps the row scales (SCB) on the weight until the first forward, then in `layer.state`."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4, bias=False))
    quantize_linear_layers_int8(model, CPU, skip=())
    # int8 weights 8*16 + 4*8 bytes, one fp32 scale per output row (8 + 4) * 4, the fp32 bias 8 * 4
    by_hand = 8 * 16 + 4 * 8 + (8 + 4) * 4 + 8 * 4
    assert weight_bytes(model) == by_hand
    with torch.inference_mode():
        model(torch.randn(3, 16))
    assert model[0].weight.SCB is None and model[0].state.SCB is not None  # where bitsandbytes moved them
    assert weight_bytes(model) == by_hand


def test_int8_lm_weight_bytes_do_not_change_when_it_runs(tiny_dir):
    lm = load_language_model(tiny_dir / "opt", Placement(CPU, "int8"))
    before = weight_bytes(lm)
    with torch.inference_mode():
        lm(input_ids=torch.tensor([[2, 40, 41, 42]]))
    assert weight_bytes(lm) == before


def _profile(tmp_path, name, *argv):
    out = tmp_path / name
    code = main(["profile", "--out", str(out), "--device", "cpu", "--scenarios", "prefill,decode",
                 "--context-lengths", "8", "--decode-batch-sizes", "1", "--new-tokens", "2", "--decode-paths",
                 "auto,static", "--repeats", "1", "--warmup", "0", "--min-seconds", "0", *argv])
    return code, out


@pytest.fixture(scope="module")
def small_clip_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "config.json"
    path.write_text(tiny_clip_config().to_json_string())
    return path


def test_profile_records_say_which_outliers_were_used(small_opt_config, small_clip_config, tiny_dir, tmp_path):
    random_init = ["--random-init", "--opt-version", str(small_opt_config), "--visual-model", str(small_clip_config),
                   "--precisions", "fp32,int8"]
    code, default = _profile(tmp_path, "default", *random_init)
    assert code == 0
    records = read_results(default)["records"]
    assert ("int8", "skipped") in {(r["precision"], r["status"]) for r in records}  # int8 cannot take the static step
    assert {r["int8_outliers"] for r in records} == {"planted"}  # every record, skipped ones too
    assert read_results(default)["config"]["int8_outliers"] == "planted"
    code, plain = _profile(tmp_path, "plain", *random_init, "--int8-outliers", "none")
    assert code == 0 and {r["int8_outliers"] for r in read_results(plain)["records"]} == {"none"}
    code, loaded = _profile(tmp_path, "loaded", "--model-dir", str(tiny_dir), "--precisions", "int8")
    assert code == 0 and {r["int8_outliers"] for r in read_results(loaded)["records"]} == {"checkpoint"}


def test_unknown_outlier_mode_is_bad_input(tiny_dir, tmp_path, capsys):
    code, out = _profile(tmp_path, "bad", "--model-dir", str(tiny_dir), "--int8-outliers", "some")
    assert code == 2
    assert "--int8-outliers 'some': unknown int8 outlier mode" in capsys.readouterr().err
    assert not out.exists()

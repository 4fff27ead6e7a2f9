"""Benchmark fixtures: the issue's reference size, a random-init OPT of hidden 512 x 8 layers (vocabulary
50272, as OPT) with a small CLIP vision tower, on CPU in fp32."""
import json
import time

import pytest
import torch

from model import load_fromage

OPT_512x8 = {"model_type": "opt", "vocab_size": 50272, "hidden_size": 512, "ffn_dim": 2048, "num_hidden_layers": 8,
             "num_attention_heads": 8, "max_position_embeddings": 2048, "word_embed_proj_dim": 512,
             "do_layer_norm_before": True, "activation_function": "relu", "dropout": 0.0, "attention_dropout": 0.0,
             "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2}
CLIP_SMALL = {"model_type": "clip_vision_model", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
              "num_attention_heads": 4, "patch_size": 32, "image_size": 224, "hidden_act": "quick_gelu"}


@pytest.fixture(scope="session")
def bench_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-configs")
    (d / "opt.json").write_text(json.dumps(OPT_512x8))
    (d / "clip.json").write_text(json.dumps(CLIP_SMALL))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_fromage(None, random_init=True, opt_version=str(d / "opt.json"), visual_model=str(d / "clip.json"),
                        device="cpu", precision="fp32", seed=0)


def best_of(fn, repeats: int = 3) -> float:
    """Fastest of `repeats` wall-clock runs (the reference path is timed by hand, the fast one by pytest-benchmark)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best

"""Precisions on CPU: bf16/fp16 close to fp32; int8 (LLM.int8() via bitsandbytes) close to fp32, smaller,
and the same whichever way it is built (BitsAndBytesConfig at load time or swapping layers afterwards)."""
import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F

from model import load_fromage
from model.backbones import load_language_model
from model.precision import Placement, quantize_linear_layers_int8, weight_bytes


@pytest.fixture(scope="module")
def by_precision(tiny_dir):
    return {p: load_fromage(tiny_dir, device="cpu", precision=p) for p in ("fp32", "bf16", "fp16", "int8")}


PROMPT_TEXT = "Q: what colour is the circle?\nA: red"


@pytest.mark.parametrize("precision, tol", [("bf16", 0.05), ("fp16", 0.01), ("int8", 0.05)])
def test_lower_precisions_track_fp32(by_precision, images, precision, tol):
    ref, low = by_precision["fp32"], by_precision[precision]
    prompt = [images[0], PROMPT_TEXT]
    ll_ref, ll_low = ref.get_log_lik_scores(prompt), low.get_log_lik_scores(prompt)
    assert abs(ll_low - ll_ref) <= tol * abs(ll_ref)
    ret_prompt = [images[1], "two blue squares [RET]"]
    cos = F.cosine_similarity(ref.retrieval_embeddings([ret_prompt]), low.retrieval_embeddings([ret_prompt]).float())
    assert cos.item() > 0.98


def test_dtypes_where_they_should_be(by_precision):
    assert by_precision["bf16"].model.lm_dtype == torch.bfloat16
    assert by_precision["fp16"].model.visual_fc.weight.dtype == torch.float16
    int8 = by_precision["int8"].model
    linears = [m for m in int8.lm.model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(linears) == 6 * int8.lm.config.num_hidden_layers  # q, k, v, out, fc1, fc2 per layer
    assert all(m.weight.dtype == torch.int8 for m in linears)
    assert not isinstance(int8.lm.lm_head, bnb.nn.Linear8bitLt)
    assert int8.visual_fc.weight.dtype == torch.float32  # trained maps stay in higher precision
    assert all(m.threshold == 6.0 for m in linears) if hasattr(linears[0], "threshold") else \
        all(m.state.threshold == 6.0 for m in linears)


def test_weight_bytes_count_real_storage(by_precision):
    fp32, bf16, int8 = (by_precision[p].weight_bytes for p in ("fp32", "bf16", "int8"))
    assert bf16 == pytest.approx(fp32 / 2, rel=0.01)
    lm = by_precision["int8"].model.lm
    quantized = sum(m.weight.numel() for m in lm.model.modules() if isinstance(m, bnb.nn.Linear8bitLt))
    # those weights cost 1 byte instead of 4 (plus one fp32 scale per output row)
    assert fp32 - int8 == pytest.approx(3 * quantized, rel=0.05)


def test_layer_swap_equals_bitsandbytes_config(tiny_dir, images):
    """Random-init models are quantised by swapping layers; loaded ones via BitsAndBytesConfig: same result."""
    cpu = torch.device("cpu")
    via_config = load_language_model(tiny_dir / "opt", Placement(cpu, "int8"))
    swapped = load_language_model(tiny_dir / "opt", Placement(cpu, "fp32"))  # eval mode, like the quantised one
    quantize_linear_layers_int8(swapped.model, cpu)
    ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    torch.testing.assert_close(swapped(input_ids=ids).logits, via_config(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert weight_bytes(swapped) == weight_bytes(via_config)

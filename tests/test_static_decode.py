"""The fixed-size-cache decode step against Hugging Face's OPT forward, and the fused q/k/v projection (on CPU;
greedy decoding through the step, compiled too, is in test_generation.py, the CUDA-graph replay in
test_cuda.py)."""
import pytest
import torch
from transformers import OPTForCausalLM

from model.lm_cache import cache_layers, forward_with_cache, returned_cache
from model.static_decode import StaticDecoder, fused_qkv, supports_static
from model.tiny import tiny_opt_config


def tiny_lm(**overrides) -> OPTForCausalLM:
    torch.manual_seed(0)
    config = tiny_opt_config(vocab_size=97, hidden=32, layers=3, heads=4)
    for name, value in overrides.items():
        setattr(config, name, value)
    return OPTForCausalLM(config).eval()


@pytest.mark.parametrize("overrides", [{}, {"do_layer_norm_before": False},
                                       {"enable_bias": False, "layer_norm_elementwise_affine": False}],
                         ids=["pre-norm", "post-norm (OPT-350m)", "no biases, no norm weights"])
def test_one_static_step_equals_the_full_forward(overrides):
    """Prefill 6 positions (the first one padding), then one step: the logits and every hidden state equal
    Hugging Face's forward over all 7 positions at once."""
    lm = tiny_lm(**overrides)
    embeds = torch.randn(1, 7, lm.config.word_embed_proj_dim, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        full = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        prefill = forward_with_cache(lm, None, inputs_embeds=embeds[:, :6], attention_mask=mask[:, :6],
                                     position_ids=positions[:, :6])
        decoder = StaticDecoder(lm, batch_size=1, max_len=16, use_graph=False)
        decoder.load_prefix(cache_layers(returned_cache(prefill)), mask[:, :6])
        logits, hidden = decoder.step(embeds[:, 6:], positions[:, 6:], column=6)
    torch.testing.assert_close(logits, full.logits[:, -1], atol=1e-5, rtol=1e-5)
    assert len(hidden) == len(full.hidden_states)
    for ours, theirs in zip(hidden, full.hidden_states):
        torch.testing.assert_close(ours[:, -1], theirs[:, -1], atol=1e-5, rtol=1e-5)


def test_fused_qkv_shares_the_projection_weights():
    lm = tiny_lm()
    attn = lm.model.decoder.layers[0].self_attn
    ids = torch.tensor([[2, 5, 7, 11]])
    before = lm(ids).logits
    originals = [p.weight.detach().clone() for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    weight, bias = fused_qkv(attn)
    assert torch.equal(weight, torch.cat(originals))
    assert torch.equal(bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
    # the projections now read row blocks of the fused tensor: nothing is held twice
    rows = attn.q_proj.weight.shape[0]
    for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        assert proj.weight.data_ptr() == weight[i * rows].data_ptr()
        assert isinstance(proj.weight, torch.nn.Parameter) and proj.weight.requires_grad
    assert fused_qkv(attn)[0] is weight  # reused while the weights stay where they are
    torch.testing.assert_close(lm(ids).logits, before, atol=0, rtol=0)
    lm.double()  # casting replaces the parameters: the fused copy follows
    refused, _ = fused_qkv(attn)
    assert refused.dtype == torch.float64 and refused.data_ptr() == attn.q_proj.weight.data_ptr()


def test_only_relu_opt_models_take_the_static_step():
    assert supports_static(tiny_lm())
    assert not supports_static(tiny_lm(activation_function="gelu"))
    assert not supports_static(tiny_lm().train())


def test_a_freed_model_takes_its_static_decoders_with_it(tiny_dir, images):
    """The decoders (KV buffers, CUDA graphs) reused across calls belong to the model: once the caller drops
    the model, the LM and its weights are garbage, not kept alive by a cache of decoders."""
    import gc
    import weakref

    from model import load_fromage

    m = load_fromage(tiny_dir, device="cpu", precision="fp32")
    m.generate([[images[0], "A red"]], 6, decode="static")
    dead_model, dead_lm = weakref.ref(m), weakref.ref(m.model.lm)
    weight = weakref.ref(m.model.lm.model.decoder.layers[0].fc1.weight)
    del m
    gc.collect()
    assert dead_model() is None and dead_lm() is None and weight() is None


def test_fusing_every_layer_keeps_one_copy_of_the_weights_and_releases_the_cache_once(monkeypatch):
    """Building a decoder fuses all layers up front (never inside a graph capture) into tensors equal to the
    concatenation; the three projections' old storages are freed (not duplicated); the allocator's cache is
    handed back once, after the last layer."""
    import gc
    import weakref

    import model.static_decode as static_decode

    lm = tiny_lm()
    layers = [layer.self_attn for layer in lm.model.decoder.layers]
    projections = [(a.q_proj, a.k_proj, a.v_proj) for a in layers]
    expected = [torch.cat([p.weight.detach().clone() for p in ps]) for ps in projections]
    old_storages = [weakref.ref(p.weight.untyped_storage()) for ps in projections for p in ps]
    param_bytes = sum(p.nbytes for p in lm.parameters())
    released = []
    monkeypatch.setattr(static_decode, "_release_cached_blocks",
                        lambda device: released.append(sum(a in static_decode._FUSED_QKV for a in layers)))
    StaticDecoder(lm, batch_size=1, max_len=8, use_graph=False)
    gc.collect()
    assert released == [len(layers)]  # once, with every layer fused
    for attn, ps, want in zip(layers, projections, expected):
        weight, _ = static_decode._FUSED_QKV[attn]
        assert torch.equal(weight, want)
        assert {p.weight.untyped_storage().data_ptr() for p in ps} == {weight.untyped_storage().data_ptr()}
    assert all(ref() is None for ref in old_storages)  # freed: nothing holds the pre-fusion copies
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in lm.parameters()}
    assert sum(storages.values()) == param_bytes  # every byte of the weights held once
    StaticDecoder(lm, batch_size=2, max_len=8, use_graph=False)
    assert released == [len(layers)]  # already fused: nothing new to release

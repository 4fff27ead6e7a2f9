"""Decoding: KV-cache tokens equal the original's no-cache decoding; [RET] rules; sampling; newline stop."""
import pytest
import torch

from model.generation import choose_next_token

PROMPTS = [
    lambda im: [im[0], "A red"],
    lambda im: ["Q: what colour is it?\nA:"],
    lambda im: ["There are", im[2], "two blue squares and", im[3], "then"],
]


@pytest.mark.parametrize("make_prompt", PROMPTS)
def test_kv_cache_greedy_tokens_equal_no_cache(tiny, images, make_prompt):
    prompt = make_prompt(images)
    cached = tiny.generate([prompt], 24, use_cache=True)
    uncached = tiny.generate([prompt], 24, use_cache=False)
    assert torch.equal(cached.token_ids, uncached.token_ids)
    torch.testing.assert_close(cached.ret_embeddings, uncached.ret_embeddings, atol=1e-5, rtol=1e-4)


def test_left_padded_batch_equals_each_prompt_alone(tiny, images):
    prompts = [p(images) for p in PROMPTS]
    batched = tiny.generate(prompts, 16)
    for row, prompt in enumerate(prompts):
        alone = tiny.generate([prompt], 16)
        assert torch.equal(batched.token_ids[row], alone.token_ids[0])
        torch.testing.assert_close(batched.ret_embeddings[row], alone.ret_embeddings[0], atol=1e-5, rtol=1e-4)


def test_ret_scale_factor_and_min_word_tokens():
    ret = 7
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5, 0.0, 0.0, 0.0, 2.5]])
    assert choose_next_token(logits, 0, ret).item() == 2            # plain argmax
    assert choose_next_token(logits, 0, ret, ret_scale_factor=1.3).item() == ret  # 2.5 * 1.3 = 3.25 > 3
    assert choose_next_token(logits, 0, ret, ret_scale_factor=1.3, min_word_tokens=1).item() == 2  # [RET] forbidden at step 0
    assert choose_next_token(logits, 1, ret, ret_scale_factor=1.3, min_word_tokens=1).item() == ret


def test_top_p_keeps_the_nucleus_only():
    # probabilities 0.5, 0.3, 0.2: top_p 0.6 keeps the first two tokens (0.5 < 0.6, 0.8 > 0.6 ends the nucleus)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    g = torch.Generator().manual_seed(0)
    drawn = {choose_next_token(logits, 5, ret_token=0, temperature=1.0, top_p=0.6, generator=g).item() for _ in range(200)}
    assert drawn == {0, 1}
    with pytest.raises(ValueError):
        choose_next_token(logits, 0, 0, temperature=0.0, top_p=0.5)


def test_sampling_is_reproducible_with_a_seeded_generator(tiny, images):
    draw = lambda: tiny.generate([[images[0], "A"]], 12, temperature=1.0, top_p=0.9,  # noqa: E731
                                 generator=torch.Generator().manual_seed(3)).token_ids
    assert torch.equal(draw(), draw())


def test_generation_stops_at_the_first_newline(tiny, images):
    newline = tiny.model.tokenizer("\n", add_special_tokens=False).input_ids[0]
    prompt = [images[1], "Q: is it"]
    raw = tiny.generate([prompt], 20).token_ids[0]
    # force a newline: scale nothing, but check against whatever the model produced via the ranking rule
    out = tiny.generate([prompt], 20, stop_at_newline=True)
    positions = (raw == newline).nonzero().flatten().tolist()
    expected = positions[0] if positions else 20
    assert int(out.lengths[0]) == expected
    assert torch.equal(out.token_ids[0, :expected], raw[:expected])


def test_generate_for_images_and_texts_truncates_at_newline(tiny, images, monkeypatch):
    newline = tiny.model.tokenizer("\n", add_special_tokens=False).input_ids[0]
    word = tiny.model.tokenizer(" red", add_special_tokens=False).input_ids[0]
    script = iter([word, word, newline, word, word, word])

    def scripted(logits, step, ret_token, **kw):
        return torch.full((logits.shape[0],), next(script), dtype=torch.long)

    monkeypatch.setattr("model.generation.choose_next_token", scripted)
    out = tiny.generate_for_images_and_texts([images[0], "A"], num_words=6)
    assert out == [" red red"]


@pytest.mark.parametrize("make_prompt", PROMPTS)
def test_static_cache_decoder_equals_dynamic_cache(tiny, images, make_prompt):
    """The fixed-size-cache step (what the CUDA graph replays) against Hugging Face's forward."""
    prompt = make_prompt(images)
    dynamic = tiny.generate([prompt], 20, decode="dynamic")
    static = tiny.generate([prompt], 20, decode="static")
    assert torch.equal(dynamic.token_ids, static.token_ids)
    torch.testing.assert_close(dynamic.ret_embeddings, static.ret_embeddings, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("decode", ["static", "compiled"])
def test_static_decoder_with_left_padding_and_4_visual_tokens(tiny_vis4_dir, images, decode):
    """"compiled" runs the layer halves through torch.compile (inductor on CPU here)."""
    from model import load_fromage

    m = load_fromage(tiny_vis4_dir, device="cpu")
    prompts = [p(images) for p in PROMPTS]
    dynamic = m.generate(prompts, 12, decode="dynamic")
    torch._dynamo.reset()
    static = m.generate(prompts, 12, decode=decode)
    compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert compiled_graphs == (2 if decode == "compiled" else 0)  # the two layer halves, shared by every layer
    assert torch.equal(dynamic.token_ids, static.token_ids)
    torch.testing.assert_close(dynamic.ret_embeddings, static.ret_embeddings, atol=1e-5, rtol=1e-4)


def test_on_device_greedy_applies_the_ret_rules_like_the_host_loop(tiny, images):
    prompt = [images[1], "There are two"]
    ret = tiny.model.retrieval_token_idx
    # a factor that makes this model emit [RET] (its [RET] logits are negative, so a negative factor does)
    factor = next(f for f in (3.0, -20.0) if ret in tiny.generate([prompt], 10, decode="dynamic",
                                                                  ret_scale_factor=f).token_ids)
    for kwargs in ({"ret_scale_factor": factor}, {"ret_scale_factor": factor, "min_word_tokens": 4},
                   {"ret_scale_factor": factor, "min_word_tokens": 10}):
        dynamic = tiny.generate([prompt], 10, decode="dynamic", **kwargs)
        static = tiny.generate([prompt], 10, decode="static", **kwargs)
        assert torch.equal(dynamic.token_ids, static.token_ids)
        torch.testing.assert_close(dynamic.ret_embeddings, static.ret_embeddings, atol=1e-5, rtol=1e-4)
    assert ret in tiny.generate([prompt], 10, decode="static", ret_scale_factor=factor).token_ids
    assert ret not in tiny.generate([prompt], 10, decode="static", ret_scale_factor=factor, min_word_tokens=10).token_ids

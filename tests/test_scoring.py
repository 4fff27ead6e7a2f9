"""Log-likelihood: the original get_log_lik_scores semantics, and KV-cached continuation scoring."""
import pytest
import torch
import torch.nn.functional as F

from model.prompts import embed_prompt

OPTIONS = ["red", "a blue square", "no", "yes, it is green", "two"]


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize("batch_size", [None, 2])
def test_score_continuations_equals_scoring_each_alone(tiny, images, shift, bos, batch_size):
    context = [images[0], "Q: what colour is it?\nA: red\nQ: how many?\nA: "]
    fast = tiny.score_continuations(context, OPTIONS, continuation_bos=bos, shift=shift, batch_size=batch_size)
    naive = tiny.score_continuations(context, OPTIONS, continuation_bos=bos, shift=shift, naive=True)
    torch.testing.assert_close(fast.sum_logprob, naive.sum_logprob, atol=1e-4, rtol=1e-5)
    assert torch.equal(fast.num_tokens, naive.num_tokens)


# Options as VisDial's are: many start alike, one is a prefix of another, one repeats, one shares only BOS.
SHARED_PREFIX_OPTIONS = ["it is red", "it is blue", "it is", "it is red", "it's red", "no", "no it is not", "red"]


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize("batch_size", [None, 3])
def test_options_with_shared_prefixes_score_as_each_alone(tiny, images, shift, bos, batch_size):
    """The prefix tree runs a shared prefix once; every option still gets the score of its own full pass."""
    context = [images[1], "Q: what colour is it?\nA: "]
    fast = tiny.score_continuations(context, SHARED_PREFIX_OPTIONS, continuation_bos=bos, shift=shift,
                                    batch_size=batch_size)
    naive = tiny.score_continuations(context, SHARED_PREFIX_OPTIONS, continuation_bos=bos, shift=shift, naive=True)
    torch.testing.assert_close(fast.sum_logprob, naive.sum_logprob, atol=1e-4, rtol=1e-5)
    assert torch.equal(fast.num_tokens, naive.num_tokens)
    assert fast.sum_logprob[0] == fast.sum_logprob[3]  # the repeated option: the same nodes
    # the LM ran each distinct prefix once per pass: count them from the tokenizer's own ids
    rows = [tiny.model.tokenizer(o).input_ids[0 if bos else 1:] for o in SHARED_PREFIX_OPTIONS]
    chunks = [rows] if batch_size is None else [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    assert fast.tokens_run == sum(len({tuple(r[:k]) for r in c for k in range(1, len(r) + 1)}) for c in chunks)
    assert fast.tokens_run < int(fast.num_tokens.sum())
    # the original's way re-encodes the context in every padded row of 20: far more positions
    context_len = len(embed_prompt(tiny.model, context))
    assert naive.tokens_run >= len(SHARED_PREFIX_OPTIONS) * (context_len + int(naive.num_tokens.max()))


def test_prefix_tree_shares_common_prefixes():
    from model.scoring import _ancestry, _prefix_tree

    # token rows: [5 7 9], [5 7 8], [5 7], [6]; padded with 0
    ids = torch.tensor([[5, 7, 9], [5, 7, 8], [5, 7, 0], [6, 0, 0]])
    tokens, parents, path = _prefix_tree(ids, torch.tensor([3, 3, 2, 1]))
    assert tokens.tolist() == [5, 7, 9, 8, 6]
    assert parents.tolist() == [-1, 0, 1, 1, -1]
    assert path.tolist() == [0, 1, 2, 0, 1, 3, 0, 1, 4]
    allowed, depth = _ancestry(parents)
    assert depth.tolist() == [0, 1, 2, 2, 0]
    assert allowed.nonzero().tolist() == [[0, 0], [1, 0], [1, 1], [2, 0], [2, 1], [2, 2], [3, 0], [3, 1], [3, 3],
                                          [4, 4]]


def test_continuation_score_matches_a_hand_built_sequence(tiny):
    """Independent computation: ids of context+option through the LM, log-softmax, pick next tokens."""
    tok = tiny.model.tokenizer
    ctx_ids = tok("Q: is it red?\nA:").input_ids           # with BOS
    opt_ids = tok(" yes", add_special_tokens=False).input_ids
    logits = tiny.model.lm(input_ids=torch.tensor([ctx_ids + opt_ids])).logits[0]
    logp = F.log_softmax(logits, dim=-1)
    expected = sum(logp[len(ctx_ids) - 1 + i, t] for i, t in enumerate(opt_ids))
    got = tiny.score_continuations(["Q: is it red?\nA:"], [" yes"])
    assert got.num_tokens.tolist() == [len(opt_ids)]
    assert got.sum_logprob[0].item() == pytest.approx(expected.item(), abs=1e-4)


def test_log_lik_bos_only_on_first_text_and_images_not_scored(tiny, images):
    model = tiny.model
    tok = model.tokenizer
    prompt = [images[0], "A red circle.", images[1], " Then blue."]
    embedded = embed_prompt(model, prompt)
    first, second = tok("A red circle.").input_ids, tok(" Then blue.").input_ids
    assert first[0] == tok.bos_token_id and second[0] == tok.bos_token_id
    n_vis = model.args.n_visual_tokens
    assert embedded.labels.tolist() == [-100] * n_vis + first + [-100] * n_vis + second[1:]

    # Independent expectation: the mean of -CE over shifted labels, by hand.
    logits = model.lm(inputs_embeds=embedded.embeds[None]).logits[0]
    labels = embedded.labels
    terms = [F.log_softmax(logits[i], -1)[labels[i + 1]] for i in range(len(labels) - 1) if labels[i + 1] != -100]
    assert len(terms) == len(first) + len(second) - 1
    assert tiny.get_log_lik_scores(prompt) == pytest.approx(torch.stack(terms).mean().item(), abs=1e-5)


def test_log_lik_depends_on_the_image(tiny, images):
    a = tiny.get_log_lik_scores([images[0], "A red circle."])
    b = tiny.get_log_lik_scores([images[2], "A red circle."])
    assert a != pytest.approx(b, abs=1e-6)


def test_token_id_items_are_used_verbatim(tiny, images):
    tok = tiny.model.tokenizer
    first, second = tok("A red circle.").input_ids, tok(" Then blue.").input_ids  # both start with BOS
    as_ids = embed_prompt(tiny.model, [images[0], torch.tensor(first), torch.tensor(second)])
    n_vis = tiny.model.args.n_visual_tokens
    assert as_ids.labels.tolist() == [-100] * n_vis + first + second  # the second BOS is kept
    as_text = embed_prompt(tiny.model, [images[0], "A red circle.", " Then blue."])
    torch.testing.assert_close(as_ids.embeds[: n_vis + len(first)], as_text.embeds[: n_vis + len(first)])


def test_packed_scoring_with_eager_attention(tiny_dir, images):
    """The packed continuations' mask in the eager implementation's additive form gives the same scores."""
    from model import load_fromage

    m = load_fromage(tiny_dir, device="cpu")
    m.model.lm.config._attn_implementation = "eager"
    context = [images[2], "Q: how many?\nA: "]
    fast = m.score_continuations(context, OPTIONS, continuation_bos=True)
    naive = m.score_continuations(context, OPTIONS, continuation_bos=True, naive=True)
    torch.testing.assert_close(fast.sum_logprob, naive.sum_logprob, atol=1e-4, rtol=1e-5)


def test_shared_prefix_length():
    from model.scoring import shared_prefix_length

    a = torch.arange(12.0).reshape(6, 2)
    b = a.clone()
    b[3, 1] = -1.0
    assert shared_prefix_length(a, a) == 6
    assert shared_prefix_length(a, b) == 3
    assert shared_prefix_length(a[:4], a) == 4 and shared_prefix_length(a, a[:2]) == 2
    assert shared_prefix_length(b[3:], a) == 0


def test_dialogue_rounds_reuse_the_previous_rounds_cache(tiny, images):
    """Each round's context extends the last one's: reusing its cache gives the scores of a fresh encoding,
    takes the shared prefix (image, BOS and all earlier text but the boundary token) from the cache, and
    leaves the earlier encoding intact for its own scoring."""
    from model.scoring import encode_context

    visual = tiny.encode_images([images[2]], "captioning")[0]
    turns = [("what colour is it", "red"), ("how many are there", "two squares"), ("is it sunny", "no")]
    contexts = []
    for r in range(len(turns)):
        text = "\n".join(f"Q: {q}?\nA: {a}" for q, a in turns[:r]) + ("\n" if r else "") + f"Q: {turns[r][0]}?\nA: "
        contexts.append([visual, text])
    previous = None
    for r, context in enumerate(contexts):
        encoded = tiny.encode_context(context, previous=previous)
        fresh = encode_context(tiny.model, context)
        expected_prefix = 0 if previous is None else _common_prefix(embed_prompt(tiny.model, contexts[r - 1]),
                                                                  embed_prompt(tiny.model, context))
        assert encoded.reused == expected_prefix
        assert r == 0 or encoded.reused > visual.shape[0] + 5  # the image, BOS and the first question at least
        for (k, v), (fk, fv) in zip(encoded.layers, fresh.layers):
            torch.testing.assert_close(k, fk, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, fv, atol=1e-5, rtol=1e-5)
        for bos, shift in ((True, False), (False, True)):  # the paper and corrected protocols' scoring
            reused = tiny.score_continuations(encoded, OPTIONS, continuation_bos=bos, shift=shift)
            naive = tiny.score_continuations(context, OPTIONS, continuation_bos=bos, shift=shift, naive=True)
            torch.testing.assert_close(reused.sum_logprob, naive.sum_logprob, atol=1e-4, rtol=1e-5)
        if previous is not None:  # the earlier round's cache was read, not extended in place
            again = tiny.score_continuations(previous, OPTIONS)
            torch.testing.assert_close(again.sum_logprob, tiny.score_continuations(contexts[r - 1], OPTIONS).sum_logprob)
        previous = encoded
    assert tiny.counters["context_tokens_reused"] > 0
    with pytest.raises(TypeError, match="pass the Prompt"):  # the naive path has nothing to reuse
        tiny.score_continuations(previous, OPTIONS, naive=True)


def _common_prefix(a, b) -> int:
    """Positions with the same token id, or (at image positions) the same embedding, counted by hand."""
    n = 0
    while n < min(len(a), len(b)) and torch.equal(a.embeds[n], b.embeds[n]):
        n += 1
    return min(n, len(b) - 1)


def _original_option_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The original VisDial script's arithmetic on CUDA, written out: a right-padded (options, T) label matrix
    with -100 at padding, `CrossEntropyLoss(reduction='none')` on the model-dtype logits, reshaped per option
    and summed in that dtype (float accumulation, one rounding); the score is minus the loss cast to float.
    The cross-entropy is log_softmax + nll_loss; CUDA's log_softmax kernel computes in float32 and rounds its
    output once, which is spelled out here because the CPU's bf16 kernel rounds differently (by one bf16 step
    on about one token in ten)."""
    log_probs = F.log_softmax(logits.float(), dim=-1).to(logits.dtype)  # what CUDA's kernel returns
    losses = F.nll_loss(log_probs.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                        reduction="none").reshape(labels.shape)
    assert losses.dtype == logits.dtype
    return -losses.sum(axis=1).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_original_rounding_reproduces_the_originals_low_precision_losses(dtype):
    """The same model-dtype logits: our per-continuation sums with `original_rounding` equal the original's
    bf16/fp16 cross-entropy sums exactly, ties included; without it they stay float32."""
    from model.scoring import summed_logprobs

    g = torch.Generator().manual_seed(3)
    n, vocab = 100, 50
    lengths = torch.randint(2, 7, (n,), generator=g)
    labels = torch.full((n, int(lengths.max())), -100)
    for i, k in enumerate(lengths.tolist()):
        labels[i, :k] = torch.randint(0, vocab, (k,), generator=g)
    logits = (torch.randn(*labels.shape, vocab, generator=g) * 3).to(dtype)
    real = labels != -100
    segment = torch.repeat_interleave(torch.arange(n), lengths)
    ours = summed_logprobs(logits[real], labels[real], segment, n, original_rounding=True)
    expected = _original_option_losses(logits, labels)
    assert torch.equal(ours, expected)
    ties = n - len(set(ours.tolist()))  # the rounding makes options tie exactly (bf16: many)
    assert ties >= (10 if dtype == torch.bfloat16 else 1)
    exact = summed_logprobs(logits[real], labels[real], segment, n)
    assert not torch.equal(exact, ours) and len(set(exact.tolist())) > len(set(ours.tolist()))
    torch.testing.assert_close(exact, ours, atol=0.5, rtol=1e-2)
    # at float32 the rounding is a no-op: the scores of today's float32 path
    logits32 = logits.float()
    assert torch.equal(summed_logprobs(logits32[real], labels[real], segment, n, original_rounding=True),
                       summed_logprobs(logits32[real], labels[real], segment, n))


def test_original_rounding_through_the_model_at_bf16(tiny_dir, images):
    """Through the packed path of a bf16 model: every sum is a bf16 value and close to the float32 one; the
    naive path (the original's full sequences) rounds the same way."""
    from model import load_fromage

    model = load_fromage(tiny_dir, device="cpu", precision="bf16")
    context = [images[0], "Q: what colour is it?\nA: "]
    options = OPTIONS * 20
    rounded = model.score_continuations(context, options, continuation_bos=True, shift=False, original_rounding=True)
    plain = model.score_continuations(context, options, continuation_bos=True, shift=False)
    assert torch.equal(rounded.sum_logprob, rounded.sum_logprob.bfloat16().float())
    assert not torch.equal(plain.sum_logprob, plain.sum_logprob.bfloat16().float())
    torch.testing.assert_close(rounded.sum_logprob, plain.sum_logprob, atol=0.25, rtol=1e-2)
    naive = model.score_continuations(context, options, continuation_bos=True, shift=False, original_rounding=True,
                                      naive=True)
    assert torch.equal(naive.sum_logprob, naive.sum_logprob.bfloat16().float())


def test_continuation_token_ids_are_the_tokenizers_and_follow_added_tokens(tiny):
    from model.scoring import continuation_token_ids

    tok = tiny.model.tokenizer
    texts = ["it is red", "no", "it is red", "two [RET]"]
    assert continuation_token_ids(tok, texts) == [tok(t).input_ids for t in texts]
    assert continuation_token_ids(tok, texts[:2]) == [tok(t).input_ids for t in texts[:2]]  # from the memo
    import copy

    grown = copy.deepcopy(tok)
    before = continuation_token_ids(grown, ["it is red"])
    grown.add_tokens(["red"])  # the same tokenizer, its vocabulary changed: it tokenises afresh
    assert continuation_token_ids(grown, ["it is red"]) == [grown("it is red").input_ids] != before

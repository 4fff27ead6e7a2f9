"""The `[RET]` token is tokenised as the original's tokenizer (transformers 4.21, slow GPT2Tokenizer) did."""
import pytest
from transformers import GPT2Tokenizer

from model.backbones import RET_TOKEN, load_tokenizer
from tests.reference.original_fromage import tokenize_as_421

TEXTS = ["watercolor drawing [RET]", "a ring [RET]\nQ: is it red?\nA:", "cap[RET]", "cap \t[RET] \n x",
         " [RET]", "two [RET] [RET] rets", "Q: what shape?\nA: a star [RET]\nQ: more\nA:"]


@pytest.mark.parametrize("text", TEXTS)
def test_ret_strips_its_neighbours_whitespace_as_the_original(tiny_dir, text):
    tokenizer = load_tokenizer(tiny_dir / "opt")
    assert tokenizer(text).input_ids == tokenize_as_421(tokenizer, text)


def test_a_tokenizer_saved_with_a_plain_ret_is_reflagged(tiny_dir, tmp_path):
    plain = GPT2Tokenizer.from_pretrained(str(tiny_dir / "opt"))
    plain.add_tokens(RET_TOKEN)
    plain.save_pretrained(tmp_path)
    before = plain.convert_tokens_to_ids(RET_TOKEN)
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.convert_tokens_to_ids(RET_TOKEN) == before
    assert tokenizer(TEXTS[1]).input_ids == tokenize_as_421(tokenizer, TEXTS[1])

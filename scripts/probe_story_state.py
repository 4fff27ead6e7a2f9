"""Can a stand-in LM track a miniworld story's state? Greedy-complete "now there is" after fresh stories and
count the completions equal to the story's true final state (`miniworld.Story.summary`).

    python scripts/probe_story_state.py WORK/standins/opt [--stories 40] [--seed 123]

FROMAGe's lead over CLIP on VIST `5cap4img` in the paper rests on its LM reading the story; this says whether
the stand-in LM can (issue 16).
"""
from __future__ import annotations

import argparse
import random

import torch
from transformers import GPT2Tokenizer, OPTForCausalLM

from fromage_bench import miniworld


def probe(lm_dir: str, stories: int = 40, seed: int = 123) -> tuple[int, list[tuple[str, str]]]:
    tokenizer = GPT2Tokenizer.from_pretrained(lm_dir)
    lm = OPTForCausalLM.from_pretrained(lm_dir).eval()
    rng = random.Random(seed)
    exact, shown = 0, []
    prefix = tokenizer("now there is", add_special_tokens=False).input_ids
    for _ in range(stories):
        story = miniworld.random_story(rng)
        ids = [tokenizer.bos_token_id]
        for sentence in story.sentences:  # each sentence tokenised on its own, as the tasks and LM documents do
            ids += tokenizer(sentence, add_special_tokens=False).input_ids
        inputs = torch.tensor([ids + prefix])
        with torch.no_grad():
            out = lm.generate(inputs, max_new_tokens=12, do_sample=False)
        said = tokenizer.decode(out[0, inputs.shape[1]:]).split(".")[0].strip()
        truth = story.summary[len("now there is "):].rstrip(" .")
        exact += said == truth
        shown.append((said, truth))
    return exact, shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lm_dir")
    parser.add_argument("--stories", type=int, default=40)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    exact, shown = probe(args.lm_dir, args.stories, args.seed)
    for said, truth in shown[:5]:
        print(f"said {said!r}; true final state {truth!r}")
    print(f"exact final state: {exact} of {args.stories}")


if __name__ == "__main__":
    main()

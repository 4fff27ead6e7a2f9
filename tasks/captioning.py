"""Image captioning on a caption set (CC3M validation style, or the Karpathy COCO test split), scored with
the COCO caption evaluation (pycocoevalcap).

Generation, as the original validation (`fromage/evaluate.py`) produced its sample captions:

* prompt = the image's captioning embedding (``visual_embeddings`` of the CLIP pooled features) followed by
  the model args' ``input_prompt`` when there is one (the release: ``"A picture of"``), tokenised WITHOUT
  special tokens, so the prompt has no BOS at all; the 4-visual-token release has no prompt;
* greedy decoding of up to 32 new tokens with ``[RET]`` forbidden throughout (the original passed
  ``min_word_tokens=num_words``);
* differences from the original, which decoded all 32 tokens and cut the text before its first ``.`` when
  that came after the 6th character: we stop at the first newline and cut with
  `model.inference.truncate_caption` (up to and including the first ``.``), then strip spaces. After the
  PTB tokenisation below, which drops punctuation, the kept ``.`` makes no difference;
* references: all of the image's captions, untruncated (the original compared against its
  24-token-truncated training targets).

Metrics (all x 100, as papers print them: BLEU-4 0.25 -> 25.0, CIDEr 1.17 -> 117): both sides are
tokenised with pycocoevalcap's PTBTokenizer (lower-cased, punctuation removed), then corpus BLEU-1..4
(``Bleu(4)``, "closest" reference length for the brevity penalty), METEOR 1.5 (``Meteor()``), ROUGE-L
(``Rouge()``) and CIDEr-D (``Cider()``, document frequencies from the evaluated references). SPICE is not
offered (it needs a separate Stanford CoreNLP download). The tokenizer and METEOR run on Java: without
``java`` on PATH the task stops with an error before any model work.

Cross-check: torchmetrics' ``BLEUScore`` (the metric the original validation logged) on the same
PTB-tokenised strings; its BLEU-1..4 x 100 are stored in ``TaskResult.extra`` (``"torchmetrics_bleu4"``,
``"torchmetrics_bleu"``). The two implementations compute the same clipped n-gram precisions (clip = max
count over the references) and the same corpus brevity penalty ``exp(1 - r/c)``; they differ in two
details only:

1. the reference length ``r`` of a candidate is the closest one, and when two references are equally
   close (one shorter, one longer) pycocoevalcap takes the shorter, torchmetrics the first listed. On
   5-reference random data in file order this moved BLEU-4 by about 1% relative (4.414 vs 4.372); with the
   references listed shortest first the two coincide. We pass them to torchmetrics shortest first (order
   does not matter to anything else in either metric), so the stored cross-check must agree;
2. pycocoevalcap adds 1e-15 (numerator) / 1e-9 (denominator) to each n-gram precision: where an order has
   no match at all it returns a small positive number, at most 100 * (1e-15)^(1/4) ~ 0.018 points for
   BLEU-4, where torchmetrics returns exactly 0; otherwise the relative difference is below 1e-8. (If no
   candidate has n tokens at all, pycocoevalcap's n-gram precision becomes 1e-15/1e-9 = 1e-6 and the bound
   does not hold; torchmetrics says 0.)

Hence |pycocoevalcap BLEU-n - torchmetrics BLEU-n| <= 0.02 points (plus float32 rounding in torchmetrics,
~1e-5 points) whenever some candidate has at least n tokens, which the tests assert.
"""
from __future__ import annotations

import atexit
import shutil
from typing import Any

import torch

from model.errors import FromageInputError
from model.family import GENERATE, LM_PROMPTS, family_of
from model.inference import truncate_caption

from .base import RunContext, Skipped, Task, TaskResult, register
from .caption_data import FILES, SETTINGS, load_setting
from .image_text import readable_images

MAX_NEW_TOKENS = 32  # the original validation's num_words
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def require_java() -> None:
    if shutil.which("java") is None:
        raise FromageInputError("java", "not found on PATH: the captioning metrics need Java "
                                "(METEOR and the PTB tokenizer of pycocoevalcap run on the JVM)",
                                "install a Java runtime, e.g. `apt-get install default-jre-headless`")


def caption_prefix(model_args) -> str | None:
    """The text the original validation put after the image when generating captions, if any."""
    extra = getattr(model_args, "extra", None) or {}
    return extra.get("input_prompt") or None


def prompt_prefix_ids(tokenizer, prefix: str | None) -> torch.Tensor | None:
    """The prefix's token ids without special tokens (so without a BOS), or None."""
    if not prefix:
        return None
    return torch.tensor(tokenizer(prefix, add_special_tokens=False).input_ids, dtype=torch.long)


def clean_caption(generated: str) -> str:
    return truncate_caption(generated).strip()


def _single_line(text: str) -> str:
    """Whitespace runs (newlines, CR, Unicode separators) -> one space: PTBTokenizer works line by line."""
    return " ".join(text.split())


def ptb_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """pycocoevalcap's PTB tokenisation (Java): lower-cased, punctuation tokens removed, by key."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    require_java()
    tokenized = PTBTokenizer().tokenize({k: [{"caption": _single_line(c)} for c in v] for k, v in captions.items()})
    for k, v in captions.items():  # the wrapper aligns its output lines by position: make sure none went missing
        if len(tokenized.get(k, [])) != len(v):
            raise RuntimeError(f"PTB tokenizer output does not line up with its input (key {k!r})")
    return tokenized


def shortest_first(references: list[str]) -> list[str]:
    return sorted(references, key=lambda r: len(r.split()))


def torchmetrics_bleu(candidates: list[str], references: list[list[str]]) -> dict[int, float]:
    """torchmetrics' corpus BLEU-1..4 (x 100) of whitespace-tokenised strings."""
    from torchmetrics.text import BLEUScore

    return {n: 100.0 * float(BLEUScore(n_gram=n)(candidates, references)) for n in (1, 2, 3, 4)}


_METEOR = None


def meteor_scorer():
    """pycocoevalcap's `Meteor`, started once per process and reused: its JVM takes seconds to load the
    paraphrase table, and settings run one after the other. Stopped at exit."""
    global _METEOR
    from pycocoevalcap.meteor.meteor import Meteor

    if _METEOR is None or _METEOR.meteor_p.poll() is not None:
        require_java()
        _METEOR = Meteor()
        atexit.register(_close_meteor, _METEOR)
    return _METEOR


def _close_meteor(scorer) -> None:
    global _METEOR
    try:
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    except Exception:  # already gone
        pass
    if _METEOR is scorer:
        _METEOR = None


def score_tokenized(candidates: dict[str, str], references: dict[str, list[str]]
                    ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """COCO caption metrics (x 100) of already PTB-tokenised text: corpus metrics and per-key scores."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    keys = list(candidates)
    if not keys:
        raise ValueError("no captions to score")
    if set(keys) != set(references):
        raise ValueError("candidates and references must have the same keys")
    if any(not references[k] for k in keys):
        raise ValueError("every candidate needs at least one reference")
    gts = {k: list(references[k]) for k in keys}
    res = {k: [candidates[k]] for k in keys}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    meteor, meteor_each = meteor_scorer().compute_score(gts, res)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    metrics = {f"BLEU-{n + 1}": 100.0 * float(bleu[n]) for n in range(4)}
    metrics.update({"METEOR": 100.0 * float(meteor), "ROUGE-L": 100.0 * float(rouge), "CIDEr": 100.0 * float(cider)})
    per_key = {k: {"BLEU-4": 100.0 * float(bleu_each[3][i]), "METEOR": 100.0 * float(meteor_each[i]),
                   "ROUGE-L": 100.0 * float(rouge_each[i]), "CIDEr": 100.0 * float(cider_each[i])}
               for i, k in enumerate(keys)}
    return metrics, per_key


def bleu_statistics(candidates: dict[str, str], references: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Each key's BLEU statistics as pycocoevalcap's corpus BLEU sums them (candidate length, the closest
    reference length, n-gram guesses and matches for n = 1..4): the corpus BLEU of any resample of the keys
    follows from their sums (fromage_bench/bootstrap.py)."""
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    out = {}
    for k, candidate in candidates.items():
        comps = cook_test(candidate, cook_refs(references[k]), eff="closest")
        out[k] = {"testlen": comps["testlen"], "reflen": comps["reflen"], "guess": comps["guess"],
                  "correct": comps["correct"]}
    return out


def caption_metrics(candidates: dict[str, str], references: dict[str, list[str]]
                    ) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, Any]]:
    """Raw candidate / reference captions by key -> (corpus metrics x 100, per-key scores, extra).

    Both sides are PTB-tokenised (one tokenizer run each, as the COCO evaluation does); `extra` holds
    torchmetrics' BLEU-1..4 of the same tokenised strings and the tokenised candidates."""
    require_java()
    keys = list(candidates)
    gts = ptb_tokenize({k: references[k] for k in keys})
    res = {k: v[0] for k, v in ptb_tokenize({k: [candidates[k]] for k in keys}).items()}
    metrics, per_key = score_tokenized(res, gts)
    # references shortest first: torchmetrics then breaks length ties towards the shorter reference, as
    # pycocoevalcap does, and the two BLEUs must agree (see the module docstring)
    tm = torchmetrics_bleu([res[k] for k in keys], [shortest_first(gts[k]) for k in keys])
    extra = {"torchmetrics_bleu4": tm[4], "torchmetrics_bleu": {f"BLEU-{n}": v for n, v in tm.items()},
             "tokenized_candidates": res, "bleu_statistics": bleu_statistics(res, gts)}
    return metrics, per_key, extra


@torch.inference_mode()
def run(ctx: RunContext, setting: str, protocols: tuple[str, ...] = ("standard",)) -> list[TaskResult]:
    require_java()  # before any model work
    model = ctx.model
    skipped = Skipped()
    source = TASK.path(ctx, "captions", setting)
    items, features = readable_images(ctx, load_setting(TASK, ctx, setting, skipped), skipped, source)

    prefix = caption_prefix(model.model_args)
    prefix_ids = prompt_prefix_ids(model.tokenizer, prefix)

    def caption(rows: list[int]) -> list[str]:
        """The decoded (untruncated) generations of a batch of items (indices into `items`)."""
        visual = model.project_images(features[torch.tensor(rows, dtype=torch.long)], "captioning")
        prompts = [[v] + ([prefix_ids] if prefix_ids is not None else []) for v in visual]
        out = model.generate(prompts, MAX_NEW_TOKENS, stop_at_newline=True, min_word_tokens=MAX_NEW_TOKENS)
        return list(model.decode(out))

    raw = ctx.map_batches("captions", list(range(len(items))),
                          key=lambda i: f"{i}:{items[i].image_id}:{items[i].name}", compute=caption,
                          batch_size=max(1, ctx.batch_size), desc=f"{TASK.name}:{setting}", unit="image")
    generated = [clean_caption(t) for t in raw]

    keys = [str(i) for i in range(len(items))]  # image ids need not be unique across a file: index them
    metrics, per_key, extra = caption_metrics(dict(zip(keys, generated)), {k: it.captions for k, it in zip(keys, items)})
    tokenized, bleu_stats = extra.pop("tokenized_candidates"), extra.pop("bleu_statistics")
    predictions = [{"image_id": it.image_id, "image": it.name, "caption": generated[i], "generated": raw[i],
                    "tokenized": tokenized[k], "references": list(it.captions), "scores": per_key[k],
                    "bleu_stats": bleu_stats[k]}
                   for i, (k, it) in enumerate(zip(keys, items))]
    extra.update({"prompt_prefix": prefix, "max_new_tokens": MAX_NEW_TOKENS, "n_references": sum(len(it.captions) for it in items)})
    return TASK.results(setting, protocols, metrics=metrics, n_examples=len(items), skipped=skipped,
                        predictions=predictions, extra=extra, family=family_of(model))


TASK = register(Task(
    name="captioning",
    description="Greedy image captioning (image + the model's input prompt, 32 tokens, [RET] forbidden), "
                "scored with pycocoevalcap BLEU-1..4 / METEOR / ROUGE-L / CIDEr (x100) on CC3M val or Karpathy COCO test",
    settings=SETTINGS,
    protocols=("standard",),
    files=dict(FILES),
    metrics=METRICS,
    paper={},  # the FROMAGe paper reports no captioning scores; the spec quotes none from the training logs
    run=run,
    default_setting="cc3m",
    needs={"*": (GENERATE, LM_PROMPTS)},
))

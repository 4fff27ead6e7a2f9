"""`fromage-bench data synth` and `fromage-bench make-standins` (see docs/miniworld.md).

    fromage-bench data synth --out DATA [--seed N] [--scale small|medium]
    fromage-bench make-standins --data DATA --out STANDINS [--seed N] [--preset small|medium] [--lm-steps N] ...

`add_data_parser(subparsers)` registers both on the main parser; `python -m fromage_bench.data_cli ...` runs
them on their own.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2


def cmd_data_synth(args) -> int:
    from .miniworld import write_miniworld

    start = time.perf_counter()
    manifest = write_miniworld(args.out, seed=args.seed, scale=args.scale)
    seconds = time.perf_counter() - start
    counts = manifest["counts"]
    print(f"wrote the miniworld ({args.scale}, seed {args.seed}) to {args.out} in {seconds:.1f} s: "
          f"{counts['cc3m_train']} training pairs, {counts['cc3m_val']} val captions, {counts['coco_test']} coco test "
          f"images, {counts['vist_stories']} stories (+ {counts['vist_train_stories']} for training), "
          f"{counts['visdial_dialogues']} dialogues, "
          f"{counts['images']} images")
    return 0


def cmd_make_standins(args) -> int:
    from .standins import STANDINS_FILE, make_standins

    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    report = make_standins(args.data, args.out, seed=args.seed, preset=args.preset, lm_steps=args.lm_steps,
                           vision_steps=args.vision_steps, hard_negatives=args.hard_negatives, threads=args.threads,
                           fromage=not args.no_fromage, progress=progress)
    lm, vision = report["lm"], report["vision"]
    held = vision["heldout"]
    print(f"LM: {lm['seconds']} s, held-out perplexity {lm['heldout_perplexity']} "
          f"(unigram {lm['unigram_perplexity']}) -> {args.out / 'opt'}")
    print(f"vision: {vision['seconds']} s, held-out R@1 image->text {held['i2t_R@1']} % / text->image "
          f"{held['t2i_R@1']} % (chance {held['chance_R@1']} %) -> {args.out / 'clip'}")
    if not args.no_fromage:
        print(f"untrained FROMAGe (model_args.json + pretrained_ckpt.pth.tar) in {args.out}")
    print(f"wrote {args.out / STANDINS_FILE}")
    return 0


def add_data_parser(subparsers) -> None:
    """Register `data synth` and `make-standins` (each with its `func`) on the main CLI's subparsers."""
    p = subparsers.add_parser("data", help="write benchmark datasets (data synth: the offline miniworld)")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser("synth", help="write a synthetic miniworld in the real datasets' layouts (offline)")
    s.add_argument("--out", type=Path, required=True, help="data root (use as eval --data-root)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scale", choices=("tiny", "small", "medium"), default="small",
                   help="small: 5000 training pairs, 400 val captions, 400 stories, 30 dialogues (default); "
                        "medium: 4-7x; tiny: for tests")
    s.set_defaults(func=cmd_data_synth)

    p = subparsers.add_parser("make-standins",
                              help="pretrain small stand-in OPT and CLIP backbones on a miniworld (offline, CPU)")
    p.add_argument("--data", type=Path, required=True, help="data root written by `data synth`")
    p.add_argument("--out", type=Path, required=True, help="output: opt/, clip/, standins.json (+ an untrained FROMAGe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=("tiny", "small", "medium"), default="small",
                   help="model sizes and step counts (default small: a few minutes on 2 CPU cores)")
    p.add_argument("--lm-steps", type=int, help="override the preset's LM training steps")
    p.add_argument("--vision-steps", type=int, help="override the preset's vision training steps")
    p.add_argument("--hard-negatives", type=int,
                   help="groups of two fresh scenes differing only in places / colour binding, half of every "
                        "vision batch (default 0: they lowered VIST retrieval, see docs/miniworld.md)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--no-fromage", action="store_true",
                   help="do not write model_args.json + an untrained pretrained_ckpt.pth.tar next to the stand-ins")
    p.add_argument("--quiet", action="store_true", help="no per-step progress on stderr")
    p.set_defaults(func=cmd_make_standins)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fromage-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    from model.errors import FromageInputError

    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except FromageInputError as err:
        print(f"fromage-bench: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

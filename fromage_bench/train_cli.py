"""`fromage-bench train`: train FROMAGe's maps and [RET] row on a CC3M-style TSV (see docs/training.md).

One process:     fromage-bench train --model-dir INIT --train-tsv train.tsv --image-dir images --out runs/x
Several:         torchrun --nproc-per-node N -m fromage_bench train ...   (or -m fromage_bench.train_cli ...)
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, required=True,
                   help="initial model in the release format (model_args.json + pretrained_ckpt.pth.tar)")
    p.add_argument("--train-tsv", type=Path, required=True, help="TSV with a header `caption<TAB>image`")
    p.add_argument("--image-dir", type=Path, required=True, help="directory the TSV's image names are relative to")
    p.add_argument("--out", type=Path, required=True, help="run directory: metrics.csv, checkpoints/, release/")
    p.add_argument("--steps", type=int, default=20000, help="optimiser steps in total (default 20000 = 10 x 2000)")
    p.add_argument("--batch-size", type=int, default=180, help="per process; global batch = this x processes (default 180)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default 100)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--concat-prob", type=float, default=0.5,
                   help="probability of concatenating a batch's captions pairwise for captioning (default 0.5)")
    p.add_argument("--caption-weight", type=float, default=1.0, help="weight of the captioning loss")
    p.add_argument("--retrieval-weight", type=float, default=1.0, help="weight of the contrastive retrieval loss")
    p.add_argument("--ret-lm-weight", type=float, default=1.0,
                   help="weight of the LM loss of the text-only retrieval pass (caption + [RET]); 0 drops it")
    p.add_argument("--stories", type=Path,
                   help="VIST story-in-sequence file: also train on interleaved story queries (sentences and earlier "
                        "photos, then [RET], against the next photo); an addition to the paper's recipe")
    p.add_argument("--story-images", type=Path, help="the photo directory of --stories ({photo_flickr_id}.jpg|.png)")
    p.add_argument("--story-batch", type=int, default=32, help="story queries per process and micro-batch (default 32)")
    p.add_argument("--story-weight", type=float, default=1.0, help="weight of the story queries' contrastive loss")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (<= 0: no clipping)")
    p.add_argument("--max-len", type=int, default=24, help="caption tokens incl. BOS and [RET] (default 24)")
    p.add_argument("--no-ret-renorm", action="store_true",
                   help="do not rescale the [RET] row to the mean norm of the other rows after each step")
    p.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", type=Path, help="checkpoint file, or a run directory (its latest checkpoint)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu or cuda (default: cuda if available; cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="autocast precision, CUDA only (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--log", action="append", default=[], choices=("tensorboard",),
                   help="also log to TensorBoard (if the tensorboard package is installed)")
    p.add_argument("--workers", type=int, default=4, help="data-loading worker processes (default 4)")
    p.add_argument("--no-progress", action="store_true")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train the maps and the [RET] row (single or multi-process via torchrun)")
    add_train_arguments(p)
    p.set_defaults(func=main_train)
    return p


def config_from_args(args):
    from model.training import TrainConfig

    return TrainConfig(model_dir=args.model_dir, train_tsv=args.train_tsv, image_dir=args.image_dir, out=args.out,
                       steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                       grad_accum=args.grad_accum, concat_prob=args.concat_prob, caption_weight=args.caption_weight,
                       retrieval_weight=args.retrieval_weight, ret_lm_weight=args.ret_lm_weight,
                       stories=args.stories, story_images=args.story_images, story_batch=args.story_batch,
                       story_weight=args.story_weight,
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip, max_len=args.max_len,
                       renorm_ret=not args.no_ret_renorm, save_every=args.save_every, resume=args.resume,
                       seed=args.seed, device=args.device, precision=args.precision, log=list(args.log),
                       workers=args.workers, progress=not args.no_progress)


def main_train(args) -> int:
    from model.training import train

    result = train(config_from_args(args))
    if result.release_dir is not None:  # the main process
        last = result.history[-1] if result.history else None
        summary = f"step {last['step']}: loss {last['loss']:.4f}" if last else "nothing to train"
        print(f"{summary}; wrote {args.out}/metrics.csv and the trained model to {result.release_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m fromage_bench.train_cli [train] --model-dir ...` (what torchrun launches)."""
    from model.errors import FromageInputError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="fromage-bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return main_train(args)
    except FromageInputError as err:
        print(f"fromage-bench train: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())

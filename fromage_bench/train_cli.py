"""`fromage-bench train`: train FROMAGe's maps and [RET] row on a CC3M-style TSV (see docs/training.md).

One process:     fromage-bench train --model-dir INIT --train-tsv train.tsv --image-dir images --out runs/x
Fresh start:     fromage-bench train --init fresh --opt-version facebook/opt-6.7b --visual-model openai/clip-vit-large-patch14 ...
Several:         torchrun --nproc-per-node N -m fromage_bench train ...   (or -m fromage_bench.train_cli ...)

Validation (`--val-tsv`) and the original-format retrieval pickle (`--export-original-pickle`) are built here, from
the evaluation tasks and the retrieval-set builder, and handed to `model.training` (which imports neither).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path,
                   help="initial model in the release format (model_args.json + pretrained_ckpt.pth.tar); "
                        "its trained maps are the starting point")
    p.add_argument("--init", choices=("release", "fresh"), default="release",
                   help="release: start from --model-dir; fresh: the original recipe's initial state over "
                        "--opt-version and --visual-model (default nn.Linear init, logit_scale log(1/0.07))")
    p.add_argument("--opt-version", help="OPT: a Hugging Face id in the local cache (facebook/opt-6.7b) or a directory; "
                                         "with --model-dir, overrides its model_args.json")
    p.add_argument("--visual-model", help="CLIP vision tower: a Hugging Face id in the local cache "
                                          "(openai/clip-vit-large-patch14) or a directory")
    p.add_argument("--n-visual-tokens", type=int, default=1, help="--init fresh: visual tokens per image (default 1)")
    p.add_argument("--shared-emb-dim", type=int, default=256, help="--init fresh: retrieval space dimension (256)")
    p.add_argument("--text-emb-layers", type=int, nargs="+", default=[-1],
                   help="--init fresh: LM layers mapped to the retrieval space (default -1, the last)")
    p.add_argument("--learn-logit-scale", action="store_true",
                   help="train logit_scale (clamped to log 100); by default it stays at log(1/0.07), as the "
                        "original's bf16 training leaves it")
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
    p.add_argument("--epoch-steps", type=int,
                   help="micro-batches per epoch, each epoch the first of a fresh permutation (the original's "
                        "--steps-per-epoch 2000); default: an epoch is a whole pass over the TSV")
    p.add_argument("--val-tsv", type=Path, help="validation TSV (caption, image): BLEU-1..4 of greedy captions and "
                                                "t2i/i2t R@1/R@5, via the captioning and image_text_retrieval tasks")
    p.add_argument("--val-image-dir", type=Path, help="the directory --val-tsv's image names are relative to")
    p.add_argument("--val-every", type=int, default=2000,
                   help="validate every N steps (and before training and at the end; default 2000, as the original)")
    p.add_argument("--val-batch-size", type=int, default=16, help="validation batch size (default 16)")
    p.add_argument("--export-original-pickle", action="store_true",
                   help="after training, embed the --train-tsv images with the trained model into "
                        "OUT/release/cc3m_embeddings.pkl, which the original code's load_fromage needs")
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
                       init=args.init, opt_version=args.opt_version, visual_model=args.visual_model,
                       n_visual_tokens=args.n_visual_tokens, shared_emb_dim=args.shared_emb_dim,
                       text_emb_layers=list(args.text_emb_layers), learn_logit_scale=args.learn_logit_scale,
                       steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                       grad_accum=args.grad_accum, concat_prob=args.concat_prob, caption_weight=args.caption_weight,
                       retrieval_weight=args.retrieval_weight, ret_lm_weight=args.ret_lm_weight,
                       stories=args.stories, story_images=args.story_images, story_batch=args.story_batch,
                       story_weight=args.story_weight,
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip, max_len=args.max_len,
                       renorm_ret=not args.no_ret_renorm, epoch_steps=args.epoch_steps,
                       validate=validation(args), val_every=args.val_every, save_every=args.save_every,
                       resume=args.resume, seed=args.seed, device=args.device, precision=args.precision,
                       log=list(args.log), workers=args.workers, progress=not args.no_progress)


# -- validation: the evaluation tasks on the validation set ---------------------------------------------------
VAL_METRICS = {"captioning": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"),
               "image_text_retrieval": ("t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@5")}
VAL_ROOT = "val-data"  # under --out: a data root whose cc3m setting links to --val-tsv and --val-image-dir


def validation(args):
    """The `validate` callback of `model.training` for --val-tsv, or None. Checks its inputs now, before any
    model work: the TSV parses, the image directory exists, Java is there (the captioning metrics need it)."""
    from model.errors import FromageInputError

    if args.val_tsv is None:
        if args.val_image_dir is not None:
            raise FromageInputError("--val-image-dir", "needs --val-tsv")
        return None
    if args.val_image_dir is None:
        raise FromageInputError("--val-tsv", "needs --val-image-dir")
    if args.val_batch_size < 1:
        raise FromageInputError("--val-batch-size", "must be >= 1")
    from model.datasets import read_cc3m_rows
    from tasks.captioning import require_java

    read_cc3m_rows(args.val_tsv)
    if not args.val_image_dir.is_dir():
        raise FromageInputError(args.val_image_dir, "not a directory (--val-image-dir)")
    require_java()
    root = validation_root(args.out, args.val_tsv, args.val_image_dir)

    def validate(fromage, step: int) -> dict[str, float]:
        metrics = validation_metrics(fromage, root, args.val_batch_size)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"validation at step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()), flush=True)
        return metrics

    return validate


def validation_root(out: Path, tsv: Path, image_dir: Path) -> Path:
    """OUT/val-data laid out as the tasks' cc3m setting expects it, by links to the user's files."""
    from tasks.caption_data import FILES

    import secrets

    root = out / VAL_ROOT
    for role, target in (("cc3m/captions", tsv), ("cc3m/images", image_dir)):
        link = root / FILES[role]
        link.parent.mkdir(parents=True, exist_ok=True)
        staged = link.with_name(f".{link.name}.{secrets.token_hex(6)}")
        staged.symlink_to(Path(target).resolve())
        os.replace(staged, link)  # atomic: every torchrun process may do this at once
    return root


def validation_metrics(fromage, data_root: Path, batch_size: int) -> dict[str, float]:
    """The validation metrics of `fromage`: what `fromage-bench eval --tasks captioning:cc3m,image_text_retrieval:cc3m`
    reports on the same files, by the same code (no feature cache, no journal)."""
    from tasks import base
    import tasks.captioning  # noqa: F401 - registers the tasks
    import tasks.image_text  # noqa: F401

    metrics = {}
    for name, keys in VAL_METRICS.items():
        ctx = base.RunContext(model=fromage, data_root=data_root, progress=False, batch_size=batch_size,
                              image_workers=0, task_key=f"validation/{name}")
        result = base.get_task(name).run(ctx, "cc3m", ("standard",))[0]
        metrics.update({key: result.metrics[key] for key in keys})
    return metrics


# -- the original's retrieval pickle ------------------------------------------------------------------------------
ORIGINAL_PICKLE = "cc3m_embeddings.pkl"


def export_original_pickle(args, release: Path) -> Path:
    """Embed the training TSV's images with the exported model (the retrieval-set builder, into the release
    directory) and write them as the original's `cc3m_embeddings*.pkl` too. Returns the pickle's path."""
    from model import RetrievalSet, load_fromage

    from .retrieval_build import build_retrieval_set, images_of_tsv

    fromage = load_fromage(release, device=args.device)
    build_retrieval_set(fromage, images_of_tsv(args.train_tsv, args.image_dir), release,
                        batch_size=args.val_batch_size, workers=min(args.workers, os.cpu_count() or 1),
                        progress=not args.no_progress)
    return RetrievalSet.load(release).save_original_pickle(release / ORIGINAL_PICKLE)


def main_train(args) -> int:
    from model.training import train

    result = train(config_from_args(args))
    if result.release_dir is not None:  # the main process
        last = result.history[-1] if result.history else None
        summary = f"step {last['step']}: loss {last['loss']:.4f}" if last else "nothing to train"
        print(f"{summary}; wrote {args.out}/metrics.csv and the trained model to {result.release_dir}")
        if result.best.step >= 0:
            print(f"best validation t2i_R@1 {result.best.score:.2f} at step {result.best.step}: {args.out}/ckpt_best")
        if args.export_original_pickle:
            print(f"wrote {export_original_pickle(args, result.release_dir)}")
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

"""`fromage-bench` command line. Bad input -> one line on stderr naming the file and the problem, exit 2."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, help="directory with model_args.json and pretrained_ckpt.pth.tar")
    parser.add_argument("--opt-version", help="override the LM: a local directory or a Hugging Face id in the local cache")
    parser.add_argument("--visual-model", help="override the vision encoder (local directory or cached HF id)")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda if available)")
    parser.add_argument("--precision", help="fp32, bf16, fp16 or int8 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--retrieval-set", type=Path, help="directory written by convert-embeddings")
    parser.add_argument("--random-init", action="store_true",
                        help="paper-scale backbones with random weights from shipped configs (no weights needed)")
    parser.add_argument("--seed", type=int, default=0)


def _load(args):
    from model import load_fromage

    return load_fromage(args.model_dir, opt_version=args.opt_version, visual_model=args.visual_model, device=args.device,
                        precision=args.precision, retrieval_set=args.retrieval_set, random_init=args.random_init,
                        seed=args.seed)


def cmd_make_tiny(args) -> int:
    from model import make_tiny

    out = make_tiny(args.out, seed=args.seed, n_visual_tokens=args.n_visual_tokens)
    print(f"wrote a tiny FROMAGe model to {out}")
    return 0


def cmd_convert_embeddings(args) -> int:
    from model import RetrievalSet

    retrieval = RetrievalSet.from_original_pickles(args.pickles, trust_pickle=args.trust_pickle)
    if args.image_root:
        retrieval.image_root = str(args.image_root)
    out = retrieval.save(args.out)
    print(f"wrote {len(retrieval)} embeddings of dimension {retrieval.embeddings.shape[1]} to {out}")
    return 0


def cmd_info(args) -> int:
    fromage = _load(args)
    model = fromage.model
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    trained = count(model) - count(model.lm) - count(model.visual_model)
    info = {
        "device": str(fromage.placement.device), "precision": fromage.placement.precision,
        "opt_version": model.args.opt_version, "visual_encoder": model.args.visual_encoder,
        "n_visual_tokens": model.args.n_visual_tokens, "lm_parameters": count(model.lm),
        "vision_parameters": count(model.visual_model), "trained_parameters": trained,
        "weight_bytes": fromage.weight_bytes, "retrieval_token_idx": model.retrieval_token_idx,
        "retrieval_set_size": len(fromage.retrieval_set) if fromage.retrieval_set else 0,
        "fingerprint": fromage.fingerprint,
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_generate(args) -> int:
    from model.images import load_image

    fromage = _load(args)
    prompt = [load_image(args.image)] if args.image else []
    prompt.append(args.text)
    outputs = fromage.generate_for_images_and_texts(prompt, num_words=args.num_words, ret_scale_factor=args.ret_scale_factor)
    for item in outputs:
        print(item if isinstance(item, str) else f"<{len(item)} retrieved image(s)>")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fromage-bench", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a tiny FROMAGe model directory in the release format (offline)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-visual-tokens", type=int, choices=(1, 4), default=1)
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("convert-embeddings", help="convert the original cc3m_embeddings*.pkl to a safe retrieval set")
    p.add_argument("pickles", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--image-root", type=Path, help="directory that relative paths in the set resolve against")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling (runs code from the file: trusted files only)")
    p.set_defaults(func=cmd_convert_embeddings)

    p = sub.add_parser("info", help="load a model and print its size, precision and weight bytes")
    _add_model_arguments(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text (and [RET] retrievals) for an optional image and a text prompt")
    _add_model_arguments(p)
    p.add_argument("--image", type=Path)
    p.add_argument("--text", required=True)
    p.add_argument("--num-words", type=int, default=16)
    p.add_argument("--ret-scale-factor", type=float, default=1.0)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from model.errors import FromageInputError

    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars: noise between our own progress and errors
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except FromageInputError as err:
        print(f"fromage-bench: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT

"""`load_fromage`: a released FROMAGe directory (or a paper-scale random init) -> a ready `Fromage`."""
from __future__ import annotations

import glob
import hashlib
import json
import logging
from pathlib import Path

import torch

from .args import ModelArgs, read_model_args
from .backbones import (load_image_processor, load_language_model, load_tokenizer, load_vision_model, resolve_backbone)
from .checkpoint import CHECKPOINT_FILE, apply_trained_weights, read_state_dict
from .errors import FromageInputError, require_known
from .fromage import FromageModel
from .inference import Fromage
from .precision import INT8_OUTLIERS, resolve_placement
from .retrieval_set import EMBEDDINGS_FILE, RetrievalSet

log = logging.getLogger(__name__)


def load_fromage(model_dir: str | Path | None, *, opt_version: str | None = None, visual_model: str | None = None,
                 device: str | torch.device | None = None, precision: str | None = None,
                 retrieval_set: str | Path | RetrievalSet | None = None, random_init: bool = False,
                 seed: int = 0, accept_foreign_retrieval_set: bool = False, int8_outliers: str = "none") -> Fromage:
    """Load a FROMAGe model for inference.

    model_dir: holds `model_args.json` and `pretrained_ckpt.pth.tar` (the release format). With
        `random_init=True` it may be None (the released arguments are assumed) and the checkpoint is optional.
    opt_version / visual_model: override the backbones named in model_args.json; a local directory
        (relative paths resolve against model_dir first) or a Hugging Face id found in the local cache.
    device / precision: default CUDA if present else CPU; bf16 on CUDA, fp32 on CPU. One of fp32, bf16, fp16, int8.
    retrieval_set: a directory written by `fromage-bench build-retrieval-set` or `convert-embeddings` (default:
        model_dir if it holds one). A set recorded as built by another model (`Fromage.model_identity`) or with
        another image preprocessing is bad input unless `accept_foreign_retrieval_set=True`.
    random_init: build the backbones at their true size from the shipped paper configurations with random
        weights (for profiling without downloads); trained maps come from the checkpoint if there is one.
    int8_outliers: with random_init, "planted" gives the LM the outlier feature dimensions trained OPT has
        (`model.precision.plant_outlier_features`, at every precision, so that each precision runs the same
        network), "none" leaves the plain random init. Loaded weights have their own.
    """
    require_known("int8_outliers", [int8_outliers], INT8_OUTLIERS, "int8 outlier mode")
    placement = resolve_placement(device, precision)
    args = read_model_args(model_dir) if model_dir is not None else ModelArgs()
    if model_dir is None and not random_init:
        raise FromageInputError("model_dir", "required unless random_init=True")
    opt_name = opt_version or args.opt_version
    vision_name = visual_model or args.visual_encoder
    args.opt_version, args.visual_encoder = opt_name, vision_name
    checkpoint_path = Path(model_dir) / CHECKPOINT_FILE if model_dir is not None else None
    state_dict = None
    if checkpoint_path is not None and (not random_init or checkpoint_path.is_file()):
        state_dict = read_state_dict(checkpoint_path)  # read (and validated) before the slow backbone loads

    torch.manual_seed(seed)  # anything randomly initialised (random_init, missing rows) is reproducible
    if random_init:
        opt_path = _cached_or_none(opt_name, model_dir)
        tokenizer = load_tokenizer(opt_path if opt_path and (opt_path / "vocab.json").is_file() else None)
        lm = load_language_model(None, placement, random_init_from=opt_name, int8_outliers=int8_outliers)
        vision = load_vision_model(None, placement, random_init_from=vision_name)
        processor = load_image_processor(_cached_or_none(vision_name, model_dir))
    else:
        opt_path = resolve_backbone(opt_name, model_dir, "language model (opt_version)")
        vision_path = resolve_backbone(vision_name, model_dir, "vision encoder (visual_encoder)")
        tokenizer = load_tokenizer(opt_path)
        lm = load_language_model(opt_path, placement)
        vision = load_vision_model(vision_path, placement)
        processor = load_image_processor(vision_path)
        # Real OPT has more embedding rows (50272) than tokens (50265 + 2 added): resizing shrinks the
        # matrix and the added tokens reuse existing rows, so the result is deterministic.
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        raise FromageInputError(opt_name, f"tokenizer has {len(tokenizer)} tokens but the LM only "
                                f"{lm.get_input_embeddings().num_embeddings} embedding rows")

    model = FromageModel(args, tokenizer, lm, vision, processor, placement.dtype)
    model.eval().requires_grad_(False)  # inference; training code re-enables what it trains
    if args.retrieval_token_idx is not None and args.retrieval_token_idx != model.retrieval_token_idx:
        log.warning("model_args.json says retrieval_token_idx=%s but the tokenizer gives [RET] id %s; using the tokenizer's",
                    args.retrieval_token_idx, model.retrieval_token_idx)
    if state_dict is not None:
        apply_trained_weights(model, state_dict, checkpoint_path)
    tensors = _tensors_digest(state_dict)
    fingerprint = _fingerprint(args, tensors, placement.precision, random_init, seed,
                               planted=random_init and int8_outliers == "planted")
    identity = model_identity(args, tensors, vision.config, processor, random_init, seed)
    fromage = Fromage(model, placement, fingerprint=fingerprint, model_identity=identity)
    retrieval = _load_retrieval_set(retrieval_set, model_dir)
    if retrieval is not None:
        fromage.set_retrieval_set(retrieval, accept_foreign=accept_foreign_retrieval_set)
    return fromage


def _cached_or_none(name: str, model_dir) -> Path | None:
    try:
        return resolve_backbone(name, model_dir, "backbone")
    except FromageInputError:
        return None


def _load_retrieval_set(retrieval_set, model_dir) -> RetrievalSet | None:
    if isinstance(retrieval_set, RetrievalSet):
        return retrieval_set
    if retrieval_set is not None:
        return RetrievalSet.load(retrieval_set)
    if model_dir is None:
        return None
    if (Path(model_dir) / EMBEDDINGS_FILE).is_file():
        return RetrievalSet.load(model_dir)
    pickles = glob.glob(str(Path(model_dir) / "cc3m_embeddings*.pkl"))
    if pickles:
        log.warning("%s holds %d cc3m_embeddings*.pkl files, which are not unpickled by default: convert them once "
                    "with `fromage-bench convert-embeddings --trust-pickle` to enable [RET] retrieval", model_dir, len(pickles))
    return None


def _tensors_digest(state_dict) -> str:
    """sha256 of the checkpoint's trained tensors (names and float32 values)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict or {}):
        tensor = state_dict[key].detach().float().cpu().contiguous()
        digest.update(key.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _fingerprint(args: ModelArgs, tensors_digest: str, precision: str, random_init: bool, seed: int,
                 planted: bool = False) -> str:
    """Identifies the model's outputs: arguments, trained tensors, precision, planted outliers (used to key caches)."""
    digest = hashlib.sha256(repr(sorted(args.to_dict().items())).encode())
    digest.update(f"{precision}|{random_init}|{seed if random_init else ''}".encode())
    if planted:  # only then, so that every other model keeps the fingerprint its caches were written under
        digest.update(b"|planted-outliers")
    digest.update(tensors_digest.encode())
    return digest.hexdigest()[:16]


# Config entries that name files, versions or run-time switches, not what the vision tower computes.
_RUNTIME_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "quantization_config", "output_hidden_states",
                        "output_attentions", "return_dict"}


def model_identity(args: ModelArgs, tensors_digest: str, vision_config, processor, random_init: bool, seed: int,
                   family: str = "fromage") -> str:
    """The identity a retrieval set records (`Fromage.model_identity`): what determines the model's retrieval-space
    image embeddings, whatever the precision and however the backbones are spelled (local path, Hub id, override).

    Covers: the model arguments except the backbone names (`opt_version`, `visual_encoder`) and the tokenizer's
    `retrieval_token_idx`; the checkpoint's trained tensors (`visual_fc` among them, trained jointly with the
    text side, so they pin the whole model); the vision tower's architecture (its config without file names,
    versions and dtype); the image processor's settings (size, crop, mean, std, resampling); and, for a
    random init, the seed; the model family unless it is FROMAGe (so that FROMAGe identities, and the sets built
    under them, stay as they were). Not covered: the vision tower's pretrained weights themselves (hashing gigabytes at
    every load is too slow); a checkpoint is trained on one vision tower, so its tensors stand for it."""
    named = {k: v for k, v in args.to_dict().items() if k not in ("opt_version", "visual_encoder", "retrieval_token_idx")}
    config = {k: v for k, v in vision_config.to_dict().items() if not k.startswith("_") and k not in _RUNTIME_CONFIG_KEYS}
    settings = {k: v for k, v in processor.to_dict().items() if not k.startswith("_")} if processor is not None else None
    described = {"args": named, "vision": config, "processor": settings, "trained": tensors_digest,
                 "random_init_seed": seed if random_init else None}
    if family != "fromage":
        described["family"] = family
    described = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(described.encode()).hexdigest()[:16]


# -- model families (`model.family`) ----------------------------------------------------------------------
GILL_ARGS_KEYS = ("num_tokens", "gen_token_idx")  # in a GILL release's model_args.json, never in FROMAGe's
MODEL_DIR_KINDS = ("a FROMAGe release (model_args.json + pretrained_ckpt.pth.tar), a GILL release (model_args.json "
                   "with num_tokens / gen_token_idx) or a CLIP model (config.json with model_type \"clip\")")


def detect_family(model_dir: str | Path) -> str:
    """"fromage", "gill" or "clip" from the directory's files; anything else is bad input naming what a
    model directory holds (the FROMAGe checkpoint itself is checked by `load_fromage`)."""
    from .args import MODEL_ARGS_FILE
    from .clip_baseline import is_clip_dir
    from .errors import read_json

    model_dir = Path(model_dir)
    args_file = model_dir / MODEL_ARGS_FILE
    if args_file.is_file():
        raw = read_json(args_file, hint="a FROMAGe or GILL release directory holds model_args.json")
        return "gill" if isinstance(raw, dict) and any(k in raw for k in GILL_ARGS_KEYS) else "fromage"
    if is_clip_dir(model_dir):
        return "clip"
    raise FromageInputError(args_file, "missing", f"--model-dir takes {MODEL_DIR_KINDS}")


def load_model(model_dir: str | Path | None = None, *, clip: str | Path | None = None,
               device: str | torch.device | None = None, precision: str | None = None, **fromage_options):
    """A `model.family.TaskModel` of the family `model_dir` holds (`detect_family`), or the CLIP model `clip`
    (a local directory or a hub id in the local HF cache). `fromage_options`: `load_fromage`'s other keyword
    arguments (FROMAGe and GILL; CLIP takes none)."""
    if clip is not None and model_dir is not None:
        raise FromageInputError("--clip", "give either --clip or --model-dir, not both")
    family = "clip" if clip is not None else ("fromage" if model_dir is None else detect_family(model_dir))
    if family == "clip":
        from .clip_baseline import load_clip

        for option in ("random_init", "retrieval_set"):
            if fromage_options.get(option):
                raise FromageInputError(f"--{option.replace('_', '-')}", "not supported for the clip family")

        return load_clip(clip if clip is not None else model_dir, resolve_placement(device, precision))
    if family == "gill":
        import importlib.util

        if importlib.util.find_spec(f"{__package__}.gill") is None:
            raise FromageInputError(model_dir, "GILL release directory: not supported yet")
        from .gill import load_gill

        return load_gill(model_dir, device=device, precision=precision, **fromage_options)
    return load_fromage(model_dir, device=device, precision=precision, **fromage_options)

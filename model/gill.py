"""GILL (Koh, Fried, Salakhutdinov 2023), FROMAGe's follow-up, for retrieval and scoring: its release directory
loaded without Stable Diffusion, behind the same interface as FROMAGe (`model.family.TaskModel`).

What differs from FROMAGe (the sources: docs/gill.md):
  * eight added tokens `[IMG0]`..`[IMG7]` instead of `[RET]`; the checkpoint stores their input-embedding rows
    as `model.input_embeddings.weight` (the last `num_tokens` rows of the resized matrix);
  * the retrieval map `ret_text_hidden_fcs` (a `TextFcLayer` in "linear" mode: a Linear under `.model`) reads the
    hidden states of the eight `[IMG]` positions and keeps the first output: the `[IMG0]` position's. Causal
    attention makes that hidden state independent of `[IMG1..7]`, so a query ending in `[IMG0]` alone gives the
    same embedding (tested against the reference, which appends all eight);
  * `ret_emb_dim` (256) names the retrieval dimension, no dropout, n_visual_tokens 4 in the release;
  * a generation map (`gen_text_hidden_fcs`, for Stable Diffusion) and a decision model, neither used here: the
    first is ignored, the second loaded when present and reported (`Gill.release_info`).

`GillModel` subclasses `FromageModel` (same vision tower, `visual_embeddings`, `visual_fc`, `logit_scale`, LM) and
only swaps the text-side map and the retrieval token; `Gill` subclasses `Fromage`, whose batched methods then work
unchanged (they read `retrieval_token_idx` and `retrieval_space`).
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .args import MODEL_ARGS_FILE, ArgsFile, read_args_file
from .backbones import (load_image_processor, load_language_model, load_tokenizer, load_vision_model,
                        resolve_backbone)
from .checkpoint import CHECKPOINT_FILE, read_state_dict
from .errors import FromageInputError
from .family import FAMILY_CAPABILITIES, GENERATE
from .files import atomic_write, atomic_write_text
from .fromage import FromageModel
from .inference import Fromage
from .loading import GILL_ARGS_KEYS, _fingerprint, _load_retrieval_set, _tensors_digest, model_identity
from .precision import resolve_placement
from .retrieval_set import RetrievalSet

log = logging.getLogger(__name__)

FAMILY = "gill"
DECISION_MODEL_FILE = "decision_model.pth.tar"
IMG_ROWS_KEY = "model.input_embeddings.weight"  # (num_tokens, D): the trained [IMG0..] input-embedding rows
GEN_PREFIX = "model.gen_text_hidden_fcs."       # the Stable Diffusion map: not needed for retrieval
_RELEASE_HINT = ("a GILL model directory holds model_args.json and pretrained_ckpt.pth.tar "
                 "(decision_model.pth.tar optional)")


def img_tokens(num_tokens: int) -> list[str]:
    return [f"[IMG{i}]" for i in range(num_tokens)]


@dataclass
class GillArgs(ArgsFile):
    """The keys of GILL's `model_args.json` that inference reads; defaults are those of GILL's `GILLArgs` class
    (the release sets n_visual_tokens 4 and gen_emb_dim 768). Unknown keys are kept in `extra`."""

    opt_version: str = "facebook/opt-6.7b"
    visual_encoder: str = "openai/clip-vit-large-patch14"
    n_visual_tokens: int = 1
    ret_emb_dim: int = 256
    gen_emb_dim: int = 256
    text_emb_layers: list[int] = field(default_factory=lambda: [-1])
    text_fc_mode: str = "gill_mapper"
    ret_text_fc_mode: str = "linear"
    num_tokens: int = 8
    num_clip_tokens: int = 77
    freeze_lm: bool = True
    freeze_vm: bool = True
    share_ret_gen: bool = True
    retrieval_token_idx: list[int] | None = None  # as GILL's training wrote them; the tokenizer's ids are used
    gen_token_idx: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # What `FromageModel` reads: GILL's maps have no dropout.
    image_embed_dropout_prob: ClassVar[float] = 0.0
    text_embed_dropout_prob: ClassVar[float] = 0.0

    @property
    def shared_emb_dim(self) -> int:
        """The retrieval space's dimension under FROMAGe's name."""
        return self.ret_emb_dim

    def checks(self) -> list[tuple[Any, str]]:
        def positive(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        return [
            *self.backbone_checks(),
            (positive(self.n_visual_tokens), "n_visual_tokens must be an integer >= 1"),
            (positive(self.ret_emb_dim), "ret_emb_dim must be a positive integer"),
            (positive(self.num_tokens), "num_tokens must be an integer >= 1"),
            (self.ret_text_fc_mode == "linear", f"ret_text_fc_mode {self.ret_text_fc_mode!r} is not supported "
                                               "(only GILL's released 'linear' retrieval map)"),
            (self.share_ret_gen is True, "share_ret_gen must be true (GILL's own loader supports nothing else)"),
        ]


def read_gill_args(model_dir: str | Path) -> GillArgs:
    return read_args_file(GillArgs, model_dir, hint=_RELEASE_HINT)


def is_gill_release(model_dir: str | Path | None) -> bool:
    """Whether `model_dir`'s model_args.json is GILL's, by `model.loading.detect_family`'s rule (a key only GILL's
    has: `GILL_ARGS_KEYS`). Never raises: an unreadable file is not GILL's (the FROMAGe loader then reports it)."""
    if model_dir is None:
        return False
    try:
        raw = json.loads((Path(model_dir) / MODEL_ARGS_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and any(k in raw for k in GILL_ARGS_KEYS)


class LinearTextFc(nn.Module):
    """GILL's `TextFcLayer` in "linear" mode (its Linear is `.model`, hence the checkpoint keys): applied to every
    position; GILL then keeps the first of the `[IMG]` positions' outputs, here the caller picks the position."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.model = nn.Linear(in_dim, out_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model(hidden)


class GillModel(FromageModel):
    """FROMAGe's modules (vision tower, `visual_embeddings`, `visual_fc`, `logit_scale`, LM) with GILL's text-side
    retrieval map `ret_text_hidden_fcs` and `[IMG0]` as the retrieval token."""

    def __init__(self, args: GillArgs, tokenizer, lm, visual_model, feature_extractor, dtype: torch.dtype):
        super().__init__(args, tokenizer, lm, visual_model, feature_extractor, dtype)
        del self.text_hidden_fcs  # FROMAGe's map; GILL's is below
        self.img_token_ids = [tokenizer.convert_tokens_to_ids(t) for t in img_tokens(args.num_tokens)]
        self.retrieval_token_idx = self.img_token_ids[0]
        lm_dim, out_dim = lm.config.hidden_size, lm.config.word_embed_proj_dim
        device = lm.get_input_embeddings().weight.device
        self.ret_text_hidden_fcs = nn.ModuleList(
            LinearTextFc(self._text_layer_dim(i, lm_dim, out_dim), args.ret_emb_dim) for i in args.text_emb_layers)
        self.ret_text_hidden_fcs.to(device=device, dtype=dtype)

    def retrieval_space(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Sum of ret_text_hidden_fcs over text_emb_layers, NOT normalised: (..., T, ret_emb_dim)."""
        mapped = [fc(hidden_states[layer].to(self.dtype))
                  for layer, fc in zip(self.args.text_emb_layers, self.ret_text_hidden_fcs)]
        return torch.stack(mapped, dim=-1).sum(dim=-1)


class Gill(Fromage):
    """`Fromage`'s interface for a GILL model: retrieval (`retrieval_embeddings` of queries ending in `[IMG0]`,
    `project_images(..., "retrieval")` through GILL's `visual_fc`), interleaved context images (GILL's
    `visual_embeddings`, n_visual_tokens each) and continuation scoring. Generation is not offered: GILL forces
    `[IMG1..7]` after a generated `[IMG0]` and produces images with Stable Diffusion, neither of which is here."""

    family = FAMILY
    capabilities = FAMILY_CAPABILITIES[FAMILY] - {GENERATE}  # everything FROMAGe does but generation
    retrieval_token = "[IMG0]"
    release_info: dict

    def _not_here(self, *args, **kwargs):
        raise NotImplementedError("GILL generation (forced [IMG1..7], Stable Diffusion) is not implemented here: "
                                  "only retrieval and continuation scoring")

    generate = generate_for_images_and_texts = _not_here


def load_gill(model_dir: str | Path, *, opt_version: str | None = None, visual_model: str | None = None,
              device: str | torch.device | None = None, precision: str | None = None,
              retrieval_set: str | Path | RetrievalSet | None = None, random_init: bool = False, seed: int = 0,
              accept_foreign_retrieval_set: bool = False, int8_outliers: str = "none") -> Gill:
    """Load a GILL release directory for retrieval and scoring (Stable Diffusion is never loaded).

    Arguments as `model.loading.load_fromage`'s; `random_init` is refused (no paper-scale GILL init is shipped) and
    `int8_outliers` only concerns random inits. model_dir holds `model_args.json`, `pretrained_ckpt.pth.tar` and
    optionally `decision_model.pth.tar` (loaded and reported in `release_info`, not used for retrieval)."""
    if random_init or model_dir is None:
        raise FromageInputError(model_dir or "model_dir", "a GILL model needs its release directory (random_init is "
                                "not supported for GILL)")
    placement = resolve_placement(device, precision)
    args = read_gill_args(model_dir)
    args.opt_version, args.visual_encoder = opt_version or args.opt_version, visual_model or args.visual_encoder
    checkpoint_path = Path(model_dir) / CHECKPOINT_FILE
    if not checkpoint_path.is_file():
        raise FromageInputError(checkpoint_path, "missing", _RELEASE_HINT)
    state_dict = _strip_ddp_prefix(read_state_dict(checkpoint_path))  # read before the slow backbone loads
    decision_path = Path(model_dir) / DECISION_MODEL_FILE
    decision_state = read_state_dict(decision_path) if decision_path.is_file() else None

    torch.manual_seed(seed)  # rows the resize adds are overwritten, but stay reproducible
    opt_path = resolve_backbone(args.opt_version, model_dir, "language model (opt_version)")
    vision_path = resolve_backbone(args.visual_encoder, model_dir, "vision encoder (visual_encoder)")
    tokenizer = load_tokenizer(opt_path, added_tokens=tuple(img_tokens(args.num_tokens)))
    lm = load_language_model(opt_path, placement)
    vision = load_vision_model(vision_path, placement)
    processor = load_image_processor(vision_path)
    # As GILL: the matrix resized to the tokenizer (OPT-6.7B's 50272 rows grow to 50274), so that its last
    # num_tokens rows are [IMG0]..; they are written from the checkpoint below.
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)

    model = GillModel(args, tokenizer, lm, vision, processor, placement.dtype)
    model.eval().requires_grad_(False)
    _check_img_token_ids(model, args)
    ignored = apply_gill_weights(model, state_dict, checkpoint_path)
    tensors = _tensors_digest(state_dict)
    fingerprint = _fingerprint(args, tensors, placement.precision, False, seed)
    identity = model_identity(args, tensors, vision.config, processor, False, seed, family=FAMILY)
    gill = Gill(model, placement, fingerprint=fingerprint, model_identity=identity)
    gill.decision_model = _decision_model(decision_state, decision_path, placement) if decision_state else None
    gill.release_info = {"family": FAMILY, "img_token_ids": model.img_token_ids, "ignored_checkpoint_keys": ignored,
                         "decision_model": _describe_decision(gill.decision_model, decision_path)}
    log.info("GILL release %s: decision model %s; %d generation-map tensors ignored", model_dir,
             "loaded" if gill.decision_model is not None else "absent", len(ignored))
    retrieval = _load_retrieval_set(retrieval_set, model_dir)
    if retrieval is not None:
        gill.set_retrieval_set(retrieval, accept_foreign=accept_foreign_retrieval_set)
    return gill


def _strip_ddp_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GILL's loader drops DistributedDataParallel's 'module.' from every key."""
    return {k.replace("module.", ""): v for k, v in state_dict.items()}


def _check_img_token_ids(model: GillModel, args: GillArgs) -> None:
    rows = model.input_embeddings.num_embeddings
    expected = list(range(rows - args.num_tokens, rows))
    if model.img_token_ids != expected:  # GILL writes the last rows whatever the ids: they must coincide
        raise FromageInputError(args.opt_version, f"the tokenizer gives [IMG0..{args.num_tokens - 1}] ids "
                                f"{model.img_token_ids}, not the embedding matrix's last rows {expected}")
    if args.retrieval_token_idx is not None and list(args.retrieval_token_idx) != model.img_token_ids:
        log.warning("model_args.json says retrieval_token_idx=%s but the tokenizer gives [IMG] ids %s; using the "
                    "tokenizer's", args.retrieval_token_idx, model.img_token_ids)


def gill_trained_keys(model: GillModel) -> list[str]:
    """The checkpoint keys retrieval and interleaved prompts need."""
    keys = ["model.logit_scale", "model.visual_embeddings.weight", "model.visual_embeddings.bias",
            "model.visual_fc.weight", "model.visual_fc.bias"]
    for i in range(len(model.ret_text_hidden_fcs)):
        keys += [f"model.ret_text_hidden_fcs.{i}.model.weight", f"model.ret_text_hidden_fcs.{i}.model.bias"]
    return keys + [IMG_ROWS_KEY]


def _gill_targets(model: GillModel) -> dict[str, torch.Tensor]:
    own = {f"model.{name}": p for name, p in model.named_parameters() if not name.startswith(("lm.", "visual_model."))}
    own[IMG_ROWS_KEY] = model.input_embeddings.weight[model.img_token_ids[0]:model.img_token_ids[-1] + 1]
    return own


def apply_gill_weights(model: GillModel, state_dict: dict[str, torch.Tensor], source: str | Path) -> list[str]:
    """Copy the trained tensors in, the `[IMG]` rows into the LM's input embeddings (OPT ties its head to them, as
    in GILL). Returns the checkpoint keys not used (the generation map, anything unknown)."""
    missing = [k for k in gill_trained_keys(model) if k not in state_dict]
    if missing:
        raise FromageInputError(source, f"checkpoint lacks {', '.join(missing)}",
                                "is this a GILL pretrained_ckpt.pth.tar, and does model_args.json match it?")
    targets = _gill_targets(model)
    with torch.no_grad():
        for key in gill_trained_keys(model):
            value, target = state_dict[key], targets[key]
            if tuple(value.shape) != tuple(target.shape):
                raise FromageInputError(source, f"{key} has shape {tuple(value.shape)} but the model built from "
                                        f"model_args.json expects {tuple(target.shape)}",
                                        "check num_tokens, n_visual_tokens, ret_emb_dim and opt_version")
            target.copy_(value.to(device=target.device, dtype=target.dtype))
    used = set(gill_trained_keys(model))
    unknown = sorted(k for k in state_dict if k not in used and not k.startswith(GEN_PREFIX))
    if unknown:
        log.warning("%s: %d checkpoint tensors not used: %s", source, len(unknown), ", ".join(unknown[:5]))
    return sorted(k for k in state_dict if k not in used)


def _decision_model(state: dict[str, torch.Tensor], path: Path, placement) -> nn.Sequential:
    """GILL's retrieve-or-generate classifier: Dropout then Linear(hidden, 2) on the `[IMG0]` hidden state."""
    weight = state.get("1.weight")
    if weight is None or weight.ndim != 2 or set(state) != {"1.weight", "1.bias"}:
        raise FromageInputError(path, f"expected GILL's decision model (keys 1.weight, 1.bias), found {sorted(state)}",
                                "remove it if it is not GILL's: retrieval does not need it")
    classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(weight.shape[1], weight.shape[0]))
    classifier.load_state_dict(state, strict=True)
    return classifier.to(device=placement.device, dtype=placement.dtype).eval().requires_grad_(False)


def _describe_decision(classifier: nn.Sequential | None, path: Path) -> dict | None:
    if classifier is None:
        return None
    linear = classifier[1]
    return {"path": str(path), "in_features": linear.in_features, "classes": linear.out_features}


# -- writing a release (make-tiny --family gill) --------------------------------------------------------------
def save_gill_release(model: GillModel, out_dir: str | Path, gen_map: dict[str, torch.Tensor],
                      decision: nn.Sequential | None = None) -> Path:
    """Write GILL's layout: `model_args.json` (with the tokenizer's [IMG] ids as retrieval/gen_token_idx, as GILL's
    training writes them), `pretrained_ckpt.pth.tar` (the trained maps, `gen_map`'s generation-map tensors and the
    [IMG] rows) and, given one, `decision_model.pth.tar`. The backbones are referenced, not copied."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = model.args.to_dict()
    raw["retrieval_token_idx"] = raw["gen_token_idx"] = list(model.img_token_ids)
    targets = _gill_targets(model)
    state = OrderedDict((k, targets[k].detach().float().cpu().clone()) for k in gill_trained_keys(model))
    state.update((k, v.detach().float().cpu().clone()) for k, v in gen_map.items())
    state = OrderedDict(sorted(state.items()))  # GILL's training saves sorted keys
    atomic_write(out_dir / CHECKPOINT_FILE, lambda f: torch.save({"state_dict": state}, f))
    if decision is not None:
        decision_state = {k: v.detach().float().cpu().clone() for k, v in decision.state_dict().items()}
        atomic_write(out_dir / DECISION_MODEL_FILE, lambda f: torch.save({"state_dict": decision_state}, f))
    atomic_write_text(out_dir / MODEL_ARGS_FILE, json.dumps(raw, indent=4) + "\n")
    return out_dir

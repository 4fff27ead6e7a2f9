"""Training FROMAGe's trained parts on (image, caption) pairs, as the original recipe (Koh et al., ICML 2023).

Reads top to bottom: configuration, processes, the trainable tensors, one training step (captioning pass,
retrieval pass, optimiser step), checkpoints, logging, export, and `train`, the loop that ties them up.

What is trained: `visual_embeddings` (image -> LM input tokens), `visual_fc` (image -> retrieval space),
`text_hidden_fcs` (LM hidden state -> retrieval space), the `[RET]` input-embedding row, and `logit_scale` only
with `learn_logit_scale` (the original's bf16 training leaves it where it starts: see `TrainConfig`).
The OPT language model and the CLIP vision tower stay frozen and in eval mode, loaded in the training precision
(bf16 on CUDA, as the original casts them); the trained tensors and their AdamW states are fp32.

The `[RET]` row is a separate parameter spliced into the frozen LM wherever the row is used: in the
input embeddings (where a token is `[RET]`) and, because OPT ties its output layer to the input
embeddings, in the output logits (the `[RET]` column is recomputed from the trained row). This gives the
row exactly the gradient it gets in the original, where the whole tied matrix is trainable and the
gradient of every other row is zeroed before each step; but no other row can ever change (whatever the
optimiser or weight decay), and no gradient or AdamW state is kept for the 50k frozen rows of the real
model. At the end the row is written into the embedding matrix and exported with `save_release`.

Several processes (`torchrun`): each process reads its block of every global batch, computes its share of
the global loss (see `model.losses`) and the gradients of the trained tensors are summed across processes
with one all-reduce per optimiser step. Only these few tensors are synchronised; the frozen model is never
wrapped. The contrastive loss is taken over the global batch.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import json
import logging
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from typing import Callable

from .args import ModelArgs
from .checkpoint import save_release
from .errors import FromageInputError
from .files import atomic_write, atomic_write_text
from .fresh import build_initial_model, load_release_for_training
from .fromage import FromageModel
from .inference import Fromage
from .losses import IGNORE_INDEX, contrastive_loss_share, distributed, token_loss_share
from .precision import Placement, resolve_placement
from .train_data import MAX_LEN, Batch, CaptionDataset, Collate, KeyedBatches
from .train_stories import StoryQueries, StorySource, story_sequences

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
RELEASE_DIR = "release"
BEST_DIR = "ckpt_best"          # the release-format export of the best validation step (the original's ckpt_best)
METRICS_FILE = "metrics.csv"
VAL_METRICS_FILE = "val_metrics.csv"
BEST_METRIC = "t2i_R@1"         # what picks ckpt_best, as in the original
MAX_LOGIT_SCALE = math.log(100)  # open_clip's clamp of a learned temperature
METRICS_FIELDS = ["step", "loss", "caption_loss", "retrieval_loss", "lr", "grad_norm", "seconds",
                  "ret_lm_loss", "skipped_images", "story_loss"]
CHECKPOINT_FORMAT = "fromage-bench-train-1"


# -- configuration --------------------------------------------------------------------------------------
Validate = Callable[[Fromage, int], dict]  # (the model in eval mode, step) -> {metric: value}


@dataclass
class TrainConfig:
    """Defaults are the original's (batch 180 on one GPU, 10 epochs x 2000 steps).

    `learn_logit_scale`: the original trains `logit_scale` in bf16, where an AdamW step (at most about lr = 3e-4)
    is below half the spacing of bf16 numbers at its initial log(1/0.07) = 2.659 (2^-6 = 0.0156 between 2 and
    4), so every update rounds back and the temperature stays 1/0.07 for the whole run. Here the trained tensors
    are fp32, so by default `logit_scale` is left out of the optimiser to keep the original's behaviour; with
    `learn_logit_scale` it is trained and clamped to [0, log 100] after each step, as open_clip does.
    """

    model_dir: Path | None          # initial model (release format); its trained maps are the initialisation
    train_tsv: Path
    image_dir: Path
    out: Path                       # metrics.csv, checkpoints/, release/
    init: str = "release"           # "release": start from model_dir; "fresh": the original's initial state
    opt_version: str | None = None  # backbones: Hugging Face id (local cache) or directory; override model_dir's
    visual_model: str | None = None
    n_visual_tokens: int = 1        # --init fresh: the maps' shapes (the original's defaults)
    shared_emb_dim: int = 256
    text_emb_layers: list[int] = field(default_factory=lambda: [-1])
    learn_logit_scale: bool = False  # see the class docstring
    steps: int = 20000              # optimiser steps in total (a resumed run continues up to this)
    batch_size: int = 180           # per process; the global batch is batch_size x processes
    lr: float = 3e-4
    warmup: int = 100               # linear warm-up steps
    grad_accum: int = 1             # micro-batches per optimiser step
    concat_prob: float = 0.5        # probability that a micro-batch's captions are concatenated pairwise
    caption_weight: float = 1.0     # captioning cross-entropy (image, caption)
    retrieval_weight: float = 1.0   # contrastive loss (text <-> image)
    ret_lm_weight: float = 1.0      # LM cross-entropy of the text-only retrieval pass (caption, [RET])
    stories: Path | None = None     # VIST SIS file: interleaved story queries (an addition, see train_stories)
    story_images: Path | None = None
    story_batch: int = 32           # story queries per process and micro-batch
    story_weight: float = 1.0       # contrastive loss of the story queries
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0          # <= 0: no clipping
    max_len: int = MAX_LEN
    renorm_ret: bool = True         # rescale the [RET] row to the mean norm of the other rows after each step
    epoch_steps: int | None = None  # micro-batches per epoch (the original's --steps-per-epoch 2000); None: a pass
    validate: Validate | None = None  # called on the main process before training and every val_every steps
    val_every: int = 2000           # optimiser steps between validations (the original: 2000, one epoch)
    save_every: int = 1000          # optimiser steps between checkpoints (0: only at the end)
    resume: Path | None = None      # a checkpoint file, or a directory holding checkpoints/
    seed: int = 0
    device: str | None = None       # default cuda if available (cuda:LOCAL_RANK under torchrun), else cpu
    precision: str | None = None    # autocast: bf16 (default on CUDA) or fp16 on CUDA; fp32 only on CPU
    log: list[str] = field(default_factory=list)  # extra loggers: "tensorboard"
    workers: int = 4                # data-loading worker processes
    progress: bool = True

    def check(self) -> None:
        checks = [
            (self.steps >= 1, "--steps", "must be >= 1"),
            (self.batch_size >= 1, "--batch-size", "must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum", "must be >= 1"),
            (self.lr > 0, "--lr", "must be > 0"),
            (self.warmup >= 0, "--warmup", "must be >= 0"),
            (0.0 <= self.concat_prob <= 1.0, "--concat-prob", "must be in [0, 1]"),
            (self.concat_prob == 0 or self.batch_size % 2 == 0, "--batch-size",
             "must be even when --concat-prob > 0 (captions are concatenated in pairs)"),
            (self.save_every >= 0, "--save-every", "must be >= 0"),
            (self.seed >= 0, "--seed", "must be >= 0"),
            (self.max_len >= 2, "--max-len", "must be >= 2"),
            (self.workers >= 0, "--workers", "must be >= 0"),
            (self.story_batch >= 2, "--story-batch", "must be >= 2"),
            ((self.stories is None) == (self.story_images is None), "--stories",
             "needs --story-images (and the other way round)"),
            (set(self.log) <= {"tensorboard"}, "--log", "the only extra logger is tensorboard"),
            (self.init in ("release", "fresh"), "--init", "must be release or fresh"),
            (self.init != "release" or self.model_dir is not None, "--model-dir", "is needed (or --init fresh)"),
            (self.init != "fresh" or (self.opt_version and self.visual_model), "--init fresh",
             "needs --opt-version and --visual-model (a Hugging Face id in the local cache, or a directory)"),
            (self.init != "fresh" or self.model_dir is None, "--model-dir",
             "is a starting point of its own: drop it with --init fresh"),
            (self.epoch_steps is None or self.epoch_steps >= 1, "--epoch-steps", "must be >= 1"),
            (self.val_every >= 1, "--val-every", "must be >= 1"),
        ]
        for ok, flag, problem in checks:
            if not ok:
                raise FromageInputError(flag, problem)


# -- processes ------------------------------------------------------------------------------------------
@dataclass
class Processes:
    rank: int
    world_size: int
    device: torch.device
    precision: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def setup_processes(device: str | None, precision: str | None) -> Processes:
    """One process, or one of torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment):
    gloo on CPU, NCCL on GPU, one GPU per process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    placement = resolve_placement(device, "fp32")  # the device only: `precision` is checked below
    dev = placement.device
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    precision = precision or ("bf16" if dev.type == "cuda" else "fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        raise FromageInputError(f"--precision {precision}", "training runs in fp32, bf16 or fp16")
    if precision == "fp16" and dev.type != "cuda":
        raise FromageInputError(f"--precision {precision}", "fp16 training is for CUDA only",
                                "on CPU train in fp32 (or bf16)")
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FromageInputError(f"--precision {precision}", "this GPU has no bf16 support", "use --precision fp16")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Processes(rank, world_size, dev, precision)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


# -- the starting model and the trainable tensors --------------------------------------------------------
def load_for_training(cfg: TrainConfig, procs: Processes) -> tuple[Fromage, torch.Tensor]:
    """(the starting model, its [RET] row in fp32): the frozen backbones in the training precision, the trained
    tensors in fp32, no retrieval set (see `model.fresh`)."""
    placement = Placement(procs.device, procs.precision)
    if cfg.init == "fresh":
        args = ModelArgs(opt_version=cfg.opt_version, visual_encoder=cfg.visual_model,
                         n_visual_tokens=cfg.n_visual_tokens, shared_emb_dim=cfg.shared_emb_dim,
                         text_emb_layers=list(cfg.text_emb_layers))
        model = build_initial_model(args, placement, seed=cfg.seed)
        ret_row = model.input_embeddings.weight[model.retrieval_token_idx].detach().float().clone()
        origin = f"fresh|{cfg.seed}"
    else:
        model, ret_row = load_release_for_training(cfg.model_dir, placement, opt_version=cfg.opt_version,
                                                   visual_model=cfg.visual_model)
        origin = f"release|{Path(cfg.model_dir).resolve()}"
    digest = hashlib.sha256(repr((sorted(model.args.to_dict().items()), origin, procs.precision)).encode())
    return Fromage(model, placement, fingerprint=digest.hexdigest()[:16]), ret_row


def make_trainable(model: FromageModel, ret_row: torch.Tensor | None = None,
                   learn_logit_scale: bool = False) -> tuple[nn.Parameter, dict[str, nn.Parameter]]:
    """Freeze everything, then enable the trained maps (and `logit_scale` if it is learned); the [RET] row
    (`ret_row`, default the embedding matrix's) becomes its own fp32 parameter.
    Returns (ret_row, {name: parameter}) in a fixed order (the optimiser's and the checkpoint's)."""
    model.requires_grad_(False)
    params = {}
    for name, param in model.named_parameters():
        if name == "logit_scale" and not learn_logit_scale:
            continue
        if not name.startswith(("lm.", "visual_model.")):
            params[name] = param.requires_grad_(True)
    if ret_row is None:
        ret_row = model.input_embeddings.weight[model.retrieval_token_idx]
    ret_row = nn.Parameter(ret_row.detach().clone().float())
    params["ret_row"] = ret_row
    return ret_row, params


def set_train_mode(model: FromageModel) -> None:
    """Dropout in the trained maps follows model_args.json; the frozen backbones stay in eval mode."""
    model.train()
    model.lm.eval()
    model.visual_model.eval()


def mean_frozen_row_norm(model: FromageModel) -> torch.Tensor:
    weight = model.input_embeddings.weight
    others = torch.arange(weight.shape[0], device=weight.device) != model.retrieval_token_idx
    return weight[others].float().norm(dim=1).mean()


def install_ret_row(model: FromageModel, ret_row: torch.Tensor) -> None:
    """Write the trained row into the (tied) embedding matrix: what inference and `save_release` read."""
    with torch.no_grad():
        weight = model.input_embeddings.weight
        weight[model.retrieval_token_idx] = ret_row.to(weight.dtype)


# -- the LM with the trained [RET] row --------------------------------------------------------------------
def embed_text(model: FromageModel, ret_row: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    embeds = model.input_embeddings(ids)
    is_ret = (ids == model.retrieval_token_idx).unsqueeze(-1)
    return torch.where(is_ret, ret_row.to(embeds.dtype), embeds)


def lm_forward(model: FromageModel, ret_row: torch.Tensor, embeds: torch.Tensor,
               hidden_states: bool = False) -> tuple[torch.Tensor, tuple | None]:
    """(logits, hidden_states) of the frozen OPT; with tied embeddings the [RET] logit uses the trained row."""
    out = model.lm.model.decoder(inputs_embeds=embeds, output_hidden_states=hidden_states, use_cache=False)
    hidden = out.last_hidden_state
    logits = model.lm.lm_head(hidden)
    if model.lm.lm_head.weight.data_ptr() == model.input_embeddings.weight.data_ptr():
        ret_logit = (hidden @ ret_row.to(hidden.dtype)).unsqueeze(-1)
        is_ret = torch.arange(logits.shape[-1], device=logits.device) == model.retrieval_token_idx
        logits = torch.where(is_ret, ret_logit.to(logits.dtype), logits)
    return logits, out.hidden_states


# -- one training step ------------------------------------------------------------------------------------
def caption_sequences(visual: torch.Tensor, text: torch.Tensor, ids: torch.Tensor, ret_id: int,
                      concat: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """LM inputs and labels of the captioning loss, laid out as the original's.

    Row i: image i's visual tokens, then BOS, caption, [RET], padding. Labels: -100 on the visual tokens and
    from the first [RET] on (so BOS and the caption tokens are scored). With `concat`, rows 2k and 2k+1
    become one row: the first's image and caption (up to [RET]), the second's image and caption, then the
    first's and the second's unlabelled tails ([RET] and padding).
    """
    batch, n_visual = visual.shape[:2]
    embeds = torch.cat([visual.to(text.dtype), text], dim=1)
    labels = torch.cat([ids.new_full((batch, n_visual), IGNORE_INDEX), ids], dim=1)
    cut = n_visual + (ids == ret_id).int().argmax(dim=1)  # first [RET] of each row (there always is one)
    positions = torch.arange(labels.shape[1], device=labels.device)
    labels = labels.masked_fill(positions >= cut[:, None], IGNORE_INDEX)
    if not concat:
        return embeds, labels
    pairs_embeds, pairs_labels = [], []
    for a, b in zip(range(0, batch, 2), range(1, batch, 2)):
        ca, cb = int(cut[a]), int(cut[b])
        pairs_embeds.append(torch.cat([embeds[a, :ca], embeds[b, :cb], embeds[a, ca:], embeds[b, cb:]]))
        pairs_labels.append(torch.cat([labels[a, :ca], labels[b, :cb], labels[a, ca:], labels[b, cb:]]))
    return torch.stack(pairs_embeds), torch.stack(pairs_labels)


def retrieval_labels(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The text-only retrieval pass is also scored as language modelling: the caption and its [RET]."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    return ids.masked_fill(positions >= lengths[:, None], IGNORE_INDEX)


def concat_this_batch(seed: int, micro_batch: int, prob: float) -> bool:
    """A coin flip that depends only on (seed, micro-batch index): the same on every process and on resume."""
    return prob > 0 and float(np.random.default_rng([seed, micro_batch]).random()) < prob


def micro_step(model: FromageModel, ret_row: nn.Parameter, batch: Batch, concat: bool, cfg: TrainConfig,
               procs: Processes, scaler, stories: StoryQueries | None = None) -> torch.Tensor:
    """Forward and backward of one micro-batch. Returns this process's detached loss shares
    (caption, retrieval, ret_lm, story). Each pass is back-propagated at once, so only one LM graph is alive."""
    scale = 1.0 / cfg.grad_accum
    with torch.no_grad(), procs.autocast():
        features = model.vision_features(batch.pixel_values)  # frozen CLIP: no graph needed

    # Captioning: image tokens (captioning mapping) then the caption.
    with procs.autocast():
        text = embed_text(model, ret_row, batch.input_ids)
        visual = model.project_visual(features, "captioning")
        embeds, labels = caption_sequences(visual, text, batch.input_ids, model.retrieval_token_idx, concat)
        logits, _ = lm_forward(model, ret_row, embeds)
    caption = token_loss_share(logits, labels)
    scaler.scale(cfg.caption_weight * scale * caption).backward()

    # Retrieval: the caption and [RET] alone; the hidden state at [RET] against the image (retrieval mapping).
    with procs.autocast():
        text = embed_text(model, ret_row, batch.input_ids)
        logits, hidden = lm_forward(model, ret_row, text, hidden_states=True)
        at_ret = model.retrieval_space(hidden)[torch.arange(len(text), device=text.device), batch.lengths - 1]
        image = model.project_visual(features, "retrieval")[:, 0]
    ret_lm = token_loss_share(logits, retrieval_labels(batch.input_ids, batch.lengths))
    retrieval = contrastive_loss_share(F.normalize(at_ret.float(), dim=-1), F.normalize(image.float(), dim=-1),
                                       model.logit_scale.float())
    scaler.scale((cfg.retrieval_weight * retrieval + cfg.ret_lm_weight * ret_lm) * scale).backward()
    story = torch.zeros((), device=caption.device)
    if stories is not None:
        story = story_step(model, ret_row, stories, procs)
        scaler.scale(cfg.story_weight * scale * story).backward()
    return torch.stack([caption, retrieval, ret_lm, story]).detach().double()


def story_step(model: FromageModel, ret_row: nn.Parameter, stories: StoryQueries, procs: Processes) -> torch.Tensor:
    """Interleaved story queries (sentences and earlier photos, then [RET]) against their next photo."""
    with procs.autocast():
        embeds, at = story_sequences(model, lambda ids: embed_text(model, ret_row, ids), stories)
        hidden = model.text_hidden_states(embeds)
        query = model.retrieval_space(hidden)[torch.arange(len(at), device=at.device), at]
        features = stories.features.to(model.device)[torch.arange(len(at)), torch.tensor(stories.targets)]
        target = model.project_visual(features, "retrieval")[:, 0]
    return contrastive_loss_share(F.normalize(query.float(), dim=-1), F.normalize(target.float(), dim=-1),
                                  model.logit_scale.float())


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over the first `warmup` optimiser steps (step is 1-based), then constant."""
    return cfg.lr * min(1.0, step / cfg.warmup) if cfg.warmup > 0 else cfg.lr


def optimizer_step(optimizer, scaler, params: dict[str, nn.Parameter], ret_row: nn.Parameter,
                   cfg: TrainConfig, ret_norm: torch.Tensor | None) -> float:
    """Sum the gradients over processes, clip, step; returns the gradient norm before clipping."""
    if distributed():
        for param in params.values():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
    scaler.unscale_(optimizer)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if "logit_scale" in params:  # learned: clamped as open_clip clamps it (a temperature of at most 100)
        with torch.no_grad():
            params["logit_scale"].clamp_(0, MAX_LOGIT_SCALE)
    if ret_norm is not None:  # as the original: keep the [RET] row at the mean norm of the frozen rows
        with torch.no_grad():
            ret_row.mul_(ret_norm / ret_row.norm())
    return float(grad_norm)


# -- checkpoints ----------------------------------------------------------------------------------------
def rng_state() -> dict:
    """python, numpy and torch generator states as plain tensors and numbers (loadable with weights_only)."""
    version, words, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_objects(obj) -> list:
    if not distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(path: Path, step: int, params: dict[str, nn.Parameter], optimizer, scaler, cfg: TrainConfig,
                    procs: Processes, skipped: int, best: "Best | None" = None) -> None:
    """Everything a bit-exact continuation needs, written atomically (a temporary file, then a rename).
    Every process calls it (each contributes its generator states); the main process writes."""
    ranks = gather_objects({"rng": rng_state(), "skipped": skipped})
    if not procs.is_main:
        return
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "step": step, "data_position": step * cfg.grad_accum,
        "world_size": procs.world_size, "global_batch": cfg.batch_size * procs.world_size,
        "grad_accum": cfg.grad_accum, "seed": cfg.seed, "max_len": cfg.max_len,
        "global_story_batch": global_story_batch(cfg, procs), "epoch_steps": cfg.epoch_steps or 0,
        "best": {"score": best.score, "step": best.step} if best is not None else None,
        "trainable": {name: p.detach().cpu().clone() for name, p in params.items()},
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "lr_schedule": {"lr": cfg.lr, "warmup": cfg.warmup},  # the schedule is a function of the step
        "ranks": ranks,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def global_story_batch(cfg: TrainConfig, procs: Processes) -> int:
    return cfg.story_batch * procs.world_size if cfg.stories is not None else 0


def checkpoint_path(out: Path, step: int) -> Path:
    return out / CHECKPOINT_DIR / f"step_{step:07d}.pt"


def find_checkpoint(path: Path) -> Path:
    """A checkpoint file, or the latest one in DIR/checkpoints or DIR."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path / CHECKPOINT_DIR, path):
        found = sorted(folder.glob("step_*.pt")) if folder.is_dir() else []
        if found:
            return found[-1]
    raise FromageInputError(path, "no training checkpoint found",
                            f"expected a file or a directory with {CHECKPOINT_DIR}/step_*.pt")


def load_checkpoint(path: Path, params: dict[str, nn.Parameter], optimizer, scaler, cfg: TrainConfig,
                    procs: Processes) -> tuple[int, int, "Best"]:
    """Restore the state saved by `save_checkpoint`; returns (step, this process's skipped-image count, the best
    validation so far)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise FromageInputError(path, f"not a readable training checkpoint: {err}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise FromageInputError(path, "not a fromage-bench training checkpoint")
    expected = {"global_batch": cfg.batch_size * procs.world_size, "grad_accum": cfg.grad_accum, "seed": cfg.seed,
                "max_len": cfg.max_len, "global_story_batch": global_story_batch(cfg, procs),
                "epoch_steps": cfg.epoch_steps or 0}
    differ = [f"{k} {ckpt.get(k, 0)} (now {v})" for k, v in expected.items() if ckpt.get(k, 0) != v]
    if differ:
        raise FromageInputError(path, f"was written with {', '.join(differ)}: the data order would not continue",
                                "resume with the same global batch, --grad-accum, --seed, --max-len, --epoch-steps "
                                "and stories")
    if list(ckpt["trainable"]) != list(params):
        learned = "logit_scale" in ckpt["trainable"]
        raise FromageInputError(path, "holds other trained tensors than this model has",
                                f"same --model-dir as the run, and {'' if learned else 'no '}--learn-logit-scale?")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(ckpt["trainable"][name])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    skipped = 0
    if ckpt["world_size"] == procs.world_size:
        set_rng_state(ckpt["ranks"][procs.rank]["rng"])
        skipped = ckpt["ranks"][procs.rank]["skipped"]
    else:
        log.warning("%s was written by %d processes, this run has %d: generator states are not restored "
                    "(only dropout uses them)", path, ckpt["world_size"], procs.world_size)
    best = Best(**ckpt["best"]) if ckpt.get("best") else Best()
    return ckpt["step"], skipped, best


# -- logging ----------------------------------------------------------------------------------------------
def metrics_row(step: int, shares: torch.Tensor, skipped: int, lr: float, grad_norm: float, seconds: float,
                cfg: TrainConfig) -> dict:
    """One metrics.csv row: the processes' loss shares add up to the losses of the global batch."""
    totals = sum_over_processes(torch.cat([shares, torch.tensor([float(skipped)], dtype=torch.float64)]))
    caption, retrieval, ret_lm, story, all_skipped = totals.tolist()
    loss = (cfg.caption_weight * caption + cfg.retrieval_weight * retrieval + cfg.ret_lm_weight * ret_lm
            + cfg.story_weight * story)
    return {"step": step, "loss": loss, "caption_loss": caption, "retrieval_loss": retrieval, "lr": lr,
            "grad_norm": grad_norm, "seconds": seconds, "ret_lm_loss": ret_lm, "skipped_images": int(all_skipped),
            "story_loss": story if cfg.stories is not None else ""}


def sum_over_processes(value: torch.Tensor) -> torch.Tensor:
    """Sum over processes of a small CPU float64 tensor (on the collective's device for NCCL)."""
    if not distributed():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = value.to(device)
    dist.all_reduce(value)
    return value.cpu()


class MetricsLog:
    """metrics.csv (and TensorBoard if asked for and installed), written by the main process only.
    On resume the rows after the checkpoint's step are dropped, so the file reads as one run."""

    def __init__(self, out: Path, resumed_step: int, tensorboard: bool):
        path = out / METRICS_FILE
        kept = []
        if resumed_step and path.is_file():
            with path.open(newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= resumed_step]
        self.file = path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=METRICS_FIELDS)
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.file.flush()
        self.tensorboard = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                log.warning("--log tensorboard: the tensorboard package is not installed; writing metrics.csv only")

    def write(self, row: dict) -> None:
        self.writer.writerow(row)
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step":
                    self.tensorboard.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


# -- export ---------------------------------------------------------------------------------------------
ORIGINAL_NAME_PARTS = {"opt_version": "facebook/opt", "visual_encoder": "clip"}  # what the original's loader tests


def backbone_reference(name: str, model_dir: Path | None) -> str:
    """A backbone named by a path (relative to the initial model's directory, or to the working directory) is
    written as an absolute path, so the export loads from anywhere; a Hugging Face id (found in the hub cache)
    is kept as it is."""
    candidates = ([Path(model_dir) / name] if model_dir is not None else []) + [Path(name).expanduser()]
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate.resolve())
    return name


def warn_if_not_original_loadable(args: ModelArgs, out_dir: Path) -> None:
    """The original's `load_fromage` builds OPT only if `opt_version` contains "facebook/opt" and CLIP only if
    `visual_encoder` contains "clip"; a backbone from a local directory is named by its path, which may not."""
    lacking = [f"{key} {getattr(args, key)} lacks {part!r}" for key, part in ORIGINAL_NAME_PARTS.items()
               if part not in getattr(args, key)]
    if lacking:
        log.warning("%s: %s, which the original code's load_fromage needs (backbones from local directories are "
                    "named by their path; a Hugging Face id from the hub cache is written as the id)",
                    out_dir, "; ".join(lacking))


def export_release(model: FromageModel, model_dir: Path | None, out_dir: Path, ret_row: torch.Tensor) -> Path:
    """model_args.json + pretrained_ckpt.pth.tar, which `load_fromage(out_dir)` (and the original's) reads; the
    [RET] row is the fp32 trained one, whatever the precision of the embedding matrix."""
    args = copy.deepcopy(model.args)
    args.opt_version = backbone_reference(args.opt_version, model_dir)
    args.visual_encoder = backbone_reference(args.visual_encoder, model_dir)
    warn_if_not_original_loadable(args, out_dir)
    return save_release(model, out_dir, args, ret_row=ret_row)


def trained_fingerprint(fromage: Fromage, params: dict[str, nn.Parameter]) -> str:
    digest = hashlib.sha256(fromage.fingerprint.encode())
    for name, param in params.items():
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# -- validation -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def preserved_rng():
    """Validation must not move the generators training draws from (data-loader seeds, dropout): resuming
    bit for bit then does not depend on where validations fell."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


class ValidationLog:
    """val_metrics.csv (step, then the metrics in the order the first validation gave them) and TensorBoard
    `val/*`, main process only; on resume the rows after the checkpoint's step are dropped."""

    def __init__(self, out: Path, resumed_step: int, tensorboard):
        self.path = out / VAL_METRICS_FILE
        self.rows = []
        if resumed_step and self.path.is_file():
            with self.path.open(newline="") as f:
                self.rows = [row for row in csv.DictReader(f) if int(row["step"]) <= resumed_step]
        self.tensorboard = tensorboard
        self._write()

    def _write(self) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for row in self.rows for k in row)) or ["step"])
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, text.getvalue())

    def write(self, step: int, metrics: dict) -> None:
        self.rows.append({"step": step, **metrics})
        self._write()
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(f"val/{key}", value, step)


@dataclass
class Best:
    """The best validation so far (`BEST_METRIC`), kept in checkpoints so that a resumed run continues it."""
    score: float = -math.inf
    step: int = -1


def run_validation(fromage: Fromage, ret_row: nn.Parameter, step: int, cfg: TrainConfig, procs: Processes,
                   val_log: ValidationLog | None, best: Best) -> None:
    """Validate (every process calls `cfg.validate`: the tasks share their batches out among the processes and
    all get the same metrics), log on the main process, and export `ckpt_best` when `BEST_METRIC` improves. As in
    the original, the validation before training is logged but is no candidate for the best checkpoint."""
    model = fromage.model
    install_ret_row(model, ret_row)  # the trained row, where inference reads it
    model.eval()
    with preserved_rng(), torch.no_grad(), procs.autocast():
        metrics = cfg.validate(fromage, step)
    set_train_mode(model)
    score = metrics.get(BEST_METRIC)
    improved = step > 0 and score is not None and score > best.score
    if improved:
        best.score, best.step = float(score), step
    if procs.is_main:
        val_log.write(step, metrics)
        if improved:
            export_release(model, cfg.model_dir, cfg.out / BEST_DIR, ret_row.detach())
            atomic_write_text(cfg.out / BEST_DIR / "best.json",
                              json.dumps({"step": step, "metric": BEST_METRIC, "value": float(score)}) + "\n")
    if distributed():
        dist.barrier()  # ckpt_best is written before any process trains on


def warn_if_best_is_from_a_later_step(out: Path, start: int) -> None:
    """A run resumed from an earlier checkpoint than its last may find in ckpt_best a step it is about to redo."""
    try:
        recorded = json.loads((out / BEST_DIR / "best.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if recorded > start:
        log.warning("%s holds step %d, after the checkpoint's step %d (a continuation this run replaces): it is "
                    "overwritten when a validation beats the checkpoint's best", out / BEST_DIR, recorded, start)


def validation_due(step: int, start: int, cfg: TrainConfig) -> bool:
    """Before training (a run that starts at step 0), every `val_every` steps, and at the end."""
    if cfg.validate is None:
        return False
    if step == start:
        return start == 0
    return step % cfg.val_every == 0 or step == cfg.steps


def match_backbone_dtype(model: FromageModel) -> None:
    """Cast the trained maps to the backbones' dtype (after the export, which keeps fp32): the model in memory is
    then the one `load_fromage(release, precision=...)` gives, and runs without autocast."""
    dtype = model.lm_dtype
    if dtype == model.dtype:
        return
    for module in (model.text_hidden_fcs, model.visual_embeddings, model.visual_fc):
        module.to(dtype)
    model.logit_scale.data = model.logit_scale.data.to(dtype)


# -- the loop ---------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    fromage: Fromage               # the trained model in memory ([RET] row installed, eval mode, one dtype)
    history: list[dict]            # one row per optimiser step of this run (what metrics.csv holds)
    release_dir: Path | None       # the export (main process only)
    checkpoint: Path | None        # the last checkpoint written
    skipped_images: int            # over all processes
    skipped_reasons: dict = field(default_factory=dict)  # this process's skipped images by reason
    best: Best = field(default_factory=Best)             # the best validation (step -1: none)


def train(cfg: TrainConfig) -> TrainResult:
    procs = setup_processes(cfg.device, cfg.precision)
    try:
        return _train(cfg, procs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, procs: Processes) -> TrainResult:
    cfg.check()
    fromage, initial_ret_row = load_for_training(cfg, procs)
    model = fromage.model
    dataset = CaptionDataset(cfg.train_tsv, cfg.image_dir, model.tokenizer, model.feature_extractor,
                             model.retrieval_token_idx, cfg.max_len, seed=cfg.seed)
    global_batch = cfg.batch_size * procs.world_size
    if len(dataset) < global_batch:
        raise FromageInputError(cfg.train_tsv, f"has {len(dataset)} rows, fewer than one global batch ({global_batch})")

    stories = None
    if cfg.stories is not None:
        stories = StorySource(cfg.stories, cfg.story_images, model, cfg.story_batch, procs.world_size, procs.rank,
                              cfg.seed)
    seed_everything(cfg.seed + procs.rank)
    ret_row, params = make_trainable(model, initial_ret_row, cfg.learn_logit_scale)
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=cfg.betas, eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(procs.device.type, enabled=procs.precision == "fp16")
    ret_norm = mean_frozen_row_norm(model) if cfg.renorm_ret else None
    start, skipped, best = 0, 0, Best()
    if cfg.resume is not None:
        start, skipped, best = load_checkpoint(find_checkpoint(cfg.resume), params, optimizer, scaler, cfg, procs)
        warn_if_best_is_from_a_later_step(cfg.out, start)

    sampler = KeyedBatches(len(dataset), cfg.batch_size, procs.world_size, procs.rank, cfg.seed,
                           start=start * cfg.grad_accum, stop=cfg.steps * cfg.grad_accum, epoch_batches=cfg.epoch_steps)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers,
                                         collate_fn=Collate(model.tokenizer.pad_token_id, cfg.max_len),
                                         pin_memory=procs.device.type == "cuda")
    metrics = val_log = None
    if procs.is_main:
        cfg.out.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(cfg.out, start, "tensorboard" in cfg.log)
        if cfg.validate is not None:
            val_log = ValidationLog(cfg.out, start, metrics.tensorboard)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not (procs.is_main and cfg.progress))
    history, last_checkpoint, reasons = [], None, Counter()
    set_train_mode(model)
    if validation_due(start, start, cfg):
        run_validation(fromage, ret_row, start, cfg, procs, val_log, best)
    batches = iter(loader)
    for step in range(start + 1, cfg.steps + 1):
        began = time.time()
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        shares = torch.zeros(4, dtype=torch.float64)
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            skipped += batch.skipped
            reasons.update(batch.reasons)
            index = (step - 1) * cfg.grad_accum + micro
            concat = concat_this_batch(cfg.seed, index, cfg.concat_prob)
            queries = stories.queries(index) if stories is not None else None
            shares += micro_step(model, ret_row, batch.to(procs.device), concat, cfg, procs, scaler, queries).cpu()
        if batch.skipped:
            log.warning("step %d: %d unreadable image(s) replaced by random rows (%s)", step, batch.skipped,
                        ", ".join(f"{n} {r}" for r, n in batch.reasons.most_common()))
        grad_norm = optimizer_step(optimizer, scaler, params, ret_row, cfg, ret_norm)
        row = metrics_row(step, shares / cfg.grad_accum, skipped, lr, grad_norm, time.time() - began, cfg)
        history.append(row)
        if metrics is not None:
            metrics.write(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", cap=f"{row['caption_loss']:.3f}", ret=f"{row['retrieval_loss']:.3f}")
        if validation_due(step, start, cfg):
            run_validation(fromage, ret_row, step, cfg, procs, val_log, best)
        if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
            last_checkpoint = checkpoint_path(cfg.out, step)
            save_checkpoint(last_checkpoint, step, params, optimizer, scaler, cfg, procs, skipped, best)
    bar.close()
    if metrics is not None:
        metrics.close()

    install_ret_row(model, ret_row)
    model.eval().requires_grad_(False)
    fromage.fingerprint = trained_fingerprint(fromage, params)
    release = export_release(model, cfg.model_dir, cfg.out / RELEASE_DIR, ret_row.detach()) if procs.is_main else None
    match_backbone_dtype(model)
    total_skipped = int(sum_over_processes(torch.tensor(skipped, dtype=torch.float64)))
    if distributed():
        dist.barrier()  # the export exists before any process returns
    if total_skipped and procs.is_main:
        log.warning("%d unreadable image(s) were skipped, each replaced by a random row (this process, this run: %s)",
                    total_skipped, ", ".join(f"{n} {r}" for r, n in reasons.most_common()) or "none")
    return TrainResult(fromage, history, release, last_checkpoint, total_skipped, dict(reasons), best)

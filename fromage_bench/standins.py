"""Stand-in backbones pretrained offline on a miniworld (see `fromage_bench.miniworld`), in the places and
formats of the real ones, so that FROMAGe can be trained and evaluated on top of them without downloads:

    OUT/opt/    OPTForCausalLM + GPT-2-style byte-level BPE tokenizer (vocab.json, merges.txt,
                tokenizer_config.json), trained here on the miniworld's text (causal LM)
    OUT/clip/   a whole CLIPModel (config model_type "clip") + its tokenizer + preprocessor_config.json (its size =
                the tower's image_size), as openai/clip-vit-large-patch14 is: FROMAGe loads its vision tower
                (`CLIPVisionModel.from_pretrained` reads the vision part), the CLIP baseline family all of it.
                Both towers are trained together from scratch, contrastively, as CLIP was, on the miniworld's
                alt-text-style split (captions only: `clip_pretraining_files`), not on the CC3M-style pairs
                FROMAGe is trained on (which mix in stories and dialogues): CLIP's web pairs never taught its
                text tower to read a story, while the LM's corpus did
    OUT/standins.json   their quality: LM held-out perplexity vs a unigram model, vision R@1 vs chance
    OUT/model_args.json + OUT/pretrained_ckpt.pth.tar   (unless disabled) an untrained FROMAGe over them,
                the starting point for `fromage-bench train --model-dir OUT`

The tokenizer has OPT's special tokens at ids 0..3 (`<s>`, `<pad>`, `</s>`, `<unk>`) and, like real OPT,
the LM has more embedding rows than tokens (+2 added by FROMAGe, rounded up), so loading shrinks the matrix.
Everything runs on CPU with `threads` threads (default 2).
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import miniworld

log = logging.getLogger(__name__)

STANDINS_FILE = "standins.json"


@dataclass
class LMSettings:
    hidden: int = 192
    layers: int = 3
    heads: int = 4
    vocab: int = 1000          # target BPE vocabulary (the miniworld needs far fewer: whole words)
    max_len: int = 256         # documents are cut to this many tokens
    steps: int = 600
    batch_tokens: int = 3072   # a batch holds documents of similar length, padded width x count <= this
    lr: float = 2e-3
    warmup: int = 40


@dataclass
class VisionSettings:
    hidden: int = 192
    layers: int = 3
    heads: int = 4
    image_size: int = 96       # = the miniworld's canvas: patch 32 gives one token per grid cell
    patch: int = 32
    embed_dim: int = 128       # contrastive space (CLIP's projection_dim)
    text_hidden: int = 128
    text_layers: int = 2
    text_max_len: int = 77     # CLIP's text length
    steps: int = 500
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 30
    hard_negatives: int = 0    # groups of two scenes that differ only in places / colour binding (off: see docs)
    # Share of the training images shown squashed (resize to 224x224, as the original VIST / VisDial scripts feed
    # CLIP) instead of centre-cropped. The real CLIP, pretrained on 400M web photos, gives a squashed photo
    # nearly the features of its crop; a tower this small learns that only from seeing both.
    squashed_share: float = 1 / 3


PRESETS = {
    "tiny": (LMSettings(hidden=64, layers=2, heads=2, steps=30, batch_tokens=512, max_len=128, warmup=5),
             VisionSettings(hidden=64, layers=1, heads=2, text_hidden=64, text_layers=1, embed_dim=64, steps=30,
                            batch_size=32, warmup=5, hard_negatives=32)),
    # small: fewer steps than the defaults keep the embedded default's first run within 10 minutes on 2 cores
    # (issue 18): the LM 520 (600 before 2026-12-01: held-out perplexity 1.90; 520: 1.92), the CLIP 400 (the
    # default 500). Fewer LM steps cost FROMAGe more than its own steps do: with the LM at 480, captioning CIDEr
    # fell from 36.6 to 16.2 (cc3m); 450 steps at 3e-3 cost two thirds of the t2i R@1.
    "small": (LMSettings(steps=520), VisionSettings(steps=400)),
    "medium": (LMSettings(hidden=256, layers=4, heads=4, steps=2000, batch_tokens=4096),
               VisionSettings(hidden=256, layers=4, heads=4, steps=3000, batch_size=192)),
}


# -- text -----------------------------------------------------------------------------------------------
def train_tokenizer(texts: Sequence[str], out_dir: Path, vocab_size: int) -> None:
    """Byte-level BPE (GPT-2 pre-tokenisation) with OPT's special tokens at ids 0..3, saved as
    vocab.json + merges.txt + tokenizer_config.json (read back by GPT2Tokenizer)."""
    from tokenizers import ByteLevelBPETokenizer

    from model.tiny import OPT_SPECIAL_TOKENS, TOKENIZER_CONFIG

    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=OPT_SPECIAL_TOKENS, show_progress=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_model(str(out_dir))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))


def encode_doc(tokenizer, doc: dict, max_len: int) -> list[int]:
    """A miniworld document's token ids: each segment tokenised on its own (as the tasks do), BOS before the
    first segment or before every segment."""
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    for i, segment in enumerate(doc["segments"]):
        if i == 0 or doc.get("bos") == "each":
            ids.append(bos)
        ids += tokenizer(segment, add_special_tokens=False).input_ids
    return ids[:max_len]


def _batches(n: int, batch_size: int, steps: int, rng: random.Random):
    """`steps` batches of indices: shuffled epochs, cut into batches (a short last batch is dropped)."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order = order + fresh
        yield order[:batch_size]
        order = order[batch_size:]


def _length_batches(lengths: Sequence[int], budget: int, steps: int, rng: random.Random):
    """`steps` batches of indices of similar lengths (padded width x count <= `budget`): each epoch is
    shuffled, cut into chunks that are sorted by length and split, and the batches are shuffled."""
    pending: list[list[int]] = []
    for _ in range(steps):
        if not pending:
            order = list(range(len(lengths)))
            rng.shuffle(order)
            chunk_size = max(1, 64 * budget // max(1, max(lengths)))
            for start in range(0, len(order), chunk_size):
                chunk = sorted(order[start:start + chunk_size], key=lambda i: lengths[i])
                batch: list[int] = []
                for i in chunk:  # sorted: the new document is the widest so far
                    if batch and (len(batch) + 1) * lengths[i] > budget:
                        pending.append(batch)
                        batch = []
                    batch.append(i)
                pending.append(batch)
            rng.shuffle(pending)
        yield pending.pop()


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def _optimiser_step(optimiser: torch.optim.Optimizer, params, loss: torch.Tensor) -> None:
    """One step of the stand-ins' training loops: gradients of `loss`, clipped to norm 1, applied."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimiser.step()


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _lm_nll(lm, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 32) -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens."""
    total, count = 0.0, 0
    lm.eval()
    with torch.no_grad():
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for start in range(0, len(order), batch_size):
            chunk = [seqs[i] for i in order[start:start + batch_size]]
            ids, mask = _pad(chunk, pad_id)
            logits = lm(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                     reduction="sum").item()
            count += int((labels != -100).sum())
    return total, count


def unigram_nll(train: Sequence[Sequence[int]], heldout: Sequence[Sequence[int]], vocab: int) -> tuple[float, int]:
    """Held-out NLL of an add-one unigram model of the training tokens (the tokens the LM predicts)."""
    counts = torch.ones(vocab, dtype=torch.float64)
    for s in train:
        counts += torch.bincount(torch.tensor(s[1:], dtype=torch.long), minlength=vocab).double()[:vocab]
    logp = (counts / counts.sum()).log()
    tokens = torch.tensor([t for s in heldout for t in s[1:]], dtype=torch.long)
    return float(-logp[tokens].sum()), int(tokens.numel())


def pretrain_lm(train_docs: Sequence[dict], heldout_docs: Sequence[dict], out_dir: Path, settings: LMSettings,
                seed: int = 0, progress: Callable[[str], None] | None = None) -> dict:
    """Train the tokenizer and the OPT LM; save both to `out_dir`; return the quality numbers."""
    from transformers import GPT2Tokenizer, OPTConfig, OPTForCausalLM

    from model.files import save_pretrained
    from model.tiny import padded_vocab_size

    start = time.perf_counter()
    out_dir = Path(out_dir)
    texts = [t for d in train_docs for t in d["segments"]]
    train_tokenizer(texts, out_dir, settings.vocab)
    tokenizer = GPT2Tokenizer.from_pretrained(str(out_dir))
    base_tokens = len(tokenizer)
    train = [encode_doc(tokenizer, d, settings.max_len) for d in train_docs]
    heldout = [encode_doc(tokenizer, d, settings.max_len) for d in heldout_docs]

    torch.manual_seed(seed)
    rows = padded_vocab_size(base_tokens)
    config = OPTConfig(vocab_size=rows, hidden_size=settings.hidden, ffn_dim=4 * settings.hidden,
                       num_hidden_layers=settings.layers, num_attention_heads=settings.heads,
                       max_position_embeddings=512, word_embed_proj_dim=settings.hidden, dropout=0.0,
                       attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, init_std=0.02,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    lm = OPTForCausalLM(config)
    optimiser = torch.optim.AdamW(lm.parameters(), lr=settings.lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id
    curve = []
    lm.train()
    lengths = [len(s) for s in train]
    for step, batch in enumerate(_length_batches(lengths, settings.batch_tokens, settings.steps, rng)):
        for group in optimiser.param_groups:
            group["lr"] = settings.lr * _schedule(step, settings.steps, settings.warmup)
        ids, mask = _pad([train[i] for i in batch], pad)
        labels = ids.masked_fill(mask == 0, -100)
        # mean over the batch's tokens: batches of short documents count as much per token as long ones
        loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        _optimiser_step(optimiser, lm.parameters(), loss)
        curve.append(loss.item())
        if progress and (step % 50 == 0 or step == settings.steps - 1):
            progress(f"lm step {step + 1}/{settings.steps}: loss {loss.item():.3f}")
    lm.eval()
    save_pretrained(lm, out_dir)

    nll, n = _lm_nll(lm, heldout, pad)
    uni, n_uni = unigram_nll(train, heldout, base_tokens)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "parameters": sum(p.numel() for p in lm.parameters()),
            "config": asdict(settings), "tokenizer_size": base_tokens, "embedding_rows": rows,
            "train_docs": len(train), "train_tokens": sum(len(s) for s in train), "heldout_docs": len(heldout),
            "heldout_tokens": n, "first_loss": round(_mean(curve[:10]), 4), "final_loss": round(_mean(curve[-20:]), 4),
            "heldout_perplexity": round(math.exp(nll / n), 3), "unigram_perplexity": round(math.exp(uni / n_uni), 3)}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / max(1, len(values))


# -- vision ---------------------------------------------------------------------------------------------
def image_processor(image_size: int):
    """CLIP's processor (PIL backend, as `model.backbones.load_image_processor`) at the tower's size."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers releases before the split into backends
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def encode_images(processor, images: Sequence, batch_size: int = 256,
                  squashed: Sequence[bool] | None = None) -> torch.Tensor:
    """Pixel values as CLIP was pretrained and FROMAGe trained (shortest edge resized, centre crop), or squashed
    (`model.images`) where `squashed[i]` is true."""
    from model.images import CROP, SQUASH, prepare

    squashed = squashed if squashed is not None else [False] * len(images)
    prepared = [prepare(image, SQUASH if squash else CROP) for image, squash in zip(images, squashed, strict=True)]
    return torch.cat([processor(prepared[i:i + batch_size], return_tensors="pt").pixel_values
                      for i in range(0, len(prepared), batch_size)])


class ClipText(nn.Module):
    """A CLIPModel's text side as one call: `text_projection` of the text tower's pooled output (at EOS)."""

    def __init__(self, clip):
        super().__init__()
        self.text_model, self.text_projection = clip.text_model, clip.text_projection

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.text_model(input_ids=ids, attention_mask=mask).pooler_output)


def embed_texts_by_length(text: nn.Module, ids_list: Sequence[Sequence[int]], pad_id: int,
                          groups: int = 4) -> torch.Tensor:
    """`text` over token id lists, in the lists' order, run on `groups` runs of similar length, each padded to
    its own longest: the tower masks padding (and CLIP's is causal, pooled at EOS), so the result is that of one
    padded batch, at about half the tokens for captions of mixed length (one long caption pads a whole batch)."""
    order = sorted(range(len(ids_list)), key=lambda i: len(ids_list[i]))
    size = max(1, math.ceil(len(order) / groups))
    parts = [text(*_pad([ids_list[i] for i in order[start:start + size]], pad_id))
             for start in range(0, len(order), size)]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return torch.cat(parts)[inverse]


def _contrastive(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    logits = logit_scale.exp().clamp(max=100) * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    targets = torch.arange(len(logits))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def recall_at_1(image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict:
    sims = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    targets = torch.arange(len(sims))
    i2t = float((sims.argmax(1) == targets).float().mean()) * 100
    t2i = float((sims.argmax(0) == targets).float().mean()) * 100
    return {"i2t_R@1": round(i2t, 2), "t2i_R@1": round(t2i, 2), "chance_R@1": round(100 / len(sims), 2),
            "n": len(sims)}


def new_clip_model(tokenizer, settings: VisionSettings, seed: int = 0):
    """(an untrained CLIPModel at `settings`, its tokenizer): the stand-in OPT's BPE with CLIP's text markers
    (`model.clip_baseline.stand_in_clip_tokenizer`)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from model.clip_baseline import stand_in_clip_tokenizer

    clip_tokenizer = stand_in_clip_tokenizer(tokenizer)
    text_config = CLIPTextConfig(vocab_size=len(clip_tokenizer), hidden_size=settings.text_hidden,
                                 intermediate_size=4 * settings.text_hidden, num_hidden_layers=settings.text_layers,
                                 num_attention_heads=4 if settings.text_hidden % 4 == 0 else 1,
                                 max_position_embeddings=settings.text_max_len, projection_dim=settings.embed_dim,
                                 bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
                                 pad_token_id=clip_tokenizer.pad_token_id)
    # FROMAGe reads the vision part with CLIPVisionModel: naming that architecture in it keeps the vision config
    # FROMAGe's `model_identity` covers what a vision-only save gave (so retrieval sets stay FROMAGe's own)
    vision_config = CLIPVisionConfig(hidden_size=settings.hidden, intermediate_size=4 * settings.hidden,
                                     num_hidden_layers=settings.layers, num_attention_heads=settings.heads,
                                     image_size=settings.image_size, patch_size=settings.patch,
                                     projection_dim=settings.embed_dim, architectures=["CLIPVisionModel"])
    config = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                        projection_dim=settings.embed_dim, logit_scale_init_value=math.log(1 / 0.07))
    torch.manual_seed(seed)
    return CLIPModel(config), clip_tokenizer


def pretrain_clip(train_pairs: Sequence[tuple[object, str]], heldout_pairs: Sequence[tuple[object, str]],
                  tokenizer, out_dir: Path, settings: VisionSettings, seed: int = 0,
                  progress: Callable[[str], None] | None = None,
                  hard_pairs: Sequence[tuple[object, str]] = ()) -> dict:
    """Train a whole CLIPModel (vision tower, text tower, both projections, temperature) from scratch with
    InfoNCE both ways on (image, caption) pairs (PIL images or paths), as CLIP was trained; save it with its
    tokenizer and processor to `out_dir`; return the quality numbers. FROMAGe uses its vision tower, the CLIP
    baseline all of it.

    `hard_pairs` (consecutive groups of two, see `hard_negative_pairs`) fill half of every batch, each group
    kept together; the other half are `train_pairs`."""
    from model.clip_baseline import clip_text_ids
    from model.files import save_pretrained
    from model.images import open_image

    start = time.perf_counter()
    out_dir = Path(out_dir)
    processor = image_processor(settings.image_size)
    clip, clip_tokenizer = new_clip_model(tokenizer, settings, seed)

    def pixels_and_ids(pairs, squashed_share: float = 0.0):
        images = [p if not isinstance(p, (str, Path)) else open_image(p) for p, _ in pairs]
        ids = [clip_text_ids(clip_tokenizer, c, settings.text_max_len) for _, c in pairs]
        pick = random.Random(f"squash:{seed}")
        squashed = [pick.random() < squashed_share for _ in images]
        # float16 in memory (halves it); every batch is cast back to float32
        return encode_images(processor, images, squashed=squashed).half() if images else torch.zeros(0), ids

    train_pixels, train_ids = pixels_and_ids(train_pairs, settings.squashed_share)
    held_pixels, held_ids = pixels_and_ids(heldout_pairs)
    n_hard_groups = len(hard_pairs) // 2
    probe_groups = min(200, n_hard_groups // 5)  # held out: never trained on
    hard_pixels, hard_ids = pixels_and_ids(hard_pairs[:2 * n_hard_groups])
    prep_seconds = time.perf_counter() - start

    text = ClipText(clip)
    params = [p for p in clip.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.98), weight_decay=0.05)
    rng = random.Random(seed)
    pad = clip_tokenizer.pad_token_id
    trained_groups = n_hard_groups - probe_groups
    n_hard = settings.batch_size // 4 if trained_groups > 0 else 0  # groups per batch: half the batch
    plain = _batches(len(train_ids), settings.batch_size - 2 * n_hard, settings.steps, rng)
    groups = _batches(trained_groups, n_hard, settings.steps, rng) if n_hard else iter(lambda: [], None)

    def embed_images(pixels):
        return clip.visual_projection(clip.vision_model(pixel_values=pixels.float()).pooler_output)

    curve = []
    clip.train()
    for step in range(settings.steps):
        for group in optimiser.param_groups:
            group["lr"] = settings.lr * _schedule(step, settings.steps, settings.warmup)
        batch = next(plain)
        hard = [probe_groups * 2 + 2 * g + k for g in next(groups) for k in (0, 1)]
        pixels = torch.cat([train_pixels[batch]] + ([hard_pixels[hard]] if hard else []))
        texts = embed_texts_by_length(text, [train_ids[i] for i in batch] + [hard_ids[i] for i in hard], pad)
        loss = _contrastive(embed_images(pixels), texts, clip.logit_scale)
        _optimiser_step(optimiser, params, loss)
        curve.append(loss.item())
        if progress and (step % 50 == 0 or step == settings.steps - 1):
            progress(f"clip step {step + 1}/{settings.steps}: loss {loss.item():.3f}")
    clip.eval().requires_grad_(False)

    def embed_all(pixels, ids_list):
        with torch.no_grad():
            images = torch.cat([embed_images(pixels[i:i + 256]) for i in range(0, len(pixels), 256)])
            return images, embed_texts_by_length(text, ids_list, pad)

    report = {"seconds": None, "preprocess_seconds": round(prep_seconds, 1),
              "parameters": sum(p.numel() for p in clip.vision_model.parameters()),
              "text_parameters": sum(p.numel() for p in clip.text_model.parameters()), "config": asdict(settings),
              "train_pairs": len(train_ids), "hard_negative_groups": trained_groups,
              "first_loss": round(_mean(curve[:10]), 4), "final_loss": round(_mean(curve[-20:]), 4),
              "heldout": recall_at_1(*embed_all(held_pixels, held_ids))}
    n_probe = min(len(train_ids), len(held_ids))
    report["train_subset"] = recall_at_1(*embed_all(train_pixels[:n_probe], train_ids[:n_probe]))
    if probe_groups:
        # held-out hard negatives: does an image match its own caption better than its variant's? (chance 50 %)
        images, texts = embed_all(hard_pixels[:2 * probe_groups], hard_ids[:2 * probe_groups])
        sims = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
        own = sims.diagonal()
        swapped = torch.stack([sims[i, i ^ 1] for i in range(len(own))])
        report["heldout_hard_negatives"] = {"accuracy": round(float((own > swapped).float().mean()) * 100, 2),
                                            "chance": 50.0, "n": len(own)}
    save_pretrained(clip, out_dir)
    save_pretrained(processor, out_dir)
    clip_tokenizer.save_pretrained(str(out_dir))
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


# -- data -----------------------------------------------------------------------------------------------
def read_pairs(tsv: Path, image_dir: Path) -> list[tuple[Path, str]]:
    """(image file, caption) rows of a CC3M-style TSV whose image file exists, read and resolved as training
    and the tasks read them (`model.datasets`)."""
    from model.datasets import ImageDir, read_cc3m_rows, resolve_image  # (the package `model` loads transformers)

    images = ImageDir(image_dir)
    paths = [(resolve_image(images, row.image, f"{tsv}, line {row.line}"), row.caption) for row in read_cc3m_rows(tsv)]
    return [(path, caption) for path, caption in paths if path.is_file()]


def clip_pretraining_files(data: Path) -> tuple[Path, Path]:
    """(TSV, image directory) of the stand-in CLIP's pretraining pairs: the miniworld's own alt-text-style split
    (captions only, as CLIP's web pairs; `miniworld.CLIP_TRAIN_TSV`) where the data root has one, else its
    CC3M-style training pairs (any other data root)."""
    if (data / miniworld.CLIP_TRAIN_TSV).is_file():
        return data / miniworld.CLIP_TRAIN_TSV, data / miniworld.CLIP_TRAIN_IMAGES
    return data / miniworld.CC3M_TRAIN_TSV, data / miniworld.CC3M_TRAIN_IMAGES


def hard_negative_pairs(n: int, seed: int) -> list[tuple[object, str]]:
    """`n` groups of two (image, caption) pairs, consecutive in the list: a fresh miniworld scene and a
    `miniworld.variant` of it (objects moved or colours swapped), captioned with the same template, which
    names every position. In one batch they force the tower to encode where things are and which colour
    goes with which shape, which plain in-batch negatives rarely demand."""
    rng = random.Random(f"standins-hard:{seed}")
    out: list[tuple[object, str]] = []
    while len(out) < 2 * n:
        scene = miniworld.random_scene(rng)
        other = miniworld.variant(scene, rng)
        template = rng.choice((0, 1, 2))
        a, b = miniworld.caption(scene, rng, template), miniworld.caption(other, rng, template)
        if a != b:  # (three-object captions leave out sizes: a swap of two sizes only is invisible)
            out += [(miniworld.render(scene), a), (miniworld.render(other), b)]
    return out


def _lm_docs(data: Path) -> tuple[list[dict], list[dict]]:
    train_file, held_file = data / miniworld.LM_TRAIN, data / miniworld.LM_HELDOUT
    if train_file.is_file():
        train = miniworld.read_lm_docs(train_file)
    else:  # any CC3M-style data root: its training captions
        train = [miniworld.caption_doc(c) for _, c in read_pairs(data / miniworld.CC3M_TRAIN_TSV,
                                                                  data / miniworld.CC3M_TRAIN_IMAGES)]
    if held_file.is_file():
        held = miniworld.read_lm_docs(held_file)
    else:
        held = [miniworld.caption_doc(c) for _, c in read_pairs(data / miniworld.CC3M_VAL_TSV,
                                                                 data / miniworld.CC3M_VAL_IMAGES)]
    return train, held


def make_standins(data: str | Path, out: str | Path, *, seed: int = 0, preset: str = "small",
                  lm_steps: int | None = None, vision_steps: int | None = None, hard_negatives: int | None = None,
                  threads: int | None = 2, fromage: bool = True, progress: Callable[[str], None] | None = None) -> dict:
    """Pretrain both stand-ins on the data root `data` (written by `fromage-bench data synth`) into `out`;
    returns (and writes to OUT/standins.json) their quality numbers."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    data, out = Path(data), Path(out)
    lm_settings, vision_settings = PRESETS[preset]
    lm_settings = replace(lm_settings, **({"steps": lm_steps} if lm_steps is not None else {}))
    vision_settings = replace(vision_settings, **({"steps": vision_steps} if vision_steps is not None else {}),
                              **({"hard_negatives": hard_negatives} if hard_negatives is not None else {}))
    for required in (miniworld.CC3M_TRAIN_TSV, miniworld.CC3M_VAL_TSV):
        if not (data / required).is_file():
            from model.errors import FromageInputError

            raise FromageInputError(data / required, "missing", "write the data first: fromage-bench data synth --out DIR")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        out.mkdir(parents=True, exist_ok=True)
        train_docs, held_docs = _lm_docs(data)
        lm_report = pretrain_lm(train_docs, held_docs, out / "opt", lm_settings, seed, progress)

        from transformers import GPT2Tokenizer

        tokenizer = GPT2Tokenizer.from_pretrained(str(out / "opt"))
        train_pairs: list = read_pairs(*clip_pretraining_files(data))
        hard = hard_negative_pairs(vision_settings.hard_negatives, seed)
        held_pairs = read_pairs(data / miniworld.CC3M_VAL_TSV, data / miniworld.CC3M_VAL_IMAGES)
        vision_report = pretrain_clip(train_pairs, held_pairs, tokenizer, out / "clip", vision_settings, seed, progress,
                                      hard_pairs=hard)
    finally:
        torch.set_num_threads(previous_threads)
    report = {"data": str(data), "seed": seed, "preset": preset, "threads": threads, "lm": lm_report,
              "vision": vision_report}
    manifest = data / miniworld.MANIFEST
    if manifest.is_file():
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        report["data_manifest"] = {k: meta.get(k) for k in ("generator", "version", "seed", "scale", "counts")}
    if fromage:
        write_untrained_fromage(out, out, seed)
        report["fromage"] = {"model_dir": str(out), "trained": False}
    (out / STANDINS_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


# -- an untrained FROMAGe over the stand-ins ------------------------------------------------------------
def write_untrained_fromage(out_dir: str | Path, standins_dir: str | Path, seed: int = 0, *, n_visual_tokens: int = 1,
                            shared_emb_dim: int = 128, input_prompt: str | None = None) -> Path:
    """The original recipe's initial state over the stand-ins (`model.fresh.write_untrained_fromage`, the path
    `fromage-bench train --init fresh` takes): `load_fromage(out_dir)` then loads it."""
    from model.fresh import write_untrained_fromage as write_initial_state

    standins_dir = Path(standins_dir)
    extra = {"input_prompt": input_prompt} if input_prompt else {}
    return write_initial_state(out_dir, standins_dir / "opt", standins_dir / "clip", seed,
                               n_visual_tokens=n_visual_tokens, shared_emb_dim=shared_emb_dim, extra=extra)

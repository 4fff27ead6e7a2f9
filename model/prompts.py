"""Interleaved prompts (images and strings) -> LM input embeddings, labels and padded batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from PIL import Image

from .fromage import FromageModel
from .images import pixel_values

IGNORE_INDEX = -100  # label of positions that are not scored (images, padding)


def question_turn(question: str) -> str:
    """A dialogue question as the original's demo and example notebook send it: `Q: ...` then `\nA:` for the
    model to answer after."""
    return "Q: " + question + "\nA:"


def answer_turn(outputs: Sequence) -> str:
    """A model answer (`generate_for_images_and_texts` outputs) as the original's demo and notebook append it to
    the dialogue: its strings, with their `[RET]`s, joined by spaces, then a newline; retrieved images left out."""
    return " ".join(o for o in outputs if isinstance(o, str)) + "\n"

# An image; a string; an integer tensor of token ids, used as they are (no BOS added or removed: for
# protocols that tokenise each piece on its own); or a float tensor, an image already mapped to LM inputs
# ((n_visual_tokens, D) captioning embedding).
PromptItem = Union[Image.Image, str, torch.Tensor]
Prompt = Sequence[PromptItem]


@dataclass
class EmbeddedPrompt:
    embeds: torch.Tensor    # (T, D) LM input embeddings
    labels: torch.Tensor    # (T,) token ids at text positions, IGNORE_INDEX at image positions
    text_ids: torch.Tensor  # (n_text,) the text tokens alone, in order

    def __len__(self) -> int:
        return self.embeds.shape[0]


@dataclass
class PaddedBatch:
    embeds: torch.Tensor          # (B, T, D)
    attention_mask: torch.Tensor  # (B, T) 1 for real positions
    labels: torch.Tensor          # (B, T) IGNORE_INDEX at images and padding
    position_ids: torch.Tensor    # (B, T) 0-based positions of real tokens, 0 at padding
    lengths: torch.Tensor         # (B,) real lengths


def tokenize(model: FromageModel, text: str, keep_bos: bool) -> torch.Tensor:
    """Token ids of `text` with special tokens; the leading BOS is dropped unless `keep_bos`."""
    ids = model.tokenizer(text, add_special_tokens=True).input_ids
    if not keep_bos and ids and ids[0] == model.tokenizer.bos_token_id:
        ids = ids[1:]
    return torch.tensor(ids, dtype=torch.long, device=model.device)


def caption_embeddings(model: FromageModel, images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, n_visual_tokens, D) LM input embeddings of PIL images, one vision forward for all of them."""
    pixels = pixel_values(model.feature_extractor, images)
    return model.get_visual_embs(pixels, mode="captioning")


def embed_prompt(model: FromageModel, prompt: Prompt) -> EmbeddedPrompt:
    """The original's interleaving: each image -> its visual tokens; each string tokenised with special
    tokens, the BOS kept only on the first string."""
    images = [p for p in prompt if isinstance(p, Image.Image)]
    encoded = iter(caption_embeddings(model, images)) if images else iter(())
    lm_dtype = model.lm_dtype
    embeds, labels, text_ids = [], [], []
    first_text = True
    for item in prompt:
        if isinstance(item, str) or (isinstance(item, torch.Tensor) and not item.is_floating_point()):
            ids = tokenize(model, item, keep_bos=first_text) if isinstance(item, str) else item.to(model.device).flatten()
            first_text = False
            embeds.append(model.embed_tokens(ids))
            labels.append(ids)
            text_ids.append(ids)
        elif isinstance(item, (Image.Image, torch.Tensor)):  # a float tensor here
            visual = next(encoded) if isinstance(item, Image.Image) else item.reshape(-1, item.shape[-1])
            embeds.append(visual.to(device=model.device, dtype=lm_dtype))
            labels.append(torch.full((visual.shape[0],), IGNORE_INDEX, dtype=torch.long, device=model.device))
        else:
            raise TypeError(f"prompt items must be PIL images, strings or embedding tensors, got {type(item).__name__}")
    if not embeds:
        raise ValueError("empty prompt")
    empty = torch.zeros(0, dtype=torch.long, device=model.device)
    return EmbeddedPrompt(torch.cat(embeds).to(lm_dtype), torch.cat(labels), torch.cat(text_ids) if text_ids else empty)


def pad_batch(prompts: Sequence[EmbeddedPrompt], side: str = "right") -> PaddedBatch:
    """Stack prompts of different lengths. Right padding suits one forward pass (causal attention never
    looks ahead); left padding suits generation (every row's next token is at the same column)."""
    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max())
    ref = prompts[0].embeds
    batch = len(prompts)
    embeds = ref.new_zeros(batch, width, ref.shape[-1])
    mask = torch.zeros(batch, width, dtype=torch.long, device=ref.device)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long, device=ref.device)
    for row, p in enumerate(prompts):
        span = slice(0, len(p)) if side == "right" else slice(width - len(p), width)
        embeds[row, span] = p.embeds
        mask[row, span] = 1
        labels[row, span] = p.labels
    return PaddedBatch(embeds, mask, labels, positions_from_mask(mask), lengths.to(ref.device))


def positions_from_mask(mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """0-based position of each real token (counting only real tokens), 0 on padding."""
    positions = mask.cumsum(dim=1) - 1 + offset
    return positions.clamp(min=0) * mask

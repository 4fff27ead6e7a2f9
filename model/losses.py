"""FROMAGe's training losses, written as each process's *share* of the loss of the global batch.

Every function returns a sum over this process's rows divided by a count over the global batch, so
that the shares of all processes add up to the loss of the whole batch and their gradients add up to
its gradient. The training loop therefore SUMS gradients across processes (one all-reduce per step);
with one process a share is simply the loss.

- `token_loss_share`: next-token cross-entropy over labelled positions (labels -100 are not scored),
  with the Hugging Face shift (the logits at t predict the label at t + 1), averaged over the labelled
  tokens of the global batch.
- `contrastive_loss_share`: the symmetric InfoNCE loss between text and image embeddings,
  (CE text->image + CE image->text) / 2 with the matching pairs on the diagonal, over the global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a (detached) tensor over all processes."""
    if distributed():
        value = value.clone()
        dist.all_reduce(value)
    return value


def token_loss_share(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies of this process's labelled tokens / labelled tokens of the global batch."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    count = global_sum((targets != IGNORE_INDEX).sum())
    return total / count.clamp(min=1)


class _AllGather(torch.autograd.Function):
    """Concatenate every process's tensor (in rank order); backward sends each process the gradient that
    ALL processes computed for its rows (an all-reduce of the gradient of the gathered tensor)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), local.shape[0]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """(world x N, ...) features of the global batch; this process's slice is `local` and carries its gradient,
    including the gradient it receives as a column of the other processes' rows."""
    return _AllGather.apply(local) if distributed() else local


def contrastive_logits(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """exp(logit_scale) * text @ image.T for L2-normalised (N, D) text and (M, D) image embeddings."""
    return logit_scale.exp() * text @ image.T


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """The single-process loss, for reference: (CE(text->image) + CE(image->text)) / 2, targets on the diagonal."""
    logits = contrastive_logits(text, image, logit_scale)
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def contrastive_loss_share(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """This process's rows of the global (N x N) text->image and image->text logits, summed and divided by N.

    text, image: (n, D) L2-normalised embeddings of this process's n pairs; the columns are the embeddings
    of all N = n x world pairs. The gradient reaches this process's embeddings both through its own rows
    and through its columns in the other processes' rows (see `gather_with_grad`), so summing the
    processes' gradients gives the gradient of the global loss exactly.
    """
    rank = dist.get_rank() if distributed() else 0
    all_text, all_image = gather_with_grad(text), gather_with_grad(image)
    n, total = text.shape[0], all_text.shape[0]
    targets = torch.arange(rank * n, rank * n + n, device=text.device)
    text_to_image = F.cross_entropy(contrastive_logits(text, all_image, logit_scale), targets, reduction="sum")
    image_to_text = F.cross_entropy(contrastive_logits(image, all_text, logit_scale), targets, reduction="sum")
    return (text_to_image + image_to_text) / (2 * total)

"""Where the model runs: device and numeric precision (fp32, bf16, fp16, int8)."""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from .errors import FromageInputError

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
INT8_OUTLIER_THRESHOLD = 6.0  # LLM.int8()'s default: activations above it stay in fp16
# Random-init LMs: "planted" gives them outlier feature dimensions as trained OPT has (see plant_outlier_features)
INT8_OUTLIERS = ("planted", "none")
# LLM.int8() (Dettmers et al. 2022) describes trained OPT's outliers as systematic: a handful of hidden dimensions
# (about six at 6.7B), in every layer, up to 20x the others. Layer-norm outputs are ~1 elsewhere, so 20 is within
# that and far above the 6.0 threshold for every token.
PLANTED_OUTLIER_DIMS = 6
PLANTED_OUTLIER_MAGNITUDE = 20.0

# On CPU the non-quantised parts stay fp32 by design; bitsandbytes would warn on every int8 matmul about
# casting its fp32 input to fp16.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Placement:
    """A device plus the precision the frozen and trained parts use there."""

    device: torch.device
    precision: str

    @property
    def dtype(self) -> torch.dtype:
        """dtype of every tensor that is not an int8 weight."""
        if self.precision == "int8":
            # bitsandbytes computes int8 matmuls in fp16; on CPU fp16 elementwise kernels are slow,
            # so the rest of the model (and the trained maps) stays fp32 there.
            return torch.float16 if self.device.type == "cuda" else torch.float32
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    @property
    def quantize_lm(self) -> bool:
        return self.precision == "int8"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_placement(device: str | torch.device | None = None, precision: str | None = None) -> Placement:
    """Check that `precision` can run on `device`; defaults: CUDA if present, bf16 on CUDA, fp32 on CPU."""
    try:
        dev = torch.device(device) if device is not None else default_device()
    except (RuntimeError, TypeError) as err:
        raise FromageInputError(f"device={device!r}", f"not a torch device: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FromageInputError(f"device={device!r}", "CUDA was requested but torch sees no CUDA device",
                                "use --device cpu, or install a CUDA build of torch on a GPU machine")
    if dev.type not in ("cpu", "cuda"):
        raise FromageInputError(f"device={device!r}", "only cpu and cuda devices are supported")
    if precision is None:
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise FromageInputError(f"precision={precision!r}", "unknown precision", f"choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FromageInputError(f"precision={precision!r}", f"{torch.cuda.get_device_name(dev)} has no bf16 support", "use fp16")
    if precision == "int8" and importlib.util.find_spec("bitsandbytes") is None:
        raise FromageInputError(f"precision={precision!r}", "int8 needs the bitsandbytes package, which is not installed",
                                "pip install bitsandbytes")
    return Placement(dev, precision)


def quantize_linear_layers_int8(module: torch.nn.Module, device: torch.device,
                                threshold: float = INT8_OUTLIER_THRESHOLD, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Swap every `nn.Linear` under `module` (except names in `skip`) for a bitsandbytes LLM.int8() layer.

    Used for randomly initialised models, which cannot go through `from_pretrained(quantization_config=...)`;
    loaded weights take that path instead. Returns the number of layers replaced.
    """
    import bitsandbytes as bnb

    replaced = 0
    for name, child in list(module.named_children()):
        if name in skip:
            continue
        if isinstance(child, torch.nn.Linear):
            layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False, threshold=threshold)
            # Int8Params quantize when moved off the CPU (or within it), so the fp16 copy is staged there.
            staged = child.weight.data.to("cpu", torch.float16)
            layer.weight = bnb.nn.Int8Params(staged, requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            layer.train(child.training)
            setattr(module, name, layer.to(device))
            replaced += 1
        else:
            replaced += quantize_linear_layers_int8(child, device, threshold, skip=())
    return replaced


def plant_outlier_features(lm, n_dims: int = PLANTED_OUTLIER_DIMS,
                           magnitude: float = PLANTED_OUTLIER_MAGNITUDE) -> list[int]:
    """Give a randomly initialised OPT the outlier feature dimensions of a trained one; returns them, sorted.

    Random weights keep every activation far below LLM.int8()'s threshold, so its mixed-precision path (the
    columns of a linear layer's input holding any |x| >= 6 multiplied in fp16 beside the int8 product) never
    runs, though trained OPT takes it in every layer. Trained OPT's outliers sit in a few hidden dimensions of
    the layer-norm outputs that feed the attention's q/k/v projections and the MLP's fc1, with the same sign
    in every token: so each decoder layer's two layer norms get a bias of +-`magnitude` in the same `n_dims`
    dimensions (weights unchanged, so the values still vary by token around it). out_proj and fc2 take mixes
    (attention averages, ReLU outputs), as in trained OPT, and are left alone; so is the final layer norm
    before lm_head, which is not quantized. The dimensions and signs are fixed (their own generator), so the
    rest of the random init does not move.
    """
    hidden = lm.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    dims = torch.randperm(hidden, generator=generator)[:min(n_dims, hidden)].sort().values
    signs = torch.randint(0, 2, (len(dims),), generator=generator) * 2 - 1
    with torch.no_grad():
        for layer in lm.model.decoder.layers:
            for norm in (layer.self_attn_layer_norm, layer.final_layer_norm):
                norm.bias[dims.to(norm.bias.device)] = (signs * magnitude).to(norm.bias.device, norm.bias.dtype)
    return dims.tolist()


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameter and buffer storage actually held (int8 weights count 1 byte per element, plus scales),
    each storage once, before and after the first forward alike."""
    seen: set[int] = set()
    total = 0
    for tensor in _held_tensors(module):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _held_tensors(module: torch.nn.Module):
    """Parameters and buffers, with the int8 weights' quantized data (CB) and row scales (SCB) wherever
    bitsandbytes keeps them: on the weight after quantization, in the layer's `state` after its first forward
    (`Linear8bitLt.init_8bit_state` moves them there and leaves None on the weight)."""
    for sub in module.modules():
        holders = [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]
        for holder in holders + [getattr(sub, "state", None)]:
            for tensor in (holder, getattr(holder, "SCB", None), getattr(holder, "CB", None)):
                if isinstance(tensor, torch.Tensor):
                    yield tensor

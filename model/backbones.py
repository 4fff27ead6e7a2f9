"""The frozen parts: the OPT language model, its tokenizer, the CLIP vision tower and its image processor.

Each may come from a local directory or from the local Hugging Face cache (never the network), or be
built at paper scale with random weights from the configurations shipped in `model/configs/`.
"""
from __future__ import annotations

import json
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AddedToken, CLIPVisionConfig, CLIPVisionModel, GPT2Tokenizer, OPTConfig, OPTForCausalLM

from .errors import FromageInputError
from .precision import INT8_OUTLIER_THRESHOLD, Placement, plant_outlier_features, quantize_linear_layers_int8

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
IMAGE_TOKEN = "<|image|>"
RET_TOKEN = "[RET]"


def resolve_backbone(name_or_path: str, model_dir: str | Path | None, what: str) -> Path:
    """A local directory for `name_or_path`: relative to `model_dir` first, then as given, then the HF cache."""
    candidates = []
    if model_dir is not None:
        candidates.append(Path(model_dir) / name_or_path)
    candidates.append(Path(name_or_path).expanduser())
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not a valid repo id, or not in the cache: same answer for the user
        raise FromageInputError(
            name_or_path, f"{what} not found as a directory nor in the local Hugging Face cache",
            "download it on a machine with network access (huggingface-cli download) or pass a local directory; "
            "nothing is fetched at run time") from None


def _custom_config_file(name_or_path: str) -> Path | None:
    """A user's own architecture for random init: a config.json, or a directory holding one."""
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".json":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    return None


def paper_config_name(name_or_path: str) -> str:
    """'facebook/opt-6.7b' -> 'opt-6.7b' if we ship its configuration, else an error listing the ones we do."""
    short = name_or_path.rstrip("/").split("/")[-1]
    if not (CONFIG_DIR / f"{short}.json").is_file():
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise FromageInputError(name_or_path, "no shipped configuration for a random-init model",
                                f"choose one of {', '.join(shipped)}")
    return short


def paper_config(name_or_path: str) -> dict:
    """Architecture hyperparameters for a random-init backbone: a shipped paper configuration by name
    ('facebook/opt-6.7b'), or a config.json path / directory."""
    custom = _custom_config_file(name_or_path)
    path = custom or CONFIG_DIR / f"{paper_config_name(name_or_path)}.json"
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FromageInputError(path, f"malformed JSON: {err}") from None


def load_tokenizer(path: Path | None, added_tokens: tuple[str, ...] = (RET_TOKEN,)) -> GPT2Tokenizer:
    """OPT's GPT-2 BPE tokenizer with FROMAGe's additions: pad = eos, cls `<|image|>`, then `added_tokens` in
    order (FROMAGe: `[RET]`; GILL: `[IMG0]`..`[IMG7]`, `model.gill`)."""
    if path is None:
        tokenizer = _fallback_tokenizer()
    else:
        try:
            tokenizer = GPT2Tokenizer.from_pretrained(str(path))
        except (OSError, ValueError, TypeError) as err:
            raise FromageInputError(path, f"cannot read the tokenizer (vocab.json/merges.txt): {err}") from None
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.add_special_tokens({"cls_token": IMAGE_TOKEN})
    # The original (transformers 4.21, slow GPT2Tokenizer) stripped the whitespace on both sides of a plain added
    # token when it split the text: "drawing [RET]\nQ:" became "drawing", "[RET]", "Q:". Current tokenizers keep
    # a lone-space (and newline) token unless the token says it strips; so say it. Re-adding an existing [RET]
    # (a tokenizer saved with it) updates its flags in place and keeps its id. (GILL's transformers 4.30 stripped
    # the same way.)
    for token in added_tokens:
        tokenizer.add_tokens(AddedToken(token, lstrip=True, rstrip=True, normalized=False))
    return tokenizer


def _fallback_tokenizer() -> GPT2Tokenizer:
    """For random-init models whose real tokenizer is not on disk: a BPE tokenizer trained here, now."""
    from .tiny import save_trained_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        save_trained_tokenizer(tmp, vocab_size=2000)
        return GPT2Tokenizer.from_pretrained(tmp)


def load_language_model(path: Path | None, placement: Placement, random_init_from: str | None = None,
                        int8_outliers: str = "none") -> OPTForCausalLM:
    """OPT, frozen, in the placement's precision; int8 quantizes every decoder linear layer (not lm_head).
    A random init with `int8_outliers="planted"` gets outlier feature dimensions (`plant_outlier_features`),
    listed in `lm.planted_outlier_dims`, before any quantization."""
    if random_init_from is not None:
        config = OPTConfig(**paper_config(random_init_from))
        lm = _random_model(OPTForCausalLM, config, placement.device, placement.dtype)
        lm.planted_outlier_dims = plant_outlier_features(lm) if int8_outliers == "planted" else []
        if placement.quantize_lm:
            quantize_linear_layers_int8(lm.model, placement.device)
    else:
        _require_file(path, "config.json", "language model")
        kwargs: dict = {"dtype": placement.dtype}
        if placement.quantize_lm:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_OUTLIER_THRESHOLD)
            kwargs["device_map"] = {"": placement.device}
        try:
            lm = OPTForCausalLM.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError) as err:
            raise FromageInputError(path, f"cannot load the OPT language model: {err}") from None
        if not placement.quantize_lm:
            lm = lm.to(placement.device)
    lm.eval().requires_grad_(False)
    return lm


@contextmanager
def _transformers_log_level(level: int):
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity(level)
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def load_vision_model(path: Path | None, placement: Placement, random_init_from: str | None = None) -> CLIPVisionModel:
    if random_init_from is not None:
        config = CLIPVisionConfig(**paper_config(random_init_from))
        vision = _random_model(CLIPVisionModel, config, placement.device, placement.dtype)
    else:
        _require_file(path, "config.json", "vision encoder")
        try:
            # A whole CLIP checkpoint (openai/clip-vit-large-patch14, the stand-in) also holds the text tower, which
            # the vision model does not use: transformers' report of those keys is noise. A missing vision weight
            # is not: it is an error here, not a warning.
            with _transformers_log_level(logging.ERROR):
                vision, info = CLIPVisionModel.from_pretrained(str(path), dtype=placement.dtype,
                                                               output_loading_info=True)
        except (OSError, ValueError) as err:
            raise FromageInputError(path, f"cannot load the CLIP vision model: {err}") from None
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise FromageInputError(path, f"not a CLIP vision checkpoint: {len(missing)} vision weights missing "
                                          f"({', '.join(missing[:3])}, ...)")
        vision = vision.to(placement.device)
    vision.eval().requires_grad_(False)
    return vision


def load_image_processor(path: Path | None):
    """CLIP's processor (resize, centre crop, normalise), PIL backend so that results match across machines."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers releases before the split into backends
        from transformers import CLIPImageProcessor as Processor
    if path is None or not (Path(path) / "preprocessor_config.json").is_file():
        if path is not None:
            log.warning("%s has no preprocessor_config.json: using OpenAI CLIP's default preprocessing", path)
        return Processor()
    return Processor.from_pretrained(str(path))


def _random_model(cls, config, device: torch.device, dtype: torch.dtype):
    """Build straight on the target device in the target dtype (a 6.7B model does not fit CPU RAM in fp32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def _require_file(directory: Path | None, name: str, what: str) -> None:
    if directory is None or not (Path(directory) / name).is_file():
        raise FromageInputError(Path(directory or ".") / name, f"missing: not a {what} directory")

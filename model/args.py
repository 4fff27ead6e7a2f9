"""`model_args.json`: the hyperparameters a released FROMAGe checkpoint was trained with."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FromageInputError, read_json

MODEL_ARGS_FILE = "model_args.json"


class ArgsFile:
    """What the `model_args.json` dataclasses (FROMAGe's `ModelArgs`, GILL's `model.gill.GillArgs`) share: unknown
    keys kept in `extra`, validation as a list of (ok, problem) checks, the backbone checks both formats need."""

    extra: dict[str, Any]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = MODEL_ARGS_FILE):
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        args = cls(**{k: v for k, v in raw.items() if k in known}, extra={k: v for k, v in raw.items() if k not in known})
        for ok, problem in args.checks():
            if not ok:
                raise FromageInputError(source, problem)
        return args

    def checks(self) -> list[tuple[Any, str]]:
        raise NotImplementedError

    def backbone_checks(self) -> list[tuple[Any, str]]:
        layers = self.text_emb_layers
        return [
            (isinstance(self.opt_version, str) and self.opt_version, "opt_version must be a non-empty string"),
            (isinstance(self.visual_encoder, str) and self.visual_encoder, "visual_encoder must be a non-empty string"),
            (isinstance(layers, list) and layers and all(isinstance(i, int) for i in layers),
             "text_emb_layers must be a non-empty list of integers"),
            (len(set(layers or [])) == len(layers or []), "text_emb_layers has duplicates"),
        ]

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out.update(self.extra)
        return out


def read_args_file(cls: type[ArgsFile], model_dir: str | Path, hint: str) -> ArgsFile:
    """`cls` read from `model_dir/model_args.json` (one error line naming the file when it is not a JSON object)."""
    path = Path(model_dir) / MODEL_ARGS_FILE
    raw = read_json(path, hint=hint)
    if not isinstance(raw, dict):
        raise FromageInputError(path, "expected a JSON object of model arguments")
    return cls.from_dict(raw, source=str(path))


@dataclass
class ModelArgs(ArgsFile):
    """The keys of `model_args.json` that inference needs; defaults are the released model's.

    Unknown keys (the release has training-only ones such as `task` or `input_prompt`, and the
    4-visual-token file has `use_image_embed_norm`) are kept in `extra` and otherwise ignored.
    """

    opt_version: str = "facebook/opt-6.7b"
    visual_encoder: str = "openai/clip-vit-large-patch14"
    n_visual_tokens: int = 1
    shared_emb_dim: int = 256
    text_emb_layers: list[int] = field(default_factory=lambda: [-1])
    image_embed_dropout_prob: float = 0.0
    text_embed_dropout_prob: float = 0.0
    freeze_lm: bool = True
    freeze_vm: bool = True
    retrieval_token_idx: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def checks(self) -> list[tuple[Any, str]]:
        return [
            *self.backbone_checks(),
            (isinstance(self.n_visual_tokens, int) and self.n_visual_tokens >= 1, "n_visual_tokens must be an integer >= 1"),
            (isinstance(self.shared_emb_dim, int) and self.shared_emb_dim >= 1, "shared_emb_dim must be a positive integer"),
        ]


def read_model_args(model_dir: str | Path) -> ModelArgs:
    return read_args_file(ModelArgs, model_dir,
                          hint="a FROMAGe model directory holds model_args.json and pretrained_ckpt.pth.tar")

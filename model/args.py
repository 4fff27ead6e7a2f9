"""`model_args.json`: the hyperparameters a released FROMAGe checkpoint was trained with."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FromageInputError, read_json

MODEL_ARGS_FILE = "model_args.json"


@dataclass
class ModelArgs:
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

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = MODEL_ARGS_FILE) -> "ModelArgs":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in raw.items() if k in known}
        args = cls(**values, extra={k: v for k, v in raw.items() if k not in known})
        args._validate(source)
        return args

    def _validate(self, source: str) -> None:
        checks = [
            (isinstance(self.opt_version, str) and self.opt_version, "opt_version must be a non-empty string"),
            (isinstance(self.visual_encoder, str) and self.visual_encoder, "visual_encoder must be a non-empty string"),
            (isinstance(self.n_visual_tokens, int) and self.n_visual_tokens >= 1, "n_visual_tokens must be an integer >= 1"),
            (isinstance(self.shared_emb_dim, int) and self.shared_emb_dim >= 1, "shared_emb_dim must be a positive integer"),
            (isinstance(self.text_emb_layers, list) and self.text_emb_layers
             and all(isinstance(i, int) for i in self.text_emb_layers), "text_emb_layers must be a non-empty list of integers"),
            (len(set(self.text_emb_layers or [])) == len(self.text_emb_layers or []), "text_emb_layers has duplicates"),
        ]
        for ok, problem in checks:
            if not ok:
                raise FromageInputError(source, problem)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out.update(self.extra)
        return out


def read_model_args(model_dir: str | Path) -> ModelArgs:
    path = Path(model_dir) / MODEL_ARGS_FILE
    raw = read_json(path, hint="a FROMAGe model directory holds model_args.json and pretrained_ckpt.pth.tar")
    if not isinstance(raw, dict):
        raise FromageInputError(path, "expected a JSON object of model arguments")
    return ModelArgs.from_dict(raw, source=str(path))

"""The FROMAGe stack: loading released checkpoints, inference (original and batched APIs), precisions."""
from .args import ModelArgs, read_model_args
from .errors import FromageInputError
from .fromage import FromageModel
from .generation import GenerationOutput
from .inference import Fromage, truncate_caption
from .loading import load_fromage
from .precision import PRECISIONS, resolve_placement
from .retrieval_set import RetrievalSet
from .scoring import ContinuationScores
from .tiny import make_tiny

__all__ = ["ContinuationScores", "Fromage", "FromageInputError", "FromageModel", "GenerationOutput", "ModelArgs",
           "PRECISIONS", "RetrievalSet", "load_fromage", "make_tiny", "read_model_args", "resolve_placement",
           "truncate_caption"]

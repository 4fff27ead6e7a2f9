"""Images of a dataset: the image directory's path rule and the content hashes of the feature cache live in the
model layer (`model.datasets`), which training reads too; they are re-exported here for the tasks.
(Decoding that reports, not raises, per-example faults is `model.images.try_load`.)"""
from model.datasets import ImageDir, content_hash

__all__ = ["ImageDir", "content_hash"]

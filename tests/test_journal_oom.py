"""Out-of-memory handling in per-batch work: the batch is halved until it fits, results unchanged."""
import logging

import pytest
import torch

from tasks.journal import compute_halving_on_oom


def test_oom_halves_the_batch_and_keeps_results(caplog):
    calls = []

    def compute(batch):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [x * x for x in batch]

    with caplog.at_level(logging.WARNING):
        assert compute_halving_on_oom(compute, list(range(7)), "step") == [x * x for x in range(7)]
    assert calls == [7, 3, 1, 2, 4, 2, 2]
    assert "retrying as 3 + 4" in caplog.text


def test_oom_on_a_single_example_is_raised():
    def compute(batch):
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(torch.OutOfMemoryError):
        compute_halving_on_oom(compute, [1], "step")

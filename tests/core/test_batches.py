"""Tests for llmctl.core.batches: a step's rows depend on (seed, step) only, not on how the step is
cut into micro-steps and ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llmctl.core.batches import Source, WindowSampler
from llmctl.core.tokens import IndexedDataset, IndexedWriter, token_dtype


def dataset(tmp_path: Path, name: str, offset: int) -> IndexedDataset:
    w = IndexedWriter(tmp_path / name, token_dtype(50_000))
    for d in range(20):
        w.add(np.arange(200, dtype=np.int64) + offset + 1000 * d)
    w.close()
    return IndexedDataset(tmp_path / name)


@pytest.fixture
def sampler(tmp_path: Path) -> WindowSampler:
    sources = [
        Source("a", dataset(tmp_path, "a", 0), 0.7),
        Source("b", dataset(tmp_path, "b", 30_000), 0.3),
    ]
    return WindowSampler(sources, seq_len=16, seed=3)


def step_rows(
    s: WindowSampler, step: int, n_rows: int, world: int, rows_per_step: int
) -> torch.Tensor:
    """Every row of a step, in global order, as the ranks of a run would draw them."""
    micro_steps = rows_per_step // (n_rows * world)
    out = []
    for m in range(micro_steps):
        parts = [s.rows(step, m, n_rows, r, world)[0] for r in range(world)]
        # rank r holds global rows r, r + world, ... of the micro-step: interleave them back
        out.append(torch.stack(parts, dim=1).reshape(n_rows * world, -1))
    return torch.cat(out)


@pytest.mark.parametrize(("n_rows", "world"), [(8, 1), (4, 2), (2, 1), (1, 4), (2, 2)])
def test_a_steps_rows_do_not_depend_on_the_split(
    sampler: WindowSampler, n_rows: int, world: int
) -> None:
    ref = step_rows(sampler, 5, 8, 1, 16)
    assert torch.equal(step_rows(sampler, 5, n_rows, world, 16), ref)


def test_steps_differ_and_targets_are_inputs_shifted(sampler: WindowSampler) -> None:
    x, y = sampler.rows(0, 0, 8)
    assert not torch.equal(x, sampler.rows(1, 0, 8)[0])
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, sampler.rows(0, 0, 8)[0])  # a pure function


def test_the_mixture_follows_its_weights(sampler: WindowSampler) -> None:
    x = torch.cat([sampler.rows(s, 0, 64)[0] for s in range(20)])
    from_b = float((x[:, 0] >= 30_000).float().mean())
    assert 0.25 < from_b < 0.35

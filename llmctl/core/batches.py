"""Batches of contiguous token windows from memory-mapped token files, as a pure function of
(seed, step).

Documents are packed back to back (each already `BOS ... EOS`), and a training row is a random
window of `seq_len + 1` tokens anywhere in that stream: inputs are its first `seq_len` tokens,
targets the last. Several token datasets can be mixed: each row first draws its source with the
mixture weights. The rows of step s are one sequence drawn from (seed, s): micro-step m of a run
with R rows per micro-step takes rows m x R .. (m + 1) x R - 1 of it, and rank r of W every W-th of
those. So a step's batch is the same however it is cut into micro-steps and ranks (`--micro-batch
auto` and resuming on another number of ranks change the summation order, not the data), resuming
at step s is exact, and ranks take their rows with no coordination. All windows of a micro-batch are
read in one numpy gather from the memory map (several times faster than a Python loop of slices).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmctl.core.tokens import IndexedDataset


@dataclass
class Source:
    """One tokenized dataset in a mixture."""

    name: str
    data: IndexedDataset
    weight: float


class WindowSampler:
    """Random `seq_len + 1` windows from a weighted mixture of token datasets.

    Args:
        sources: Datasets and their (relative) weights.
        seq_len: Model input length.
        seed: Run seed.
    """

    def __init__(self, sources: list[Source], seq_len: int, seed: int) -> None:
        self.sources = sources
        self.seq_len = seq_len
        self.seed = seed
        w = np.array([s.weight for s in sources], dtype=np.float64)
        self.probs = w / w.sum()
        self._cum = np.cumsum(self.probs)
        self._arange = np.arange(seq_len + 1, dtype=np.int64)

    def rows(
        self, step: int, micro: int, n_rows: int, rank: int = 0, world: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (each (rows, seq_len) int64) for this rank's share of a micro-batch.

        The global micro-batch is rows `micro x n_rows x world` onwards of step `step`'s sequence
        (`n_rows x world` of them); rank r takes every world-th, starting at r.
        """
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world}")
        total = n_rows * world
        lo, hi = micro * total, (micro + 1) * total
        # Two streams, each a prefix of the same draws for any (micro, n_rows, world): numpy's
        # uniform doubles come one after another, so random(hi)[lo:] is independent of the split.
        pick = np.random.default_rng([self.seed, step, 0]).random(hi)[lo:][rank::world]
        u = np.random.default_rng([self.seed, step, 1]).random(hi)[lo:][rank::world]
        which = np.minimum(np.searchsorted(self._cum, pick, side="right"), len(self.sources) - 1)
        out = np.empty((n_rows, self.seq_len + 1), dtype=np.int64)
        for k, src in enumerate(self.sources):
            sel = np.nonzero(which == k)[0]
            if sel.size == 0:
                continue
            span = src.data.n_tokens - self.seq_len - 1
            starts = (u[sel] * (span + 1)).astype(np.int64)
            out[sel] = src.data.tokens[starts[:, None] + self._arange]
        t = torch.from_numpy(out)
        return t[:, :-1], t[:, 1:]


def val_windows(data: IndexedDataset, seq_len: int, max_rows: int) -> torch.Tensor:
    """Fixed, non-overlapping `seq_len + 1` windows from the start of a validation split
    (at most `max_rows`), so every evaluation scores the same tokens."""
    n = min(max_rows, (data.n_tokens - 1) // seq_len)
    if n <= 0:
        return torch.empty(0, seq_len + 1, dtype=torch.long)
    starts = np.arange(n, dtype=np.int64) * seq_len
    idx = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)
    return torch.from_numpy(data.tokens[idx].astype(np.int64))

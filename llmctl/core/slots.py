"""Continuous batching: sequences join and leave one shared KV cache between decode steps.

`sampling.stream` decodes a fixed batch: every row starts together and the batch lasts until its
last row ends. `SlotBatch` lets a new sequence start while others are mid-answer (what `llmctl
serve` does with requests that arrive during a batch), so nobody waits for a running batch to end.

Layout. The cache is one timeline of slots shared by up to `rows` sequences, (rows, kv_heads,
capacity, head_dim) per layer; `pos` slots are in use. Live sequences are rows 0 .. n-1 (a
sequence that leaves is replaced by the last one, so the live rows stay a prefix and a step runs
on views of them, never on copies). A sequence owns the slots from its `start` to `pos`: its
prompt, then one slot per step; `mask` marks them, so each row attends to its own tokens only.
Keys are cached after RoPE at the sequence's own positions (0, 1, ... from its first token), so
where its slots lie on the timeline does not change the arithmetic.

Joining: a prompt (or several arriving together, in one left-padded forward as `sampling.stream`
prefills a ragged batch) is prefilled in its own small cache and its keys/values copied into the
`n` slots just before `pos`; if fewer than `n` slots exist yet, the timeline is shifted right to
make room. The first token is sampled from the prefill's last logits, as `stream` does.

Space: the cache starts at one context of slots (or less) and grows, by doubling up to twice the
context, only when the timeline fills while live sequences still own its first half; otherwise a
full timeline is shifted left past the slots no live sequence owns. Each live sequence spans less
than a context, so a shift frees at least half the slots, and such a copy happens at most once
per half-capacity of steps.

A step where every live sequence started at slot 0 and has all its slots (one sequence alone, or
sequences that joined together with equal prompts) runs without a mask, through the model's
one-token fast path; otherwise with the mask and per-row positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmctl.core.config import require
from llmctl.core.model import KVCache, Transformer
from llmctl.core.sampling import SamplingConfig, pick, ragged_prefill_inputs


@dataclass
class _View:
    """The live rows of the shared cache, in the shape the model's forward reads (`KVCache`)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: int
    mask: torch.Tensor | None = None


class SlotBatch:
    """Up to `rows` sequences decoding together; see the module docstring.

    Use: `add(prompt, sampling) -> (row, first token)`, then `step() -> {row: token}` for every
    live row, and `remove(row)` once a sequence is done (which may renumber the last row: `add`
    and `remove` return/accept the handles `step` reports, and `remove` returns the old -> new
    row move, if any).
    """

    def __init__(
        self,
        model: Transformer,
        rows: int,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        require(rows >= 1, "a slot batch needs at least one row")
        self.model, self.rows, self.generator = model, rows, generator
        self.context = model.cfg.max_seq_len
        self.max_capacity = 2 * self.context
        w = model.embed.weight
        self.device = w.device
        self.capacity = min(self.context, 256)
        self.cache = KVCache(model.cfg, rows, self.capacity, w.device, w.dtype)
        self.mask = torch.zeros(rows, self.capacity, dtype=torch.bool, device=w.device)
        self.pos = 0
        self.n = 0  # live rows: 0 .. n-1
        self.start = [0] * rows  # first slot of each row's sequence
        self.length = [0] * rows  # tokens of each row's sequence so far (its next RoPE position)
        self.last = [0] * rows  # each row's latest token: the next step's input
        self.sampling: list[SamplingConfig | None] = [None] * rows

    @property
    def free(self) -> int:
        """Rows a new sequence can take."""
        return self.rows - self.n

    def room(self, row: int) -> int:
        """Steps the row may still take: prompt plus sampled tokens stay within the context (as
        in `sampling.stream`), and each step feeds the latest token and samples one more."""
        return self.context - 1 - self.length[row]

    def add(self, prompt: Sequence[int], sampling: SamplingConfig) -> tuple[int, int]:
        """Prefill `prompt` into a free row; returns (row, its first sampled token)."""
        return self.add_many([prompt], [sampling])[0]

    @torch.inference_mode()
    def add_many(
        self, prompts: Sequence[Sequence[int]], samplings: Sequence[SamplingConfig]
    ) -> list[tuple[int, int]]:
        """Prefill several prompts in one forward (left-padded, as `sampling.stream` prefills a
        ragged batch) into free rows; returns (row, first sampled token) for each, in order."""
        k, lens = len(prompts), [len(p) for p in prompts]
        require(0 < k <= self.free, f"{k} prompts for {self.free} free rows")
        require(len(samplings) == k, "one sampling setting per prompt")
        for n in lens:
            require(0 < n < self.context, f"a prompt needs 1 .. {self.context - 1} tokens, got {n}")
        longest = max(lens)
        rows = [[0] * (longest - len(p)) + list(p) for p in prompts]
        ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        tmp = self.model.new_cache(k, longest)
        if min(lens) == longest:
            h = self.model(ids, cache=tmp, hidden=True)
        else:
            lens_t = torch.tensor(lens, device=self.device)
            _, mask, positions = ragged_prefill_inputs(lens_t, longest)
            h = self.model(ids, cache=tmp, positions=positions, attn_mask=mask, hidden=True)
        toks = self._pick(self.model.logits(h[:, -1]), list(samplings))  # before any state change
        if self.pos >= self.capacity:
            self._make_room()
        if self.pos < longest:  # room before `pos` for the prompts' slots
            if longest > self.capacity:
                self._grow(min(self.max_capacity, max(longest, 2 * self.capacity)))
            self._shift(longest - self.pos)
        hi = self.pos
        for j, n in enumerate(lens):
            row, lo = self.n, hi - n
            for kc, vc, tk, tv in zip(self.cache.k, self.cache.v, tmp.k, tmp.v, strict=True):
                kc[row, :, lo:hi] = tk[j, :, longest - n :]
                vc[row, :, lo:hi] = tv[j, :, longest - n :]
            self.mask[row] = False
            self.mask[row, lo:hi] = True
            self.start[row], self.length[row], self.sampling[row] = lo, n, samplings[j]
            self.n += 1
        first = self.n - k
        self.last[first : self.n] = toks
        return [(first + j, t) for j, t in enumerate(toks)]

    @torch.inference_mode()
    def reset(self) -> None:
        """Drop every sequence (after a failed step: the cache may be half-written)."""
        self.n, self.pos = 0, 0
        self.mask.zero_()
        self.sampling = [None] * self.rows

    @torch.inference_mode()
    def remove(self, row: int) -> tuple[int, int] | None:
        """Free a row. The last live row moves into its place: returns (old, new) if one did."""
        require(0 <= row < self.n, f"row {row} is not live")
        last = self.n - 1
        self.n = last
        moved = None
        if row != last:
            lo = self.start[last]
            for kc, vc in zip(self.cache.k, self.cache.v, strict=True):
                kc[row, :, lo : self.pos] = kc[last, :, lo : self.pos]
                vc[row, :, lo : self.pos] = vc[last, :, lo : self.pos]
            self.mask[row] = self.mask[last]
            self.start[row], self.length[row] = self.start[last], self.length[last]
            self.last[row], self.sampling[row] = self.last[last], self.sampling[last]
            moved = (last, row)
        self.mask[last] = False
        self.sampling[last] = None
        if self.n == 0:
            self.pos = 0  # nothing live: the timeline starts over
        return moved

    @torch.inference_mode()
    def step(self) -> list[int]:
        """One token for every live row (rows 0 .. n-1, in order). A row must have room (see
        `room`): the caller ends a sequence that has filled the context."""
        n = self.n
        require(n > 0, "no live row to step")
        require(all(self.room(r) > 0 for r in range(n)), "a row's context is full")
        if self.pos >= self.capacity:
            self._make_room()
        p = self.pos
        uniform = all(self.start[r] == 0 and self.length[r] == p for r in range(n))
        view = _View([k[:n] for k in self.cache.k], [v[:n] for v in self.cache.v], p)
        ids = torch.tensor(self.last[:n], dtype=torch.long, device=self.device)[:, None]
        self.mask[:n, p] = True
        if uniform:
            h = self.model(ids, cache=view, hidden=True)  # type: ignore[arg-type]
        else:
            positions = torch.tensor(self.length[:n], dtype=torch.long, device=self.device)
            h = self.model(
                ids,
                cache=view,  # type: ignore[arg-type]
                positions=positions[:, None],
                attn_mask=self.mask[:n, None, None, : p + 1],
                hidden=True,
            )
        self.pos = p + 1
        for r in range(n):
            self.length[r] += 1
        toks = self._pick(self.model.logits(h[:, -1]), self.sampling[:n])
        self.last[:n] = toks
        return toks

    def _pick(self, logits: torch.Tensor, settings: Sequence[SamplingConfig | None]) -> list[int]:
        """Each row's token with its own settings: rows with the same temperature, top-k and
        top-p (all greedy rows alike) share one `pick` call, rows in order."""
        n = logits.shape[0]
        groups: dict[tuple, list[int]] = {}
        for r, s in enumerate(settings):
            assert s is not None
            key = ("greedy",) if s.temperature == 0 else (s.temperature, s.top_k, s.top_p)
            groups.setdefault(key, []).append(r)
        out = [0] * n
        for rows in groups.values():
            s = settings[rows[0]]
            assert s is not None
            sub = logits if len(rows) == n else logits[torch.tensor(rows, device=logits.device)]
            for r, t in zip(rows, pick(sub, s, self.generator).tolist(), strict=True):
                out[r] = t
        return out

    def _make_room(self) -> None:
        """The timeline is full: shift it left if that frees half of it, else grow the cache."""
        s = min((self.start[r] for r in range(self.n)), default=self.pos)
        if 2 * s >= self.capacity or self.capacity >= self.max_capacity:
            self._compact()
        else:
            self._grow(min(self.max_capacity, 2 * self.capacity))

    def _grow(self, capacity: int) -> None:
        """A larger cache with the same contents (allocated first: a failure changes nothing)."""
        cfg, w = self.model.cfg, self.model.embed.weight
        bigger = KVCache(cfg, self.rows, capacity, w.device, w.dtype)
        mask = torch.zeros(self.rows, capacity, dtype=torch.bool, device=w.device)
        p = self.pos
        for new, old in zip(bigger.k + bigger.v, self.cache.k + self.cache.v, strict=True):
            new[:, :, :p] = old[:, :, :p]
        mask[:, :p] = self.mask[:, :p]
        self.cache, self.mask, self.capacity = bigger, mask, capacity

    def _shift(self, d: int) -> None:
        """Move the timeline d slots right (empty slots at the front)."""
        p = self.pos
        require(p + d <= self.capacity, "the slot timeline is full")
        for kc, vc in zip(self.cache.k, self.cache.v, strict=True):
            kc[:, :, d : d + p] = kc[:, :, :p].clone()
            vc[:, :, d : d + p] = vc[:, :, :p].clone()
        self.mask[:, d : d + p] = self.mask[:, :p].clone()
        self.mask[:, :d] = False
        for r in range(self.n):
            self.start[r] += d
        self.pos = p + d

    def _compact(self) -> None:
        """Move the timeline left past the slots before every live row's first one."""
        p = self.pos
        s = min((self.start[r] for r in range(self.n)), default=p)
        require(s > 0, "the slot timeline is full")  # a live row spans < context < capacity
        for kc, vc in zip(self.cache.k, self.cache.v, strict=True):
            kc[:, :, : p - s] = kc[:, :, s:p].clone()
            vc[:, :, : p - s] = vc[:, :, s:p].clone()
        self.mask[:, : p - s] = self.mask[:, s:p].clone()
        self.mask[:, p - s :] = False
        for r in range(self.n):
            self.start[r] -= s
        self.pos = p - s

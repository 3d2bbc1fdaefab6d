"""Continuous batching (core/slots.py): sequences that join and leave a shared KV cache between
steps decode exactly as they would alone."""

from __future__ import annotations

import pytest
import torch

from llmctl.core.errors import ConfigError
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.sampling import SamplingConfig, generate
from llmctl.core.slots import SlotBatch

GREEDY = SamplingConfig(max_new_tokens=1000, temperature=0.0)


def _model(ctx: int = 24) -> Transformer:
    cfg = ModelConfig(
        vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=ctx
    )
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 256, (n,), generator=g).tolist() for n in lengths]


def _run(
    sb: SlotBatch,
    prompts: list[list[int]],
    budgets: list[int],
    sampling: list[SamplingConfig],
    join_every: int,
) -> tuple[list[list[int]], int]:
    """Feed prompts in order, a new one every `join_every` steps while a row is free; each row
    ends after its budget or when its context is full. Returns (tokens per prompt, compactions)."""
    outs: list[list[int]] = [[] for _ in prompts]
    owner: dict[int, int] = {}  # row -> prompt index
    queue, steps, compactions, high = list(range(len(prompts))), 0, 0, 0
    while queue or sb.n:
        while queue and sb.free and (sb.n == 0 or steps % join_every == 0):
            i = queue.pop(0)
            row, tok = sb.add(prompts[i], sampling[i])
            owner[row], outs[i] = i, [tok]
        before = sb.pos
        for r, t in enumerate(sb.step()):
            outs[owner[r]].append(t)
        compactions += sb.pos < before
        high = max(high, sb.pos)
        steps += 1
        r = 0
        while r < sb.n:
            i = owner[r]
            if sb.room(r) == 0 or len(outs[i]) >= budgets[i]:
                moved = sb.remove(r)
                if moved:
                    owner[moved[1]] = owner.pop(moved[0])
                else:
                    owner.pop(r)
                continue
            r += 1
    assert high <= sb.capacity
    return outs, compactions


def test_joining_and_leaving_rows_decode_as_they_would_alone() -> None:
    """Staggered joins into 3 rows, rows leaving at their budgets or a full context (which moves
    the last row into the freed one), the timeline shifted right for long prompts and compacted
    when full: every sequence's greedy tokens equal `generate` on its prompt alone."""
    model = _model()
    prompts = _prompts([5, 3, 9, 2, 7, 4, 11, 6, 1, 13])
    budgets = [30, 6, 30, 9, 30, 4, 30, 8, 30, 30]  # 30: until the context is full
    sb = SlotBatch(model, 3)
    outs, compactions = _run(sb, prompts, budgets, [GREEDY] * len(prompts), join_every=3)
    assert compactions > 0
    assert sb.capacity == 2 * model.cfg.max_seq_len  # it grew from one context
    for p, out, b in zip(prompts, outs, budgets, strict=True):
        alone = generate(model, [p], GREEDY)[0]
        assert len(out) == min(b, model.cfg.max_seq_len - len(p))
        assert out == alone[: len(out)]
    assert sb.n == 0
    assert sb.pos == 0


def test_one_sequence_alone_is_bit_identical_to_generate() -> None:
    """One row that started the timeline takes the model's one-token fast path, as `generate`."""
    model = _model(ctx=64)
    p = _prompts([7])[0]
    sb = SlotBatch(model, 4)
    row, tok = sb.add(p, GREEDY)
    out = [tok] + [sb.step()[row] for _ in range(20)]
    assert out == generate(model, [p], SamplingConfig(max_new_tokens=21, temperature=0.0))[0]


def test_rows_sample_with_their_own_settings() -> None:
    """Greedy and sampled rows share steps: the greedy ones stay greedy (top_k=1 is greedy too),
    and a seeded run repeats itself."""
    model = _model(ctx=48)
    prompts = _prompts([4, 6, 5, 3])
    hot = SamplingConfig(max_new_tokens=1000, temperature=1.5, top_k=50)
    top1 = SamplingConfig(max_new_tokens=1000, temperature=1.0, top_k=1)
    sampling = [GREEDY, hot, top1, hot]
    runs = []
    for _ in range(2):
        sb = SlotBatch(model, 4, generator=torch.Generator().manual_seed(7))
        runs.append(_run(sb, prompts, [12] * 4, sampling, join_every=2)[0])
    assert runs[0] == runs[1]
    for i in (0, 2):
        assert runs[0][i] == generate(model, [prompts[i]], GREEDY)[0][:12]
    assert runs[0][1] != generate(model, [prompts[1]], GREEDY)[0][:12]


def test_bad_use_is_refused() -> None:
    model = _model()
    sb = SlotBatch(model, 1)
    with pytest.raises(ConfigError):
        sb.step()  # nothing live
    with pytest.raises(ConfigError):
        sb.add(list(range(1, 25)), GREEDY)  # fills the whole context
    sb.add([1, 2, 3], GREEDY)
    with pytest.raises(ConfigError):
        sb.add([4, 5], GREEDY)  # no free row
    with pytest.raises(ConfigError):
        sb.remove(1)


def test_a_long_prompt_grows_a_small_cache() -> None:
    """The cache starts at min(context, 256) slots: a longer prompt grows it, and decodes right."""
    model = _model(ctx=300)
    p = _prompts([280])[0]
    sb = SlotBatch(model, 2)
    assert sb.capacity == 256
    row, tok = sb.add(p, GREEDY)
    assert sb.capacity >= 280
    out = [tok] + [sb.step()[row] for _ in range(10)]
    assert out == generate(model, [p], SamplingConfig(max_new_tokens=11, temperature=0.0))[0]


def test_reset_and_remove_outside_inference_mode() -> None:
    """A batch built under inference_mode can still remove rows and reset outside it."""
    model = _model()
    with torch.inference_mode():
        sb = SlotBatch(model, 2)
        sb.add([1, 2, 3], GREEDY)
        sb.add([4, 5], GREEDY)
        sb.step()
    sb.remove(0)
    sb.reset()
    assert (sb.n, sb.pos) == (0, 0)
    row, _ = sb.add([6, 7, 8], GREEDY)
    assert row == 0


def test_prompts_arriving_together_share_one_prefill() -> None:
    """`add_many` prefills ragged prompts in one left-padded forward; joined to a running row,
    every sequence still decodes as it would alone."""
    model = _model(ctx=48)
    first, *together = _prompts([6, 3, 9, 1, 5])
    sb = SlotBatch(model, 5)
    row0, tok0 = sb.add(first, GREEDY)
    outs = {row0: [tok0]}
    for _ in range(4):
        outs[row0].append(sb.step()[row0])
    started = sb.add_many(together, [GREEDY] * len(together))
    assert [r for r, _ in started] == [1, 2, 3, 4]
    outs |= {r: [t] for r, t in started}
    for _ in range(12):
        for r, t in enumerate(sb.step()):
            outs[r].append(t)
    for r, p in enumerate([first, *together]):
        alone = generate(model, [p], GREEDY)[0]
        assert outs[r] == alone[: len(outs[r])]

"""Batched text continuation with stop strings, on top of the KV-cache generator (core/sampling.py).

`eval humaneval` (completion-style code) and `eval judge` / `eval human-export` (chat answers) share
it (`chat_answers`: one reply per conversation through the chat template; `answer_both`: two
checkpoints' replies, for `eval judge` and `eval human-export`). A row ends at a stop id (EOS, end-of-turn), a stop string, or the token budget; the text is cut
before the first stop string. The continuation is decoded together with its prompt and the decoded
prompt removed, so SentencePiece's leading-space handling does not eat the first character.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from llmctl.core.checkpoint import Checkpoint, load_checkpoint
from llmctl.core.model import Transformer
from llmctl.core.progress import SILENT, Progress
from llmctl.core.runtime import Precision, Runtime
from llmctl.core.sampling import SamplingConfig, stream
from llmctl.core.tokenizer import Tokenizer


def fit_budget(context: int, max_new_tokens: int) -> tuple[int, int]:
    """(tokens to generate, prompt tokens kept from the end) within a model context."""
    budget = max(1, min(max_new_tokens, context // 2))
    return budget, context - budget


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """Text before the earliest stop string."""
    at = min((i for s in stops if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:at]


def complete(
    model: Transformer,
    tok: Tokenizer,
    prompts: Sequence[list[int]],
    cfg: SamplingConfig,
    *,
    rt: Runtime,
    generator: torch.Generator | None = None,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    batch_size: int = 16,
) -> list[str]:
    """Continue each prompt (ids, already fitted to the context); returns the new text per prompt.

    Prompts are batched in the order given (put equal lengths together: those batches skip the
    padding mask).
    """
    out: list[str] = []
    for a in range(0, len(prompts), batch_size):
        batch = prompts[a : a + batch_size]
        out += _complete_batch(model, tok, batch, cfg, rt, generator, stop_ids, stop_strings)
    return out


def _complete_batch(
    model: Transformer,
    tok: Tokenizer,
    prompts: Sequence[list[int]],
    cfg: SamplingConfig,
    rt: Runtime,
    generator: torch.Generator | None,
    stop_ids: Sequence[int],
    stop_strings: Sequence[str],
) -> list[str]:
    held: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    stops = set(stop_ids)
    heads = [tok.decode(p) for p in prompts]
    with rt.autocast():
        for step in stream(
            model, prompts, cfg, stop_ids=sorted(stops), generator=generator, pad_id=tok.pad_id
        ):
            for r, t in enumerate(step):
                if t is None or done[r]:
                    continue
                if t in stops:
                    done[r] = True
                    continue
                held[r].append(t)
                # Checking the tail only keeps this linear in the answer length.
                if stop_strings and any(s in _text(tok, prompts[r], held[r], heads[r])[-64:]
                                        for s in stop_strings):  # fmt: skip
                    done[r] = True
            if all(done):
                break
    return [
        cut_at_stops(_text(tok, p, h, head), stop_strings)
        for p, h, head in zip(prompts, held, heads, strict=True)
    ]


def _text(tok: Tokenizer, prompt: list[int], new: list[int], head: str) -> str:
    """The decoded continuation (decoded with its prompt, then the prompt's text removed)."""
    full = tok.decode([*prompt, *new])
    return full[len(head) :] if full.startswith(head) else tok.decode(new)


def chat_prompt_ids(tok: Tokenizer, messages: Sequence[dict[str, str]], keep: int) -> list[int]:
    """The chat template with an open assistant turn; BOS plus the last `keep - 1` tokens."""
    ids, _ = tok.render_chat(messages, add_generation_prompt=True)
    return ids if len(ids) <= keep else [ids[0], *ids[len(ids) - keep + 1 :]]


def chat_answers(
    c: Checkpoint,
    conversations: Sequence[Sequence[dict[str, str]]],
    cfg: SamplingConfig,
    *,
    rt: Runtime,
    seed: int = 0,
    batch_size: int = 16,
) -> list[str]:
    """One assistant reply per conversation (chat template, stops at <|end|> or EOS), in order."""
    budget, keep = fit_budget(c.model.cfg.max_seq_len, cfg.max_new_tokens)
    cfg = replace(cfg, max_new_tokens=budget)
    prompts = [chat_prompt_ids(c.tokenizer, m, keep) for m in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together
    gen = torch.Generator(device=rt.device).manual_seed(seed)
    texts = complete(
        c.model,
        c.tokenizer,
        [prompts[i] for i in order],
        cfg,
        rt=rt,
        generator=gen,
        stop_ids=[c.tokenizer.eos_id, c.tokenizer.end_id],
        batch_size=batch_size,
    )
    out = [""] * len(prompts)
    for i, t in zip(order, texts, strict=True):
        out[i] = t.strip()
    return out


def question_text(messages: Sequence[dict[str, str]]) -> str:
    """A conversation as the judge (or a rater) reads it: the user message, or 'role: text' lines."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def answer_both(
    ckpt_a: Path,
    ckpt_b: Path,
    conversations: Sequence[Sequence[dict[str, str]]],
    sampling: SamplingConfig,
    *,
    device: str = "auto",
    precision: Precision = "auto",
    seed: int = 0,
    batch_size: int = 16,
    progress: Progress = SILENT,
) -> tuple[list[str], list[str]]:
    """Each checkpoint's answer to every conversation (one model in memory at a time)."""
    rt = Runtime.detect(device, precision)
    out = []
    for name, ckpt in (("A", ckpt_a), ("B", ckpt_b)):
        c = load_checkpoint(ckpt, device=rt.device)
        progress.start(f"answers {name}", None)
        out.append(
            chat_answers(c, conversations, sampling, rt=rt, seed=seed, batch_size=batch_size)
        )
        progress.stop()
        del c
    return out[0], out[1]

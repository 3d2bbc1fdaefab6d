"""Post-training data: conversations (sft), preference pairs (rm, dpo) and prompts (ppo), read from
the formats the ecosystem uses, rendered with the one chat template, and batched.

Formats (Parquet, JSONL(.gz/.zst), a dataset directory, or `-` for an Arrow stream):
    conversations  `messages`: [{role: system|user|assistant, content}, ...]  (a list, or a JSON
                   string of one), or `prompt` + `response` (or `completion`) strings
    preferences    `prompt`, `chosen`, `rejected`: strings or message lists, as TRL and
                   UltraFeedback-style data use them. A chosen/rejected list may repeat the prompt
                   (UltraFeedback-binarized) or hold only the answer (TRL's explicit-prompt form); with
                   no `prompt` column the shared leading messages of chosen and rejected are the prompt
    prompts        `prompt`: a string or a message list; other columns are kept (rule rewards read
                   them, e.g. a `reference` answer)
A malformed row is an `InputError` that names the column and the row: post-training data is small
and curated, so a bad row is a bug to fix, not noise to skip.

Labels: `Tokenizer.render_chat` gives ids and a loss mask (assistant content plus its <|end|>);
the input is ids[:-1] and the target at i is ids[i+1] where the mask of i+1 is set, else -100
(`IGNORE`). Packing: several conversations share a row of `seq_len` tokens; each keeps its own RoPE
positions (restarting at 0) and a block-diagonal causal mask stops attention at conversation
boundaries, so a packed conversation sees exactly what it would see alone (the property test in
tests/core/test_chatdata.py checks the per-conversation losses). Rows without packing are
right-padded; padding sits after every real token, so plain causal attention is already exact there.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmctl.core.docs import DocSource, _suffix, open_docs
from llmctl.core.errors import InputError
from llmctl.core.tokenizer import Tokenizer

IGNORE = -100
ROLES = ("system", "user", "assistant")
Message = dict[str, str]


# -- reading ----------------------------------------------------------------------------------


class _RowSource(DocSource):
    """A DocSource that checks no text column: rows are validated by the loaders below."""

    def _check_column(self, names: list[str], where: str) -> None:
        return None


def read_rows(path: str | Path) -> tuple[Iterator[tuple[int, dict[str, Any]]], DocSource]:
    """Stream (row number, row dict) from a post-training dataset; also return the opened source
    (for the manifest's input record)."""
    src = open_docs(path)
    rows = _RowSource(src.path, src.files, "text", "strict", src.manifest)

    def it() -> Iterator[tuple[int, dict[str, Any]]]:
        n = 0
        for batch in _row_batches(rows):
            for row in batch:
                yield n, row
                n += 1
        if n == 0:
            raise InputError(f"{path} contains no rows", "check the input path")

    return it(), rows


def _row_batches(src: _RowSource) -> Iterator[list[dict[str, Any]]]:
    # JSONL rows stay Python objects: converting them to Arrow would force one type per column,
    # and real exports mix forms (a string prompt here, a message list there).
    if src.path == "-":
        for b in src._stdin_batches():
            yield b.to_pylist()
        return
    for f in src.files:
        if _suffix(f) in (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json"):
            yield list(_jsonl_rows(src, f))
        else:
            for b in src._file_batches(f, None):
                yield b.to_pylist()


def _jsonl_rows(src: _RowSource, f: Path) -> Iterator[dict[str, Any]]:
    try:
        with src._open_text(f) as raw:
            for lineno, line in enumerate(raw, 1):
                if not line.strip():
                    continue
                text = src._decode(line, f"{f} line {lineno}")
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise InputError(
                        f"{f} line {lineno} is not valid JSON ({e.msg})", "fix or drop that line"
                    ) from None
                if not isinstance(row, dict):
                    raise InputError(f"{f} line {lineno} is not a JSON object")
                yield row
    except (EOFError, OSError) as e:
        raise InputError(f"{f} is truncated or corrupt ({e})", "re-create it") from None


def _where(path: object, n: int, col: str) -> str:
    return f"{path} row {n}, column '{col}'"


def _messages(value: Any, where: str, default_role: str) -> list[Message]:
    """A string or a message list (or its JSON) -> validated messages."""
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("[") and s.endswith("]"):
            try:
                value = json.loads(s)
            except json.JSONDecodeError:
                return [{"role": default_role, "content": value}]
        else:
            return [{"role": default_role, "content": value}]
    if not isinstance(value, (list, tuple)):
        raise InputError(
            f"{where} holds {type(value).__name__}, expected a string or a list of messages",
            "use [{'role': 'user', 'content': ...}, ...] or a plain string",
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InputError(f"{where}: message {i} is not an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(
                f"{where}: message {i} has role {role!r}", "roles are system, user and assistant"
            )
        if not isinstance(content, str):
            raise InputError(f"{where}: message {i} has no string 'content'")
        out.append({"role": role, "content": content})
    return out


def _columns_error(path: object, row: dict, wanted: str) -> InputError:
    found = ", ".join(sorted(row)) or "none"
    return InputError(f"{path} has no {wanted} column(s) (found: {found})", f"provide {wanted}")


@dataclass(frozen=True)
class Conversation:
    """One training conversation and the input row it came from."""

    messages: list[Message]
    row: int


def load_conversations(path: str | Path) -> tuple[list[Conversation], DocSource]:
    """Read conversations (`messages`, or `prompt` + `response`/`completion`).

    Raises:
        InputError: Missing columns, a malformed message, or a conversation with no assistant turn.
    """
    rows, src = read_rows(path)
    out = []
    for n, row in rows:
        if "messages" in row:
            msgs = _messages(row["messages"], _where(path, n, "messages"), "user")
        elif "prompt" in row and ("response" in row or "completion" in row):
            col = "response" if "response" in row else "completion"
            reply = row[col]
            if not isinstance(reply, str):
                raise InputError(f"{_where(path, n, col)} is not a string")
            msgs = _messages(row["prompt"], _where(path, n, "prompt"), "user")
            msgs = msgs + [{"role": "assistant", "content": reply}]
        else:
            raise _columns_error(path, row, "'messages' (or 'prompt' + 'response')")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            raise InputError(
                f"{path} row {n}: the conversation has no assistant turn with content",
                "every training conversation needs at least one assistant reply to learn from",
            )
        out.append(Conversation(msgs, n))
    return out, src


@dataclass(frozen=True)
class Preference:
    """A prompt with a preferred and a dispreferred answer (each a list of assistant-side turns)."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    row: int


def _strip_prompt(answer: list[Message], prompt: list[Message], where: str) -> list[Message]:
    if prompt and answer[: len(prompt)] == prompt:
        answer = answer[len(prompt) :]
    if not answer or answer[0]["role"] != "assistant":
        raise InputError(
            f"{where}: the answer must start with an assistant turn (after the prompt's messages)",
            "give chosen/rejected as the assistant reply, or as the full conversation including the prompt",
        )
    if not any(m["role"] == "assistant" and m["content"].strip() for m in answer):
        raise InputError(f"{where} is empty", "drop the row or fill in the answer")
    return answer


def load_preferences(path: str | Path) -> tuple[list[Preference], DocSource]:
    """Read preference pairs (`prompt`, `chosen`, `rejected`).

    Raises:
        InputError: Missing columns, an empty answer, or answers that do not follow the prompt.
    """
    rows, src = read_rows(path)
    out = []
    for n, row in rows:
        if "chosen" not in row or "rejected" not in row:
            raise _columns_error(path, row, "'chosen' and 'rejected'")
        for col in ("chosen", "rejected"):
            v = row[col]
            if (
                v is None
                or (isinstance(v, str) and not v.strip())
                or (isinstance(v, (list, tuple)) and not v)
            ):
                raise InputError(
                    f"{_where(path, n, col)} is empty", "drop the row or fill in the answer"
                )
        chosen = _messages(row["chosen"], _where(path, n, "chosen"), "assistant")
        rejected = _messages(row["rejected"], _where(path, n, "rejected"), "assistant")
        if row.get("prompt") is not None:
            prompt = _messages(row["prompt"], _where(path, n, "prompt"), "user")
        else:
            k = 0  # implicit prompt: the shared leading non-assistant-final messages
            while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
                k += 1
            while k > 0 and chosen[k - 1]["role"] == "assistant":
                k -= 1
            prompt = chosen[:k]
        if not any(m["role"] == "user" for m in prompt):
            raise InputError(
                f"{path} row {n}: no prompt (no 'prompt' column and no shared user turn)",
                "add a 'prompt' column",
            )
        out.append(
            Preference(
                prompt,
                _strip_prompt(chosen, prompt, _where(path, n, "chosen")),
                _strip_prompt(rejected, prompt, _where(path, n, "rejected")),
                n,
            )
        )
    return out, src


@dataclass(frozen=True)
class Prompt:
    """An RL prompt (messages ending with a user turn) plus the row's other columns."""

    messages: list[Message]
    row: int
    extra: dict[str, Any] = field(default_factory=dict)


def load_prompts(path: str | Path) -> tuple[list[Prompt], DocSource]:
    """Read RL prompts (`prompt`: string or messages; other columns kept in `extra`).

    Raises:
        InputError: No prompt column, or an empty prompt.
    """
    rows, src = read_rows(path)
    out = []
    for n, row in rows:
        if "prompt" not in row and "messages" not in row:
            raise _columns_error(path, row, "'prompt'")
        col = "prompt" if "prompt" in row else "messages"
        msgs = _messages(row[col], _where(path, n, col), "user")
        if (
            msgs and msgs[-1]["role"] == "assistant"
        ):  # a full conversation: prompt = all but the reply
            msgs = msgs[:-1]
        if not msgs or not any(m["content"].strip() for m in msgs):
            raise InputError(f"{_where(path, n, col)} is empty", "drop the row")
        out.append(Prompt(msgs, n, {k: v for k, v in row.items() if k != col}))
    return out, src


# -- encoding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """A rendered conversation: ids and per-token loss flags (same length)."""

    ids: list[int]
    mask: list[bool]

    @property
    def n_loss(self) -> int:
        """Tokens that carry loss as *targets* (the first token never does)."""
        return sum(self.mask[1:])


def encode_conversations(
    tok: Tokenizer, convs: Sequence[Conversation], max_len: int
) -> tuple[list[Example], int]:
    """Render and truncate to `max_len` tokens; drop those left with no loss token.

    Returns:
        (examples, number truncated, ) - dropped ones are counted as truncated too.
    """
    out, truncated = [], 0
    for c in convs:
        ids, mask = tok.render_chat(c.messages)
        if len(ids) > max_len:
            ids, mask = ids[:max_len], mask[:max_len]
            truncated += 1
        ex = Example(ids, mask)
        if ex.n_loss:
            out.append(ex)
    return out, truncated


@dataclass(frozen=True)
class PairExample:
    """A tokenised preference pair: shared prompt ids (ending with <|assistant|>) and two answers
    with their loss flags (assistant content and <|end|>)."""

    prompt: list[int]
    chosen: list[int]
    chosen_mask: list[bool]
    rejected: list[int]
    rejected_mask: list[bool]


def encode_answer(
    tok: Tokenizer, prompt: list[Message], answer: list[Message]
) -> tuple[list[int], list[int], list[bool]]:
    """(prompt ids with the open assistant turn, answer ids, answer loss flags)."""
    p_ids, _ = tok.render_chat(prompt, add_generation_prompt=True)
    full, mask = tok.render_chat(prompt + answer)
    assert full[: len(p_ids)] == p_ids  # the template renders prompts as prefixes
    return p_ids, full[len(p_ids) :], mask[len(p_ids) :]


def encode_preferences(
    tok: Tokenizer, prefs: Sequence[Preference], max_len: int, max_prompt_len: int | None = None
) -> tuple[list[PairExample], int]:
    """Tokenise pairs. Prompts keep their last `max_prompt_len` tokens (default: half of max_len)
    after the BOS; answers are cut so prompt + answer <= max_len.

    Returns:
        (pairs, number truncated).
    """
    cap = max_prompt_len or max_len // 2
    out, truncated = [], 0
    for p in prefs:
        p_ids, c_ids, c_mask = encode_answer(tok, p.prompt, p.chosen)
        _, r_ids, r_mask = encode_answer(tok, p.prompt, p.rejected)
        cut = False
        if len(p_ids) > cap:
            p_ids, cut = [p_ids[0], *p_ids[len(p_ids) - cap + 1 :]], True
        room = max_len - len(p_ids)
        if len(c_ids) > room or len(r_ids) > room:
            cut = True
            c_ids, c_mask, r_ids, r_mask = c_ids[:room], c_mask[:room], r_ids[:room], r_mask[:room]
        truncated += cut
        out.append(PairExample(p_ids, c_ids, c_mask, r_ids, r_mask))
    return out, truncated


# -- batching ---------------------------------------------------------------------------------


@dataclass
class Batch:
    """Model inputs for next-token training on rendered conversations.

    ids/targets: (B, T); targets are IGNORE where no loss. positions/attn_mask: None for plain
    causal rows, else (B, T) RoPE positions and a (B, 1, T, T) bool mask (True = may attend).
    """

    ids: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The batch on `device`."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(mv(self.ids), mv(self.targets), mv(self.positions), mv(self.attn_mask))  # type: ignore[arg-type]

    @property
    def n_targets(self) -> int:
        """Number of tokens with loss."""
        return int((self.targets != IGNORE).sum())


def pack(lengths: Sequence[int], seq_len: int, order: Sequence[int]) -> list[list[int]]:
    """Group examples (visited in `order`) into rows of at most `seq_len` input tokens, greedily in
    that order. An example of n tokens takes n - 1 input positions. Returns example indices per row."""
    rows: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in order:
        n = lengths[i] - 1
        if cur and used + n > seq_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


def collate(
    examples: Sequence[Example],
    rows: Sequence[Sequence[int]],
    pad_id: int,
    seq_len: int | None = None,
) -> Batch:
    """Build a batch; each row holds the listed examples back to back, then padding.

    With one example per row no mask is needed (padding only trails); with several, positions restart
    per example and attention is block-diagonal causal. `seq_len` fixes T (default: the longest row).
    """
    parts = [[examples[i] for i in r] for r in rows]
    width = max(sum(len(e.ids) - 1 for e in p) for p in parts)
    T = seq_len or width
    assert width <= T, f"row of {width} tokens exceeds {T}"
    B = len(parts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    tgt = torch.full((B, T), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    packed = any(len(p) > 1 for p in parts)
    for b, p in enumerate(parts):
        at = 0
        for s, e in enumerate(p):
            n = len(e.ids) - 1
            x = torch.tensor(e.ids, dtype=torch.long)
            m = torch.tensor(e.mask[1:], dtype=torch.bool)
            ids[b, at : at + n] = x[:-1]
            tgt[b, at : at + n] = torch.where(m, x[1:], IGNORE)
            pos[b, at : at + n] = torch.arange(n)
            seg[b, at : at + n] = s
            at += n
    if not packed:
        return Batch(ids, tgt)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal  # padding (-1) attends to earlier padding
    return Batch(ids, tgt, pos, mask[:, None])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on (seed, epoch)."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order

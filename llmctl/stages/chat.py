"""chat: a multi-turn conversation with a checkpoint, one user line at a time.

The conversation lives in `ChatSession` (no terminal needed, so tests drive it directly): each user
message is appended to the history, the whole history is rendered with `render_chat` (the template
SFT trained on) plus an open assistant turn, and the reply is sampled with the KV-cache generator
(core/sampling.stream), decoded incrementally (whole UTF-8 characters only) and stopped at <|end|>
or </s>. The reply then joins the history. `cli.py` only reads lines and prints events.

Context policy: when the rendered history no longer leaves room for a reply (at least
min(--max-new-tokens, context / 2) tokens), the oldest turns are dropped, a user message together
with the assistant reply that followed it, with a notice; the system message is always kept. If even
the system message plus the new user message alone does not fit, that message is refused (with an
error event) and the history is left as it was.

Commands (a line whose first word is one of these; anything else is a message):
    /reset        forget the conversation (the system message stays)
    /save FILE    write {"messages": [...]} as one JSON line (a valid line of an SFT chat file)
    /load FILE    replace the conversation with one written by /save (`llmctl chat --load FILE`
                  does the same at start); a bad file is refused and the history is kept
    /quit, /exit  end the session
    /help         list the commands
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from llmctl.core.checkpoint import load_checkpoint
from llmctl.core.config import require
from llmctl.core.errors import InputError
from llmctl.core.model import Transformer
from llmctl.core.runtime import Runtime
from llmctl.core.sampling import SamplingConfig, stream
from llmctl.core.tokenizer import Tokenizer

EventKind = Literal["text", "end", "info", "warn", "error", "quit"]
HELP = (
    "/reset forget the conversation   /save FILE write it as JSON   /load FILE resume a saved one"
    "   /quit end   (any other line is a message)"
)
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Event:
    """What the session tells its front end: a reply piece ("text"), the end of a reply ("end"),
    a notice ("info", "warn"), a refused line ("error"), or the end of the session ("quit")."""

    kind: EventKind
    text: str = ""


@dataclass(frozen=True, kw_only=True)
class ChatConfig:
    """Settings of `llmctl chat`."""

    max_new_tokens: int = 256  # tokens per reply at most
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    system: str | None = None  # system message, kept at the top of every prompt
    device: str = "auto"  # auto, cpu, cuda, mps
    seed: int = 0  # sampling seed (one generator for the whole session)

    def __post_init__(self) -> None:
        _ = self.sampling  # validates the sampling flags
        require(self.system is None or self.system.strip() != "", "--system must not be empty")

    @property
    def sampling(self) -> SamplingConfig:
        """The sampling part."""
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
        )


class ChatSession:
    """A conversation with one model: history, context policy, commands."""

    def __init__(
        self, model: Transformer, tokenizer: Tokenizer, cfg: ChatConfig, *, device: str = "cpu"
    ) -> None:
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.messages: list[dict[str, str]] = []
        self.reset()

    @property
    def context(self) -> int:
        """The model's context length in tokens."""
        return self.model.cfg.max_seq_len

    @property
    def reply_room(self) -> int:
        """Tokens kept free for the reply when fitting the history into the context."""
        return max(1, min(self.cfg.max_new_tokens, self.context // 2))

    def reset(self) -> None:
        """Forget the conversation, keeping the system message."""
        self.messages = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []

    def load(self, path: Path) -> None:
        """Replace the conversation with one saved by `save` (see `resume`).

        Raises:
            InputError: The file is missing, unreadable, not JSON, or not {"messages": [...]}.
        """
        self.resume(read_conversation(path))

    def resume(self, messages: list[dict[str, str]]) -> None:
        """Replace the conversation with `messages` (checked by `read_conversation`). A `--system`
        given to this session replaces their system message (or is added when they have none);
        an over-long history is trimmed at the next message, as usual."""
        if self.cfg.system:
            rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
            messages = [{"role": "system", "content": self.cfg.system}, *rest]
        self.messages = messages

    def save(self, path: Path) -> None:
        """Write the conversation as one JSON line: {"messages": [...]}."""
        line = json.dumps({"messages": self.messages}, ensure_ascii=False)
        Path(path).write_text(line + "\n", encoding="utf-8")

    def handle(self, line: str) -> Iterator[Event]:
        """React to one input line: a command, or a user message (then stream the reply)."""
        line = line.rstrip("\r\n")
        word, _, arg = line.strip().partition(" ")
        if word in ("/quit", "/exit"):
            yield Event("quit")
        elif word == "/reset":
            self.reset()
            yield Event("info", "conversation cleared")
        elif word == "/save":
            yield self._save_event(arg.strip())
        elif word == "/load":
            yield self._load_event(arg.strip())
        elif word == "/help":
            yield Event("info", HELP)
        elif line.strip():
            yield from self.say(line)

    def _save_event(self, arg: str) -> Event:
        if not arg:
            return Event("error", "usage: /save FILE")
        try:
            self.save(Path(arg).expanduser())
        except OSError as e:
            return Event("error", f"cannot write {arg}: {e.strerror or e}")
        return Event("info", f"saved {len(self.messages)} messages to {arg}")

    def _load_event(self, arg: str) -> Event:
        if not arg:
            return Event("error", "usage: /load FILE")
        try:
            self.load(Path(arg).expanduser())
        except InputError as e:
            return Event("error", e.problem)
        return Event("info", f"loaded {len(self.messages)} messages from {arg}")

    def say(self, text: str) -> Iterator[Event]:
        """Add a user message, fit the history into the context, and stream the reply.

        The reply joins the history even when the caller stops early (Ctrl-C): what was shown is
        what the model will see next turn.
        """
        candidate = [*self.messages, {"role": "user", "content": text}]
        fitted, dropped = self._fit(candidate)
        if fitted is None:
            n = len(self._prompt(self._system() + candidate[-1:]))
            yield Event(
                "error",
                f"message too long: {n} prompt tokens, the context is {self.context} and "
                f"{self.reply_room} are kept for the reply; shorten it",
            )
            return
        if dropped:
            yield Event(
                "warn",
                f"context full ({self.context} tokens): dropped the oldest {dropped} "
                f"message{'s' if dropped > 1 else ''}",
            )
        self.messages = fitted
        reply = ""
        try:
            for piece in self._sample(self._prompt(self.messages)):
                reply += piece
                yield Event("text", piece)
        finally:
            self.messages.append({"role": "assistant", "content": reply})
        yield Event("end")

    # -- helpers ---------------------------------------------------------------------------------

    def _system(self) -> list[dict[str, str]]:
        return [m for m in self.messages[:1] if m["role"] == "system"]

    def _prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tok.render_chat(messages, add_generation_prompt=True)[0]

    def _fit(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]] | None, int]:
        """Drop the oldest non-system messages until the prompt leaves `reply_room` tokens free.

        Returns:
            (the fitted messages, how many were dropped), or (None, 0) when even the system
            message plus the last message is too long.
        """
        system, rest = self._system(), messages[len(self._system()) :]
        budget = self.context - self.reply_room
        dropped = 0
        while len(self._prompt(system + rest)) > budget:
            if len(rest) <= 1:
                return None, 0
            # Drop a whole exchange where possible, so the history never starts with a reply.
            cut = 2 if len(rest) > 2 and rest[1]["role"] == "assistant" else 1
            rest, dropped = rest[cut:], dropped + cut
        return system + rest, dropped

    def _sample(self, prompt: list[int]) -> Iterator[str]:
        stops = {self.tok.eos_id, self.tok.end_id}

        def ids() -> Iterator[int]:
            for step in stream(
                self.model,
                [prompt],
                self.cfg.sampling,
                stop_ids=sorted(stops),
                generator=self.generator,
                pad_id=self.tok.pad_id,
            ):
                t = step[0]
                if t is None or t in stops:
                    return
                yield t

        yield from self.tok.decode_stream(ids())


def read_conversation(path: Path) -> list[dict[str, str]]:
    """Read a conversation written by `/save`: one JSON object {"messages": [{role, content}, ...]}
    (a line of an SFT chat file; surrounding whitespace is fine).

    Raises:
        InputError: The file is missing or unreadable, is not JSON, or has another shape (each
            problem in one line that names the file).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"conversation file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read conversation file {path}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(
            f"{path} is not JSON ({e.msg} at line {e.lineno}); expected one line "
            '{"messages": [...]} as /save writes it'
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise InputError(f'{path} is not a saved conversation: expected {{"messages": [...]}}')
    messages = []
    for i, m in enumerate(data["messages"]):
        ok = isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
        if not ok:
            raise InputError(
                f'{path}: message {i} is not {{"role": system|user|assistant, "content": str}}'
            )
        if m["role"] == "system" and i > 0:
            raise InputError(f"{path}: message {i} is a system message; only the first may be")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def open_session(ckpt: Path, cfg: ChatConfig, *, load: Path | None = None) -> ChatSession:
    """Load a checkpoint and start a conversation with it, resuming the one saved in `load`.

    Raises:
        InputError: The checkpoint is missing, incomplete or inconsistent, or `load` is not a
            conversation saved by /save (checked first, before the model is loaded).
    """
    messages = read_conversation(load) if load is not None else None
    rt = Runtime.detect(cfg.device, "fp32")
    c = load_checkpoint(ckpt, device=rt.device, inference=True)
    session = ChatSession(c.model, c.tokenizer, cfg, device=str(rt.device))
    if messages is not None:
        session.resume(messages)
    return session

"""The generation engine behind `llmctl serve`: one worker thread, continuously batched.

The HTTP handlers (serve.py) run on the asyncio event loop and never touch the model. Each choice
they want sampled becomes a `Row` (prompt ids, token budget, stop strings, sampling settings) in a
shared queue; the worker thread decodes up to `max_batch` rows at a time in a `core.slots.SlotBatch`
(a KV cache that sequences join and leave between steps), pushing text pieces and the finish
reason of every row back to the loop. So the loop stays responsive while the model runs.

Per-token costs, kept small because at batch 1 they add straight to the decode step (on a small CPU
the loop thread, the worker and torch's threads share the cores and the GIL):
- detokenisation is incremental (`TextTail`): each token decodes a window of a few ids, not the
  whole reply again (which made a reply of n tokens cost O(n^2));
- the events of one decode step, for every row of the batch, reach the loop in one
  `call_soon_threadsafe` (one wake-up of the loop per step, not one per row and event);
- text is posted at most every `stream_interval_ms` (the first pieces of a batch, every finish
  and every error at once), so at the default 20 ms a chunk carries a few tokens rather than one;
- the idle worker gathers a batch by waiting on a condition with a timeout, not by sleeping.

Batching policy (continuous): before every decode step the worker starts the rows that wait, in
arrival order, as many as there are free rows (each is prefilled alone and joins the step; rows
need not share sampling settings). When it is idle, the first row waits until no new row has
arrived for `batch_wait_ms` (at most 5 x that in all, or until every row is taken), so requests
sent together start together. Each row stops on its own (end-of-turn or EOS token, a stop string,
its own max_tokens, a full context or a cancelled client) and frees its row for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from llmctl.core.model import Transformer
from llmctl.core.sampling import SamplingConfig
from llmctl.core.slots import SlotBatch
from llmctl.core.tokenizer import Tokenizer

FinishReason = Literal["stop", "length"]
MAX_WAIT_FACTOR = 5  # an idle worker gathers a batch for at most 5 x batch_wait_ms


@dataclass(frozen=True)
class Sampling:
    """A request's sampling settings (each row of a batch samples with its own)."""

    temperature: float
    top_k: int
    top_p: float


@dataclass(frozen=True, eq=False)
class Outbox:
    """Where a request's events go: an asyncio queue on the loop that serves the request. Rows
    put (index, kind, payload) items into it; the worker delivers them in bulk (`post`)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass(eq=False)
class Row:
    """One choice to sample, answered through `outbox` as (index, kind, payload) items.

    Events: ("text", str) for each new piece, then ("done", (finish_reason, completion_tokens)) or
    ("error", message).
    """

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stops: tuple[str, ...]
    outbox: Outbox
    index: int = 0  # the choice index within its request
    cancelled: bool = False
    # worker-side state
    ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (whole characters only)
    sent: int = 0  # characters of `text` already emitted
    tail: TextTail | None = None  # incremental decoder of `ids` (set by the worker)


def post(events: Sequence[tuple[Row, str, Any]]) -> None:
    """Deliver (row, kind, payload) events to their queues: one `call_soon_threadsafe` per event
    loop (each call wakes the loop through a socket write, which costs more than the rest)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple]]] = {}
    for r, kind, payload in events:
        by_loop.setdefault(r.outbox.loop, []).append((r.outbox.queue, (r.index, kind, payload)))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class TextTail:
    """Incremental detokenisation: the text that each new id adds, whole characters only.

    Decoding the whole reply again at every token is exact but O(n) per token. Here each step
    decodes a window that starts at the previous piece: the window text minus the previous
    piece's own text is what the new ids add. Starting the window at an earlier id (rather than at
    the new one) keeps what SentencePiece does to a leading piece (a stripped dummy-prefix space)
    out of the new text; a window is never started at ids that decode to nothing (control tokens),
    so the piece whose space may be stripped is the same in both decodes. An id that leaves an
    incomplete UTF-8 character (byte fallback) adds nothing until the character is whole.
    """

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.head = 0  # the window starts here
        self.done = 0  # ids[:done] have been turned into text
        self.prefix = ""  # decode(ids[head:done])

    def push(self, t: int) -> str | None:
        """Add an id; the new text, or None while a multi-byte character is incomplete."""
        self.ids.append(t)
        window = self.tok.decode(self.ids[self.head :])
        if window.endswith("\ufffd"):
            return None
        if not window.startswith(self.prefix):  # not seen with SentencePiece; stay exact anyway
            whole = self.tok.decode(self.ids)
            old = self.tok.decode(self.ids[: self.done])
            new = whole[len(old) :]
        else:
            new = window[len(self.prefix) :]
        piece = self.tok.decode(self.ids[self.done :]) if new else ""
        if piece:  # start the next window at this piece
            self.head, self.prefix = self.done, piece
        else:
            self.prefix = window
        self.done = len(self.ids)
        return new


class StopScan:
    """Find stop strings in a growing text, holding back a tail that may be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]

    def scan(self, text: str, sent: int) -> tuple[int, bool]:
        """(characters of `text` safe to emit, whether a stop string was hit). On a hit, the safe
        length is where the earliest stop string begins."""
        if not self.stops:
            return len(text), False
        start = max(0, sent - max(len(s) for s in self.stops))
        hits = [i for s in self.stops if (i := text.find(s, start)) >= 0]
        if hits:
            return min(hits), True
        hold = 0
        for s in self.stops:  # the longest tail of text that begins some stop string
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return len(text) - hold, False


def _config(r: Row) -> SamplingConfig:
    s = r.sampling
    return SamplingConfig(
        max_new_tokens=r.max_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p
    )


class Engine:
    """Owns the model; decodes queued rows on one worker thread, continuously batched."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 8,
        batch_wait_ms: float = 10.0,
        stream_interval_ms: float = 20.0,
        seed: int = 0,
    ) -> None:
        self.model, self.tok = model, tokenizer
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000
        device = model.embed.weight.device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.stop_ids = sorted({tokenizer.eos_id, tokenizer.end_id})
        self._pending: deque[Row] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._arrivals = 0  # rows submitted so far (the batch gatherer waits for this to settle)
        self._current: list[Row] = []  # the rows being decoded
        self._waiting: list[Row] = []  # taken off the queue, not started yet
        self._events: list[tuple[Row, str, Any]] = []  # this step's events, posted together
        self.stream_interval = stream_interval_ms / 1000
        self._next_post = 0.0  # text events wait until then (finishes and errors never wait)
        self.running = 0  # rows being decoded
        self.batches = 0  # decode runs started from idle (rows that arrive mid-run join it)
        self._thread = threading.Thread(target=self._work, name="llmctl-serve-engine", daemon=True)
        self._thread.start()

    @property
    def context(self) -> int:
        """The model's context length in tokens."""
        return self.model.cfg.max_seq_len

    @property
    def queued(self) -> int:
        """Rows waiting for a batch."""
        return len(self._pending)

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._thread.is_alive() and not self._closed

    def submit(self, row: Row) -> None:
        """Queue a row (thread-safe)."""
        with self._cv:
            self._pending.append(row)
            self._arrivals += 1
            self._cv.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker: the running batch ends at its next step, queued rows are dropped."""
        with self._cv:
            self._closed = True
            for r in [*self._pending, *self._current, *self._waiting]:
                r.cancelled = True
            self._pending.clear()
            self._cv.notify()
        self._thread.join(timeout)

    # -- worker thread -------------------------------------------------------------------------

    def _work(self) -> None:
        slots: SlotBatch | None = None  # made at the first request (a failure is reported then)
        live: list[Row] = []  # live[i] decodes in slots' row i
        scans: list[StopScan] = []
        self._current = live
        while True:
            new = self._admit(idle=not live, free=slots.free if slots else self.max_batch)
            if new is None:
                return
            self._waiting = waiting = list(new)  # admitted, not started (close() cancels them)
            try:
                if slots is None:
                    slots = SlotBatch(self.model, self.max_batch, generator=self.generator)
                self._start_all(slots, waiting, live, scans)
                if live:
                    self._step(slots, live, scans)
            except Exception as e:  # noqa: BLE001 - a failed step must not kill the server
                message = f"generation failed: {type(e).__name__}: {e}"
                self._events += [(r, "error", message) for r in [*live, *waiting]]
                live.clear()
                scans.clear()
                waiting.clear()
                if slots is not None:
                    slots.reset()  # the cache may be half-written; its memory is kept
            self.running = len(live)
            self._flush(force=not live)

    def _start_all(
        self, slots: SlotBatch, waiting: list[Row], live: list[Row], scans: list[StopScan]
    ) -> None:
        """Prefill the admitted rows together (one forward) and feed each its first token. If
        that fails, each row is tried alone, so only a row that fails alone (say, out of memory
        on a long prompt) gets the error."""
        rows = [r for r in waiting if not r.cancelled]
        waiting.clear()
        if not rows:
            return
        try:
            started: list[tuple[int, int] | None] = list(
                slots.add_many([r.prompt for r in rows], [_config(r) for r in rows])
            )
        except Exception:  # noqa: BLE001 - retried one by one below
            started = []
            for r in rows:
                try:
                    started.append(slots.add(r.prompt, _config(r)))
                except Exception as e:  # noqa: BLE001 - this row's failure, reported to it
                    message = f"generation failed: {type(e).__name__}: {e}"
                    self._events.append((r, "error", message))
                    started.append(None)
        self._next_post = 0.0  # a new reply's first piece goes out at once
        for r, got in zip(rows, started, strict=True):
            if got is not None:  # slots' rows are taken in order, as `live` grows
                r.tail = TextTail(self.tok)
                live.append(r)
                scans.append(StopScan(r.stops))
        self._feed(slots, live, scans, [got for got in started if got is not None])

    def _step(self, slots: SlotBatch, live: list[Row], scans: list[StopScan]) -> None:
        """One token for every live row."""
        self._feed(slots, live, scans, list(enumerate(slots.step())))

    def _feed(
        self,
        slots: SlotBatch,
        live: list[Row],
        scans: list[StopScan],
        tokens: list[tuple[int, int]],
    ) -> None:
        """Give each (row, token) to its row, from the highest row down: a finished row leaves,
        and `remove` moves the last row, already fed, into its place."""
        for i, tok in sorted(tokens, reverse=True):
            r = live[i]
            if not self._advance(r, tok, scans[i]) or not self._room(slots, i, r, scans):
                self._drop(slots, live, scans, i)

    def _room(self, slots: SlotBatch, i: int, r: Row, scans: list[StopScan]) -> bool:
        """False (and the row finished) once its prompt and reply fill the context."""
        if slots.room(i) > 0:
            return True
        self._finish(r, "length", scans[i])
        return False

    @staticmethod
    def _drop(slots: SlotBatch, live: list[Row], scans: list[StopScan], i: int) -> None:
        """Free row i; the last live row takes its place (as `SlotBatch.remove` moves it)."""
        slots.remove(i)
        live[i], scans[i] = live[-1], scans[-1]
        live.pop()
        scans.pop()

    def _admit(self, *, idle: bool, free: int) -> list[Row] | None:
        """Rows to start now (None once closed). Busy: whatever waits, up to the free rows, at
        once. Idle: block for a row, then gather the rows that arrive with it."""
        with self._cv:
            if self._closed:
                return None
            if not idle:
                return self._take(free)
            while not self._pending and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            # Let requests that arrive together start together: wait until no new row has come
            # for `batch_wait` (at most MAX_WAIT_FACTOR times that in all, or until every row is
            # taken). A submit wakes the wait, so a full batch starts at once.
            deadline = time.monotonic() + MAX_WAIT_FACTOR * self.batch_wait
            seen = self._arrivals
            quiet_until = time.monotonic() + self.batch_wait
            while len(self._pending) < free and not self._closed:
                now = time.monotonic()
                if now >= min(quiet_until, deadline):
                    break
                self._cv.wait(min(quiet_until, deadline) - now)
                if self._arrivals != seen:
                    seen, quiet_until = self._arrivals, time.monotonic() + self.batch_wait
            if self._closed:
                return None
            taken = self._take(free)
            self.batches += bool(taken)
            return taken

    def _take(self, free: int) -> list[Row]:
        """Up to `free` waiting rows, in arrival order, skipping cancelled ones."""
        out: list[Row] = []
        while self._pending and len(out) < free:
            r = self._pending.popleft()
            if not r.cancelled:
                out.append(r)
        return out

    def _emit(self, r: Row, kind: str, payload: Any) -> None:
        self._events.append((r, kind, payload))

    def _flush(self, *, force: bool = True) -> None:
        """Post the gathered events; unless forced, text alone waits for the stream interval."""
        if not self._events:
            return
        now = time.monotonic()
        if not force and now < self._next_post and all(k == "text" for _, k, _ in self._events):
            return
        self._next_post = now + self.stream_interval
        events, self._events = self._events, []
        post(events)

    def _advance(self, r: Row, t: int | None, scan: StopScan) -> bool:
        """Feed one sampled token to a row; False once the row is finished."""
        if r.cancelled:
            return False
        if t is None or t in self.stop_ids:
            self._finish(r, "stop", scan, counted=t is not None)
            return False
        r.ids.append(t)
        new = r.tail.push(t) if r.tail is not None else None
        if new is not None:  # None: a multi-byte character is held back until it is whole
            r.text = text = r.text + new
            safe, hit = scan.scan(text, r.sent)
            if safe > r.sent:
                self._emit(r, "text", text[r.sent : safe])
                r.sent = safe
            if hit:
                self._emit(r, "done", ("stop", len(r.ids)))
                return False
        if len(r.ids) >= r.max_tokens:
            self._finish(r, "length", scan)
            return False
        return True

    def _finish(
        self, r: Row, reason: FinishReason, scan: StopScan, *, counted: bool = False
    ) -> None:
        """Flush the held-back tail (it did not complete a stop string) and report the end."""
        if len(r.text) > r.sent:
            self._emit(r, "text", r.text[r.sent :])
            r.sent = len(r.text)
        self._emit(r, "done", (reason, len(r.ids) + int(counted)))

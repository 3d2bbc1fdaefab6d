"""Judges of two answers to one prompt: a reward model, or an OpenAI-compatible chat endpoint.

A judge sees the answers in the order it is given ("first", "second") and returns "first",
"second", "tie" or None (unreadable); the caller randomises which model's answer comes first and
maps the verdict back, which cancels a judge's position bias on average (Zheng et al., 2023,
"Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena").

The reward-model judge scores each (prompt, answer) conversation through the chat template, exactly
as `rm` trained it; the higher reward wins, and a difference within `epsilon` is a tie.

The HTTP judge posts MT-Bench's pairwise prompt to `{url}/chat/completions` with temperature 0 and
reads the verdict: the last "[[A]]", "[[B]]" or "[[C]]" (tie), else a "verdict: A" line, "assistant
B is better", or "tie"; anything else counts as unreadable, not as a tie. Only the standard library is used (urllib). The API key is read from an environment variable
named by the caller and is never written anywhere.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from llmctl.core.errors import InputError
from llmctl.core.heads import load_reward_model

Verdict = Literal["first", "second", "tie"] | None

SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. You should choose the assistant that "
    "follows the user's instructions and answers the user's question better. Your evaluation "
    "should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, and "
    "level of detail of their responses. Begin your evaluation by comparing the two responses and "
    "provide a short explanation. Avoid any position biases and ensure that the order in which "
    "the responses were presented does not influence your decision. Do not allow the length of "
    "the responses to influence your evaluation. Do not favor certain names of the assistants. "
    "Be as objective as possible. After providing your explanation, output your final verdict by "
    'strictly following this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is '
    'better, and "[[C]]" for a tie.'
)
_BRACKET = re.compile(r"\[\[\s*(A|B|C|TIE)\s*\]\]", re.IGNORECASE)
_LINE = re.compile(
    r"(?:verdict|winner|better|answer)\s*(?:is)?\s*[:\-]?\s*\**\s*(?:assistant\s+)?"
    r"\(?(A|B|tie|C)\)?\b",
    re.IGNORECASE,
)
_BETTER = re.compile(r"assistant\s+(A|B)\W*\s+(?:is|was)\s+(?:clearly\s+)?(?:the\s+)?better", re.I)
_TIE = re.compile(r"\b(?:it'?s\s+a\s+tie|tie|equally\s+good)\b", re.IGNORECASE)


def parse_verdict(text: str) -> Verdict:
    """The verdict in a judge's reply ("[[A]]" style first, then a "verdict: B" style line)."""
    found = _BRACKET.findall(text or "") or _LINE.findall(text or "")
    found = found or _BETTER.findall(text or "") or ["tie"] * bool(_TIE.search(text or ""))
    if not found:
        bare = (text or "").strip().strip(".*\"' ").upper()
        found = [bare] if bare in ("A", "B", "C", "TIE") else []
    if not found:
        return None
    v = found[-1].upper()
    return "first" if v == "A" else "second" if v == "B" else "tie"


def judge_messages(question: str, first: str, second: str) -> list[dict[str, str]]:
    """MT-Bench's pairwise judge prompt for one question and two answers."""
    user = (
        f"[User Question]\n{question}\n\n"
        f"[The Start of Assistant A's Answer]\n{first}\n[The End of Assistant A's Answer]\n\n"
        f"[The Start of Assistant B's Answer]\n{second}\n[The End of Assistant B's Answer]"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


class HttpJudge:
    """An OpenAI-compatible chat completions endpoint as the judge."""

    def __init__(
        self, url: str, model: str, *, api_key: str | None = None, timeout_s: float = 60.0
    ) -> None:
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key, self.timeout_s = model, api_key, timeout_s

    def ask(self, messages: list[dict[str, str]], attempts: int = 3) -> str:
        """The endpoint's reply text (retries on 429/5xx and connection errors).

        Raises:
            InputError: The endpoint refuses the request, or is unreachable after retries.
        """
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": 1024}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:  # noqa: S310
                    data = json.loads(r.read().decode("utf-8"))
                return str(data["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code in (429, 500, 502, 503, 504) and attempt + 1 < attempts:
                    time.sleep(2**attempt)
                    continue
                raise InputError(
                    f"judge endpoint {self.url} answered HTTP {e.code}: {detail}",
                    "check --judge-url, --judge-model and the API key variable (--api-key-env)",
                ) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt + 1 < attempts:
                    time.sleep(2**attempt)
                    continue
                raise InputError(
                    f"cannot reach the judge endpoint {self.url} ({e})",
                    "is the server running? pass its base URL, e.g. http://127.0.0.1:8000/v1",
                ) from None
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise InputError(
                    f"judge endpoint {self.url} did not return an OpenAI chat completion ({e!r})",
                    "the endpoint must implement POST /v1/chat/completions",
                ) from None
        raise AssertionError("unreachable")

    def judge(self, question: str, first: str, second: str) -> tuple[Verdict, str]:
        """(verdict, the judge's raw reply)."""
        reply = self.ask(judge_messages(question, first, second))
        return parse_verdict(reply), reply


class RewardJudge:
    """A reward-model checkpoint as the judge: the higher reward wins."""

    def __init__(self, path: Path, *, device: str = "cpu", epsilon: float = 0.0) -> None:
        self.rm, self.tok = load_reward_model(Path(path), device=device)
        self.epsilon = epsilon
        self.context = self.rm.backbone.cfg.max_seq_len

    def scores(
        self, conversations: Sequence[Sequence[dict[str, str]]], answers: Sequence[str]
    ) -> list[float]:
        """Reward of each (conversation + assistant answer), as `rm` trained it."""
        seqs = []
        for msgs, ans in zip(conversations, answers, strict=True):
            ids, _ = self.tok.render_chat([*msgs, {"role": "assistant", "content": ans}])
            if len(ids) > self.context:  # keep BOS and the end, where the reward is read
                ids = [ids[0], *ids[len(ids) - self.context + 1 :]]
            seqs.append(ids)
        return self.rm.score(seqs, pad_id=self.tok.pad_id).tolist()

    def verdict(self, first: float, second: float) -> Verdict:
        """Compare two rewards."""
        if abs(first - second) <= self.epsilon:
            return "tie"
        return "first" if first > second else "second"

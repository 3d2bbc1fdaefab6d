"""Request validation for `llmctl serve`: an OpenAI-style JSON body -> a `Plan`, or an `ApiError`.

Follows OpenAI's API where llmctl can honour it: the same parameter names and ranges, the same
error body (`{"error": {"message", "type", "param", "code"}}`), `max_tokens` bounded by the context
(`context_length_exceeded`). What the server cannot do (logprobs, echo, tools, suffix, penalties)
is refused with 400 rather than silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse

from llmctl.core.tokenizer import Tokenizer
from llmctl.stages._serve_engine import Sampling

if TYPE_CHECKING:
    from llmctl.stages.serve import ServeConfig

MAX_STOPS = 4  # as OpenAI's API
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "tools", "functions", "suffix")


class ApiError(Exception):
    """An error answered as OpenAI's JSON error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


@dataclass(frozen=True)
class Plan:
    """A validated request: the rows to sample and how to answer."""

    kind: str  # "chat" or "text"
    prompts: list[list[int]]  # one per prompt; each is sampled n times
    n: int
    max_tokens: list[int]  # per prompt
    sampling: Sampling
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool


# -- request parsing --------------------------------------------------------------------------------


def _number(
    body: dict, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False
) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ApiError(400, f"'{name}' must be a number, got {json.dumps(v)}", param=name)
    if v < lo or (lo_open and v == lo) or v > hi:
        span = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ApiError(400, f"'{name}' must be in {span}, got {v}", param=name)
    return float(v)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(v)}", param=name)
    if not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be in [{lo}, {hi}], got {v}", param=name)
    return v


def _stops(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or len(v) > MAX_STOPS:
        raise ApiError(
            400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop"
        )
    return tuple(s for s in v if s)


def _messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise ApiError(
                400,
                f"messages[{i}].role must be system, user or assistant, got {json.dumps(role)}",
                param=f"messages[{i}].role",
            )
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text parts are understood
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise ApiError(
                    400,
                    f"messages[{i}].content: only text parts are supported",
                    param=f"messages[{i}].content",
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(
                400, f"messages[{i}].content must be a string", param=f"messages[{i}].content"
            )
        out.append({"role": role, "content": content})
    return out


def _text_prompts(body: dict) -> list[str]:
    p = body.get("prompt")
    p = [p] if isinstance(p, str) else p
    if not isinstance(p, list) or not p or not all(isinstance(s, str) for s in p):
        raise ApiError(
            400, "'prompt' must be a string or a non-empty list of strings", param="prompt"
        )
    return p


def _budget(body: dict, prompt_len: int, context: int, default: int) -> int:
    """The reply's token budget: max_tokens if given (it must fit the context), else the default
    capped by the room the prompt leaves."""
    room = context - prompt_len
    if room < 1:
        raise ApiError(
            400,
            f"the prompt is {prompt_len} tokens and the model's context is {context}; shorten it",
            param="messages" if "messages" in body else "prompt",
            code="context_length_exceeded",
        )
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    asked = _integer(body, name, None, 1, 10**9)
    if asked is None:
        return min(default, room)
    if asked > room:
        raise ApiError(
            400,
            f"'{name}' is {asked}, but the prompt ({prompt_len} tokens) leaves {room} of the model's {context}-token context",
            param=name,
            code="context_length_exceeded",
        )
    return asked


def plan_request(body: Any, kind: str, tok: Tokenizer, context: int, cfg: ServeConfig) -> Plan:
    """Validate a request body and turn it into a Plan.

    Raises:
        ApiError: 400 for anything malformed or out of range.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name in UNSUPPORTED:
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name)
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0:
            raise ApiError(400, f"'{name}' is not supported by this server (send 0)", param=name)
    sampling = Sampling(
        temperature=_number(body, "temperature", cfg.temperature, 0.0, 2.0),
        top_k=int(_integer(body, "top_k", cfg.top_k, 0, 10**9) or 0),
        top_p=_number(body, "top_p", cfg.top_p, 0.0, 1.0, lo_open=True),
    )
    if sampling.temperature == 0:  # greedy ignores top-k/top-p: one key, so greedy rows batch
        sampling = Sampling(temperature=0.0, top_k=0, top_p=1.0)
    n = int(_integer(body, "n", 1, 1, cfg.max_n) or 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    if kind == "chat":
        prompts = [tok.render_chat(_messages(body), add_generation_prompt=True)[0]]
    else:
        texts = _text_prompts(body)
        if len(texts) * n > cfg.max_n:
            raise ApiError(
                400,
                f"{len(texts)} prompts x n={n} is more than {cfg.max_n} choices",
                param="prompt",
            )
        prompts = [tok.encode(t, bos=True) for t in texts]
    budgets = [_budget(body, len(p), context, cfg.max_tokens) for p in prompts]
    return Plan(
        kind, prompts, n, budgets, sampling, _stops(body), stream, bool(opts.get("include_usage"))
    )

"""serve: a checkpoint behind an OpenAI-compatible HTTP API, with a chat page.

Endpoints (Starlette app, run by uvicorn):
    GET  /                     the chat page (llmctl/assets/chat.html: one file, no external resources)
    GET  /health               {"status": "ok", ...}; never needs the API key
    GET  /v1/models            the one served model
    POST /v1/chat/completions  messages rendered with `render_chat` (the template SFT trained on)
    POST /v1/completions       plain text continuation (BOS + prompt)
Both POST endpoints stream server-sent events (`data: {chunk}` lines, then `data: [DONE]`) when
`"stream": true`, with chunks shaped like OpenAI's `chat.completion.chunk` / `text_completion`, and
otherwise answer one JSON object with `usage` token counts and a `finish_reason` of "stop" (end of
turn, EOS or a `stop` string, which is cut from the text) or "length" (max_tokens or the context).

Validation follows OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`: malformed
JSON or out-of-range parameters get 400, a model name other than the served one 404, a missing or
wrong `Authorization: Bearer KEY` (when --api-key is set) 401. Parameters the server cannot honour
(logprobs, echo, tools, suffix, penalties) are refused with 400 rather than silently ignored.

The handlers run on the event loop and never call the model: generation happens on one worker
thread that batches them continuously (_serve_engine.py: the batching policy;
_serve_requests.py: validation).
`create_app` builds the app from a loaded model, so tests drive it without a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmctl.core.checkpoint import load_checkpoint
from llmctl.core.config import require
from llmctl.core.model import Transformer
from llmctl.core.runtime import Runtime
from llmctl.core.tokenizer import Tokenizer
from llmctl.stages._serve_engine import Engine, Outbox, Row
from llmctl.stages._serve_requests import ApiError, Plan, plan_request


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Settings of `llmctl serve`."""

    host: str = "127.0.0.1"  # interface to listen on (0.0.0.0 for every interface)
    port: int = 8000  # TCP port
    api_key: str | None = None  # require `Authorization: Bearer KEY` on /v1/* (None = open)
    model_name: str | None = (
        None  # the model id clients send (default: the checkpoint's folder name)
    )
    max_batch: int = 8  # rows (choices) decoded together at most
    batch_wait_ms: float = 10.0  # how long an idle worker waits for more requests to batch
    # A streamed reply's text goes out at most this often (its first piece and its end at once);
    # 0 = one chunk per token. Each chunk costs a wake-up of the server loop and a socket write,
    # which on a small CPU slow the decode steps they interleave with.
    stream_interval_ms: float = 20.0
    max_n: int = 8  # largest `n` (choices per request) accepted
    max_tokens: int = 256  # reply budget when a request gives no max_tokens (capped by the context)
    temperature: float = 0.8  # default when a request gives none
    top_k: int = 50  # default top_k (requests may send "top_k"; 0 = off)
    top_p: float = 0.95  # default when a request gives none
    device: str = "auto"  # auto, cpu, cuda, mps
    seed: int = 0  # seed of the sampling generator
    log_level: str = "info"  # uvicorn's log level (access lines at info)

    def __post_init__(self) -> None:
        require(1 <= self.port <= 65535, f"--port must be in 1..65535, got {self.port}")
        require(self.max_batch >= 1, f"--max-batch must be >= 1, got {self.max_batch}")
        require(self.batch_wait_ms >= 0, f"--batch-wait-ms must be >= 0, got {self.batch_wait_ms}")
        require(
            self.stream_interval_ms >= 0,
            f"stream_interval_ms must be >= 0, got {self.stream_interval_ms}",
        )
        require(self.max_n >= 1, f"--max-n must be >= 1, got {self.max_n}")
        require(self.max_tokens >= 1, f"--max-tokens must be >= 1, got {self.max_tokens}")
        require(self.api_key is None or self.api_key != "", "--api-key must not be empty")
        require(
            0 <= self.temperature <= 2, f"--temperature must be in [0, 2], got {self.temperature}"
        )
        require(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, f"--top-k must be >= 0, got {self.top_k}")


# -- answering --------------------------------------------------------------------------------------


class Answer:
    """The rows of one request, fed by the engine; read as events or collected."""

    def __init__(self, engine: Engine, plan: Plan) -> None:
        self.plan = plan
        self.queue: asyncio.Queue = asyncio.Queue()
        outbox = Outbox(asyncio.get_running_loop(), self.queue)
        self.rows: list[Row] = []
        for p, budget in zip(plan.prompts, plan.max_tokens, strict=True):
            for _ in range(plan.n):
                row = Row(p, budget, plan.sampling, plan.stops, outbox, index=len(self.rows))
                self.rows.append(row)
        self.prompt_tokens = sum(len(p) for p in plan.prompts) * plan.n
        self.completion_tokens = 0
        for r in self.rows:
            engine.submit(r)

    def cancel(self) -> None:
        for r in self.rows:
            r.cancelled = True

    async def events(self) -> AsyncIterator[tuple[int, str, Any]]:
        """(choice index, "text" | "done", payload) until every row is done.

        Events that piled up while the loop was busy are coalesced (one text piece per choice),
        so a slow client or a busy loop costs fewer, larger chunks rather than a growing backlog.

        Raises:
            ApiError: 500 when the engine reports a failed batch.
        """
        open_rows = len(self.rows)
        while open_rows:
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            texts: dict[int, str] = {}
            dones: list[tuple[int, Any]] = []
            for i, kind, payload in items:
                if kind == "error":
                    raise ApiError(500, payload, kind="server_error")
                if kind == "text":
                    texts[i] = texts.get(i, "") + payload
                else:
                    dones.append((i, payload))
            for i, text in texts.items():
                yield i, "text", text
            for i, payload in dones:
                open_rows -= 1
                self.completion_tokens += payload[1]
                yield i, "done", payload

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _choice(
    kind: str, i: int, text: str, finish: str | None, *, delta: bool, first: bool = False
) -> dict:
    if kind == "text":
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
    if not delta:
        return {
            "index": i,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
        }
    d: dict[str, str] = (
        {"role": "assistant", "content": text}
        if first
        else ({"content": text} if finish is None else {})
    )
    return {"index": i, "delta": d, "logprobs": None, "finish_reason": finish}


class Server:
    """The request handlers around one engine."""

    def __init__(self, engine: Engine, model_id: str, cfg: ServeConfig) -> None:
        self.engine, self.model_id, self.cfg = engine, model_id, cfg
        self.created = int(time.time())

    def _check(self, request: Request) -> None:
        if self.cfg.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key.strip().encode(), self.cfg.api_key.encode()
        ):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                kind="authentication_error",
            )

    async def _body(self, request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    def _model(self, body: Any) -> None:
        name = body.get("model") if isinstance(body, dict) else None
        if name is not None and name != self.model_id:
            raise ApiError(
                404,
                f"model {json.dumps(name)} does not exist; this server serves {json.dumps(self.model_id)}",
                param="model",
                code="model_not_found",
            )

    async def health(self, request: Request) -> Response:
        ok = self.engine.alive
        return JSONResponse(
            {
                "status": "ok" if ok else "down",
                "model": self.model_id,
                "queued": self.engine.queued,
                "running": self.engine.running,
                "batches": self.engine.batches,
            },
            status_code=200 if ok else 503,
        )

    async def models(self, request: Request) -> Response:
        self._check(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "llmctl",
            "context_length": self.engine.context,
        }

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    async def text(self, request: Request) -> Response:
        return await self._complete(request, "text")

    async def _complete(self, request: Request, kind: str) -> Response:
        self._check(request)
        body = await self._body(request)
        self._model(body)
        plan = plan_request(body, kind, self.engine.tok, self.engine.context, self.cfg)
        head = {
            "id": ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24],
            "created": int(time.time()),
            "model": self.model_id,
        }
        answer = Answer(self.engine, plan)
        if plan.stream:
            return StreamingResponse(
                self._sse(answer, head),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            texts, finish = [""] * len(answer.rows), [None] * len(answer.rows)
            async for i, ev, payload in answer.events():
                if ev == "text":
                    texts[i] += payload
                else:
                    finish[i] = payload[0]
        finally:
            answer.cancel()  # no-op when done; frees the rows if the client went away
        obj = "chat.completion" if kind == "chat" else "text_completion"
        choices = [
            _choice(kind, i, t, f, delta=False)
            for i, (t, f) in enumerate(zip(texts, finish, strict=True))
        ]
        return JSONResponse({**head, "object": obj, "choices": choices, "usage": answer.usage()})

    async def _sse(self, answer: Answer, head: dict[str, Any]) -> AsyncIterator[str]:
        kind = answer.plan.kind
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        # Every chunk starts with the same fields: serialise them once, not once per token. The
        # result is what json.dumps({**head, "object": obj, "choices": ..., **extra}) gives.
        start = "data: " + json.dumps({**head, "object": obj}, ensure_ascii=False)[:-1]

        def chunk(choices: list[dict], **extra: Any) -> str:
            rest = json.dumps({"choices": choices, **extra}, ensure_ascii=False)[1:]
            return f"{start}, {rest}\n\n"

        try:
            if kind == "chat":
                yield chunk(
                    [
                        _choice(kind, i, "", None, delta=True, first=True)
                        for i in range(len(answer.rows))
                    ]
                )
            async for i, ev, payload in answer.events():
                if ev == "text":
                    yield chunk([_choice(kind, i, payload, None, delta=True)])
                else:
                    yield chunk([_choice(kind, i, "", payload[0], delta=True)])
            if answer.plan.include_usage:
                yield chunk([], usage=answer.usage())
        except ApiError as e:
            yield "data: " + json.dumps(e.body()) + "\n\n"
        finally:
            answer.cancel()  # the client disconnected (or we are done): stop decoding its rows
        yield "data: [DONE]\n\n"

    async def page(self, request: Request) -> Response:
        return HTMLResponse(chat_page())


def chat_page() -> str:
    """The chat page's HTML (package data)."""
    return (resources.files("llmctl") / "assets" / "chat.html").read_text(encoding="utf-8")


def _api(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as e:
            return e.response()

    return wrapped


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return ApiError(
        status, f"{request.method} {request.url.path}: {detail}", kind="invalid_request_error"
    ).response()


def create_app(
    model: Transformer, tokenizer: Tokenizer, cfg: ServeConfig, *, model_id: str = "llmctl"
) -> Starlette:
    """The ASGI app around a loaded model; its engine's worker thread starts now and stops when the
    app shuts down (lifespan) or when `app.state.engine.close()` is called.

    Args:
        model: The decoder (eval mode), on its device.
        tokenizer: The checkpoint's tokenizer.
        cfg: Server settings.
        model_id: The model name clients use.
    """
    engine = Engine(
        model,
        tokenizer,
        max_batch=cfg.max_batch,
        batch_wait_ms=cfg.batch_wait_ms,
        stream_interval_ms=cfg.stream_interval_ms,
        seed=cfg.seed,
    )
    srv = Server(engine, cfg.model_name or model_id, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        engine.close()

    routes = [
        Route("/", srv.page, methods=["GET"]),
        Route("/health", srv.health, methods=["GET"]),
        Route("/v1/models", _api(srv.models), methods=["GET"]),
        Route("/v1/chat/completions", _api(srv.chat), methods=["POST"]),
        Route("/v1/completions", _api(srv.text), methods=["POST"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error}
    )
    app.state.engine = engine
    app.state.model_id = srv.model_id
    return app


def build_app(ckpt: Path, cfg: ServeConfig) -> Starlette:
    """Load a checkpoint and build the app (model id: --model-name or the checkpoint's folder name).

    Raises:
        InputError: The checkpoint is missing, incomplete or inconsistent.
    """
    rt = Runtime.detect(cfg.device, "fp32")
    c = load_checkpoint(ckpt, device=rt.device, inference=True)
    return create_app(c.model, c.tokenizer, cfg, model_id=Path(ckpt).resolve().name)


def run(
    ckpt: Path, cfg: ServeConfig, *, on_ready: Callable[[str, str], None] | None = None
) -> None:
    """Serve a checkpoint until interrupted (uvicorn, one process).

    Args:
        ckpt: Checkpoint directory.
        cfg: Server settings.
        on_ready: Called with (base URL, model id) once the model is loaded, before listening.
    """
    import uvicorn

    app = build_app(ckpt, cfg)
    if on_ready:
        on_ready(f"http://{cfg.host}:{cfg.port}", app.state.model_id)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)

"""serve: a real uvicorn server on loopback, driven by the `openai` client and raw httpx.

Checks the answers against the generator itself (greedy, so the server's text must equal what
core/sampling produces for the same prompt), the SSE framing and chunk shapes, stop strings,
validation (400 with OpenAI's error body), the API key (401), 8 concurrent requests (all answered,
fewer batches than requests), and that the server stays healthy throughout.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from typer.testing import CliRunner

from llmctl.cli import app as cli_app
from llmctl.core.checkpoint import Checkpoint, load_checkpoint
from llmctl.core.sampling import SamplingConfig, generate
from llmctl.stages._serve_engine import StopScan, TextTail
from llmctl.stages.serve import ServeConfig, create_app

MODEL = "tiny"
KEY = "sk-test-123"


@pytest.fixture(scope="module")
def loaded(base_ckpt: Path) -> Checkpoint:
    return load_checkpoint(base_ckpt)


class Running:
    """A uvicorn server in a thread on a free loopback port."""

    def __init__(self, loaded: Checkpoint, cfg: ServeConfig) -> None:
        self.app = create_app(loaded.model, loaded.tokenizer, cfg, model_id=MODEL)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]})
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def client(self, key: str = "unused", **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


@pytest.fixture(scope="module")
def server(loaded: Checkpoint) -> Iterator[Running]:
    s = Running(loaded, ServeConfig(max_tokens=12, max_batch=8, batch_wait_ms=50))
    yield s
    s.stop()
    assert not s.app.state.engine.alive  # the lifespan shutdown stopped the worker


@pytest.fixture(scope="module")
def keyed(loaded: Checkpoint) -> Iterator[Running]:
    s = Running(loaded, ServeConfig(api_key=KEY, max_tokens=4))
    yield s
    s.stop()


def expected(loaded: Checkpoint, ids: list[int], n: int) -> tuple[str, int]:
    """What greedy decoding gives for `ids` alone: (text up to the first stop token, tokens)."""
    tok = loaded.tokenizer
    out = generate(
        loaded.model,
        [ids],
        SamplingConfig(max_new_tokens=n, temperature=0.0),
        stop_ids=[tok.eos_id, tok.end_id],
        pad_id=tok.pad_id,
    )[0]
    return tok.decode([t for t in out if t not in (tok.eos_id, tok.end_id)]), len(out)


def chat_ids(loaded: Checkpoint, messages: list[dict]) -> list[int]:
    return loaded.tokenizer.render_chat(messages, add_generation_prompt=True)[0]


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]


def test_chat_non_streaming_equals_the_generator(server: Running, loaded: Checkpoint) -> None:
    r = server.client().chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=10, temperature=0
    )
    want, n = expected(loaded, chat_ids(loaded, MSGS), 10)
    assert r.object == "chat.completion"
    assert r.model == MODEL
    assert r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == ("length" if n == 10 and want else "stop")
    assert r.usage.prompt_tokens == len(chat_ids(loaded, MSGS))
    assert r.usage.completion_tokens == n
    assert r.usage.total_tokens == r.usage.prompt_tokens + n


def test_chat_streaming_chunks(server: Running, loaded: Checkpoint) -> None:
    chunks = list(
        server.client().chat.completions.create(
            model=MODEL,
            messages=MSGS,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected(loaded, chat_ids(loaded, MSGS), 10)[0]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")
    assert not any(finishes[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens > 0


def test_sse_framing_on_the_wire(server: Running) -> None:
    body = {"model": MODEL, "prompt": "The list", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ")
        assert json.loads(e[6:])["object"] == "text_completion"


def test_completions_streaming_and_not(server: Running, loaded: Checkpoint) -> None:
    c = server.client()
    prompt = "def main():"
    want, n = expected(loaded, loaded.tokenizer.encode(prompt, bos=True), 8)
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == want
    assert r.usage.completion_tokens == n
    parts = list(
        c.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    )
    assert "".join(p.choices[0].text for p in parts) == want
    assert parts[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("interval_ms", [0.0, 60_000.0])
def test_stream_interval_changes_the_chunks_not_the_text(
    loaded: Checkpoint, interval_ms: float
) -> None:
    """0 ms: one chunk per token. A long interval: the first piece at once, the rest with the end."""
    s = Running(loaded, ServeConfig(max_tokens=12, stream_interval_ms=interval_ms))
    try:
        prompt = "def main():"
        want, n = expected(loaded, loaded.tokenizer.encode(prompt, bos=True), 12)
        parts = list(
            s.client().completions.create(
                model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True
            )
        )
    finally:
        s.stop()
    texts = [p.choices[0].text for p in parts if p.choices[0].text]
    assert "".join(texts) == want
    assert len(want) > 4  # several tokens of text, so the chunk counts below mean something
    if interval_ms:
        assert len(texts) == 2
    else:
        assert len(texts) > 2


def test_length_and_n_choices(server: Running) -> None:
    r = server.client().completions.create(
        model=MODEL, prompt=["a", "bb"], n=2, max_tokens=3, temperature=1.0
    )
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert all(ch.finish_reason in ("stop", "length") for ch in r.choices)
    assert r.usage.completion_tokens <= 4 * 3


def test_stop_string_cuts_the_text(server: Running) -> None:
    c = server.client()
    full = c.completions.create(model=MODEL, prompt="import os", max_tokens=12, temperature=0)
    text = full.choices[0].text
    if len(text.strip()) < 4:
        pytest.skip(f"greedy output too short to place a stop string in: {text!r}")
    stop = text.strip()[2:4]
    r = c.completions.create(
        model=MODEL, prompt="import os", max_tokens=12, temperature=0, stop=[stop, "\x00never"]
    )
    assert r.choices[0].text == text[: text.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(
        model=MODEL, prompt="import os", max_tokens=12, temperature=0, stop=stop, stream=True
    )
    assert "".join(p.choices[0].text for p in streamed) == text[: text.find(stop)]


def test_stop_scan_holds_back_a_possible_stop() -> None:
    s = StopScan(["END", "xy"])
    assert s.scan("abc E", 0) == (4, False)  # "E" may start "END"
    assert s.scan("abc EN", 4) == (4, False)
    assert s.scan("abc ENd", 4) == (7, False)
    assert s.scan("abc END more", 4) == (4, True)
    assert s.scan("ax", 0) == (1, False)
    assert StopScan([]).scan("anything", 0) == (8, False)


def _random_ids(sp: Any, rng: random.Random, n: int) -> list[int]:
    """Ids a model might sample: ordinary pieces (often one that starts with a space, the piece a
    dummy prefix strips), control tokens, and byte-fallback tokens, both whole multi-byte
    characters and stray bytes."""
    control = [i for i in range(sp.get_piece_size()) if sp.is_control(i)]
    spaced = [i for i in range(sp.get_piece_size()) if sp.id_to_piece(i).startswith("\u2581")]
    byte_id = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_byte(i)}
    ids: list[int] = []
    while len(ids) < n:
        roll = rng.random()
        if roll < 0.1:
            ids.append(rng.choice(control))
        elif roll > 0.75:
            ids.append(rng.choice(spaced))
        elif roll < 0.25:
            ch = rng.choice("é漢😀") if roll < 0.2 else "\x80"  # "\x80": a lone byte 0xC2
            ids += [byte_id[f"<0x{b:02X}>"] for b in ch.encode()[: 1 if ch == "\x80" else None]]
        else:
            ids.append(rng.randrange(sp.get_piece_size()))
    return ids


def _dummy_prefix_sp(tmp_path: Path) -> Any:
    """A SentencePiece model that strips a leading space when decoding (add_dummy_prefix), as
    imported Llama tokenizers do (llmctl's own do not)."""
    import sentencepiece as spm

    lines = [f"def f_{i}(x):\n    return x * {i}  # é 漢 tuple list" for i in range(300)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=400,
        byte_fallback=True,
        add_dummy_prefix=True,
        control_symbols=["<|user|>", "<|end|>"],
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))


def test_text_tail_gives_the_text_of_a_whole_decode(loaded: Checkpoint, tmp_path: Path) -> None:
    """Incremental decoding emits exactly what decoding all ids again at every token would: the
    text is the whole decode whenever that does not end in a partial character."""
    other = _dummy_prefix_sp(tmp_path)
    for tok, sp in ((loaded.tokenizer, loaded.tokenizer.sp), (other, other)):
        rng = random.Random(0)
        for _ in range(40):
            ids = _random_ids(sp, rng, 40)
            tail, text = TextTail(tok), ""
            for k, t in enumerate(ids):
                new = tail.push(t)
                whole = tok.decode(ids[: k + 1])
                assert (new is None) == whole.endswith("\ufffd")
                if new is not None:
                    text += new
                    assert text == whole


def test_eight_concurrent_requests_are_batched(server: Running, loaded: Checkpoint) -> None:
    c = server.client()
    engine = server.app.state.engine
    prompts = [f"Question {i}: what is {'a ' * i}tuple?" for i in range(8)]
    before = engine.batches

    def ask(p: str) -> str:
        msgs = [{"role": "user", "content": p}]
        r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
        return r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, prompts))
    assert len(answers) == 8
    for p, a in zip(prompts, answers, strict=True):  # batched rows decode as they would alone
        assert a == expected(loaded, chat_ids(loaded, [{"role": "user", "content": p}]), 6)[0]
    assert engine.batches - before < 8  # some requests shared a batch
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_a_request_arriving_mid_batch_joins_it(server: Running, loaded: Checkpoint) -> None:
    """Continuous batching: a request that arrives while another is decoding starts at once, in
    the same decode run (no new run from idle), and both answer as they would alone."""
    tok, engine = loaded.tokenizer, server.app.state.engine
    ctx = loaded.model.cfg.max_seq_len
    long_prompt = None
    for p in ("def", "import", "class", "The", "return", "x"):
        ids = tok.encode(p, bos=True)
        want_a, n_a = expected(loaded, ids, ctx - len(ids))
        if n_a >= 40:  # a reply long enough that the second request arrives during it
            long_prompt = p
            break
    assert long_prompt is not None
    body = {
        "model": MODEL,
        "prompt": long_prompt,
        "max_tokens": ctx - len(ids),
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(lines)
        assert first.startswith("data: ")  # the long reply is being decoded
        runs = engine.batches
        b = server.client().completions.create(
            model=MODEL, prompt="x = 1", max_tokens=3, temperature=0
        )
        joined = engine.batches == runs
        rest = list(lines)
    assert joined  # the short request did not wait for a run of its own
    assert b.choices[0].text == expected(loaded, tok.encode("x = 1", bos=True), 3)[0]
    events = [json.loads(x[6:]) for x in [first, *rest] if x.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == want_a


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 100}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_bad_parameters_get_400(server: Running, patch: dict, param: str) -> None:
    body = {"model": MODEL, "messages": MSGS, **patch}
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert err["message"]


def test_bad_json_unknown_model_and_routes(server: Running) -> None:
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json=["a list"])
    assert r.status_code == 400
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client().chat.completions.create(model="gpt-9", messages=MSGS)
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client().completions.create(model=MODEL, prompt="word " * 200)
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/v1/completions").status_code == 405
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_models_and_health(server: Running, loaded: Checkpoint) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok"
    assert h["model"] == MODEL


def test_loop_answers_while_a_stream_is_open(server: Running) -> None:
    body = {"model": MODEL, "messages": MSGS, "max_tokens": 12, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    # the client left mid-stream: the server goes on serving
    r = server.client().chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_api_key(keyed: Running) -> None:
    with pytest.raises(openai.AuthenticationError):
        keyed.client("wrong").models.list()
    r = httpx.post(keyed.url + "/v1/chat/completions", json={"model": MODEL, "messages": MSGS})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert [m.id for m in keyed.client(KEY).models.list().data] == [MODEL]
    r = keyed.client(KEY).chat.completions.create(model=MODEL, messages=MSGS)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(keyed.url + "/health").status_code == 200  # health needs no key
    assert httpx.get(keyed.url + "/").status_code == 200  # nor the page (it asks for the key)


def test_chat_page_is_self_contained_and_uses_the_api(server: Running) -> None:
    r = httpx.get(server.url + "/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    html = r.text
    for needle in ("/v1/chat/completions", "getReader", '"stream": true', "[DONE]"):
        assert needle.replace('"stream": true', "stream: true") in html
    for element in ('id="system"', 'id="temperature"', 'id="max-tokens"', 'id="reset"'):
        assert element in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing external
    assert "@import" not in html


def test_cli_serve_help_and_bad_checkpoint(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(cli_app, ["serve", "--help"])
    assert r.exit_code == 0
    assert "Example" in r.stdout
    r = runner.invoke(cli_app, ["serve", str(tmp_path / "missing"), "--port", "1"])
    assert r.exit_code == 2
    assert "error:" in r.stderr
    r = runner.invoke(cli_app, ["serve", str(tmp_path), "--port", "70000"])
    assert r.exit_code == 2
    assert "--port" in r.stderr


def _chromium() -> tuple[str, str] | None:
    """(browser, driver) paths from Debian's chromium + chromium-driver, if installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """The browser and driver; installed with apt where missing (as root, unless
    LLMCTL_NO_BROWSER_INSTALL is set), else the test is skipped."""
    found = _chromium()
    apt = shutil.which("apt-get")
    if (
        found is None
        and apt
        and os.geteuid() == 0
        and not os.environ.get("LLMCTL_NO_BROWSER_INSTALL")
    ):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = [
            apt,
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "chromium",
            "chromium-driver",
        ]
        if subprocess.run(
            install, env=env, capture_output=True, timeout=900, check=False
        ).returncode:
            subprocess.run(
                [apt, "update", "-q"], env=env, capture_output=True, timeout=600, check=False
            )
            subprocess.run(install, env=env, capture_output=True, timeout=900, check=False)
        found = _chromium()
    if found is None:
        pytest.skip("no chromium + chromedriver (apt-get install chromium chromium-driver)")
    return found


@pytest.mark.slow
def test_chat_page_in_a_headless_browser(
    server: Running, loaded: Checkpoint, chromium: tuple[str, str]
) -> None:
    """Type a message into the page, see the streamed answer appear: the greedy reply."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=chromium[1]))
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: MODEL in d.find_element(By.ID, "model").text)
        driver.execute_script(
            "document.getElementById('temperature').value = '0';"
            "document.getElementById('max-tokens').value = '10';"
            "document.getElementById('system').value = arguments[0];",
            MSGS[0]["content"],
        )
        driver.find_element(By.ID, "input").send_keys(MSGS[1]["content"])
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
        replies = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")
        got = driver.execute_script("return arguments[0].textContent;", replies[-1])
        assert got == expected(loaded, chat_ids(loaded, MSGS), 10)[0]
        assert driver.find_elements(By.CSS_SELECTOR, ".msg.user")[0].text.endswith(
            MSGS[1]["content"]
        )
        driver.find_element(By.ID, "reset").click()
        assert driver.find_elements(By.CSS_SELECTOR, ".msg") == []
    finally:
        driver.quit()


@pytest.mark.slow
def test_bench_serve_quick_runs(tmp_path: Path) -> None:
    """benchmarks/bench_serve.py runs end to end (a real `llmctl serve` child) and prints ratios."""
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "serve.json"
    cmd = [sys.executable, str(root / "benchmarks" / "bench_serve.py"), "--quick", "--no-hf"]
    cmd += ["--repeats", "1", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "batching gain" in proc.stdout
    results = json.loads(out.read_text())["results"]
    rows = {r["side"]: r for r in results["rows"]}
    # every concurrent request answered in full
    assert rows["serve_8"]["tokens"] == 8 * results["new_tokens"]


def test_engine_survives_a_failed_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step that raises (out of memory, say) ends its rows with one error event each;
    the worker stays alive, keeps its cache, and answers the next request."""
    import asyncio

    import torch

    from llmctl.core.model import ModelConfig, Transformer
    from llmctl.core.slots import SlotBatch
    from llmctl.stages._serve_engine import Engine, Outbox, Row, Sampling

    class Tok:
        eos_id, end_id, pad_id = 1, 2, 0

        def decode(self, ids: list[int]) -> str:
            return "".join(chr(97 + i % 26) for i in ids if i > 2)

    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    fail = {"on": True}
    real_step = SlotBatch.step

    def step(self: SlotBatch) -> list[int]:
        if fail["on"]:
            raise RuntimeError("out of memory (simulated)")
        return real_step(self)

    monkeypatch.setattr(SlotBatch, "step", step)

    async def events(engine: Engine, rows: int) -> list[list[tuple]]:
        loop, queues = asyncio.get_running_loop(), [asyncio.Queue() for _ in range(rows)]
        for q in queues:
            engine.submit(Row([5, 6, 7], 8, Sampling(0.0, 0, 1.0), (), Outbox(loop, q)))
        out = []
        for q in queues:
            got = [await asyncio.wait_for(q.get(), 10)]
            while got[-1][1] == "text":
                got.append(await asyncio.wait_for(q.get(), 10))
            out.append(got)
        return out

    engine = Engine(model, Tok(), max_batch=2, batch_wait_ms=1)  # type: ignore[arg-type]
    try:
        failed = asyncio.run(events(engine, 2))
        assert [e[-1][1] for e in failed] == ["error", "error"]
        assert all("out of memory" in e[-1][2] for e in failed)
        assert engine.alive
        fail["on"] = False
        ok = asyncio.run(events(engine, 1))[0]
        assert ok[-1][1] == "done"
        assert ok[-1][2][1] == 8  # the whole budget
    finally:
        engine.close()

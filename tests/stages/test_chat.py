"""chat: the session keeps history, answers each line, obeys /reset /save /quit, trims the oldest
turns when the context is full, and is scriptable through piped stdin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core.checkpoint import load_checkpoint
from llmctl.stages.chat import ChatConfig, ChatSession, Event

runner = CliRunner()
GREEDY = {"temperature": 0.0, "max_new_tokens": 8}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loaded(base_ckpt: Path) -> object:
    return load_checkpoint(base_ckpt)


def session(loaded: object, **over: object) -> ChatSession:
    return ChatSession(loaded.model, loaded.tokenizer, ChatConfig(**{**GREEDY, **over}))


def reply(s: ChatSession, line: str) -> tuple[str, list[Event]]:
    """The reply text and the other events of one line."""
    events = list(s.handle(line))
    return "".join(e.text for e in events if e.kind == "text"), [
        e for e in events if e.kind != "text"
    ]


def test_history_grows_and_replies_follow_the_template(loaded: object) -> None:
    s = session(loaded, system="Be brief.")
    first, ev = reply(s, "Hi")
    assert [e.kind for e in ev] == ["end"]
    reply(s, "And then?")
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert s.messages[2]["content"] == first
    # The second prompt is the rendered history: the reply equals a one-shot generation on it.
    fresh = session(loaded, system="Be brief.")
    fresh.messages = s.messages[:3]
    again, _ = reply(fresh, "And then?")
    assert again == s.messages[4]["content"]


def test_reset_clears_history_but_keeps_the_system_message(loaded: object) -> None:
    s = session(loaded, system="sys")
    first, _ = reply(s, "Hello")
    reply(s, "More")
    _, ev = reply(s, "/reset")
    assert ev == [Event("info", "conversation cleared")]
    assert s.messages == [{"role": "system", "content": "sys"}]
    assert reply(s, "Hello")[0] == first  # greedy: same answer as at the start


def test_save_writes_the_messages_as_one_json_line(loaded: object, tmp_path: Path) -> None:
    s = session(loaded, system="sys")
    answer, _ = reply(s, "Hi there")
    _, ev = reply(s, f"/save {tmp_path / 'conv.json'}")
    assert ev[0].kind == "info"
    text = (tmp_path / "conv.json").read_text(encoding="utf-8")
    assert text.count("\n") == 1
    assert json.loads(text) == {
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": answer},
        ]
    }
    assert reply(s, "/save")[1][0].kind == "error"
    assert reply(s, f"/save {tmp_path / 'no' / 'such' / 'dir.json'}")[1][0].kind == "error"


def test_commands_and_ordinary_lines(loaded: object) -> None:
    s = session(loaded)
    assert list(s.handle("/quit")) == [Event("quit")]
    assert list(s.handle("/exit")) == [Event("quit")]
    assert list(s.handle("   ")) == []
    assert reply(s, "/help")[1][0].kind == "info"
    _, ev = reply(s, "/usr/bin is a path?")  # not a command: an ordinary message
    assert ev[-1].kind == "end"
    assert s.messages[0] == {"role": "user", "content": "/usr/bin is a path?"}


def test_full_context_drops_the_oldest_turns_with_a_notice(loaded: object) -> None:
    s = session(loaded, system="sys")  # 8 tokens kept for the reply
    line = "Tell me about lists and tuples. " * (s.context // 40)  # ~ a quarter of the context
    warned = []
    for _ in range(6):
        _, ev = reply(s, line)
        warned += [e.text for e in ev if e.kind == "warn"]
        prompt = s.tok.render_chat(s.messages[:-1], add_generation_prompt=True)[0]
        assert len(prompt) <= s.context - s.reply_room
    assert warned
    assert "dropped the oldest" in warned[0]
    assert s.messages[0] == {"role": "system", "content": "sys"}
    assert s.messages[1]["role"] == "user"


def test_a_message_longer_than_the_context_is_refused(loaded: object) -> None:
    s = session(loaded)
    reply(s, "Hi")
    before = list(s.messages)
    _, ev = reply(s, "word " * s.context)
    assert [e.kind for e in ev] == ["error"]
    assert "too long" in ev[0].text
    assert s.messages == before


def test_an_interrupted_reply_stays_in_the_history(loaded: object) -> None:
    s = session(loaded)
    events = s.handle("Hi")
    first = next(e for e in events if e.kind == "text")
    events.close()  # what Ctrl-C does to the generator
    assert s.messages[-1] == {"role": "assistant", "content": first.text}


def test_piped_stdin_answers_each_line(base_ckpt: Path, loaded: object, tmp_path: Path) -> None:
    lines = [
        "Hi",
        "",
        "What is a list?",
        "/reset",
        "Hi",
        f"/save {tmp_path / 'c.json'}",
        "/quit",
        "x",
    ]
    r = runner.invoke(
        app,
        ["chat", str(base_ckpt), "--temperature", "0", "--max-new-tokens", "8", "--system", "S"],
        input="\n".join(lines) + "\n",
    )
    assert r.exit_code == 0, r.output
    s = session(loaded, system="S")
    a, b = reply(s, "Hi")[0], reply(s, "What is a list?")[0]
    assert r.stdout == f"{a}\n{b}\n{a}\n"  # one reply per message; /quit stops before "x"
    assert "conversation cleared" in r.stderr
    saved = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["messages"]
    assert [m["content"] for m in saved] == ["S", "Hi", a]


def test_chat_cli_reports_a_bad_checkpoint(tmp_path: Path) -> None:
    r = runner.invoke(app, ["chat", str(tmp_path / "missing")], input="Hi\n")
    assert r.exit_code == 2
    assert "does not exist" in r.stderr


def test_bad_sampling_flag_is_a_usage_error(base_ckpt: Path) -> None:
    r = runner.invoke(app, ["chat", str(base_ckpt), "--top-p", "0"], input="Hi\n")
    assert r.exit_code == 2
    assert "--top-p" in r.stderr


def test_load_resumes_a_saved_conversation(loaded: object, tmp_path: Path) -> None:
    s = session(loaded, system="sys")
    reply(s, "Hi there")
    reply(s, f"/save {tmp_path / 'conv.json'}")
    expected = reply(s, "And then?")[0]
    resumed = session(loaded)  # no --system: the file's system message is kept
    _, ev = reply(resumed, f"/load {tmp_path / 'conv.json'}")
    assert ev == [Event("info", f"loaded 3 messages from {tmp_path / 'conv.json'}")]
    assert reply(resumed, "And then?")[0] == expected  # greedy: as if never interrupted
    assert resumed.messages == s.messages
    other = session(loaded, system="new")  # --system replaces the saved one
    other.load(tmp_path / "conv.json")
    assert other.messages[0] == {"role": "system", "content": "new"}
    assert other.messages[1:] == s.messages[1:3]
    reply(other, "/reset")  # the session's own system message stays
    assert other.messages == [{"role": "system", "content": "new"}]


BAD_FILES = {
    "missing": (None, "does not exist"),
    "not_json": ("{'messages': []}\n", "is not JSON"),
    "no_messages": ('{"turns": []}\n', 'expected {"messages": [...]}'),
    "a_list": ('[{"role": "user", "content": "x"}]\n', 'expected {"messages": [...]}'),
    "bad_role": ('{"messages": [{"role": "bot", "content": "x"}]}\n', "message 0 is not"),
    "no_content": ('{"messages": [{"role": "user"}]}\n', "message 0 is not"),
    "late_system": (
        '{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]}',
        "message 1 is a system message",
    ),
}


def bad_file(tmp_path: Path, name: str) -> tuple[Path, str]:
    """Write BAD_FILES[name] (nothing for "missing"); (its path, the expected error text)."""
    text, message = BAD_FILES[name]
    path = tmp_path / f"{name}.json"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    return path, message


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_load_refuses_a_bad_file_and_keeps_the_history(
    loaded: object, tmp_path: Path, name: str
) -> None:
    path, message = bad_file(tmp_path, name)
    s = session(loaded, system="sys")
    reply(s, "Hi")
    before = list(s.messages)
    _, ev = reply(s, f"/load {path}")
    assert [e.kind for e in ev] == ["error"]
    assert message in ev[0].text
    assert str(path) in ev[0].text
    assert s.messages == before
    assert reply(s, "/load")[1] == [Event("error", "usage: /load FILE")]


def test_chat_cli_load_resumes_from_piped_stdin(
    base_ckpt: Path, loaded: object, tmp_path: Path
) -> None:
    s = session(loaded, system="S")
    reply(s, "Hi")
    s.save(tmp_path / "c.json")
    expected = reply(s, "What is a list?")[0]
    r = runner.invoke(
        app,
        ["chat", str(base_ckpt), "--temperature", "0", "--max-new-tokens", "8"]
        + ["--load", str(tmp_path / "c.json")],
        input=f"What is a list?\n/save {tmp_path / 'd.json'}\n",
    )
    assert r.exit_code == 0, r.output
    assert r.stdout == f"{expected}\n"
    saved = json.loads((tmp_path / "d.json").read_text(encoding="utf-8"))["messages"]
    assert saved == s.messages


@pytest.mark.parametrize("name", ["missing", "not_json", "bad_role"])
def test_chat_cli_load_bad_file_is_one_error_line(
    base_ckpt: Path, tmp_path: Path, name: str
) -> None:
    path, message = bad_file(tmp_path, name)
    r = runner.invoke(app, ["chat", str(base_ckpt), "--load", str(path)], input="Hi\n")
    assert r.exit_code == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error:")
    assert message in lines[0]

"""core/code_exec.py: the confined runner. Wrong code fails, endless code times out, and code that
writes outside its directory, deletes files, opens sockets or starts processes fails without
touching anything. All programs run in one batch (2 at a time) to keep the module near 3 s."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmctl.core.code_exec import Limits, Outcome, run_many, run_one

LIMITS = Limits(timeout_s=3.0, cpu_s=1, memory_mb=512, file_mb=1)  # generous: shared CPUs


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file outside every child's directory, which no program may change or remove."""
    p = tmp_path_factory.mktemp("outside") / "keep.txt"
    p.write_text("original")
    return p


@pytest.fixture(scope="module")
def outcomes(victim: Path) -> dict[str, Outcome]:
    out = victim.parent
    programs = {
        "ok": "from typing import List\nimport math, re, collections\nassert sum([1, 2]) == 3",
        "wrong": "def f(x):\n    return x + 1\nassert f(1) == 3",
        "exit_early": "import sys\nsys.exit(0)\nassert False",
        "spin": "while True:\n    pass",
        "sleep": "import time\ntime.sleep(60)",
        "write_outside": f"open({str(out / 'new.txt')!r}, 'w').write('x')",
        "overwrite": f"open({str(victim)!r}, 'w').write('changed')",
        "os_open": f"import os\nos.open({str(out / 'new2.txt')!r}, os.O_CREAT | os.O_WRONLY)",
        "remove": f"import os\nos.remove({str(victim)!r})",
        "rename": f"import os\nos.rename({str(victim)!r}, 'mine.txt')",
        "write_inside": "import tempfile\nopen('a.txt', 'w').write('x')\n"
        "tempfile.NamedTemporaryFile().write(b'y')",
        "socket": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)",
        "connect": "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9/')",
        "subprocess": "import subprocess\nsubprocess.run(['true'])",
        "fork": "import os\nos.fork()",
        "memory": "x = bytearray(2 * 1024**3)",
        "big_file": "open('big', 'wb').write(b'x' * (8 * 2**20))",
        "read_secret": "open('/etc/hostname').read()",
        "dir_fd_write": "import os, sys\nfd = os.open(sys.base_prefix, os.O_RDONLY)\n"
        "os.close(os.open('llmctl-exec-test', os.O_CREAT | os.O_WRONLY, dir_fd=fd))",
        "dir_fd_mkdir": "import os, sys\nfd = os.open(sys.base_prefix, os.O_RDONLY)\n"
        "os.mkdir('llmctl-exec-test', dir_fd=fd)",
    }
    res = run_many(list(programs.values()), LIMITS, workers=2)
    return dict(zip(programs, res, strict=True))


def test_correct_code_passes(outcomes: dict[str, Outcome]) -> None:
    assert outcomes["ok"].status == "passed"
    assert outcomes["write_inside"].status == "passed"  # its own directory is writable


def test_wrong_code_fails_with_the_exception(outcomes: dict[str, Outcome]) -> None:
    assert outcomes["wrong"].status == "failed"
    assert "AssertionError" in outcomes["wrong"].detail


def test_exiting_before_the_tests_does_not_pass(outcomes: dict[str, Outcome]) -> None:
    o = outcomes["exit_early"]
    assert o.returncode == 0
    assert o.status == "failed"


def test_endless_code_times_out(outcomes: dict[str, Outcome]) -> None:
    assert outcomes["spin"].status == "timeout"  # RLIMIT_CPU
    assert outcomes["sleep"].status == "timeout"  # wall clock, process group killed
    assert outcomes["sleep"].seconds < LIMITS.timeout_s + 1.5


@pytest.mark.parametrize(
    "name",
    ["write_outside", "overwrite", "os_open", "remove", "rename", "socket", "connect"]
    + ["subprocess", "fork", "memory", "big_file", "read_secret", "dir_fd_write", "dir_fd_mkdir"],
)
def test_harmful_code_fails(outcomes: dict[str, Outcome], name: str) -> None:
    assert outcomes[name].status == "failed", outcomes[name]


def test_nothing_outside_was_touched(outcomes: dict[str, Outcome], victim: Path) -> None:
    import sys

    assert victim.read_text() == "original"
    assert sorted(p.name for p in victim.parent.iterdir()) == ["keep.txt"]
    assert not (Path(sys.base_prefix) / "llmctl-exec-test").exists()


def test_the_scratch_directory_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    o = run_one("open('left.txt', 'w').write('x')", LIMITS)
    assert o.passed
    assert list(tmp_path.iterdir()) == []

"""The command line: help texts, exit codes, one-line errors, config layering, and an end-to-end run
of corpus | tokenize -> pretrain -> generate -> inspect through the installed `llmctl` script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli import app

runner = CliRunner()
STAGES = [
    *("corpus", "crawl-filter", "dedup", "tokenize", "pretrain", "sft", "rm", "dpo", "ppo"),
    *("eval", "generate", "chat", "serve", "export", "import-hf", "inspect", "report", "reproduce"),
]
TINY = [
    "--model",
    "tiny",
    "--d-model",
    "32",
    "--n-layers",
    "2",
    "--n-heads",
    "4",
    "--n-kv-heads",
    "2",
    "--d-ff",
    "64",
    "--seq-len",
    "32",
    "--batch-tokens",
    "256",
    "--micro-batch",
    "8",
    "--precision",
    "fp32",
    "--device",
    "cpu",
]


def llmctl_bin() -> str:
    exe = Path(sys.executable).parent / "llmctl"
    assert exe.exists(), "the package must be installed (make test does pip install -e .)"
    return str(exe)


def test_top_level_help_lists_every_stage() -> None:
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for name in [*STAGES, "lm-eval"]:
        assert name in r.stdout


@pytest.mark.parametrize("name", STAGES)
def test_each_command_help_has_an_example(name: str) -> None:
    r = runner.invoke(app, [name, "--help"])
    assert r.exit_code == 0, r.output
    assert "Example" in r.stdout


def test_version() -> None:
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0
    assert r.stdout.startswith("llmctl ")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """corpus -o - | tokenize - ; then pretrain, through the installed console script."""
    root = tmp_path_factory.mktemp("e2e")
    exe = llmctl_bin()
    cmd = (
        f"{exe} corpus -o - --max-docs 60 | {exe} -q tokenize - -o {root / 'tokens'} --vocab-size 400 "
        f"--val-fraction 0.1 --workers 2"
    )
    subprocess.run(cmd, shell=True, check=True, cwd=root)
    subprocess.run(
        [
            exe,
            "-q",
            "pretrain",
            str(root / "tokens"),
            "-o",
            str(root / "base"),
            "--max-steps",
            "3",
            *TINY,
        ],
        check=True,
        cwd=root,
    )
    return root


@pytest.mark.slow  # three subprocesses, each importing torch
def test_end_to_end_through_console_script(pipeline: Path) -> None:
    m = json.loads((pipeline / "tokens" / "manifest.json").read_text())
    assert m["counts"]["documents"] == 60
    assert m["inputs"][0]["path"] == "-"
    r = subprocess.run(
        [
            llmctl_bin(),
            "generate",
            str(pipeline / "base"),
            "import ",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.startswith("import ")
    assert len(r.stdout) > len("import \n")
    r = subprocess.run(
        [llmctl_bin(), "inspect", str(pipeline / "tokens"), "--head", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "row 0" in r.stdout
    assert "tokens:" in r.stdout


def _check_clean_failure(r, code: int, message: str, *leftovers: Path) -> None:  # noqa: ANN001
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("error: "), r.stderr
    assert message in lines[0]
    assert all(ln.startswith(("error: ", "hint: ")) for ln in lines)
    for p in leftovers:
        assert not p.exists(), p
        assert not p.with_name(p.name + ".partial").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "contains no documents"),
        (b'{"body": "hello"}\n', "has no column 'text' (found: body)"),
        (b'{"text": "\xff\xfe bad"}\n', "is not valid UTF-8"),
    ],
)
def test_bad_docs_input(tmp_path: Path, content: bytes, message: str) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    r = runner.invoke(app, ["tokenize", str(src), "-o", str(tmp_path / "t"), "--vocab-size", "400"])
    _check_clean_failure(r, 2, message, tmp_path / "t")


def test_missing_input(tmp_path: Path) -> None:
    r = runner.invoke(app, ["tokenize", str(tmp_path / "nope"), "-o", str(tmp_path / "t")])
    _check_clean_failure(r, 2, "does not exist", tmp_path / "t")


def test_bad_flag_value(tmp_path: Path) -> None:
    r = runner.invoke(
        app, ["tokenize", str(tmp_path), "-o", str(tmp_path / "t"), "--vocab-size", "10"]
    )
    _check_clean_failure(r, 2, "--vocab-size must be >= 300", tmp_path / "t")


@pytest.mark.slow  # uses the pipeline fixture
def test_truncated_checkpoint(tmp_path: Path, pipeline: Path) -> None:
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(pipeline / "base", ck)
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    r = runner.invoke(app, ["generate", str(ck), "x", "--max-new-tokens", "2"])
    _check_clean_failure(r, 2, "corrupt or truncated")


def test_foreign_checkpoint(tmp_path: Path) -> None:
    ck = tmp_path / "hf"
    ck.mkdir()
    (ck / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64})
    )
    (ck / "model.safetensors").write_bytes(b"\0" * 16)
    (ck / "tokenizer.model").write_bytes(b"\0")
    r = runner.invoke(app, ["generate", str(ck), "x"])
    _check_clean_failure(r, 2, "is not an llmctl model config")


def test_checkpoint_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["generate", str(tmp_path / "empty"), "x"])
    _check_clean_failure(r, 2, "missing model.safetensors, config.json, tokenizer.model")


def test_config_file_then_flags_then_global_seed(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text("seed = 3\n[corpus]\nmax_docs = 7\nkinds = ['topics']\n")
    r = runner.invoke(
        app,
        [
            "--seed",
            "5",
            "corpus",
            "-o",
            str(tmp_path / "d"),
            "--config",
            str(cfg),
            "--max-docs",
            "4",
        ],
    )
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["config"] == {
        "source": "stdlib",
        "format": "docs",
        "kinds": ["topics"],
        "max_docs": 4,
        "seed": 5,
    }
    assert m["counts"]["documents"] == 4
    # The existing output is refused without --force, kept intact, and replaced with it.
    r = runner.invoke(app, ["corpus", "-o", str(tmp_path / "d"), "--max-docs", "2"])
    _check_clean_failure(r, 2, "already exists")
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["counts"]["documents"] == 4
    r = runner.invoke(app, ["corpus", "-o", str(tmp_path / "d"), "--max-docs", "2", "--force"])
    assert r.exit_code == 0
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["counts"]["documents"] == 2


def test_unknown_config_key(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text("[corpus]\nmax_dogs = 7\n")
    r = runner.invoke(app, ["corpus", "-o", str(tmp_path / "d"), "--config", str(cfg)])
    _check_clean_failure(r, 2, "unknown key(s) in [corpus]: max_dogs", tmp_path / "d")

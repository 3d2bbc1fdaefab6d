"""llmctl reproduce: the command printed from a manifest re-makes the artifact with the same content
fingerprint; the generated TOML resolves to the recorded config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core.artifacts import Manifest
from llmctl.core.config import build_config, load_toml, to_dict
from llmctl.core.errors import InputError
from llmctl.stages import corpus, dedup, reproduce
from llmctl.stages.crawl_filter import CrawlFilterConfig
from llmctl.stages.tokenize import TokenizeConfig


def test_corpus_reproduced_from_its_manifest_has_the_same_fingerprint(tmp_path: Path) -> None:
    src = tmp_path / "docs"
    m = corpus.run(src, corpus.CorpusConfig(max_docs=20))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmctl",
            "--quiet",
            "reproduce",
            str(src / "manifest.json"),
            "--run",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("llmctl corpus -o ")
    again = Manifest.read(tmp_path / "docs.reproduced")
    assert again.fingerprint == m.fingerprint
    assert again.config == m.config
    assert (tmp_path / "docs.reproduce.toml").is_file()
    assert not (src / "docs.reproduce.toml").exists()  # the artifact itself is untouched


def test_dedup_reproduced_in_process(tmp_path: Path, docs_dir: Path) -> None:
    m = dedup.run(docs_dir, tmp_path / "d", dedup.DedupConfig(threshold=0.7))
    recipe = reproduce.plan(tmp_path / "d", tmp_path / "twin")
    assert recipe.argv[:2] == ["dedup", str(docs_dir.resolve())]
    assert recipe.warnings == []
    reproduce.write_config(recipe)
    r = CliRunner().invoke(app, ["--quiet", *recipe.argv])  # in-process: no interpreter start-up
    assert r.exit_code == 0, r.output
    assert Manifest.read(tmp_path / "twin").fingerprint == m.fingerprint


def test_tokenize_reproduced(tokens_dir: Path, tmp_path: Path) -> None:
    recipe = reproduce.plan(tokens_dir, tmp_path / "again")
    assert recipe.argv[0] == "tokenize"
    assert recipe.argv[-4:-2] == ["-o", str(tmp_path / "again")]
    cfg = build_config(TokenizeConfig, load_toml(reproduce.write_config(recipe)), "tokenize")
    assert to_dict(cfg) == recipe.manifest.config
    # Tokenizer training and encoding are deterministic: the same bytes come out.
    r = CliRunner().invoke(app, ["--quiet", *recipe.argv])
    assert r.exit_code == 0, r.output
    assert Manifest.read(tmp_path / "again").fingerprint == recipe.manifest.fingerprint


def test_changed_input_and_relative_paths_are_reported(tmp_path: Path, docs_dir: Path) -> None:
    m = Manifest(
        kind="checkpoint",
        stage="sft",
        config={"data": "chat", "init": "base", "lr": 1e-3},
        inputs=[
            {"path": str(docs_dir), "kind": "docs", "fingerprint": "0" * 64},
            {"path": str(tmp_path / "gone"), "kind": "checkpoint", "fingerprint": "1" * 64},
        ],
    )
    (tmp_path / "sft").mkdir()
    m.write(tmp_path / "sft")
    recipe = reproduce.plan(tmp_path / "sft")
    assert any("changed since" in w for w in recipe.warnings)
    assert any("no longer exists" in w for w in recipe.warnings)
    assert recipe.argv[:2] == ["sft", "chat"]  # "chat" is not an input's name: kept as typed


def _loads(text: str, tmp: Path) -> dict:
    (tmp / "c.toml").write_text(text)
    return load_toml(tmp / "c.toml")


def test_toml_round_trip_with_nested_tables(tmp_path: Path) -> None:
    cfg = to_dict(CrawlFilterConfig())
    text = reproduce.to_toml({"crawl-filter": cfg})
    back = build_config(CrawlFilterConfig, _loads(text, tmp_path), "crawl-filter")
    assert to_dict(back) == cfg
    text = reproduce.to_toml({"s": {"a": None, "b": [[1, 0.5]], "c": 'q"'}})
    assert _loads(text, tmp_path) == {"s": {"b": [[1, 0.5]], "c": 'q"'}}


def test_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="neither an artifact"):
        reproduce.plan(tmp_path)


def test_run_exits_1_when_the_fingerprint_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus.run(tmp_path / "docs", corpus.CorpusConfig(max_docs=5))
    differs = Manifest(kind="docs", stage="corpus", fingerprint="f" * 64)
    monkeypatch.setattr(reproduce, "run", lambda recipe, force=False: differs)
    r = CliRunner().invoke(app, ["reproduce", str(tmp_path / "docs"), "--run"])
    assert r.exit_code == 1
    assert "differs from the original" in r.output
    assert r.output.startswith("llmctl corpus -o ")  # the command is printed first

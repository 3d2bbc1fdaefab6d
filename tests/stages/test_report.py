"""llmctl report: renders every section for a small run directory built from real artifacts (docs,
dedup, tokens, a pretrained checkpoint) plus hand-written manifests for the stages too slow to run
here (crawl-filter, ppo, eval); lists missing stages as "not run"; never crashes on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core.artifacts import Manifest
from llmctl.core.errors import InputError
from llmctl.stages import dedup, report

SECTIONS = (
    "# Run report",
    "## Data funnel",
    "## Tokenizer",
    "## Training",
    "## Evaluation",
    "## Samples before and after alignment",
    "## Time per stage",
    "## Environment",
)


def _fake(path: Path, metrics: list[dict] | None = None, **fields: object) -> Path:
    path.mkdir(parents=True)
    Manifest(**fields).write(path)  # type: ignore[arg-type]
    if metrics is not None:
        lines = [json.dumps(r) for r in metrics] + ["{truncated"]  # a crash mid-write
        (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def run_dir(
    tmp_path_factory: pytest.TempPathFactory, docs_dir: Path, tokens_dir: Path, base_ckpt: Path
) -> Path:
    run = tmp_path_factory.mktemp("run")
    for name, src in (("docs", docs_dir), ("tokens", tokens_dir), ("base", base_ckpt)):
        (run / name).symlink_to(src, target_is_directory=True)
    dedup.run(docs_dir, run / "docs-dedup", dedup.DedupConfig())
    removed = {"lang": {"docs": 7, "bytes": 900, "rules": {"lang": 4, "min_lang_score": 3}}}
    _fake(
        run / "web",
        kind="docs",
        stage="crawl-filter",
        counts={"documents": 20, "kept": 13, "rejected": 7, "bytes_in": 5000, "bytes_kept": 3000},
        stats={"removed": removed},
        wall_time_s=1.5,
    )
    ppo = [
        {"step": s, "score": 0.1 * s, "kl": 0.01 * s, "entropy": 4.0, "grad_norm": 1.0}
        for s in (1, 2, 3)
    ]
    _fake(
        run / "ppo",
        ppo,
        kind="checkpoint",
        stage="ppo",
        counts={"steps": 3},
        stats={"score_last": 0.3, "runtime": {"device": "cpu"}},
        wall_time_s=9.0,
    )
    _fake(
        run / "eval" / "ppl",
        kind="eval",
        stage="eval-ppl",
        inputs=[{"path": str(base_ckpt), "kind": "checkpoint", "fingerprint": "x"}],
        stats={"nll": 5.5, "ppl": 244.7, "bits_per_byte": 2.5},
    )
    _fake(
        run / "eval" / "tasks",
        kind="eval",
        stage="eval",
        stats={
            "metrics": {"llmctl_stdlib_mc": {"acc": 0.41}},
            "skipped": ["hellaswag: not cached"],
        },
    )
    (run / "sample.txt").write_text("def hello():\n    return 1\n")
    (run / "base.partial").mkdir()  # a crashed stage: listed, not read
    return run


def test_report_has_every_section(run_dir: Path, tmp_path: Path) -> None:
    cfg = report.ReportConfig(samples=True, max_new_tokens=4, prompts=("def ",))
    path = report.run(run_dir, tmp_path / "R.md", cfg)
    text = path.read_text()
    for heading in SECTIONS:
        assert heading in text, heading
    # Stages are recognised by manifest, whatever their folder is called.
    for name in ("docs-dedup", "tokens", "base", "web", "ppo", "eval/ppl", "eval/tasks"):
        assert f"| {name} |" in text, name
    assert "| lang | 7 | 900 | lang 4, min_lang_score 3 |" in text  # why documents went
    assert "### Duplicates: docs-dedup" in text
    funnel = text[text.index("## Data funnel") : text.index("## Tokenizer")]
    assert funnel.count("| docs | corpus") == 1  # read by dedup and tokenize, listed once
    assert funnel.index("| docs |") < funnel.index("| docs-dedup |")  # source first
    assert "_sft: not run._" in text
    assert "_rm: not run._" in text
    assert "Not run: sft, rm." in text
    assert "Incomplete (still running, or crashed" in text
    assert "base.partial" in text
    assert "| llmctl_stdlib_mc | acc | 0.41 |" in text
    assert "| ppl | 244.7 |" in text
    assert "hellaswag: not cached" in text
    assert "### sample.txt" in text
    assert "return 1" in text
    assert "**base** (pretrain, base model, before alignment)" in text  # generated with --samples
    assert "| cpu cores |" in text
    assert "| torch |" in text
    figs = {p.name for p in (tmp_path / "R_files").iterdir()}
    assert {"funnel.png", "base.png", "ppo.png", "time.png"} <= figs
    for fig in figs:
        assert f"(R_files/{fig})" in text
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written is left


def test_report_of_an_empty_dir_lists_everything_as_not_run(tmp_path: Path) -> None:
    text = report.run(tmp_path).read_text()  # default: RUN_DIR/REPORT.md
    for heading in SECTIONS:
        assert heading in text
    assert "Not run: crawl-filter, dedup, tokenize, pretrain, sft, rm, ppo, eval." in text
    assert text.count("not run._") >= 8


def test_report_cli(tmp_path: Path) -> None:
    _fake(tmp_path / "run" / "d", kind="docs", stage="dedup", counts={"kept": 3}, wall_time_s=1.0)
    out = tmp_path / "x.md"
    r = CliRunner().invoke(app, ["--quiet", "report", str(tmp_path / "run"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file()
    assert (tmp_path / "x_files" / "time.png").is_file()
    # Written again over itself: the old figures folder is replaced, not nested.
    assert (
        CliRunner()
        .invoke(app, ["--quiet", "report", str(tmp_path / "run"), "-o", str(out)])
        .exit_code
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "x_files").iterdir()) == ["funnel.png", "time.png"]
    r = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert r.exit_code == 2
    assert "is not a directory" in r.output


def test_report_rejects_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(InputError, match="not a directory"):
        report.run(tmp_path / "f")

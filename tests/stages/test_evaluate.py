"""stages/evaluate.py and `llmctl eval`: perplexity on tokens and text, lm-eval tasks end to end
offline, and the one-line errors (unknown task, missing tokenizer, tokenizer mismatch)."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core.artifacts import Manifest
from llmctl.core.tokenizer import Tokenizer, train_tokenizer
from llmctl.eval_tasks import TASKS_DIR
from llmctl.stages import evaluate

pytest.importorskip("lm_eval")
runner = CliRunner()
CPU = {"device": "cpu", "precision": "fp32"}


def test_ppl_on_the_val_split_of_a_tokens_artifact(
    base_ckpt: Path, tokens_dir: Path, tmp_path: Path
) -> None:
    m = evaluate.perplexity(
        base_ckpt,
        tokens_dir,
        tmp_path / "ppl",
        evaluate.PerplexityConfig(stride=32, max_docs=4, **CPU),
    )
    res = json.loads((tmp_path / "ppl" / "results.json").read_text())
    assert Manifest.read(tmp_path / "ppl").kind == "eval"
    p = res["perplexity"]
    assert p["perplexity"] == pytest.approx(math.exp(p["nll_per_token"]))
    assert p["bits_per_byte"] == pytest.approx(
        res["tokens"] * p["nll_per_token"] / math.log(2) / res["bytes"]
    )
    assert 1 < p["perplexity"] < 512  # trained a little: better than uniform over 512 ids
    assert m.counts["documents"] == 4


def test_ppl_refuses_tokens_from_another_tokenizer(
    base_ckpt: Path, tokens_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "tokens"
    shutil.copytree(tokens_dir, other)
    lines = (Path(textwrap.__file__).read_text(encoding="utf-8")).splitlines()
    Tokenizer.from_bytes(train_tokenizer([x for x in lines if x.strip()], 400)).save(other)
    r = runner.invoke(app, ["eval", "ppl", str(base_ckpt), str(other), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "was built with tokenizer" in r.stderr
    assert "llmctl tokenize" in r.stderr
    assert not (tmp_path / "o").exists()


def test_checkpoint_without_its_tokenizer_is_a_clear_error(base_ckpt: Path, tmp_path: Path) -> None:
    broken = tmp_path / "ckpt"
    shutil.copytree(base_ckpt, broken)
    (broken / "tokenizer.model").unlink()
    for args in (
        ["eval", "ppl", str(broken), str(TASKS_DIR / "stdlib_text.jsonl")],
        ["eval", str(broken)],
    ):
        r = runner.invoke(app, [*args, "-o", str(tmp_path / "o")])
        assert r.exit_code == 2, r.output
        assert "missing tokenizer.model" in r.stderr
        assert "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_local_multiple_choice_task_end_to_end_offline(base_ckpt: Path, tmp_path: Path) -> None:
    """simple_evaluate over the shipped stdlib_module task; acc recomputed from the adapter."""
    from llmctl.core.lm_eval_adapter import LlmctlLM

    cfg = evaluate.TasksConfig(tasks=("stdlib_module",), limit=6, bootstrap_iters=0, **CPU)
    m = evaluate.run_tasks(base_ckpt, tmp_path / "ev", cfg)
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    acc = res["results"]["stdlib_module"]["acc,none"]
    assert m.stats["metrics"]["stdlib_module"]["acc,none"] == acc
    assert m.stats["skipped"] == []
    rows = [json.loads(x) for x in (TASKS_DIR / "stdlib_module.jsonl").read_text().splitlines()[:6]]
    lm = LlmctlLM(str(base_ckpt), **CPU)
    hits = 0
    for row in rows:
        q = f"Question: Which Python standard library module defines the {row['kind']} `{row['name']}`?\nAnswer:"
        lls = [
            lp
            for lp, _ in lm.loglikelihood(
                [SimpleNamespace(args=(q, " " + c)) for c in row["choices"]]
            )
        ]
        hits += max(range(len(lls)), key=lls.__getitem__) == row["label"]
    assert acc == pytest.approx(hits / len(rows))


def test_unknown_task_is_a_one_line_usage_error(base_ckpt: Path, tmp_path: Path) -> None:
    r = runner.invoke(
        app, ["eval", str(base_ckpt), "--tasks", "stdlib_modul", "-o", str(tmp_path / "o")]
    )
    assert r.exit_code == 2, r.output
    assert "unknown lm-eval task: stdlib_modul" in r.stderr
    assert "did you mean stdlib_module" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # ~6 s: parses the whole stdlib
def test_shipped_tasks_are_rebuilt_byte_identical(tmp_path: Path) -> None:
    from llmctl.eval_tasks import build

    counts = build.build(tmp_path, rows=200, seed=0)
    assert counts == {"stdlib_module": 200, "stdlib_docstring": 200, "stdlib_text": 200}
    for name in counts:
        shipped = (TASKS_DIR / f"{name}.jsonl").read_bytes()
        assert (tmp_path / f"{name}.jsonl").read_bytes() == shipped, name

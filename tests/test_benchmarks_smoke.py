"""Smoke test of benchmarks/: each script runs in its quick mode (trimmed further) in a subprocess,
exits 0, prints a ratio and writes its JSON. No timing is asserted: these are measurements."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Extra flags on top of --quick that keep the whole file well under a minute.
CASES = {
    "bench_train.py": ["--repeats", "1", "--bf16-repeats", "1"],
    "bench_generate.py": ["--repeats", "1", "--new-tokens", "8"],
    "bench_tokenizer.py": ["--max-docs", "40", "--repeats", "1"],
    "bench_tokenize_memory.py": ["--max-docs", "40"],
    "bench_gpu_mfu.py": [],
    "bench_lm_eval.py": ["--docs", "10"],
}
# "ratio" in the output followed (on the same line or in the table below it) by a number.
RATIO = re.compile(r"ratio.*?\d+\.\d+", re.IGNORECASE | re.DOTALL)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_quick_runs(script: str, tmp_path: Path) -> None:
    out_json = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / script),
            "--quick",
            "--json",
            str(out_json),
            *CASES[script],
        ],
        cwd=ROOT,
        # One torch thread: on a busy 2-core machine two spin-waiting OpenMP threads can make a
        # step 10-30x slower, and this test only checks that the scripts run.
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    if script == "bench_gpu_mfu.py" and "no CUDA device: skipped" in proc.stdout:
        assert json.loads(out_json.read_text())["results"]["skipped"] is True
        return
    if script == "bench_lm_eval.py" and "hf model is unavailable" in proc.stdout:
        assert json.loads(out_json.read_text())["results"]["skipped"] is True
        return
    assert RATIO.search(proc.stdout), f"{script} printed no ratio:\n{proc.stdout[-2000:]}"
    record = json.loads(out_json.read_text())
    assert record["benchmark"] == script.removesuffix(".py")
    assert record["results"]

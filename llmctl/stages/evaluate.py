"""eval: checkpoint -> eval artifact (`results.json` + manifest), two ways.

`perplexity` (llmctl eval ppl): held-out loss of a checkpoint on the validation split of a tokens
artifact (its tokenizer must be the checkpoint's: compared by fingerprint) or on any text dataset
the docs reader opens (artifact dir, Parquet, JSONL, .txt). Each document is scored on its own,
from its BOS, in sliding windows (core/scoring.py): every token once, `--stride` tokens per window.
Reports the mean NLL per token, perplexity = exp(NLL), and bits per byte = sum NLL / ln 2 / UTF-8
bytes of the text, which does not depend on the tokenizer (Gao et al., 2020, The Pile), so models
with different vocabularies compare. Token documents are scored through their EOS, text documents
without one (as lm-eval's loglikelihood_rolling scores a text).

`run_tasks` (llmctl eval --tasks ...): lm-evaluation-harness tasks through the `LlmctlLM` adapter
(core/lm_eval_adapter.py) with `lm_eval.simple_evaluate`. Task names are looked up first among
llmctl's shipped offline tasks (llmctl/eval_tasks) and `--include-path` folders, and only when some
name is not there among lm-eval's ~15,000 built-in tasks (indexing them costs several seconds).
The Hugging Face hub is used offline unless HF_HUB_OFFLINE / HF_DATASETS_OFFLINE say otherwise: a
built-in task whose dataset is not in the local cache is skipped with one line (instead of waiting
out a network timeout), and the others run. Writes lm-eval's results JSON.

`lm_eval_cli` (llmctl lm-eval ...): lm-eval's own command line with the "llmctl" model registered.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmctl.core.artifacts import Manifest, check_output, commit_output, input_record, is_artifact
from llmctl.core.checkpoint import Checkpoint, load_checkpoint
from llmctl.core.config import require, to_dict
from llmctl.core.docs import open_docs
from llmctl.core.errors import InputError
from llmctl.core.progress import SILENT, Progress
from llmctl.core.runtime import Runtime
from llmctl.core.scoring import NllTotals, Span, rolling_spans, score_spans
from llmctl.core.tokenizer import Tokenizer
from llmctl.core.tokens import IndexedDataset
from llmctl.eval_tasks import TAG, TASKS_DIR

RESULTS = "results.json"
_DOCS_PER_CALL = 64  # documents whose windows are scored together (batches sort across them)


@dataclass(frozen=True, kw_only=True)
class PerplexityConfig:
    """Settings of `llmctl eval ppl`."""

    stride: int = 0  # tokens scored per window; 0 = the model's context (disjoint windows)
    batch_size: int = 8  # windows per forward pass
    split: Literal["val", "train"] = "val"  # which split of a tokens artifact
    text_column: str = "text"  # column holding the text, for text datasets
    max_docs: int = 0  # score at most this many documents (0 = all)
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # bf16 = autocast; weights stay fp32

    def __post_init__(self) -> None:
        require(self.stride >= 0, f"--stride must be >= 0, got {self.stride}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self.split in ("val", "train"), f"--split must be val or train, got {self.split}")
        require(self.max_docs >= 0, f"--max-docs must be >= 0, got {self.max_docs}")


@dataclass(frozen=True, kw_only=True)
class TasksConfig:
    """Settings of `llmctl eval` (lm-evaluation-harness tasks)."""

    tasks: tuple[str, ...] = (TAG,)  # task, group or tag names (default: llmctl's offline tasks)
    include_path: tuple[str, ...] = ()  # extra folders of task YAMLs
    limit: float = 0  # examples per task: 0 = all, < 1 = a fraction, else a count
    num_fewshot: int | None = None  # few-shot examples (None = each task's default)
    batch_size: int = 8  # requests per forward pass
    bootstrap_iters: int = 1000  # resamples for the stderr of non-mean metrics (0 = none)
    log_samples: bool = False  # also write every example's prompt and response
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0  # lm-eval's random, numpy, torch and few-shot seeds

    def __post_init__(self) -> None:
        require(len(self.tasks) > 0, "--tasks needs at least one task name")
        require(self.limit >= 0, f"--limit must be >= 0, got {self.limit}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(
            self.num_fewshot is None or self.num_fewshot >= 0,
            f"--num-fewshot must be >= 0, got {self.num_fewshot}",
        )
        require(self.bootstrap_iters >= 0, "bootstrap_iters must be >= 0")


# -- perplexity ------------------------------------------------------------------------------------


def perplexity(
    ckpt: Path,
    data: str | Path,
    dst: Path,
    cfg: PerplexityConfig,
    *,
    force: bool = False,
    progress: Progress = SILENT,
) -> Manifest:
    """Score `data` with the checkpoint; write results.json and return the manifest.

    Raises:
        InputError: A missing/incomplete checkpoint, unreadable data, or tokens made with another
            tokenizer.
    """
    check_output(dst, force)
    rt = Runtime.detect(cfg.device, cfg.precision)
    c = load_checkpoint(ckpt, device=rt.device)
    docs, total = _ppl_documents(c, data, cfg)
    context = c.model.cfg.max_seq_len
    stride = min(cfg.stride or context, context)
    totals = NllTotals()
    inputs = [input_record(ckpt, "checkpoint"), input_record(data, None)]
    with commit_output(
        dst, kind="eval", stage="eval-ppl", config=to_dict(cfg), inputs=inputs, force=force
    ) as out:
        progress.start("ppl", total, "docs")
        chunk: list[tuple[list[int], int]] = []
        for doc in docs:
            chunk.append(doc)
            if len(chunk) == _DOCS_PER_CALL:
                _score_docs(c, rt, chunk, context, stride, cfg.batch_size, totals, progress)
                chunk = []
        if chunk:
            _score_docs(c, rt, chunk, context, stride, cfg.batch_size, totals, progress)
        progress.stop()
        if totals.tokens == 0:
            raise InputError(f"{data} holds no tokens to score", "pass a non-empty dataset")
        metrics = totals.metrics()
        results = {
            "perplexity": metrics,
            "documents": totals.documents,
            "tokens": totals.tokens,
            "bytes": totals.bytes,
            "checkpoint": str(ckpt),
            "data": str(data),
            "context": context,
            "stride": stride,
            "runtime": rt.describe(),
        }
        (out.path / RESULTS).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        out.manifest.counts = {k: results[k] for k in ("documents", "tokens", "bytes")}
        out.manifest.stats = {**metrics, "context": context, "stride": stride}
        out.manifest.tokenizer = {"fingerprint": c.tokenizer.fingerprint}
    return out.manifest


def document_nll(
    c: Checkpoint, ids: list[int], stride: int | None = None, batch_size: int = 8
) -> float:
    """Summed NLL (nats) of ids[1:] given ids[0] (BOS) and what precedes each token."""
    spans = rolling_spans(ids, c.model.cfg.max_seq_len, stride)
    scores = score_spans(c.model, spans, batch_size=batch_size, pad_id=c.tokenizer.pad_id)
    return -sum(s.logprob for s in scores)


def _score_docs(
    c: Checkpoint,
    rt: Runtime,
    docs: list[tuple[list[int], int]],
    context: int,
    stride: int,
    batch_size: int,
    totals: NllTotals,
    progress: Progress,
) -> None:
    per_doc: list[list[Span]] = [rolling_spans(ids, context, stride) for ids, _ in docs]
    with rt.autocast():
        scores = iter(
            score_spans(
                c.model,
                [s for spans in per_doc for s in spans],
                batch_size=batch_size,
                pad_id=c.tokenizer.pad_id,
            )
        )
    for (ids, n_bytes), spans in zip(docs, per_doc, strict=True):
        if len(ids) < 2:
            continue
        totals.add(-sum(next(scores).logprob for _ in spans), len(ids) - 1, n_bytes)
    progress.advance(len(docs), ppl=totals.metrics()["perplexity"])


def _ppl_documents(
    c: Checkpoint, data: str | Path, cfg: PerplexityConfig
) -> tuple[Iterator[tuple[list[int], int]], int | None]:
    """(ids starting with BOS, UTF-8 bytes of the text) per document, and the count if known."""
    p = Path(data)
    tok = c.tokenizer
    if str(data) != "-" and is_artifact(p, "tokens"):
        theirs = Tokenizer.load(p)
        if theirs.fingerprint != tok.fingerprint:
            raise InputError(
                f"{p} was built with tokenizer {theirs.fingerprint}, {c.path} expects "
                f"{tok.fingerprint}; re-run: llmctl tokenize DOCS -o {p} --tokenizer "
                f"{c.path / 'tokenizer.model'}",
                "or pass the text itself (a docs dataset or file): it is tokenized with the "
                "checkpoint's tokenizer",
            )
        ds = IndexedDataset(p / cfg.split)
        n = len(ds) if not cfg.max_docs else min(len(ds), cfg.max_docs)
        if n == 0:
            raise InputError(
                f"{p} has no {cfg.split} documents",
                "re-tokenize with --val-fraction > 0, or pass --split train",
            )

        def from_tokens() -> Iterator[tuple[list[int], int]]:
            for i in range(n):
                ids = [int(x) for x in ds[i]]
                yield ids, len(tok.decode(ids).encode("utf-8"))

        return from_tokens(), n
    source = open_docs(data, text_column=cfg.text_column)

    def from_text() -> Iterator[tuple[list[int], int]]:
        for i, text in enumerate(source.texts()):
            if cfg.max_docs and i >= cfg.max_docs:
                return
            yield tok.encode(text, bos=True), len(text.encode("utf-8"))

    return from_text(), cfg.max_docs or None


# -- lm-evaluation-harness tasks ---------------------------------------------------------------------


def offline_hub() -> None:
    """Use the Hugging Face hub offline unless the user's environment says otherwise.

    Sets HF_HUB_OFFLINE / HF_DATASETS_OFFLINE when unset, and, where `datasets` or
    `huggingface_hub` are already imported (which read them at import), their module constants.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    hub = os.environ["HF_HUB_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE")
    data = os.environ["HF_DATASETS_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE")
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = hub
    if "datasets.config" in sys.modules:
        sys.modules["datasets.config"].HF_HUB_OFFLINE = data
        sys.modules["datasets.config"].HF_DATASETS_OFFLINE = data


def run_tasks(
    ckpt: Path,
    dst: Path,
    cfg: TasksConfig,
    *,
    force: bool = False,
    checkpoint: Checkpoint | None = None,
    progress: Progress = SILENT,
) -> Manifest:
    """Evaluate the checkpoint on lm-eval tasks; write results.json and return the manifest.

    The manifest's stats hold `metrics` ({task: {metric: value}}) and `skipped` (one line per
    built-in task whose dataset could not be loaded).

    Raises:
        InputError: An unknown task name (exit code 2), a missing include path, a bad checkpoint,
            or no task left to run.
    """
    check_output(dst, force)
    offline_hub()
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    from llmctl.core.lm_eval_adapter import LlmctlLM

    progress.start("index tasks", None)
    tm, builtin = _task_manager(cfg)
    skipped = _unavailable(tm, builtin)
    names = [t for t in cfg.tasks if t not in {s for s, _ in skipped}]
    progress.stop()
    if not names:
        raise InputError(
            "no task left to run: " + "; ".join(f"{t}: {why}" for t, why in skipped),
            "download the datasets once with network access (HF_DATASETS_OFFLINE=0), or pick "
            f"local tasks (--tasks {TAG})",
        )
    lm = LlmctlLM(
        None if checkpoint else ckpt,
        checkpoint=checkpoint,
        batch_size=cfg.batch_size,
        device=cfg.device,
        precision=cfg.precision,
        seed=cfg.seed,
    )
    inputs = [input_record(ckpt, "checkpoint")]
    with commit_output(
        dst, kind="eval", stage="eval", config=to_dict(cfg), inputs=inputs, force=force
    ) as out:
        progress.start("lm-eval " + ",".join(names), None)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=tm,
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit or None,
            bootstrap_iters=cfg.bootstrap_iters,
            log_samples=cfg.log_samples,
            random_seed=cfg.seed,
            numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed,
        )
        progress.stop()
        samples = results.pop("samples", None) or {}
        text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
        (out.path / RESULTS).write_text(text + "\n", encoding="utf-8")
        for task, rows in samples.items():
            with open(out.path / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, default=handle_non_serializable) + "\n")
        out.manifest.counts = {"tasks": len(results["results"]), "skipped": len(skipped)}
        out.manifest.stats = {
            "metrics": task_metrics(results),
            "skipped": [f"{t}: {why}" for t, why in skipped],
        }
        out.manifest.tokenizer = {"fingerprint": lm.tok.fingerprint}
    return out.manifest


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{task: {"metric,filter": value, ...}} from lm-eval's results (stderr kept, alias dropped)."""
    return {
        task: {k: v for k, v in row.items() if "," in k}
        for task, row in results.get("results", {}).items()
    }


def _task_manager(cfg: TasksConfig) -> tuple[Any, list[str]]:
    """A TaskManager that knows every requested name, and the names that are lm-eval built-ins."""
    from lm_eval.tasks import TaskManager

    for p in cfg.include_path:
        if not Path(p).is_dir():
            raise InputError(
                f"--include-path {p} is not a directory", "pass a folder of task YAML files"
            )
    paths = [str(TASKS_DIR), *cfg.include_path]
    tm = TaskManager(include_path=paths, include_defaults=False)
    builtin = [t for t in cfg.tasks if t not in tm.all_tasks]
    if builtin:
        tm = TaskManager(include_path=paths, include_defaults=True)
        unknown = [t for t in builtin if t not in tm.all_tasks]
        if unknown:
            close = [m for t in unknown for m in difflib.get_close_matches(t, tm.all_tasks, 3)]
            raise InputError(
                f"unknown lm-eval task{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
                (f"did you mean {', '.join(close)}? " if close else "")
                + "list them: llmctl lm-eval ls tasks (add --include_path DIR for your own)",
            )
    return tm, builtin


def _unavailable(tm: Any, builtin: list[str]) -> list[tuple[str, str]]:
    """Built-in tasks whose data cannot be loaded (not in the local cache, offline): name, why."""
    out = []
    for name in builtin:
        try:
            tm.load_task_or_group([name])
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; each becomes one line
            out.append((name, _why(e)))
    return out


def _why(e: BaseException) -> str:
    chain, x = [], e
    while x is not None and len(chain) < 8:
        chain.append(x)
        x = x.__cause__ or x.__context__
    text = " ".join(f"{type(x).__name__} {x}" for x in chain).lower()
    if any(w in text for w in ("offline", "connection", "couldn't reach", "not found", "no such")):
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        return f"its dataset is not in the local Hugging Face cache ({home}); skipped"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"could not be loaded ({type(e).__name__}: {first}); skipped"


def lm_eval_cli(args: list[str]) -> int:
    """Run lm-eval's command line (`lm-eval ARGS...`) with the "llmctl" model registered.

    Returns:
        lm-eval's exit status.
    """
    offline_hub()
    from lm_eval.__main__ import cli_evaluate

    import llmctl.core.lm_eval_adapter  # noqa: F401 - registers --model llmctl

    argv = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return 0

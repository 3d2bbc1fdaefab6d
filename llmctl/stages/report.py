"""report: run directory -> REPORT.md with PNG plots, built only from what the stages wrote to disk.

Walks RUN_DIR for artifacts (directories with a `manifest.json`; an artifact's own subdirectories,
such as intermediate checkpoints, are not descended into) and recognises each by its manifest's
`stage` and `kind`, never by its directory name. Sections: the data funnel (documents and bytes at
every data stage, and why each was removed: crawl-filter's removal reasons and rules, dedup's exact
and near duplicates), tokenizer statistics, training curves from each run's `metrics.jsonl`
(pretrain, sft, rm, dpo: loss, learning rate, gradient norm, tokens/s; ppo: reward, KL, entropy),
eval tables, sample generations before and after alignment (`*sample*.txt` files in the run
directory, and with `samples=True` greedy answers generated from the base, SFT and aligned
checkpoints), time per stage (the manifests' wall_time_s) and the environment (versions and hardware
recorded in the manifests, and of the machine writing the report). A stage that did not run is
listed as "not run"; a malformed metrics line or manifest is skipped, never fatal.

Output: the markdown file plus a `<stem>_files/` folder of PNGs next to it; the folder is built
under a temporary name and renamed, then the markdown is written atomically, so a reader never
sees a report pointing at missing plots.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.core.artifacts import MANIFEST, Manifest, atomic_write_text
from llmctl.core.config import require
from llmctl.core.errors import InputError, LlmctlError
from llmctl.core.progress import SILENT, Progress
from llmctl.stages import _report_plots as plots
from llmctl.stages._report_parts import (
    generate_text,
    machine,
    not_run,
    read_metrics,
    scalars,
    table,
)

# Pipeline order of stages (artifacts are listed in this order, then by creation time).
ORDER = (
    "corpus",
    "crawl-filter",
    "dedup",
    "tokenize",
    "pretrain",
    "sft",
    "rm",
    "dpo",
    "ppo",
    "eval-ppl",
    "eval",
    "eval-humaneval",
)
EXPECTED = ("crawl-filter", "dedup", "tokenize", "pretrain", "sft", "rm", "ppo", "eval")
DATA_STAGES = ("corpus", "crawl-filter", "dedup", "tokenize")
TRAIN_STAGES = ("pretrain", "sft", "rm", "dpo", "ppo")
POST_TRAINING = ("chat", "prefs", "prompts")  # corpus formats that feed sft / rm, dpo / ppo
CHAT_STAGES = ("sft", "dpo", "ppo")  # checkpoints that answer in the chat template
LABELS = {
    "pretrain": "base model, before alignment",
    "sft": "after supervised fine-tuning",
    "dpo": "after preference alignment (DPO)",
    "ppo": "after RL alignment (PPO)",
}


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """Settings of `llmctl report`."""

    samples: bool = False  # also generate answers from the base, SFT and aligned checkpoints
    prompts: tuple[str, ...] = ("What does the json module do?",)  # prompts for `samples`
    max_new_tokens: int = 48  # tokens per generated sample
    seed: int = 0  # sampling seed (greedy decoding: only ties depend on it)

    def __post_init__(self) -> None:
        require(
            self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"
        )
        require(len(self.prompts) >= 1, "--prompt: give at least one prompt")


@dataclass
class Artifact:
    """One artifact found in the run directory."""

    name: str  # path relative to the run directory
    path: Path
    m: Manifest


def find_artifacts(run_dir: Path) -> tuple[list[Artifact], list[str]]:
    """Artifacts under `run_dir` in pipeline order, and the names of incomplete `*.partial` dirs."""
    found, partial = [], []
    for root, dirs, files in os.walk(run_dir, followlinks=True):
        here = Path(root)
        dirs.sort()
        partial += [str((here / d).relative_to(run_dir)) for d in dirs if d.endswith(".partial")]
        dirs[:] = [d for d in dirs if not d.startswith(".") and not d.endswith(".partial")]
        if MANIFEST in files:
            dirs[:] = []  # an artifact's inner folders (checkpoints/, rejected/) are its own
            try:
                m = Manifest.read(here)
            except LlmctlError:
                continue
            found.append(Artifact(str(here.relative_to(run_dir)) or ".", here, m))
    rank = {s: i for i, s in enumerate(ORDER)}
    found.sort(key=lambda a: (rank.get(a.m.stage, len(ORDER)), a.m.created, a.name))
    return found, partial


def run(
    run_dir: Path,
    dst: Path | None = None,
    cfg: ReportConfig | None = None,
    *,
    progress: Progress = SILENT,
) -> Path:
    """Write the report of `run_dir` to `dst` (default RUN_DIR/REPORT.md); returns its path.

    Raises:
        InputError: `run_dir` is not a directory.
    """
    cfg = cfg or ReportConfig()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir} is not a directory", "pass the run's output folder, e.g. out/")
    dst = Path(dst) if dst else run_dir / "REPORT.md"
    arts, partial = find_artifacts(run_dir)
    progress.log(f"{len(arts)} artifacts in {run_dir}")
    figs = dst.with_name(f"{dst.stem}_files")
    tmp = dst.with_name(f".{figs.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        ctx = _Ctx(run_dir, figs.name, tmp, arts)
        sections = [
            _overview(ctx, partial),
            _funnel(ctx),
            _tokenizer(ctx),
            _training(ctx, progress),
            _evals(ctx),
            _samples(ctx, cfg, progress),
            _timing(ctx),
            _environment(ctx),
        ]
        if figs.exists():
            shutil.rmtree(figs)
        os.replace(tmp, figs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(dst, "\n\n".join("\n".join(s) for s in sections) + "\n")
    return dst


@dataclass
class _Ctx:
    run_dir: Path
    figs_rel: str  # the figures folder as the markdown links it
    figs: Path  # where figures are written now
    arts: list[Artifact]

    def of(self, *stages: str) -> list[Artifact]:
        return [a for a in self.arts if a.m.stage in stages]

    def fig(self, written: Path | None) -> list[str]:
        return [f"![{written.stem}]({self.figs_rel}/{written.name})", ""] if written else []


# -- sections --------------------------------------------------------------------------------------


def _overview(ctx: _Ctx, partial: list[str]) -> list[str]:
    out = [f"# Run report: {ctx.run_dir.resolve().name}", ""]
    out += [f"Run directory `{ctx.run_dir.resolve()}`, {len(ctx.arts)} artifacts.", ""]
    present = {
        a.m.stage.split("-")[0] if a.m.stage.startswith("eval") else a.m.stage for a in ctx.arts
    }
    missing = [s for s in EXPECTED if s not in present]
    rows = [[a.name, a.m.stage, a.m.kind, a.m.created, a.m.fingerprint[:12]] for a in ctx.arts]
    out += table(["artifact", "stage", "kind", "created", "fingerprint"], rows)
    out += [f"Not run: {', '.join(missing)}." if missing else "Every pipeline stage ran.", ""]
    if partial:
        out += [
            f"Incomplete (still running, or crashed; resume with --resume): {', '.join(partial)}.",
            "",
        ]
    return out


def _funnel_row(a: Artifact) -> list[Any]:
    c, s, st = a.m.counts, a.m.stats, a.m.stage
    if st == "crawl-filter":
        removed = c.get("rejected", 0) + c.get("unreadable", 0)
        return [
            a.name,
            st,
            c.get("documents"),
            c.get("kept"),
            c.get("bytes_in"),
            c.get("bytes_kept"),
            removed,
        ]
    if st == "dedup":
        removed = c.get("exact_removed", 0) + c.get("near_removed", 0)
        return [a.name, st, c.get("documents"), c.get("kept"), None, c.get("bytes"), removed]
    if st == "tokenize":
        return [
            a.name,
            st,
            c.get("documents"),
            c.get("documents"),
            c.get("bytes"),
            c.get("bytes"),
            0,
        ]
    docs = c.get("documents", c.get("records"))
    return [a.name, f"{st} ({a.m.kind})", None, docs, None, c.get("bytes", s.get("bytes")), None]


def lineage(arts: list[Artifact]) -> list[list[Artifact]]:
    """Each data chain, source first, ending at a tokens artifact (or at a docs artifact nothing
    reads): an artifact's upstream is the artifact holding its first input (a directory, or a
    file inside one, such as a crawl's .warc.gz)."""
    by_path = {a.path.resolve(): a for a in arts}

    def parent(a: Artifact) -> Artifact | None:
        for i in a.m.inputs[:1]:
            p = Path(i.get("path") or "-").resolve()
            return by_path.get(p) or by_path.get(p.parent)
        return None

    used = {id(u) for a in arts if (u := parent(a))}
    chains = []
    for leaf in (a for a in arts if id(a) not in used):
        chain, a = [leaf], parent(leaf)
        while a is not None and a not in chain:
            chain.insert(0, a)
            a = parent(a)
        chains.append(chain)
    return chains


def _funnel(ctx: _Ctx) -> list[str]:
    out = ["## Data funnel", ""]
    data = [a for a in ctx.of(*DATA_STAGES) if a.m.config.get("format") not in POST_TRAINING]
    if not data:
        return out + not_run("data stages (corpus, crawl-filter, dedup, tokenize)")
    chains = lineage(data)
    seen: set[str] = set()  # a source read by two chains is listed once, with the first
    ordered = [a for chain in chains for a in chain if not (a.name in seen or seen.add(a.name))]
    rows = [_funnel_row(a) for a in ordered]
    out += table(
        ["artifact", "stage", "docs in", "docs out", "bytes in", "bytes out", "removed"], rows
    )
    out += ctx.fig(
        plots.bars(
            [f"{a.name} ({a.m.stage})" for a in ordered],
            [float(r[3] or 0) for r in rows],
            ctx.figs / "funnel.png",
            title="documents after each data stage, source first",
            xlabel="documents",
        )
    )
    post = [a for a in ctx.of("corpus") if a.m.config.get("format") in POST_TRAINING]
    if post:
        out += ["Post-training data:", ""]
        rows = [[a.name, a.m.config.get("format"), a.m.counts.get("documents")] for a in post]
        out += table(["artifact", "format", "rows"], rows)
    for a in ctx.of("crawl-filter"):
        removed = a.m.stats.get("removed", {})
        out += [f"### Why documents were removed: {a.name} (crawl-filter)", ""]
        rows = [
            [reason, r.get("docs"), r.get("bytes"), _rules(r.get("rules", {}))]
            for reason, r in sorted(removed.items(), key=lambda kv: -kv[1].get("docs", 0))
            if isinstance(r, dict)
        ]
        out += (
            table(["reason", "docs", "bytes", "rules (docs)"], rows)
            if rows
            else ["_none removed._", ""]
        )
    for a in ctx.of("dedup"):
        c = a.m.counts
        out += [f"### Duplicates: {a.name} (dedup, Jaccard >= {a.m.config.get('threshold')})", ""]
        out += table(
            ["exact duplicates", "near duplicates", "clusters", "kept"],
            [[c.get("exact_removed"), c.get("near_removed"), c.get("clusters"), c.get("kept")]],
        )
    if not ctx.of("crawl-filter"):
        out += not_run("crawl-filter")
    if not ctx.of("dedup"):
        out += not_run("dedup")
    return out


def _rules(rules: dict[str, int]) -> str:
    top = sorted(rules.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v}" for k, v in top[:6]) + (" …" if len(top) > 6 else "")


def _tokenizer(ctx: _Ctx) -> list[str]:
    out = ["## Tokenizer", ""]
    toks = ctx.of("tokenize")
    if not toks:
        return out + not_run("tokenize")
    rows = []
    for a in toks:
        t, c, s = a.m.tokenizer or {}, a.m.counts, a.m.stats
        rows.append(
            [
                a.name,
                t.get("vocab_size", a.m.config.get("vocab_size")),
                t.get("fingerprint"),
                "reused" if t.get("reused") else "trained",
                c.get("documents"),
                c.get("bytes"),
                c.get("tokens"),
                s.get("bytes_per_token"),
                c.get("train_tokens"),
                c.get("val_tokens"),
                s.get("unigram_loss_val"),
            ]
        )
    header = ["artifact", "vocab", "fingerprint", "tokenizer", "docs", "bytes", "tokens"]
    header += ["bytes/token", "train tokens", "val tokens", "unigram loss (val)"]
    return out + table(header, rows)


def _training(ctx: _Ctx, progress: Progress) -> list[str]:
    out = ["## Training", ""]
    for stage in TRAIN_STAGES:
        arts = ctx.of(stage)
        if not arts and stage != "dpo":
            out += [f"### {stage}", ""] + not_run(stage)
        for a in arts:
            progress.log(f"plotting {a.name}")
            out += [f"### {stage}: {a.name}", ""]
            recs = read_metrics(a.path / "metrics.jsonl")
            panels = plots.PANELS["ppo" if stage == "ppo" else "lm"]
            out += ctx.fig(
                plots.training_curves(
                    recs,
                    ctx.figs / f"{_slug(a.name)}.png",
                    title=f"{stage} {a.name}",
                    panels=panels,
                )
            )
            if not recs:
                out += ["_no metrics.jsonl._", ""]
            rows = {**scalars(a.m.counts), **scalars(a.m.stats)}
            if isinstance(a.m.stats.get("model"), dict):
                mm = a.m.stats["model"]
                rows["model"] = " ".join(
                    f"{k}={mm[k]}"
                    for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")
                    if k in mm
                )
            out += table(["", "value"], [[k, v] for k, v in rows.items()])
    return out


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "run"


def _evals(ctx: _Ctx) -> list[str]:
    out = ["## Evaluation", ""]
    evals = [a for a in ctx.arts if a.m.kind == "eval"]
    if not evals:
        return out + not_run("eval (llmctl eval ppl / llmctl eval --tasks)")
    for a in evals:
        src = ", ".join(Path(i.get("path", "?")).name for i in a.m.inputs)
        out += [f"### {a.m.stage}: {a.name} ({src})", ""]
        metrics = a.m.stats.get("metrics")
        if isinstance(metrics, dict) and metrics:
            rows = [
                [task, k, v]
                for task, ms in metrics.items()
                if isinstance(ms, dict)
                for k, v in ms.items()
            ]
            out += table(["task", "metric", "value"], rows)
        scal = {**scalars(a.m.counts), **scalars(a.m.stats)}
        if scal:
            out += table(["", "value"], [[k, v] for k, v in scal.items()])
        for line in a.m.stats.get("skipped", []) or []:
            out += [f"- skipped: {line}"]
    return out


def _samples(ctx: _Ctx, cfg: ReportConfig, progress: Progress) -> list[str]:
    out = ["## Samples before and after alignment", ""]
    files = sorted(p for p in ctx.run_dir.glob("*sample*.txt") if p.is_file())
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace").strip()
        out += [f"### {p.name}", "", "```text", text[:2000], "```", ""]
    if cfg.samples:
        out += _generated(ctx, cfg, progress)
    elif not files:
        out += not_run("samples (no *sample*.txt in the run directory; pass --samples to generate)")
    return out


def _generated(ctx: _Ctx, cfg: ReportConfig, progress: Progress) -> list[str]:
    ckpts = [a for a in ctx.of("pretrain", *CHAT_STAGES) if a.m.kind == "checkpoint"]
    if not ckpts:
        return not_run("sample generation (no pretrain/sft/dpo/ppo checkpoint)")
    out = []
    for prompt in cfg.prompts:
        out += [f"### Prompt: {prompt}", ""]
        for a in ckpts:
            progress.log(f"sampling {a.name}")
            try:
                text = generate_text(
                    a.path,
                    prompt,
                    chat=a.m.stage in CHAT_STAGES,
                    max_new_tokens=cfg.max_new_tokens,
                    seed=cfg.seed,
                )
            except LlmctlError as e:
                text = f"(could not generate: {e.problem})"
            label = LABELS.get(a.m.stage, a.m.stage)
            out += [f"**{a.name}** ({a.m.stage}, {label}):", "", "```text", text.strip(), "```", ""]
    return out


def _timing(ctx: _Ctx) -> list[str]:
    out = ["## Time per stage", ""]
    if not ctx.arts:
        return out + not_run("every stage")
    total = sum(a.m.wall_time_s or 0 for a in ctx.arts) or 1.0
    rows = [
        [a.name, a.m.stage, a.m.wall_time_s, f"{100 * (a.m.wall_time_s or 0) / total:.1f}%"]
        for a in ctx.arts
    ]
    rows.append(["**total**", "", round(total, 1), "100%"])
    out += table(["artifact", "stage", "seconds", "share"], rows)
    out += ctx.fig(
        plots.bars(
            [f"{a.name} ({a.m.stage})" for a in ctx.arts],
            [float(a.m.wall_time_s or 0) for a in ctx.arts],
            ctx.figs / "time.png",
            title="wall time per stage",
            xlabel="seconds",
        )
    )
    return out


def _environment(ctx: _Ctx) -> list[str]:
    out = ["## Environment", "", "Recorded by the stages:", ""]
    seen: dict[str, list[str]] = {}
    for a in ctx.arts:
        rt = a.m.stats.get("runtime") if isinstance(a.m.stats.get("runtime"), dict) else {}
        rec = {
            "llmctl": a.m.llmctl_version,
            **({"python": a.m.stats["python"]} if "python" in a.m.stats else {}),
            **rt,
        }
        key = ", ".join(f"{k} {v}" for k, v in rec.items())
        seen.setdefault(key, []).append(a.name)
    out += [f"- {k} ({', '.join(v)})" for k, v in seen.items()] or ["- (no artifacts)"]
    out += ["", "This report was written on:", ""]
    out += table(["", "value"], [[k, v] for k, v in machine().items()])
    return out

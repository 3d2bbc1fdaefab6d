"""(Re)build the JSONL files of llmctl's offline eval tasks from the installed Python's stdlib.

    python -m llmctl.eval_tasks.build [--out DIR] [--rows 200] [--seed 0]

Source: the subjects of core/chatgen.py (public stdlib functions, classes and methods with their
docstring summaries, parsed with `ast`; nothing is imported), restricted to those that `split_of`
keeps out of the SFT conversations (its prefs and prompts sets), so a chat model is never tuned on
the answers. Pretraining on the full stdlib corpus does see the text: these tasks measure what a
model has absorbed from it, in the formats lm-eval uses.

    stdlib_module.jsonl     name, kind, module, choices (4 modules), label: "which module defines X?"
                            (only names defined in exactly one public module and not builtins);
                            read by the multiple-choice task and by the generation task
    stdlib_docstring.jsonl  qualname, kind, choices (4 docstring summaries), label: "which docstring
                            belongs to X?"; distractors are summaries of other held-out subjects
    stdlib_text.jsonl       qualname, text ("module.name\\n\\nsummary", as the corpus writes
                            docstrings): for perplexity / bits per byte

Deterministic: rows are ordered by a seeded hash of the qualified name and distractors drawn with
a generator seeded by (seed, name), so the same Python version and seed give byte-identical files.
The shipped files were built with Python 3.11 and seed 0; another Python version gives other rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Iterable
from pathlib import Path

from llmctl.core import chatgen
from llmctl.eval_tasks import TASKS_DIR

N_CHOICES = 4


def _key(seed: int, name: str) -> bytes:
    return hashlib.sha256(f"{seed}:{name}".encode()).digest()


def _rng(seed: int, task: str, name: str) -> random.Random:
    return random.Random(int.from_bytes(_key(seed, f"{task}:{name}")[:8], "big"))


def _choices(rng: random.Random, right: str, pool: list[str]) -> tuple[list[str], int]:
    """`right` plus N_CHOICES - 1 distinct others from `pool`, shuffled; and right's index."""
    wrong: list[str] = []
    while len(wrong) < N_CHOICES - 1:
        c = pool[rng.randrange(len(pool))]
        if c != right and c not in wrong:
            wrong.append(c)
    choices = [right, *wrong]
    rng.shuffle(choices)
    return choices, choices.index(right)


def held_out_subjects(modules: Iterable[tuple[str, str]]) -> list[chatgen.Subject]:
    """Documented functions, classes and methods that the SFT set never sees."""
    return [s for s in chatgen.stdlib_subjects(modules) if chatgen.split_of(s.qualname) != "chat"]


def module_rows(
    subjects: list[chatgen.Subject], unique: frozenset[str], seed: int, rows: int
) -> list[dict]:
    """Rows of "which module defines X?"."""
    cand = [s for s in subjects if s.kind in ("function", "class") and s.name in unique]
    pool = sorted({s.module for s in cand})
    cand.sort(key=lambda s: _key(seed, s.qualname))
    out = []
    for s in cand[:rows]:
        choices, label = _choices(_rng(seed, "module", s.qualname), s.module, pool)
        out.append(
            {"name": s.name, "kind": s.kind, "module": s.module, "choices": choices, "label": label}
        )
    return out


def docstring_rows(subjects: list[chatgen.Subject], seed: int, rows: int) -> list[dict]:
    """Rows of "which docstring belongs to X?"."""
    pool = sorted({s.summary for s in subjects})
    cand = sorted(subjects, key=lambda s: _key(seed, s.qualname))
    out = []
    for s in cand[:rows]:
        choices, label = _choices(_rng(seed, "docstring", s.qualname), s.summary, pool)
        out.append({"qualname": s.qualname, "kind": s.kind, "choices": choices, "label": label})
    return out


def text_rows(subjects: list[chatgen.Subject], seed: int, rows: int) -> list[dict]:
    """Docstring documents for perplexity (a different sample than docstring_rows)."""
    cand = sorted(subjects, key=lambda s: _key(seed, "text:" + s.qualname))
    return [{"qualname": s.qualname, "text": f"{s.qualname}\n\n{s.summary}"} for s in cand[:rows]]


def build(out: Path = TASKS_DIR, *, rows: int = 200, seed: int = 0) -> dict[str, int]:
    """Write the three JSONL files into `out`; returns rows per file."""
    from llmctl.stages.corpus import stdlib_modules  # the corpus's own reader: same files, order

    modules = list(stdlib_modules())
    subjects = held_out_subjects(modules)
    unique = chatgen.unique_names(modules)
    tables = {
        "stdlib_module": module_rows(subjects, unique, seed, rows),
        "stdlib_docstring": docstring_rows(subjects, seed, rows),
        "stdlib_text": text_rows(subjects, seed, rows),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in table]
        (out / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")
    return {name: len(t) for name, t in tables.items()}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: python -m llmctl.eval_tasks.build."""
    p = argparse.ArgumentParser(prog="python -m llmctl.eval_tasks.build", description=__doc__)
    p.add_argument("--out", type=Path, default=TASKS_DIR, help="folder for the JSONL files")
    p.add_argument("--rows", type=int, default=200, help="rows per file")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name, n in build(a.out, rows=a.rows, seed=a.seed).items():
        print(f"{name}.jsonl: {n} rows")


if __name__ == "__main__":
    main()

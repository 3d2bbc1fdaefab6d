"""Dataset loaders named by the task YAMLs (`custom_dataset: !function loader.NAME`).

lm-eval imports this file by path and calls a loader with the task's metadata as keyword arguments;
each returns a DatasetDict with one `test` split read from the JSONL beside this file. Built in
memory with `Dataset.from_list`: nothing is downloaded and nothing is written to the HF cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def _load(name: str) -> Any:
    import datasets

    with open(HERE / f"{name}.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def stdlib_module(**_: Any) -> Any:
    """Rows of stdlib_module and stdlib_module_gen: name, kind, module, choices, label."""
    return _load("stdlib_module")


def stdlib_docstring(**_: Any) -> Any:
    """Rows of stdlib_docstring: qualname, kind, choices (docstring summaries), label."""
    return _load("stdlib_docstring")


def stdlib_text(**_: Any) -> Any:
    """Rows of stdlib_ppl: qualname, text (the docstring document as the corpus writes it)."""
    return _load("stdlib_text")

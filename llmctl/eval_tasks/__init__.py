"""Offline lm-eval tasks that ship with llmctl, built from held-out stdlib text (see `build.py`).

`TASKS_DIR` is this folder: an lm-eval `include_path`. Each task's YAML loads its rows through
`custom_dataset: !function loader.<name>`, which reads the JSONL beside it by absolute path, so the
tasks work from any working directory (lm-eval resolves a relative `data_files` path against the
process's working directory, not the YAML's folder).
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).parent
TAG = "llmctl_stdlib"  # runs all of them: llmctl eval CKPT --tasks llmctl_stdlib

"""inspect: look inside any artifact without writing code.

For every artifact its manifest summary; for docs datasets the first rows; for tokens the first
documents decoded back to text with their token counts; for checkpoints the architecture, parameter
count and the last training metrics. Returns plain data; `cli.py` renders it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.core.artifacts import Manifest, is_artifact
from llmctl.core.docs import open_docs
from llmctl.core.errors import InputError
from llmctl.core.model import ModelConfig, param_count
from llmctl.core.tokenizer import Tokenizer
from llmctl.core.tokens import IndexedDataset
from llmctl.core.train_loop import read_metrics


@dataclass
class Inspection:
    """What `inspect` found."""

    path: str
    kind: str
    summary: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + f"… (+{len(text) - n} chars)"


def run(path: Path | str, head: int = 3, max_chars: int = 400, split: str = "train") -> Inspection:
    """Inspect an artifact directory (or a plain docs file).

    Raises:
        InputError: Not an artifact or readable dataset.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p} does not exist")
    if not is_artifact(p):
        if p.is_file() and p.name == "manifest.json":
            return run(p.parent, head, max_chars, split)
        src = open_docs(p)  # plain Parquet / JSONL / txt
        return _docs(Inspection(str(p), "docs (no manifest)"), src, head, max_chars)
    m = Manifest.read(p)
    ins = Inspection(str(p), m.kind, _summary(m))
    if m.kind == "docs":
        return _docs(ins, open_docs(p), head, max_chars)
    if m.kind == "tokens":
        return _tokens(ins, p, head, max_chars, split)
    if m.kind == "checkpoint":
        return _checkpoint(ins, p, head)
    return ins


def _summary(m: Manifest) -> dict[str, Any]:
    s: dict[str, Any] = {
        "stage": m.stage,
        "created": m.created,
        "llmctl": m.llmctl_version,
        "wall time (s)": m.wall_time_s,
        "fingerprint": m.fingerprint[:16],
    }
    s.update({f"count.{k}": v for k, v in m.counts.items()})
    s.update({f"stat.{k}": v for k, v in m.stats.items() if not isinstance(v, dict)})
    if m.tokenizer:
        s["tokenizer"] = f"{m.tokenizer.get('fingerprint')} ({m.tokenizer.get('vocab_size')} ids)"
    s["inputs"] = ", ".join(i.get("path", "?") for i in m.inputs) or "-"
    return s


def _docs(ins: Inspection, src, head: int, max_chars: int) -> Inspection:  # noqa: ANN001
    for batch in src.batches():
        for row in batch.to_pylist():
            if len(ins.rows) >= head:
                return ins
            ins.rows.append(
                {k: _clip(v, max_chars) if isinstance(v, str) else v for k, v in row.items()}
            )
    return ins


def _tokens(ins: Inspection, p: Path, head: int, max_chars: int, split: str) -> Inspection:
    tok = Tokenizer.load(p)
    ds = IndexedDataset(p / split)
    ins.summary.update(
        {f"{split}.documents": len(ds), f"{split}.tokens": ds.n_tokens, "dtype": str(ds.dtype)}
    )
    for i in range(min(head, len(ds))):
        ids = ds[i]
        ins.rows.append(
            {
                "doc": i,
                "tokens": int(ids.size),
                "first ids": " ".join(map(str, ids[:12])),
                "text": _clip(tok.decode(ids.tolist()), max_chars),
            }
        )
    return ins


def _checkpoint(ins: Inspection, p: Path, head: int) -> Inspection:
    import json

    cfg = json.loads((p / "config.json").read_text())
    mc = ModelConfig.from_dict(cfg["model"])
    ins.summary.update(
        {"params": f"{param_count(mc):,}", **{f"model.{k}": v for k, v in mc.to_dict().items()}}
    )
    recs = read_metrics(p / "metrics.jsonl")
    for r in [r for r in recs if "val_loss" in r][-head:]:
        ins.rows.append(r)
    return ins

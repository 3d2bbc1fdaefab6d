"""Pieces of `llmctl report` that know nothing of its sections: markdown cells and tables, reading
metrics.jsonl, this machine's versions and hardware, and a greedy sample from a checkpoint."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from llmctl import __version__


def fmt(v: Any) -> str:
    """A table cell: thousands separators for counts, 4 significant digits for floats."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return out + [""]


def scalars(d: dict[str, Any]) -> dict[str, Any]:
    """The entries of a stats/counts dict that fit a table cell (nested dicts left out)."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) and v is not None}


def not_run(what: str) -> list[str]:
    """The line a section shows for a stage that did not run."""
    return [f"_{what}: not run._", ""]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records; malformed lines (a crash mid-write) are skipped."""
    recs = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict):
                recs.append(r)
    return recs


def generate_text(ckpt: Path, prompt: str, *, chat: bool, max_new_tokens: int, seed: int) -> str:
    """Greedy continuation of `prompt` (as a chat turn for chat checkpoints), on the CPU."""
    import torch

    from llmctl.core.checkpoint import load_checkpoint
    from llmctl.core.sampling import SamplingConfig, generate

    c = load_checkpoint(ckpt, device=torch.device("cpu"), inference=True)
    tok = c.tokenizer
    if chat:
        ids, _ = tok.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
        stops = [tok.eos_id, tok.end_id]
    else:
        ids, stops = tok.encode(prompt, bos=True), [tok.eos_id]
    scfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        new = generate(
            c.model.eval(), [ids], scfg, stop_ids=stops, generator=gen, pad_id=tok.pad_id
        )[0]
    new = [t for t in new if t not in stops]
    return (prompt if not chat else "") + tok.decode(new)


def machine() -> dict[str, Any]:
    """Versions and hardware of this machine."""
    info: dict[str, Any] = {
        "llmctl": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu cores": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            info["gpu"] = f"{n} x {torch.cuda.get_device_name(0)}"
            info["cuda"] = torch.version.cuda
        else:
            info["gpu"] = "none"
    except ImportError:  # pragma: no cover - torch is a dependency
        info["torch"] = "not installed"
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

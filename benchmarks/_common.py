"""Shared helpers for the benchmark scripts: argument parsing, interleaved timing, the result
table, the JSON record and the llmctl -> Hugging Face Llama weight mapping.

Timing rules (the machine is shared and noisy): every A/B comparison is interleaved (A, B, B, A,
...), warmed up first, and summarised by its median. Benchmarks print ratios measured in the same
run and never assert on time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ first, not the repo root
    sys.path.insert(0, str(REPO))


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run well under 60 s")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return p


class Timings(dict):
    """Seconds per side ({name: [s, ...]}), plus how the rounds went: `foreign` is the share of the
    CPUs other processes used during each kept round, `discarded` how many busy rounds were dropped."""

    foreign: list[float]
    discarded: int
    kept: list[int]  # indices of the kept rounds (call k of a side is round k - warmup)


def interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    max_foreign: float = 0.15,
    max_rounds: int | None = None,
) -> Timings:
    """Wall-clock seconds of each callable, run round-robin (order reversed every other round, so
    neither side always runs first), after `warmup` untimed rounds.

    A round during which other processes used more than `max_foreign` of the CPUs is set aside and
    run again, up to `max_rounds` (default 3 x repeats) rounds in all; if too few quiet rounds come,
    the least busy of the others fill in. (On 2 cores one busy core can slow torch's spin-waiting
    OpenMP threads 10-30x, so a busy round says nothing about either side.)
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    rounds: list[tuple[float, int, dict[str, float]]] = []
    max_rounds = max_rounds or 3 * repeats
    for r in range(max_rounds):
        load = ForeignLoad()
        row: dict[str, float] = {}
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[n]()
            row[n] = time.perf_counter() - t0
        share = load.share()
        rounds.append((0.0 if share is None else share, r, row))
        if sum(x[0] <= max_foreign for x in rounds) >= repeats:
            break
    quiet = [x for x in rounds if x[0] <= max_foreign]
    busy = sorted((x for x in rounds if x[0] > max_foreign), key=lambda x: x[0])
    kept = sorted((quiet + busy)[:repeats], key=lambda x: x[1])
    out = Timings({n: [row[n] for _, _, row in kept] for n in names})
    out.foreign = [f for f, _, _ in kept]
    out.kept = [r for _, r, _ in kept]
    out.discarded = len(rounds) - len(kept)
    return out


def rounds_note(t: Timings) -> str:
    """One line on how clean the timed rounds were."""
    worst = max(t.foreign) if t.foreign else 0.0
    note = f"{len(t.foreign)} rounds kept, {t.discarded} busy rounds dropped, worst foreign CPU {worst:.0%}"
    return note + (" (noisy)" if worst > 0.15 else "")


# Child processes that work for the running benchmark (e.g. bench_serve's server): their CPU time
# is the benchmark's own, not foreign load, although os.times() counts it only once they exit.
HELPER_PIDS: set[int] = set()


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (0 when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class ForeignLoad:
    """How much of the machine other processes used while this one ran (from /proc/stat minus our
    own CPU time, children included). High values mean the timings are noisier than usual."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        return own + sum(_process_cpu(pid) for pid in HELPER_PIDS)

    def share(self) -> float | None:
        """Fraction of all CPUs' time used by other processes since construction (0..1)."""
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        foreign = (busy - self.busy0) - (self._own() - self.own0)
        return max(0.0, min(1.0, foreign / max(1e-9, wall * (os.cpu_count() or 1))))

    def report(self) -> str:
        s = self.share()
        if s is None:
            return "other processes' CPU use: unknown"
        note = " (busy machine: expect noisy timings)" if s > 0.1 else ""
        return f"other processes used {s:.0%} of the CPUs during the run{note}"


def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(xs))


def spread(xs: Sequence[float]) -> str:
    """min..max of a sample, for a feel of the noise."""
    return f"{min(xs):.3g}..{max(xs):.3g}"


def table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of dicts (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e6 else f"{v:,.0f}"
        if isinstance(v, bool):
            return "yes" if v else "no"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out)


def environment() -> dict[str, Any]:
    """Machine and library versions, recorded with every result."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        env["cpu_native_bf16"] = cpu_has_native_bf16()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    with contextlib.suppress(OSError):
        env["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    return env


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN sees AVX512-BF16/AMX (without it bf16 matmuls are emulated and slow)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def write_json(
    path: str | None, name: str, args: argparse.Namespace, results: dict[str, Any]
) -> None:
    """Write {benchmark, args, environment, results} to `path` (no-op when path is None)."""
    if not path:
        return
    record = {
        "benchmark": name,
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "environment": environment(),
        "results": results,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


# -- Hugging Face Llama with the same weights ------------------------------------------------


def _hf_config_kwargs(cfg: Any) -> dict[str, Any]:
    from llmctl.core.hf_compat import to_hf_config

    return to_hf_config(cfg)


def _hf_state_dict(model: Any) -> dict[str, Any]:
    from llmctl.core.hf_compat import to_hf_state_dict

    return to_hf_state_dict(model)


def hf_llama_like(model: Any, attn_implementation: str = "sdpa") -> Any:
    """A `transformers.LlamaForCausalLM` with the same architecture and (copied) weights as an
    llmctl `Transformer`, in the same train/eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**_hf_config_kwargs(model.cfg))
    hf = LlamaForCausalLM._from_config(hf_cfg, attn_implementation=attn_implementation)
    sd = {k: v.detach().clone() for k, v in _hf_state_dict(model).items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    allowed = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise RuntimeError(f"weight mapping mismatch: missing {missing}, unexpected {unexpected}")
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    return hf.train(model.training)

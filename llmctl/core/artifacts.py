"""Artifacts: directories with a `manifest.json`, written atomically.

Every stage writes its output through `commit_output`: files go to `<dst>.partial/`, the manifest is
written last, then the directory is renamed to `<dst>`. A directory without a manifest is not an
artifact, an existing `<dst>` is never touched unless `force=True` (and then only after the new
output is complete), and a failed stage leaves nothing at `<dst>`.

The manifest records what is needed to re-make the artifact: stage, resolved config, seed, inputs
with their fingerprints, the llmctl version and the command line; plus counts, stats and wall time.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Literal

from llmctl import __version__
from llmctl.core.errors import InputError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
Kind = Literal["docs", "tokens", "checkpoint", "eval"]

# Files whose bytes are allowed to differ between two runs of the same config (timings, plots,
# intermediate checkpoints): left out of an artifact's content fingerprint.
VOLATILE = ("manifest.json", "metrics.jsonl", "*.png", "checkpoints/*", "trainer_state.*")

_SAMPLE_ABOVE = 256 << 20  # files larger than this are fingerprinted by 64 sampled 1 MiB chunks


def file_fingerprint(path: Path) -> str:
    """sha256 of a file (sampled for files over 256 MiB: size plus 64 evenly spaced MiB chunks)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= _SAMPLE_ABOVE:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            for i in range(64):
                f.seek((size - (1 << 20)) * i // 63)
                h.update(f.read(1 << 20))
    return h.hexdigest()


def dir_fingerprint(path: Path, volatile: Iterable[str] = VOLATILE) -> str:
    """Content fingerprint of an artifact directory: its non-volatile files, by relative path."""
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        rel = p.relative_to(path).as_posix()
        if any(fnmatch(rel, pat) for pat in volatile):
            continue
        h.update(rel.encode() + b"\0" + file_fingerprint(p).encode() + b"\n")
    return h.hexdigest()


@dataclass
class Manifest:
    """The `manifest.json` of an artifact. Unknown keys read from disk are kept in `extra`."""

    kind: str
    stage: str
    config: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    tokenizer: dict[str, Any] | None = None
    wall_time_s: float = 0.0
    created: str = ""
    command: list[str] = field(default_factory=list)
    llmctl_version: str = __version__
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, `extra` merged at the top level."""
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d

    def write(self, directory: Path) -> None:
        """Write `manifest.json` into `directory` (atomically, via a temporary file)."""
        atomic_write_text(directory / MANIFEST, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """Read the manifest of an artifact directory.

        Raises:
            InputError: No manifest, or one that is not valid JSON.
        """
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise InputError(
                f"{directory} is not an llmctl artifact (no {MANIFEST})",
                "point at a directory written by an llmctl stage",
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path} is corrupt: {e}", "re-run the stage that wrote it") from None
        if not isinstance(data, dict) or "kind" not in data:
            raise InputError(f"{path} is not an llmctl manifest (no 'kind')")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise InputError(
                f"{directory} was written by a newer llmctl (format {data['format_version']}, "
                f"this is {FORMAT_VERSION})",
                "upgrade llmctl",
            )
        known = set(cls.__dataclass_fields__) - {"extra"}
        return cls(
            **{k: v for k, v in data.items() if k in known},
            extra={k: v for k, v in data.items() if k not in known},
        )


def is_artifact(path: Path, kind: str | None = None) -> bool:
    """True if `path` is a directory with a manifest (of `kind`, when given)."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        return False
    if kind is None:
        return True
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("kind") == kind
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False


def input_record(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """How an input is recorded in a manifest: path, kind and content fingerprint."""
    if str(path) == "-":
        return {"path": "-", "kind": kind, "fingerprint": None}
    p = Path(path)
    if is_artifact(p):
        m = Manifest.read(p)
        return {"path": str(p.resolve()), "kind": m.kind, "fingerprint": m.fingerprint}
    if p.is_file():
        return {"path": str(p.resolve()), "kind": kind, "fingerprint": file_fingerprint(p)}
    if p.is_dir():
        return {"path": str(p.resolve()), "kind": kind, "fingerprint": dir_fingerprint(p, ())}
    return {"path": str(p), "kind": kind, "fingerprint": None}


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via a temporary name and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Binary twin of `atomic_write_text`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def partial_path(dst: Path) -> Path:
    """Where an artifact is built before it is renamed to `dst`."""
    dst = Path(dst)
    return dst.with_name(dst.name + ".partial")


def check_output(dst: Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless forced (call before any long work)."""
    dst = Path(dst)
    if dst.exists() and not force:
        raise InputError(
            f"{dst} already exists", "pass --force to replace it, or choose another -o"
        )


@dataclass
class Output:
    """A stage's output while it is being written; `path` is the partial directory."""

    path: Path
    manifest: Manifest


@contextmanager
def commit_output(
    dst: Path,
    *,
    kind: str,
    stage: str,
    config: dict[str, Any],
    inputs: list[dict[str, Any]],
    force: bool = False,
    keep_partial_on_error: bool = False,
    fresh: bool = True,
) -> Iterator[Output]:
    """Build an artifact in `<dst>.partial`, then write its manifest and rename it to `dst`.

    Args:
        dst: Final directory.
        kind: Artifact kind (docs, tokens, checkpoint, eval).
        stage: The stage writing it.
        config: Resolved config (JSON-ready).
        inputs: `input_record`s of the inputs.
        force: Replace an existing `dst` (only once the new output is complete).
        keep_partial_on_error: Leave `<dst>.partial` after a failure (pretrain resumes from it).
        fresh: Empty a stale `<dst>.partial` first; False keeps it (resume).

    Yields:
        The Output; fill `output.manifest.counts` / `stats` inside the block.
    """
    dst = Path(dst)
    check_output(dst, force)
    part = partial_path(dst)
    if fresh and part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    manifest = Manifest(
        kind=kind, stage=stage, config=config, inputs=inputs, command=list(sys.argv)
    )
    out = Output(part, manifest)
    try:
        yield out
        manifest.wall_time_s = round(manifest.wall_time_s or (time.time() - t0), 3)
        manifest.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        manifest.fingerprint = dir_fingerprint(part)
        manifest.write(part)
    except BaseException:
        if not keep_partial_on_error:
            shutil.rmtree(part, ignore_errors=True)
        raise
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(part, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(part, dst)

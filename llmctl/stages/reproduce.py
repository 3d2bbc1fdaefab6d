"""reproduce: artifact -> the command that re-makes it, from its manifest alone (and, run, a twin).

A manifest records the stage, the resolved config (every default filled in) and the inputs with
their paths and content fingerprints. `plan()` turns that into a command line,
`llmctl <stage> <positional inputs> -o OUT --config <ARTIFACT>.reproduce.toml`, where the TOML
holds the whole resolved config as the stage's `[section]` table, so no default of a later llmctl
version can creep in. It is written next to the artifact, never inside it (that would change the
artifact's content). Input paths are taken from the manifest's resolved `inputs`; a config path
that no longer exists (a relative path typed elsewhere) is replaced by the input of the same name.
Inputs whose content changed since (fingerprint differs) are reported, because the re-made
artifact will then differ too. `run()` executes the command with this Python into a new directory
and returns the new manifest: the same stage, config and inputs give the same content fingerprint
for the deterministic stages (data stages; training on CPU).

Limits: a config value recorded as null is left out of the TOML (TOML has no null), so the stage's
default applies; for every field whose default is None that is the same thing.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.core.artifacts import MANIFEST, Manifest, atomic_write_text, input_record
from llmctl.core.errors import InputError, LlmctlError

# stage -> command words (eval variants are subcommands of `llmctl eval`).
COMMANDS = {
    "eval-ppl": ["eval", "ppl"],
    "eval-humaneval": ["eval", "humaneval"],
    "rm-score": ["rm", "score"],
}
# Config keys that hold input paths (positional arguments of some stages).
PATH_KEYS = ("data", "init", "prompts", "reward_model", "tokenizer", "ref")
# Stages whose positional arguments are their recorded inputs, and how many of them.
POSITIONAL_INPUTS = {
    "crawl-filter": None,
    "dedup": 1,
    "tokenize": 1,
    "eval": 1,
    "eval-ppl": 2,
    "eval-humaneval": 1,
}
# Stages whose positional argument is a config key.
POSITIONAL_KEY = {"sft": "data", "rm": "data", "dpo": "data", "ppo": "prompts"}


@dataclass
class Recipe:
    """How to re-make one artifact."""

    artifact: Path
    manifest: Manifest
    argv: list[str]  # arguments after `llmctl`
    toml_path: Path
    toml_text: str
    warnings: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        """The shell command line."""
        return shlex.join(["llmctl", *self.argv])


def locate(path: Path) -> Path:
    """The artifact directory for an artifact or its manifest.json.

    Raises:
        InputError: Neither.
    """
    p = Path(path)
    if p.is_file() and p.name == MANIFEST:
        p = p.parent
    if not (p / MANIFEST).is_file():
        raise InputError(
            f"{path} is neither an artifact directory nor a {MANIFEST}",
            "pass a directory written by an llmctl stage, e.g. out/web-dedup",
        )
    return p


def plan(artifact: Path, output: Path | None = None) -> Recipe:
    """The command (and its config file's text) that re-makes `artifact` into `output`.

    Args:
        artifact: Artifact directory or its manifest.json.
        output: Where the twin goes (default `<artifact>.reproduced`).

    Raises:
        InputError: Not an artifact, or a manifest without a stage.
    """
    art = locate(artifact).resolve()
    m = Manifest.read(art)
    if not m.stage:
        raise InputError(f"{art / MANIFEST} names no stage", "it cannot be reproduced")
    out = Path(output) if output else art.with_name(art.name + ".reproduced")
    config, warnings = _resolve_paths(m)
    toml_path = art.with_name(art.name + ".reproduce.toml")
    argv = [*COMMANDS.get(m.stage, [m.stage]), *_positional(m, config)]
    argv += ["-o", str(out), "--config", str(toml_path)]
    text = f"# Re-makes {art} ({m.stage}, fingerprint {m.fingerprint[:12]}); written by llmctl reproduce.\n"
    text += to_toml({m.stage: config})
    warnings += _changed_inputs(m)
    return Recipe(art, m, argv, toml_path, text, warnings)


def write_config(recipe: Recipe) -> Path:
    """Write the recipe's TOML next to the artifact; returns its path."""
    atomic_write_text(recipe.toml_path, recipe.toml_text)
    return recipe.toml_path


def run(recipe: Recipe, *, force: bool = False) -> Manifest:
    """Write the config, run the command with this Python, and return the new artifact's manifest.

    Raises:
        LlmctlError: The command failed (its stderr's last lines are in the message).
    """
    write_config(recipe)
    argv = [*recipe.argv, *(["--force"] if force else [])]
    r = subprocess.run(
        [sys.executable, "-m", "llmctl", "--quiet", *argv], capture_output=True, text=True
    )
    if r.returncode != 0:
        tail = " / ".join(r.stderr.strip().splitlines()[-3:])
        raise LlmctlError(f"`{recipe.command}` failed (exit {r.returncode}): {tail}")
    return Manifest.read(Path(argv[argv.index("-o") + 1]))


def _resolve_paths(m: Manifest) -> tuple[dict[str, Any], list[str]]:
    """The config with path values that no longer exist replaced by the same-named input."""
    by_name = {Path(i["path"]).name: i["path"] for i in m.inputs if i.get("path")}
    warnings = []

    def fix(v: str) -> str:
        path, sep, w = v.rpartition("=") if "=" in v else (v, "", "")
        if not sep:
            path = v
        if Path(path).exists() or Path(path).name not in by_name:
            return v
        new = by_name[Path(path).name]
        warnings.append(f"config path {path} does not exist here; using the input {new}")
        return new + (f"={w}" if sep else "")

    config = dict(m.config)
    for k in PATH_KEYS:
        v = config.get(k)
        if isinstance(v, str) and v:
            config[k] = fix(v)
        elif isinstance(v, list):
            config[k] = [fix(x) if isinstance(x, str) else x for x in v]
    return config, warnings


def _positional(m: Manifest, config: dict[str, Any]) -> list[str]:
    if m.stage in POSITIONAL_KEY:
        v = config.get(POSITIONAL_KEY[m.stage])
        return [str(v)] if v else []
    if m.stage in POSITIONAL_INPUTS:
        n = POSITIONAL_INPUTS[m.stage]
        paths = [i["path"] for i in m.inputs if i.get("path") and i["path"] != "-"]
        return paths if n is None else paths[:n]
    return []


def _changed_inputs(m: Manifest) -> list[str]:
    out = []
    for i in m.inputs:
        p, fp = i.get("path"), i.get("fingerprint")
        if not p or p == "-" or not fp:
            continue
        if not Path(p).exists():
            out.append(f"input {p} no longer exists")
            continue
        now = input_record(p, i.get("kind")).get("fingerprint")
        if now != fp:
            out.append(f"input {p} changed since (fingerprint {fp[:12]} -> {str(now)[:12]})")
    return out


def to_toml(tables: dict[str, dict[str, Any]]) -> str:
    """TOML for {section: {key: value}}: nested dicts become sub-tables, None values are left out."""
    lines: list[str] = []

    def emit(path: list[str], d: dict[str, Any]) -> None:
        lines.append("[" + ".".join(_key(p) for p in path) + "]")
        subs = []
        for k, v in d.items():
            if isinstance(v, dict):
                subs.append(([*path, k], v))
            elif v is not None:
                lines.append(f"{_key(k)} = {_value(v)}")
        lines.append("")
        for sub_path, sub in subs:
            emit(sub_path, sub)

    for name, d in tables.items():
        emit([name], d)
    return "\n".join(lines)


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if v != v else "inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v if x is not None) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")

"""Tests for llmctl.core.config: defaults < TOML top level < TOML section < flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from llmctl.core.config import build_config, load_toml, require, to_dict
from llmctl.core.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """A stand-in stage config."""

    seed: int = 0
    lr: float = 1e-3
    name: str = "default"
    betas: tuple[float, float] = (0.9, 0.95)
    out: Path | None = None
    steps: int = 10

    def __post_init__(self) -> None:
        require(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")


TOML = """
seed = 1
name = "top"
unrelated_top_level = "ignored: other stages' keys live here too"

[train]
name = "section"
lr = 3
betas = [0.8, 0.9]

[other]
whatever = 1
"""


def _toml(tmp_path: Path, text: str = TOML) -> dict:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_toml(path)


def test_defaults_only() -> None:
    assert build_config(StageConfig) == StageConfig()
    assert build_config(StageConfig, None, "train") == StageConfig()


def test_precedence(tmp_path: Path) -> None:
    doc = _toml(tmp_path)
    cfg = build_config(StageConfig, doc, "train")
    assert cfg.seed == 1  # top level over default
    assert cfg.name == "section"  # section over top level
    assert cfg.lr == 3.0  # section over default, int coerced to the float field
    assert isinstance(cfg.lr, float)
    assert cfg.betas == (0.8, 0.9)  # TOML array to the tuple field
    assert cfg.steps == 10  # untouched default

    flagged = build_config(StageConfig, doc, "train", name="flag", seed=5, lr=None, steps=None)
    assert flagged.name == "flag"  # flags over everything
    assert flagged.seed == 5
    assert flagged.lr == 3.0  # a None flag means "not given"
    assert flagged.steps == 10


def test_top_level_applies_without_a_section(tmp_path: Path) -> None:
    cfg = build_config(StageConfig, _toml(tmp_path), "missing_section")
    assert (cfg.seed, cfg.name, cfg.lr) == (1, "top", 1e-3)


def test_unknown_section_key_is_named(tmp_path: Path) -> None:
    doc = _toml(tmp_path, "[train]\nlr = 1.0\nlearning_rate = 2.0\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[train\]: learning_rate") as e:
        build_config(StageConfig, doc, "train")
    assert "lr" in (e.value.hint or "")


def test_section_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[train\] in the config file must be a table"):
        build_config(StageConfig, {"train": 3}, "train")


def test_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[train\nlr = = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML"):
        load_toml(path)


def test_missing_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "nope.toml")


def test_validation_runs_on_the_merged_result(tmp_path: Path) -> None:
    doc = _toml(tmp_path, "[train]\nsteps = 0\n")
    with pytest.raises(ConfigError, match="--steps must be >= 1, got 0"):
        build_config(StageConfig, doc, "train")
    assert build_config(StageConfig, doc, "train", steps=3).steps == 3  # a flag can fix it


def test_unknown_flag() -> None:
    with pytest.raises(ConfigError, match="bad config for StageConfig"):
        build_config(StageConfig, None, None, no_such_flag=1)


def test_to_dict_is_json_ready() -> None:
    cfg = StageConfig(out=Path("/tmp/x"), betas=(0.1, 0.2))
    d = to_dict(cfg)
    assert d["out"] == "/tmp/x"
    assert d["betas"] == [0.1, 0.2]
    assert build_config(StageConfig, {"s": d}, "s", out=Path(d["out"])) == cfg

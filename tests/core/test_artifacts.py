"""Tests for llmctl.core.artifacts: atomic outputs, manifests and fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmctl.core.artifacts import (
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    atomic_write_text,
    commit_output,
    dir_fingerprint,
    file_fingerprint,
    input_record,
    is_artifact,
    partial_path,
)
from llmctl.core.errors import InputError


def _commit(dst: Path, **kwargs: object):  # noqa: ANN202
    return commit_output(dst, kind="docs", stage="test", config={"seed": 7}, inputs=[], **kwargs)


def _build_and_fail(dst: Path, exc: BaseException, name: str, **kwargs: object) -> None:
    """Write a file into the partial output, then fail the way a crashing stage would."""
    with _commit(dst, **kwargs) as out:
        (out.path / name).write_text("partial work")
        raise exc


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_success_renames_partial_into_place(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    with _commit(dst) as out:
        assert out.path == partial_path(dst) == tmp_path / "out.partial"
        assert not dst.exists()
        (out.path / "part-00000.parquet").write_bytes(b"data")
        out.manifest.counts["docs"] = 1
    assert _leftovers(tmp_path) == ["out"]
    assert (dst / "part-00000.parquet").read_bytes() == b"data"
    m = json.loads((dst / MANIFEST).read_text())
    assert m["kind"] == "docs"
    assert m["stage"] == "test"
    assert m["config"] == {"seed": 7}
    assert m["counts"] == {"docs": 1}
    assert m["format_version"] == FORMAT_VERSION
    assert m["fingerprint"] == dir_fingerprint(dst)
    assert m["created"]
    assert m["wall_time_s"] >= 0
    assert is_artifact(dst, "docs")
    assert not is_artifact(dst, "tokens")


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_leaves_nothing(tmp_path: Path, exc: BaseException) -> None:
    dst = tmp_path / "out"
    with pytest.raises(type(exc)):
        _build_and_fail(dst, exc, "half.parquet")
    assert _leftovers(tmp_path) == []


def test_keep_partial_on_error(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        _build_and_fail(dst, RuntimeError("interrupted"), "step-100", keep_partial_on_error=True)
    assert _leftovers(tmp_path) == ["out.partial"]
    with _commit(dst, fresh=False) as out:  # resume: the partial's files are kept
        assert (out.path / "step-100").read_text() == "partial work"
    assert (dst / "step-100").is_file()


def test_stale_partial_is_emptied_when_fresh(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    partial_path(dst).mkdir()
    (partial_path(dst) / "stale").write_text("old run")
    with _commit(dst) as out:
        assert list(out.path.iterdir()) == []
    assert not (dst / "stale").exists()


def test_existing_dst_is_refused_without_force(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep").write_text("precious")
    with pytest.raises(InputError, match="already exists") as e, _commit(dst):
        pytest.fail("the block must not run")
    assert "--force" in (e.value.hint or "")
    assert (dst / "keep").read_text() == "precious"
    assert _leftovers(tmp_path) == ["out"]


def test_force_replaces_only_after_completion(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old").write_text("old")
    with _commit(dst, force=True) as out:
        assert (dst / "old").read_text() == "old"  # still intact while the new one is built
        (out.path / "new").write_text("new")
    assert _leftovers(dst) == [MANIFEST, "new"]
    assert _leftovers(tmp_path) == ["out"]


def test_force_with_failure_keeps_the_old_output(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old").write_text("old")
    with pytest.raises(ValueError, match="bad"):
        _build_and_fail(dst, ValueError("bad"), "new", force=True)
    assert _leftovers(dst) == ["old"]
    assert _leftovers(tmp_path) == ["out"]


# -- manifests --------------------------------------------------------------------------------------


def test_manifest_round_trip_keeps_unknown_keys(tmp_path: Path) -> None:
    m = Manifest(
        kind="tokens", stage="tokenize", counts={"docs": 3}, extra={"future_field": [1, 2]}
    )
    m.write(tmp_path)
    back = Manifest.read(tmp_path)
    assert back == m
    assert json.loads((tmp_path / MANIFEST).read_text())["future_field"] == [1, 2]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "is not an llmctl artifact"),
        ("{broken", "is corrupt"),
        ('["a list"]', "no 'kind'"),
        ('{"stage": "x"}', "no 'kind'"),
        (json.dumps({"kind": "docs", "stage": "x", "format_version": 99}), "newer llmctl"),
    ],
)
def test_bad_manifests(tmp_path: Path, content: str | None, match: str) -> None:
    if content is not None:
        (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(InputError, match=match):
        Manifest.read(tmp_path)


def test_is_artifact(tmp_path: Path) -> None:
    assert not is_artifact(tmp_path)
    (tmp_path / MANIFEST).write_text("{broken")
    assert is_artifact(tmp_path)  # a manifest is there, whatever its state
    assert not is_artifact(tmp_path, "docs")


# -- fingerprints -----------------------------------------------------------------------------------


def test_dir_fingerprint_ignores_volatile_files(tmp_path: Path) -> None:
    (tmp_path / "data.bin").write_bytes(b"abc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("x")
    base = dir_fingerprint(tmp_path)
    assert dir_fingerprint(tmp_path) == base
    (tmp_path / MANIFEST).write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("{}")
    (tmp_path / "loss.png").write_bytes(b"png")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "w").write_bytes(b"w")
    assert dir_fingerprint(tmp_path) == base
    (tmp_path / "sub" / "x.txt").write_text("y")
    assert dir_fingerprint(tmp_path) != base
    (tmp_path / "sub" / "x.txt").write_text("x")
    (tmp_path / "sub" / "x.txt").rename(tmp_path / "sub" / "z.txt")  # same bytes, other name
    assert dir_fingerprint(tmp_path) != base


def test_file_fingerprint(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"same")
    b.write_bytes(b"same")
    assert file_fingerprint(a) == file_fingerprint(b)
    b.write_bytes(b"diff")
    assert file_fingerprint(a) != file_fingerprint(b)


def test_input_record(tmp_path: Path) -> None:
    f = tmp_path / "f.jsonl"
    f.write_text("{}\n")
    assert input_record(f, "docs") == {
        "path": str(f.resolve()),
        "kind": "docs",
        "fingerprint": file_fingerprint(f),
    }
    art = tmp_path / "art"
    art.mkdir()
    Manifest(kind="tokens", stage="tokenize", fingerprint="abc").write(art)
    assert input_record(art, "docs") == {
        "path": str(art.resolve()),
        "kind": "tokens",
        "fingerprint": "abc",
    }
    assert input_record("-", "docs")["fingerprint"] is None
    assert input_record(tmp_path / "missing", "docs")["fingerprint"] is None


def test_atomic_write_text(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert _leftovers(tmp_path) == ["x.json"]

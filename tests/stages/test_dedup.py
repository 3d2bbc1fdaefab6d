"""Tests for `llmctl dedup` on planted duplicates of real text (the stdlib's documentation topics).

Each original gets, in shuffled input order: sometimes an exact copy (case and whitespace changed),
a near copy with 0.5-1.5% of its words replaced, and a far copy with 6-10% replaced. Every planted
pair's true Jaccard on word 5-gram shingles is computed here, independently of the stage; recall
counts pairs at or above the threshold, precision pairs below threshold - 0.15.
"""

from __future__ import annotations

import io
import json
import random
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasketch import MinHash
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core import minhash
from llmctl.core.artifacts import Manifest
from llmctl.core.docs import open_docs
from llmctl.core.errors import ConfigError, InputError
from llmctl.stages import corpus, dedup

CFG = dedup.DedupConfig()
runner = CliRunner()


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = unicodedata.normalize("NFKC", text).lower().split()
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def _edit(words: list[str], rate: float, rng: random.Random, vocab: list[str]) -> list[str]:
    out = list(words)
    for i in rng.sample(range(len(out)), max(1, round(rate * len(out)))):
        out[i] = rng.choice([w for w in rng.sample(vocab, 3) if w != out[i]] or ["zzz"])
    return out


def build_planted() -> tuple[list[dict], list[tuple[str, str, float]], list[str]]:
    """Rows (id, text, kind) in shuffled order, planted pairs (a, b, true Jaccard), exact copies."""
    rng = random.Random(0)
    originals = []
    for d in corpus.documents(corpus.CorpusConfig(kinds=("topics",))):
        words = d["text"].split()
        if len(words) >= 100:
            originals.append((d["id"], words[:300]))  # capped: keeps the test fast
    vocab = sorted({w for _, ws in originals for w in ws})
    rows, pairs, exact = [], [], []
    for i, (doc_id, words) in enumerate(originals):
        text = " ".join(words)
        rows.append({"id": doc_id, "text": text, "kind": "original"})
        near = " ".join(_edit(words, (0.005, 0.01, 0.015)[i % 3], rng, vocab))
        far = " ".join(_edit(words, (0.06, 0.1)[i % 2], rng, vocab))
        rows.append({"id": doc_id + "#near", "text": near, "kind": "near"})
        rows.append({"id": doc_id + "#far", "text": far, "kind": "far"})
        pairs += [(doc_id, doc_id + "#near", jaccard(text, near))]
        pairs += [(doc_id, doc_id + "#far", jaccard(text, far))]
        if i % 3 == 0:
            # Upper case where lower(upper(w)) == lower(w) ('ß' upper-cases to 'SS'), doubled spaces.
            copy = "  ".join(w.upper() if w.upper().lower() == w.lower() else w for w in words)
            copy += "\n"
            rows.append({"id": doc_id + "#exact", "text": copy, "kind": "exact"})
            exact.append(doc_id + "#exact")
    rng.shuffle(rows)
    return rows, pairs, exact


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    rows, pairs, exact = build_planted()
    root = tmp_path_factory.mktemp("dedup")
    # A directory input: a Parquet file with small row groups and a JSONL file, so shards split it.
    half = len(rows) * 2 // 3
    pq.write_table(pa.Table.from_pylist(rows[:half]), root / "a.parquet", row_group_size=40)
    with open(root / "b.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[half:])
    (root / "input").mkdir()
    (root / "a.parquet").rename(root / "input" / "a.parquet")
    (root / "b.jsonl").rename(root / "input" / "b.jsonl")
    out = root / "out"
    manifest = dedup.run(root / "input", out, CFG)
    return {"root": root, "rows": rows, "pairs": pairs, "exact": exact, "out": out, "m": manifest}


def _report(out: Path) -> list[dict]:
    return pq.read_table(out / "duplicates" / "part-00000.parquet").to_pylist()


def _survivor(report: list[dict]) -> dict[str, str]:
    return {r["id"]: r["kept_id"] for r in report}


def test_planted_pairs_span_the_threshold(planted: dict) -> None:
    js = [j for _, _, j in planted["pairs"]]
    above = [j for j in js if j >= CFG.threshold]
    below = [j for j in js if j < CFG.threshold - 0.15]
    assert len(above) >= 40
    assert len(below) >= 40
    assert min(above) < 0.87  # some pairs close to the threshold, not only easy ones


def test_exact_duplicates_all_removed(planted: dict) -> None:
    report = {r["id"]: r for r in _report(planted["out"])}
    order = [r["id"] for r in planted["rows"]]
    for copy in planted["exact"]:
        original = copy.removesuffix("#exact")
        first, second = sorted([copy, original], key=order.index)
        assert second in report, second
        assert report[second]["kind"] == "exact"
        # Kept is `first`, or the survivor of the cluster `first` belongs to.
        if report[second]["kept_id"] == first:
            assert report[second]["similarity"] == 1.0
        else:
            assert report[first]["kept_id"] == report[second]["kept_id"]


def test_near_duplicate_recall_and_precision(planted: dict) -> None:
    survivor = _survivor(_report(planted["out"]))

    def same_cluster(a: str, b: str) -> bool:
        return survivor.get(a, a) == survivor.get(b, b)

    t = CFG.threshold
    positives = [(a, b) for a, b, j in planted["pairs"] if j >= t]
    negatives = [(a, b) for a, b, j in planted["pairs"] if j < t - 0.15]
    tp = sum(same_cluster(a, b) for a, b in positives)
    fp = sum(same_cluster(a, b) for a, b in negatives)
    recall, precision = tp / len(positives), tp / max(1, tp + fp)
    assert recall >= 0.95, (recall, len(positives))
    assert precision >= 0.95, (precision, fp)


def test_report_lists_each_removed_document_with_its_kept_id(planted: dict) -> None:
    out = planted["out"]
    kept = {r["id"] for b in open_docs(out).batches() for r in b.to_pylist()}
    report = _report(out)
    removed = {r["id"] for r in report}
    every = {r["id"] for r in planted["rows"]}
    assert kept | removed == every
    assert not kept & removed
    assert all(r["kept_id"] in kept for r in report)
    assert {r["kind"] for r in report} == {"exact", "near"}
    m = planted["m"]
    assert m.counts["kept"] == len(kept)
    assert m.counts["kept"] + m.counts["exact_removed"] + m.counts["near_removed"] == len(every)
    assert m.counts["documents"] == len(every)
    assert m.stats["bands"] * m.stats["rows"] <= m.stats["num_perm"]
    # Every column of the input survives (text renamed to `text` is already its name).
    assert open_docs(out).batches().__next__().schema.names == ["id", "text", "kind"]


def test_survivor_is_the_first_in_input_order(planted: dict) -> None:
    order = {r["id"]: i for i, r in enumerate(planted["rows"])}
    for r in _report(planted["out"]):
        assert order[r["kept_id"]] < order[r["id"]]
        assert r["cluster"] == order[r["kept_id"]]


def test_output_is_deterministic(planted: dict, tmp_path: Path) -> None:
    again = dedup.run(planted["root"] / "input", tmp_path / "again", CFG)
    assert again.fingerprint == planted["m"].fingerprint
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [
        "duplicates",
        "manifest.json",
        "part-00000.parquet",
    ]  # intermediate files are gone
    for f in ["part-00000.parquet", "duplicates/part-00000.parquet"]:
        assert (tmp_path / "again" / f).read_bytes() == (planted["out"] / f).read_bytes()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_shards_combine_to_one_run(planted: dict, tmp_path: Path, n: int) -> None:
    src = planted["root"] / "input"
    sigs = [tmp_path / f"sigs{k}" for k in range(n)]
    for k in range(n):
        dedup.signatures(src, sigs[k], CFG, shard=(k, n))
    dedup.cluster(sigs[::-1], tmp_path / "clusters", CFG)  # order of SIGS does not matter
    kept, report = set(), []
    for k in range(n):
        out = tmp_path / f"out{k}"
        dedup.write(src, tmp_path / "clusters", out, CFG, shard=(k, n))
        kept |= {r["id"] for b in open_docs(out).batches() for r in b.to_pylist()}
        report += _report(out)
    assert kept == {r["id"] for b in open_docs(planted["out"]).batches() for r in b.to_pylist()}
    assert sorted(report, key=lambda r: r["id"]) == sorted(
        _report(planted["out"]), key=lambda r: r["id"]
    )


def test_transitive_clusters() -> None:
    # A~B share bands 0-6 exactly, B~C bands 7-13; A and C agree on only 70% of positions.
    rng = np.random.default_rng(1)
    a = rng.integers(0, 1 << 16, 128, dtype=np.uint16)
    b, c = a.copy(), a.copy()
    b[70:89] ^= 1
    c[70:89] ^= 1
    c[0:19] ^= 1
    d = rng.integers(0, 1 << 16, 128, dtype=np.uint16)
    sig = np.stack([a, b, c, d])
    est = dict(
        zip(
            ["ab", "bc", "ac"],
            minhash.estimate_jaccard(sig, np.array([[0, 1], [1, 2], [0, 2]])),
            strict=True,
        )
    )
    assert est["ab"] >= 0.8
    assert est["bc"] >= 0.8
    assert est["ac"] < 0.75
    exact = np.arange(4 * 16, dtype=np.uint8).reshape(4, 16)
    kept, _, counts = minhash.find_clusters(exact, sig, CFG.threshold, *CFG.lsh())
    assert kept.tolist() == [0, 0, 0, 3]
    assert counts["verified_pairs"] == 2  # A-C was never linked directly


def test_generated_ids_and_arrow_stream(tmp_path: Path) -> None:
    text = " ".join(f"word{i}" for i in range(50))
    (tmp_path / "in.jsonl").write_text(
        "\n".join(f'{{"text": "{t}"}}' for t in [text, "other words entirely here", text]) + "\n"
    )
    dedup.run(tmp_path / "in.jsonl", tmp_path / "out", CFG)
    assert _report(tmp_path / "out") == [
        {
            "id": "in.jsonl:2",
            "cluster": 0,
            "kept_id": "in.jsonl:0",
            "kind": "exact",
            "similarity": 1.0,
        }
    ]
    buf = io.BytesIO()
    m = dedup.run(tmp_path / "in.jsonl", "-", CFG, stdout=buf)
    table = pa.ipc.open_stream(buf.getvalue()).read_all()
    assert table.num_rows == m.counts["kept"] == 2


def test_bad_inputs_are_input_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="contains no documents"):
        dedup.run(tmp_path / "empty.jsonl", tmp_path / "out", CFG)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.partial").exists()
    pq.write_table(pa.table({"body": ["a b c"]}), tmp_path / "nobody.parquet")
    r = runner.invoke(app, ["dedup", str(tmp_path / "nobody.parquet"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "has no column 'text' (found: body)" in r.stderr
    assert "--text-column body" in r.stderr
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="0 <= K < N"):
        dedup.parse_shard("3/3")
    with pytest.raises(ConfigError, match="--threshold"):
        dedup.DedupConfig(threshold=1.5)


def test_steps_refuse_mismatched_inputs(planted: dict, tmp_path: Path) -> None:
    src = planted["root"] / "input"
    dedup.signatures(src, tmp_path / "s0", CFG, shard=(0, 2))
    with pytest.raises(InputError, match="missing 1/2"):
        dedup.cluster([tmp_path / "s0"], tmp_path / "c", CFG)
    with pytest.raises(InputError, match="not a dedup signatures artifact"):
        dedup.cluster([planted["out"]], tmp_path / "c", CFG)
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "one"}\n')
    dedup.signatures(other, tmp_path / "s1", CFG)
    dedup.cluster([tmp_path / "s1"], tmp_path / "c1", CFG)
    with pytest.raises(InputError, match="was computed from"):
        dedup.write(src, tmp_path / "c1", tmp_path / "w", CFG)


def test_cli_steps_and_help(planted: dict, tmp_path: Path) -> None:
    for cmd in ([], ["run"], ["signatures"], ["cluster"], ["write"]):
        r = runner.invoke(app, ["dedup", *cmd, "--help"])
        assert r.exit_code == 0, r.output
        assert "Example" in r.stdout
    src = str(planted["root"] / "input")
    r = runner.invoke(
        app, ["-q", "dedup", "signatures", src, "--shard", "0/1", "-o", str(tmp_path / "s")]
    )
    assert r.exit_code == 0, r.output
    # A signature file row holds datasketch's hash values for that document.
    row = pq.read_table(tmp_path / "s" / "part-00000.parquet").slice(7, 1).to_pylist()[0]
    text = next(r["text"] for r in planted["rows"] if r["id"] == row["id"])
    ref = MinHash(num_perm=128, seed=0, hashfunc=int)
    ref.update_batch(minhash.hash_texts(pa.array([text]), 5).shingles.tolist())
    np.testing.assert_array_equal(np.frombuffer(row["minhash"], "<u4"), ref.hashvalues)
    r = runner.invoke(
        app, ["-q", "dedup", "cluster", str(tmp_path / "s"), "-o", str(tmp_path / "c")]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app, ["dedup", "write", src, "--clusters", str(tmp_path / "c"), "-o", str(tmp_path / "w")]
    )
    assert r.exit_code == 0, r.output
    assert "written" in r.stderr
    m = Manifest.read(tmp_path / "w")
    assert m.counts["written"] == planted["m"].counts["kept"]
    r = runner.invoke(
        app, ["dedup", "signatures", src, "--shard", "2/2", "-o", str(tmp_path / "x")]
    )
    assert r.exit_code == 2
    assert "0 <= K < N" in r.stderr

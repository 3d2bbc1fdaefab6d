"""Near-duplicate removal: `llmctl dedup` vs datasketch used naively, and datatrove if installed.

Input: N documents of 100-300 words, each a random run of sentences from real text (the stdlib's
documentation topics and docstrings), written as one Parquet file. Planted on top: near copies
(0.2-2% of words replaced; true word 5-gram Jaccard about 0.75-0.98), far copies (6-15% replaced;
about 0.35-0.65) and exact copies (case and whitespace changed), each of a different original.
The true Jaccard of every planted pair is computed here with the normalisation llmctl documents
(NFKC, lowercase, whitespace words).

Systems, each end to end (Parquet in, survivors out) in its own process, so that peak RSS
(ru_maxrss, reported above the process's baseline after imports) is its own:
    llmctl      `llmctl.stages.dedup.run` with its defaults (128 perms, 14 bands x 9 rows, t = 0.8)
    naive       datasketch as most tutorials use it: one `MinHash.update` per shingle, then
                `MinHashLSH(threshold=0.8, num_perm=128)`: query, drop on any hit, else insert;
                exact duplicates by a dict of text hashes first
    datatrove   its four minhash steps with its defaults (5-grams, 14 buckets x 8 hashes, xxhash)
                and a whitespace word tokenizer; runs under --datatrove-python (a separate venv,
                since datatrove is not a dependency of llmctl), skipped with a note when absent

Metrics: a planted pair counts as found when either document was removed. Recall over near pairs
with true Jaccard >= 0.8 (also per Jaccard band), precision = found near / (found near + found
far pairs below 0.65). Speed is documents per second of wall time; the figure to read is the
ratio llmctl / naive (target >= 3x) at equal or better recall. One run per system by default
(`--repeats` for more, interleaved; medians). The machine is shared: CPU seconds per document
(docs_per_cpu_s, cpu_speedup) are steadier than wall time when other jobs compete for the cores.

Memory of the cluster step, the one that holds every document: `dedup cluster` on synthetic
signature files of n/2 and n documents (default 1M); the difference in peak RSS per document is the
figure to project to 10M documents.

    python benchmarks/bench_dedup.py [--quick] [--docs N] [--json PATH] [--datatrove-python PY]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

import _common  # puts the repo root on sys.path

TARGET = 3.0
THRESHOLD = 0.8
NGRAM = 5


# -- input ---------------------------------------------------------------------------------------


def sentences() -> list[str]:
    """Distinct sentences of 8-60 words from the stdlib's documentation topics and docstrings."""
    from llmctl.stages.corpus import CorpusConfig, documents

    out = set()
    for d in documents(CorpusConfig(kinds=("topics", "docstrings"))):
        for s in re.split(r"(?<=[.!?])\s+", d["text"]):
            if 8 <= len(s.split()) <= 60:
                out.add(" ".join(s.split()))
    return sorted(out)


def shingles(text: str) -> set[tuple[str, ...]]:
    words = unicodedata.normalize("NFKC", text).lower().split()
    return {tuple(words[i : i + NGRAM]) for i in range(max(1, len(words) - NGRAM + 1))}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def edit(text: str, rate: float, rng: random.Random, vocab: list[str]) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, round(rate * len(words)))):
        words[i] = rng.choice(vocab)
    return " ".join(words)


def make_input(n_docs: int, root: Path, seed: int = 0) -> dict:
    """Write root/input/docs.parquet and return the planted pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    pool = sentences()
    vocab = sorted({w for s in pool[:2000] for w in s.split()})
    n_near, n_far, n_exact = int(0.08 * n_docs), int(0.04 * n_docs), int(0.02 * n_docs)
    n_base = n_docs - n_near - n_far - n_exact
    base = []
    for _ in range(n_base):
        # Independent random sentences: two base documents share a 5-gram only by sharing a
        # sentence, so the only duplicates in the input are the planted ones.
        words: list[str] = []
        target = rng.randint(100, 300)
        while len(words) < target:
            words += rng.choice(pool).split()
        base.append(" ".join(words))
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(base)]
    pairs = []
    originals = rng.sample(range(n_base), n_near + n_far + n_exact)
    for k, o in enumerate(originals):
        src = base[o]
        if k < n_near:
            kind, text = "near", edit(src, rng.uniform(0.002, 0.02), rng, vocab)
        elif k < n_near + n_far:
            kind, text = "far", edit(src, rng.uniform(0.06, 0.15), rng, vocab)
        else:
            kind = "exact"
            text = "  ".join(
                w.upper() if w.upper().lower() == w.lower() else w for w in src.split()
            )
        copy = f"{kind}{k}"
        docs.append({"id": copy, "text": text})
        pairs.append(
            {
                "a": f"d{o}",
                "b": copy,
                "kind": kind,
                "jaccard": 1.0 if kind == "exact" else jaccard(src, text),
            }
        )
    rng.shuffle(docs)
    (root / "input").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(docs), root / "input" / "docs.parquet", row_group_size=4096)
    (root / "pairs.json").write_text(json.dumps(pairs))
    return {"pairs": pairs, "docs": len(docs)}


# -- systems (each runs in a worker process) -------------------------------------------------------


def run_llmctl(root: Path, out: Path, tag: str) -> list[str]:
    import pyarrow.parquet as pq

    from llmctl.stages import dedup

    dedup.run(root / "input", out, dedup.DedupConfig())
    return (
        pq.read_table(out / "duplicates" / "part-00000.parquet", columns=["id"])
        .column(0)
        .to_pylist()
    )


def run_naive(root: Path, out: Path, tag: str) -> list[str]:
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=128)
    seen: set[bytes] = set()
    removed: list[str] = []
    path = root / "input" / "docs.parquet"
    for batch in pq.ParquetFile(path).iter_batches(columns=["id", "text"]):
        for doc_id, text in zip(
            batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True
        ):
            words = unicodedata.normalize("NFKC", text).lower().split()
            key = hashlib.blake2b(" ".join(words).encode(), digest_size=16).digest()
            if key in seen:
                removed.append(doc_id)
                continue
            seen.add(key)
            m = MinHash(num_perm=128, seed=0)
            for i in range(max(1, len(words) - NGRAM + 1)):
                m.update(" ".join(words[i : i + NGRAM]).encode())
            if lsh.query(m):
                removed.append(doc_id)
            else:
                lsh.insert(doc_id, m)
    gone = set(removed)
    table = pq.read_table(path)
    keep = pa.array([i not in gone for i in table.column("id").to_pylist()])
    out.mkdir()
    pq.write_table(table.filter(keep), out / "part-00000.parquet", compression="zstd")
    return removed


def run_datatrove(root: Path, out: Path, tag: str) -> list[str]:
    import struct

    import pyarrow.parquet as pq
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    cfg = MinhashConfig()
    work, logs, src = out / "work", out / "logs", str(root / "input")

    def execute(pipeline: list, tasks: int, name: str) -> None:
        LocalPipelineExecutor(
            pipeline=pipeline, tasks=tasks, workers=1, logging_dir=str(logs / name)
        ).run()

    execute(
        [
            ParquetReader(src),
            MinhashDedupSignature(
                output_folder=str(work / "sigs"), config=cfg, language=Whitespace()
            ),
        ],
        1,
        "sigs",
    )
    execute(
        [
            MinhashDedupBuckets(
                input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=cfg
            )
        ],
        cfg.num_buckets,
        "buckets",
    )
    execute(
        [
            MinhashDedupCluster(
                input_folder=str(work / "buckets"), output_folder=str(work / "remove"), config=cfg
            )
        ],
        1,
        "cluster",
    )
    execute(
        [
            ParquetReader(src),
            MinhashDedupFilter(input_folder=str(work / "remove")),
            ParquetWriter(str(out / "docs")),
        ],
        1,
        "filter",
    )
    ids = pq.read_table(root / "input" / "docs.parquet", columns=["id"]).column(0).to_pylist()
    data = (
        (work / "remove" / "000000.remove").read_bytes()
        if (work / "remove" / "000000.remove").exists()
        else b""
    )
    return [ids[i] for (i,) in struct.iter_unpack("<I", data)]


def make_signatures(n_docs: int, out: Path, num_perm: int = 128, seed: int = 0) -> None:
    """A synthetic signatures artifact of n_docs random signatures, 5% of them near copies of
    others (one position changed), written 100k rows per file as `dedup signatures` does."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmctl.core.artifacts import Manifest
    from llmctl.core.config import to_dict
    from llmctl.stages.dedup import DedupConfig

    rng = np.random.default_rng(seed)
    out.mkdir()
    rows_per_file = 100_000
    for f, start in enumerate(range(0, n_docs, rows_per_file)):
        n = min(rows_per_file, n_docs - start)
        sig = rng.integers(0, 1 << 32, (n, num_perm), dtype=np.uint32)
        src = rng.choice(n, n // 20, replace=False)
        dst = rng.choice(n, n // 20, replace=False)
        sig[dst] = sig[src]
        sig[dst, rng.integers(0, num_perm, len(dst))] ^= 1  # near copies, estimate ~0.99
        rows = np.arange(start, start + n, dtype=np.int64)
        table = pa.table(
            {
                "file": pa.array(np.zeros(n, np.int32)),
                "row": pa.array(rows),
                "id": pa.array([f"s{i}" for i in rows.tolist()]),
                "exact": pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(16), n, [None, pa.py_buffer(rng.bytes(16 * n))]
                ),
                "minhash": pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(4 * num_perm), n, [None, pa.py_buffer(sig.astype("<u4").tobytes())]
                ),
            }
        )
        pq.write_table(table, out / f"part-{f:05d}.parquet", row_group_size=8192)
    Manifest(
        kind="signatures",
        stage="bench",
        config=to_dict(DedupConfig(num_perm=num_perm)),
        inputs=[{"path": "synthetic", "kind": "docs", "fingerprint": "synthetic"}],
        counts={"documents": n_docs},
        stats={"shard": "0/1", "units": 1},
    ).write(out)


def run_cluster(root: Path, out: Path, tag: str) -> list[str]:
    from llmctl.stages import dedup

    dedup.cluster([root / f"sigs-synthetic-{tag}"], out, dedup.DedupConfig())
    return []


SYSTEMS = {
    "llmctl": run_llmctl,
    "naive": run_naive,
    "datatrove": run_datatrove,
    "cluster": run_cluster,
}


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB: VmHWM where /proc has it. (ru_maxrss survives
    exec, so a worker started from a large parent would report the parent's peak.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(system: str, root: Path, tag: str) -> None:
    """Run one system; print one JSON line: seconds, RSS, where the removed ids are."""
    if system == "datatrove":
        import datatrove.pipeline.dedup.minhash  # noqa: F401  (imports belong to the baseline)
    elif system == "naive":
        import datasketch.lsh  # noqa: F401
    else:
        import llmctl.stages.dedup  # noqa: F401
    base = peak_rss_mb()
    out = root / f"out-{system}-{tag}"
    t0, c0 = time.perf_counter(), time.process_time()
    removed = SYSTEMS[system](root, out, tag)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = peak_rss_mb()
    (root / f"removed-{system}-{tag}.json").write_text(json.dumps(removed))
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": peak, "base_rss_mb": base}))


# -- driver ----------------------------------------------------------------------------------------


def call(python: str, system: str, root: Path, tag: str) -> dict | None:
    env = {**os.environ, "PYTHONPATH": str(_common.REPO)}
    r = subprocess.run(
        [python, __file__, "--worker", system, "--data", str(root), "--tag", tag],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if r.returncode != 0:
        print(f"[{system}] failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
        return None
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["removed"] = set(json.loads((root / f"removed-{system}-{tag}.json").read_text()))
    return res


def metrics(pairs: list[dict], removed: set[str]) -> dict:
    def found(p: dict) -> bool:
        return p["a"] in removed or p["b"] in removed

    near = [p for p in pairs if p["kind"] == "near" and p["jaccard"] >= THRESHOLD]
    far = [p for p in pairs if p["kind"] == "far" and p["jaccard"] < THRESHOLD - 0.15]
    exact = [p for p in pairs if p["kind"] == "exact"]
    tp, fp = sum(map(found, near)), sum(map(found, far))
    out = {
        "recall": tp / max(1, len(near)),
        "precision": tp / max(1, tp + fp),
        "exact_recall": sum(map(found, exact)) / max(1, len(exact)),
        "far_flagged": fp,
    }
    for lo, hi in ((0.8, 0.85), (0.85, 0.9), (0.9, 1.01)):
        band = [p for p in near if lo <= p["jaccard"] < hi]
        out[f"recall_{lo:.2f}-{min(hi, 1):.2f}"] = sum(map(found, band)) / max(1, len(band))
    planted = {p[k] for p in pairs for k in ("a", "b")}
    out["other_removed"] = len(removed - planted)
    return out


def datatrove_python(arg: str | None) -> str | None:
    candidates = [arg] if arg else [sys.executable, "/tmp/venv-dt/bin/python"]
    for py in candidates:
        if py and Path(py).exists():
            probe = (
                "import pyarrow, xxhash; from datatrove.pipeline.dedup.minhash import MinhashConfig"
            )
            r = subprocess.run([py, "-c", probe], capture_output=True, check=False)
            if r.returncode == 0:
                return py
    return None


def cluster_memory(root: Path, args: argparse.Namespace) -> dict | None:
    """Peak memory of `dedup cluster` on synthetic signatures: at n/2 and n documents, so the
    cost per document is the difference (fixed costs such as Arrow's allocator cancel out)."""
    n = args.cluster_docs or (100_000 if args.quick else 1_000_000)
    t0 = time.perf_counter()
    peaks = {}
    for m in (n // 2, n):
        make_signatures(m, root / f"sigs-synthetic-{m}")
        res = call(sys.executable, "cluster", root, str(m))
        if not res:
            return None
        peaks[m] = res
    marginal = (peaks[n]["peak_rss_mb"] - peaks[n // 2]["peak_rss_mb"]) * 2**20 / (n - n // 2)
    fixed = peaks[n]["peak_rss_mb"] - marginal * n / 2**20
    out = {
        "documents": n,
        "seconds": peaks[n]["seconds"],
        "peak_rss_mb": peaks[n]["peak_rss_mb"],
        "rss_above_base_mb": peaks[n]["peak_rss_mb"] - peaks[n]["base_rss_mb"],
        "bytes_per_doc": marginal,
        "fixed_mb": fixed,
        "projected_10m_gib": (fixed * 2**20 + marginal * 1e7) / 2**30,
    }
    print(
        f"cluster step on {n:,} synthetic signatures: {out['seconds']:.1f} s, peak RSS "
        f"{out['peak_rss_mb']:.0f} MiB; {n // 2:,} -> {n:,} documents adds {marginal:.0f} B/doc "
        f"(fixed {fixed:.0f} MiB), so 10M documents ~ {out['projected_10m_gib']:.1f} GiB "
        f"[probe built in {time.perf_counter() - t0:.0f} s]"
    )
    return out


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, help="documents (default 100000; 3000 with --quick)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per system (interleaved)")
    p.add_argument(
        "--datatrove-python", help="interpreter with datatrove, pyarrow and xxhash installed"
    )
    p.add_argument(
        "--skip-naive", action="store_true", help="leave out the (slow) naive datasketch run"
    )
    p.add_argument(
        "--cluster-docs",
        type=int,
        help="documents for the cluster-step memory probe (default 1000000; 100000 with --quick)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--tag", default="0", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, Path(args.data), args.tag)
        return
    n_docs = args.docs or (3_000 if args.quick else 100_000)
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        planted = make_input(n_docs, root)
        near = [q for q in planted["pairs"] if q["kind"] == "near"]
        print(
            f"input: {planted['docs']:,} documents, {len(near)} near copies "
            f"(true Jaccard {min(q['jaccard'] for q in near):.2f}-{max(q['jaccard'] for q in near):.2f}, "
            f"{sum(q['jaccard'] >= THRESHOLD for q in near)} >= {THRESHOLD}), built in {time.perf_counter() - t0:.1f} s"
        )
        systems = {"llmctl": sys.executable}
        if not args.skip_naive:
            systems["naive"] = sys.executable
        dt = datatrove_python(args.datatrove_python)
        if dt:
            systems["datatrove"] = dt
        else:
            print(
                "note: datatrove not found, skipped (in another venv: pip install torch==2.13.0 "
                "datatrove xxhash pyarrow regex tokenizers; then pass --datatrove-python)"
            )
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        names = list(systems)
        for r in range(args.repeats):
            for s in names if r % 2 == 0 else names[::-1]:
                res = call(systems[s], s, root, str(r))
                if res:
                    runs[s].append(res)
        rows = []
        for s, rs in runs.items():
            if not rs:
                continue
            secs = _common.median([x["seconds"] for x in rs])
            cpu = _common.median([x["cpu_s"] for x in rs])
            row = {
                "system": s,
                "docs_per_s": planted["docs"] / secs,
                "docs_per_cpu_s": planted["docs"] / cpu,
                "seconds": secs,
                "spread_s": _common.spread([x["seconds"] for x in rs]),
                "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
                "rss_above_base_mb": max(x["peak_rss_mb"] - x["base_rss_mb"] for x in rs),
                **metrics(planted["pairs"], rs[0]["removed"]),
            }
            rows.append(row)
        base = next((r for r in rows if r["system"] == "llmctl"), None)
        for r in rows:
            r["llmctl_speedup"] = base["docs_per_s"] / r["docs_per_s"] if base else None
            r["cpu_speedup"] = base["docs_per_cpu_s"] / r["docs_per_cpu_s"] if base else None
        print(
            _common.table(
                rows,
                [
                    "system",
                    "docs_per_s",
                    "docs_per_cpu_s",
                    "seconds",
                    "spread_s",
                    "peak_rss_mb",
                    "rss_above_base_mb",
                    "recall",
                    "precision",
                    "exact_recall",
                    "llmctl_speedup",
                    "cpu_speedup",
                ],
            )
        )
        print(
            _common.table(
                rows,
                ["system"]
                + [k for k in rows[0] if k.startswith("recall_")]
                + ["far_flagged", "other_removed"],
            )
        )
        naive = next((r for r in rows if r["system"] == "naive"), None)
        if base and naive:
            ratio = base["docs_per_s"] / naive["docs_per_s"]
            verdict = "meets" if ratio >= TARGET and base["recall"] >= naive["recall"] else "misses"
            print(
                f"ratio llmctl / naive datasketch: {ratio:.1f}x "
                f"(target >= {TARGET}x at equal recall): {verdict}"
            )
        dtrove = next((r for r in rows if r["system"] == "datatrove"), None)
        if base and dtrove:
            ratio = base["docs_per_s"] / dtrove["docs_per_s"]
            print(f"ratio llmctl / datatrove: {ratio:.1f}x (target >= 1.0x)")
        results = {
            "docs": planted["docs"],
            "rows": rows,
            "cluster_step": cluster_memory(root, args),
        }
        _common.write_json(args.json, "bench_dedup", args, results)


if __name__ == "__main__":
    main()

"""Peak memory of `llmctl tokenize` at two corpus sizes: it should stay flat as the corpus grows.

The stdlib corpus (`llmctl corpus`) is written to a JSONL file once (x1) and repeated `--factor`
times (x4 by default). For each file the tokenize stage runs in a fresh child process (2 encode
workers, a fixed `--train-bytes` so both runs train the tokenizer on a sample of the same size:
memory is bounded by train_bytes by design, and this checks that nothing else grows with the
input). Measured:
    tree peak   the largest sum of RSS over the child and all its descendants (the spawn workers),
                polled from /proc every 20 ms (shared library pages count once per process)
    parent      the child's own peak RSS (getrusage RUSAGE_SELF ru_maxrss)
    worker      the largest worker's peak RSS (the child's RUSAGE_CHILDREN ru_maxrss)
and the ratios big/small of the tree peak and of the corpus size. Flat memory: a peak ratio near
1.0 while the size ratio is `--factor`.

    python benchmarks/bench_tokenize_memory.py [--quick] [--json PATH] [--docs DOCS_DIR]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # puts the repo root on sys.path: keep it before the llmctl imports

from llmctl.core.docs import open_docs
from llmctl.stages.corpus import CorpusConfig
from llmctl.stages.corpus import run as build_corpus

PAGE = os.sysconf("SC_PAGE_SIZE")

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from llmctl.stages.tokenize import TokenizeConfig, run
t0 = time.perf_counter()
m = run({src!r}, Path({dst!r}), TokenizeConfig(vocab_size={vocab}, train_bytes={train_bytes}, workers={workers}),
        force=True)
print(json.dumps({{
    "seconds": time.perf_counter() - t0,
    "self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "children_maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    "tokens": m.counts["tokens"], "documents": m.counts["documents"], "bytes": m.counts["bytes"],
}}))
"""


def _tree_rss(root: int) -> tuple[int, int]:
    """(sum of RSS bytes over `root` and its descendants, number of processes)."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/statm") as f:
                pages = int(f.read().split()[1])
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parent[int(d)] = ppid
        rss[int(d)] = pages * PAGE
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, pp in parent.items():
            if pp in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(rss.get(p, 0) for p in tree), len(tree & rss.keys())


def measure(src: Path, dst: Path, args) -> dict:
    code = CHILD.format(
        repo=str(_common.REPO),
        src=str(src),
        dst=str(dst),
        vocab=args.vocab,
        train_bytes=args.train_bytes,
        workers=args.workers,
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=_common.REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak, peak_procs = 0, 0
    while proc.poll() is None:
        total, n = _tree_rss(proc.pid)
        if total > peak:
            peak, peak_procs = total, n
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"tokenize child failed ({proc.returncode}):\n{err[-3000:]}")
    r = json.loads(out.strip().splitlines()[-1])
    return {
        "corpus_mb": src.stat().st_size / 1e6,
        "text_mb": r["bytes"] / 1e6,
        "documents": r["documents"],
        "tokens": r["tokens"],
        "seconds": r["seconds"],
        "tree_peak_mb": peak / 1e6,
        "procs_at_peak": peak_procs,
        "parent_maxrss_mb": r["self_maxrss_kb"] / 1e3,
        "worker_maxrss_mb": r["children_maxrss_kb"] / 1e3,
    }


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0])
    p.add_argument(
        "--docs", help="an existing docs artifact to use instead of building the stdlib corpus"
    )
    p.add_argument(
        "--factor", type=int, default=4, help="the big corpus is the small one this many times"
    )
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument(
        "--train-bytes",
        type=int,
        default=4_000_000,
        help="tokenizer training sample (same for both)",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--max-docs", type=int, default=0, help="limit the corpus to this many documents (0 = all)"
    )
    args = p.parse_args()
    if args.quick:
        args.vocab, args.train_bytes = 1024, 300_000
        args.max_docs = args.max_docs or 150

    with tempfile.TemporaryDirectory(prefix="bench_tokmem_") as tmp:
        tmp = Path(tmp)
        docs_dir = Path(args.docs) if args.docs else tmp / "docs"
        if not args.docs:
            build_corpus(docs_dir, CorpusConfig(max_docs=args.max_docs), force=True)
        docs = list(open_docs(str(docs_dir)).texts())
        if args.max_docs:
            docs = docs[: args.max_docs]
        lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
        small, big = tmp / "x1.jsonl", tmp / f"x{args.factor}.jsonl"
        small.write_text(lines)
        with open(big, "w") as f:
            for _ in range(args.factor):
                f.write(lines)
        del lines, docs
        print(
            f"bench_tokenize_memory: x1 = {small.stat().st_size / 1e6:.1f} MB JSONL, x{args.factor} = "
            f"{big.stat().st_size / 1e6:.1f} MB; vocab {args.vocab}, train_bytes {args.train_bytes / 1e6:g} MB, "
            f"{args.workers} workers"
        )
        rows = []
        for name, src in (("x1", small), (f"x{args.factor}", big)):
            r = {"corpus": name, **measure(src, tmp / f"tokens_{name}", args)}
            rows.append(r)
            print(f"  {name}: {r['seconds']:.1f} s, tree peak {r['tree_peak_mb']:.0f} MB")
    size_ratio = rows[1]["text_mb"] / rows[0]["text_mb"]
    peak_ratio = rows[1]["tree_peak_mb"] / rows[0]["tree_peak_mb"]
    parent_ratio = rows[1]["parent_maxrss_mb"] / rows[0]["parent_maxrss_mb"]
    worker_ratio = rows[1]["worker_maxrss_mb"] / rows[0]["worker_maxrss_mb"]
    print()
    print(
        _common.table(
            rows,
            [
                "corpus",
                "text_mb",
                "documents",
                "tokens",
                "seconds",
                "tree_peak_mb",
                "procs_at_peak",
                "parent_maxrss_mb",
                "worker_maxrss_mb",
            ],
        )
    )
    print(
        f"ratio big/small: corpus size {size_ratio:.2f}, tree peak RSS {peak_ratio:.2f}, parent RSS "
        f"{parent_ratio:.2f}, worker RSS {worker_ratio:.2f}  (flat: RSS ratios near 1.0)"
    )
    _common.write_json(
        args.json,
        "bench_tokenize_memory",
        args,
        {
            "rows": rows,
            "size_ratio": size_ratio,
            "peak_ratio": peak_ratio,
            "parent_ratio": parent_ratio,
            "worker_ratio": worker_ratio,
        },
    )


if __name__ == "__main__":
    main()

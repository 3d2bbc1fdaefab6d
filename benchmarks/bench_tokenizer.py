"""Tokenizer training time and encode throughput: llmctl's SentencePiece BPE vs Hugging Face
`tokenizers` BPE, on the same text (the embedded stdlib corpus of `llmctl corpus`).

Training: llmctl's `train_tokenizer` (2 threads) on the corpus lines, as `llmctl tokenize` feeds it,
vs `tokenizers` BPE with a ByteLevel pre-tokenizer (digits split one by one, as ours) and a
BpeTrainer with the same vocabulary size and special tokens.

Encoding, with 2 workers on each side:
    ours (2 procs)      the `llmctl tokenize` encoder: a spawn pool of 2 processes running the
                        stage's own worker functions over chunks of 256 documents, results in order
                        (numpy arrays back to the parent). Timed per run: pool start-up + encoding;
                        the steady rate leaves the start-up (measured separately) out.
    ours (2 threads)    `Tokenizer.encode_batch(docs, num_threads=2)` in-process, for comparison.
    HF encode_batch     `Tokenizer.encode_batch(docs)` then `.ids` of each, RAYON_NUM_THREADS=2.
The stage end-to-end (reuse the trained tokenizer: read Parquet, encode, write the token files and
the unigram counts) is timed once as well.

Target: encode ours / HF >= 1.0x.

    python benchmarks/bench_tokenizer.py [--quick] [--json PATH] [--docs DOCS_DIR]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "2")  # before `tokenizers` is imported anywhere
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import multiprocessing as mp  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import _common  # noqa: E402  (puts the repo root on sys.path: keep it before the llmctl imports)

from llmctl.core.docs import open_docs  # noqa: E402
from llmctl.core.tokenizer import CONTROL_TOKENS, Tokenizer, train_tokenizer  # noqa: E402
from llmctl.stages import tokenize as tokenize_stage  # noqa: E402
from llmctl.stages.corpus import CorpusConfig  # noqa: E402
from llmctl.stages.corpus import run as build_corpus  # noqa: E402

TARGET = 1.0
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", *CONTROL_TOKENS]


def lines_of(docs: list[str]) -> list[str]:
    """Training lines as `llmctl tokenize` feeds SentencePiece (non-empty lines of each doc)."""
    return [line for d in docs for line in d.split("\n") if line]


def train_hf(lines: list[str], vocab: int):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return tok


def chunks(docs: list[str]) -> list[list[str]]:
    n = tokenize_stage.CHUNK_DOCS
    return [docs[i : i + n] for i in range(0, len(docs), n)]


def encode_pool(model_bytes: bytes, docs: list[str], workers: int) -> tuple[float, float, int]:
    """(start-up seconds, total seconds, tokens) of the stage's encoder on `docs`."""
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(workers, initializer=tokenize_stage._init_worker, initargs=(model_bytes,))
    try:
        # One tiny task per worker: the pool is up once these come back.
        pool.map(tokenize_stage._encode_chunk, [["warm up"]] * workers, chunksize=1)
        t1 = time.perf_counter()
        n = 0
        for arrays in pool.imap(tokenize_stage._encode_chunk, chunks(docs), chunksize=1):
            n += sum(len(a) for a in arrays)
        t2 = time.perf_counter()
    finally:
        pool.terminate()
        pool.join()
    return t1 - t0, t2 - t0, n


def main() -> None:
    p = _common.parser(__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument(
        "--docs", help="an existing docs artifact to use instead of building the stdlib corpus"
    )
    p.add_argument(
        "--max-docs", type=int, default=0, help="limit the corpus to this many documents (0 = all)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed encodes per method")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--train-repeats", type=int, default=1, help="timed tokenizer trainings per side"
    )
    args = p.parse_args()
    load = _common.ForeignLoad()
    if args.quick:
        args.vocab, args.repeats = 2048, 2
        args.max_docs = args.max_docs or 120

    with tempfile.TemporaryDirectory(prefix="bench_tokenizer_") as tmp:
        tmp = Path(tmp)
        if args.docs:
            docs_dir = Path(args.docs)
        else:
            t0 = time.perf_counter()
            docs_dir = tmp / "docs"
            build_corpus(docs_dir, CorpusConfig(max_docs=args.max_docs), force=True)
            print(f"built the stdlib corpus in {time.perf_counter() - t0:.1f} s")
        docs = list(open_docs(str(docs_dir)).texts())
        if args.max_docs:
            docs = docs[: args.max_docs]
        n_bytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)
        mb = n_bytes / 1e6
        lines = lines_of(docs)
        print(
            f"bench_tokenizer: {len(docs)} documents, {mb:.2f} MB, {len(lines)} lines; vocab {args.vocab}; "
            f"{args.workers} workers; RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']}"
        )

        # -- training: seconds per run, interleaved, no warm-up ---------------------------------
        trained: dict = {}

        def train_ours() -> None:
            trained["ours"] = train_tokenizer(lines, args.vocab, num_threads=args.workers)

        def train_hf_() -> None:
            trained["hf"] = train_hf(lines, args.vocab)

        t_train = _common.interleaved(
            {"ours": train_ours, "hf": train_hf_}, repeats=args.train_repeats, warmup=0
        )
        t_train_ours, t_train_hf = _common.median(t_train["ours"]), _common.median(t_train["hf"])
        model_bytes, hf = trained["ours"], trained["hf"]
        ours = Tokenizer.from_bytes(model_bytes)
        print(
            f"  trained: ours {ours.vocab_size} ids in {t_train_ours:.2f} s, HF {hf.get_vocab_size()} ids in "
            f"{t_train_hf:.2f} s"
        )

        # -- encoding, interleaved -----------------------------------------------------------
        startups: list[float] = []
        steady: list[float] = []
        counts: dict[str, int] = {}

        def run_pool() -> None:
            s, total, n = encode_pool(model_bytes, docs, args.workers)
            startups.append(s)
            steady.append(total - s)
            counts["ours"] = n

        def run_threads() -> None:
            counts["ours_threads"] = sum(
                len(x) for x in ours.encode_batch(docs, num_threads=args.workers)
            )

        def run_hf() -> None:
            counts["hf"] = sum(len(e.ids) for e in hf.encode_batch(docs, add_special_tokens=False))

        times = _common.interleaved(
            {"ours_pool": run_pool, "ours_threads": run_threads, "hf": run_hf},
            repeats=args.repeats,
            warmup=1,
        )
        steady = [steady[1 + k] for k in times.kept]  # call 0 was the warm-up
        startups = [startups[1 + k] for k in times.kept]
        t_pool = _common.median(times["ours_pool"])
        t_pool_steady = _common.median(steady)
        t_threads = _common.median(times["ours_threads"])
        t_hf = _common.median(times["hf"])

        # -- the stage end-to-end, reusing the tokenizer ---------------------------------------
        tok_path = ours.save(tmp)
        t0 = time.perf_counter()
        man = tokenize_stage.run(
            str(docs_dir),
            tmp / "tokens",
            tokenize_stage.TokenizeConfig(
                vocab_size=args.vocab, tokenizer=str(tok_path), workers=args.workers
            ),
            force=True,
        )
        t_stage = time.perf_counter() - t0
        stage_mb = man.counts["bytes"] / 1e6

    hf_mb_s = mb / t_hf
    rows = [
        {
            "what": "train",
            "ours": t_train_ours,
            "hf": t_train_hf,
            "unit": "s",
            "ratio": t_train_hf / t_train_ours,
        },
        {
            "what": "encode, 2 procs (steady)",
            "ours": mb / t_pool_steady,
            "hf": hf_mb_s,
            "unit": "MB/s",
            "ratio": (mb / t_pool_steady) / hf_mb_s,
            "target": f">= {TARGET}",
            "met": (mb / t_pool_steady) / hf_mb_s >= TARGET,
        },
        {
            "what": "encode, 2 procs (incl. start-up)",
            "ours": mb / t_pool,
            "hf": hf_mb_s,
            "unit": "MB/s",
            "ratio": (mb / t_pool) / hf_mb_s,
        },
        {
            "what": "encode, 2 threads in-process",
            "ours": mb / t_threads,
            "hf": hf_mb_s,
            "unit": "MB/s",
            "ratio": (mb / t_threads) / hf_mb_s,
        },
        {
            "what": "tokenize stage end-to-end",
            "ours": stage_mb / t_stage,
            "hf": None,
            "unit": "MB/s",
            "ratio": None,
        },
        {
            "what": "bytes per token",
            "ours": n_bytes / counts["ours_threads"],
            "hf": n_bytes / counts["hf"],
            "unit": "B/tok",
            "ratio": (n_bytes / counts["ours_threads"]) / (n_bytes / counts["hf"]),
        },
    ]
    print(
        f"  pool start-up {_common.median(startups):.2f} s (median); encode seconds: pool "
        f"{_common.spread(times['ours_pool'])}, threads {_common.spread(times['ours_threads'])}, "
        f"HF {_common.spread(times['hf'])}; stage end-to-end {t_stage:.2f} s\n"
        f"  encode: {_common.rounds_note(times)}; train: {_common.rounds_note(t_train)}"
    )
    print()
    print(_common.table(rows, ["what", "ours", "hf", "unit", "ratio", "target", "met"]))
    print(
        "ratio = ours / HF as speed (train: HF seconds / ours seconds; bytes per token: higher is better)"
    )
    print(load.report())
    _common.write_json(
        args.json,
        "bench_tokenizer",
        args,
        {
            "foreign_cpu_share": load.share(),
            "target": TARGET,
            "documents": len(docs),
            "bytes": n_bytes,
            "rows": rows,
            "pool_startup_s": startups,
            "pool_steady_s": steady,
            "times_s": times,
            "train_s": t_train,
            "encode_rounds": _common.rounds_note(times),
            "train_rounds": _common.rounds_note(t_train),
            "stage_s": t_stage,
        },
    )


if __name__ == "__main__":
    main()

"""tokenize: docs -> tokens. Trains (or reuses) a SentencePiece BPE tokenizer and encodes every
document into Megatron-format token files.

Output directory:
    train.bin / train.idx    training documents, each BOS ... EOS (see core/tokens.py for the layout)
    val.bin / val.idx        held-out documents (`val_fraction`, chosen per document by a seeded hash)
    tokenizer.model          the SentencePiece model
    manifest.json            counts, bytes per token, tokenizer fingerprint, unigram baseline loss

Tokenizer training sees a uniform random sample of documents capped at `train_bytes`: every
document gets a seeded random key and the lowest keys are kept (a bottom-k sample by bytes), which
needs one streaming pass and memory bounded by `train_bytes`. Encoding runs in `workers` processes
over batches of documents; results come back in order, so output is byte-identical for any number
of workers. Input from stdin (`-`) is spooled to a temporary Parquet file first, since it is read
twice (sample, then encode).

The unigram baseline recorded in the manifest is the cross-entropy of the validation tokens under
the training split's unigram distribution (add-one smoothed): a model that has learned anything
about context must beat it.
"""

from __future__ import annotations

import hashlib
import heapq
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from llmctl.core.artifacts import Manifest, commit_output
from llmctl.core.config import require, to_dict
from llmctl.core.docs import DocSource, open_docs
from llmctl.core.errors import InputError
from llmctl.core.progress import SILENT, Progress
from llmctl.core.tokenizer import Tokenizer, train_tokenizer
from llmctl.core.tokens import IndexedWriter, token_dtype

CHUNK_DOCS = 256  # documents per task sent to a worker


@dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    """Settings of `llmctl tokenize`."""

    vocab_size: int = 32000  # target vocabulary (special and byte tokens included)
    train_bytes: int = 200_000_000  # at most this much sampled text trains the tokenizer
    tokenizer: str | None = None  # reuse this tokenizer (tokenizer.model, tokens dir or checkpoint)
    val_fraction: float = 0.005  # share of documents held out for validation
    workers: int = 0  # encoding processes (0 = all cores)
    text_column: str = "text"  # column holding the text
    encoding_errors: Literal["strict", "replace"] = (
        "strict"  # non-UTF-8 input: fail, or replace bytes
    )
    seed: int = 0  # drives the tokenizer sample and the train/val split

    def __post_init__(self) -> None:
        require(
            self.vocab_size >= 300,
            f"--vocab-size must be >= 300 (256 byte tokens + specials), got {self.vocab_size}",
        )
        require(self.train_bytes >= 1000, f"--train-bytes must be >= 1000, got {self.train_bytes}")
        require(
            0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}"
        )
        require(self.workers >= 0, f"--workers must be >= 0, got {self.workers}")


def run(
    src: str | Path,
    dst: Path,
    cfg: TokenizeConfig,
    *,
    force: bool = False,
    progress: Progress = SILENT,
) -> Manifest:
    """Tokenize a docs input into a tokens artifact at `dst`.

    Raises:
        InputError: Unreadable or empty input, missing text column, bad tokenizer.
    """
    source = open_docs(src, cfg.text_column, cfg.encoding_errors)
    inputs = [source.record()]
    with commit_output(
        dst, kind="tokens", stage="tokenize", config=to_dict(cfg), inputs=inputs, force=force
    ) as out:
        if source.path == "-":
            source = source.spool(out.path / ".stdin.parquet")
        if cfg.tokenizer:
            tok = Tokenizer.load(cfg.tokenizer)
            train_seconds = 0.0
        else:
            t0 = time.perf_counter()
            tok = _train(source, cfg, progress)
            train_seconds = time.perf_counter() - t0
        tok.save(out.path)
        counts, unigram = _encode_all(source, tok, out.path, cfg, progress)
        for f in out.path.glob(".stdin.parquet"):
            f.unlink()
        out.manifest.counts = counts
        out.manifest.tokenizer = {
            "fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "reused": bool(cfg.tokenizer),
        }
        out.manifest.stats = {
            "bytes_per_token": round(
                counts["bytes"] / max(1, counts["tokens"] - 2 * counts["documents"]), 4
            ),
            "tokenizer_train_seconds": round(train_seconds, 2),
            **unigram,
        }
    return out.manifest


def _doc_key(seed: int, i: int, salt: bytes) -> float:
    h = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8, key=salt).digest()
    return int.from_bytes(h, "little") / 2**64


def _train(source: DocSource, cfg: TokenizeConfig, progress: Progress) -> Tokenizer:
    # Bottom-k by bytes: keep the documents with the smallest random keys whose total fits.
    heap: list[tuple[float, int, str]] = []  # (-key, i, text): max-heap on key
    size = 0
    progress.start("sample for tokenizer", None, "docs")
    for i, text in enumerate(source.texts()):
        key = _doc_key(cfg.seed, i, b"tok-sample")
        text = text[: cfg.train_bytes]
        if size + len(text) > cfg.train_bytes and heap and -heap[0][0] < key:
            progress.advance(1)
            continue
        heapq.heappush(heap, (-key, i, text))
        size += len(text)
        while size > cfg.train_bytes and len(heap) > 1:
            size -= len(heapq.heappop(heap)[2])
        progress.advance(1)
    progress.stop()
    docs = [t for _, _, t in sorted(heap, key=lambda x: x[1])]
    progress.start(f"train tokenizer ({cfg.vocab_size} ids, {size / 1e6:.1f} MB)", None)
    try:
        model = train_tokenizer(
            (line for d in docs for line in d.split("\n") if line),
            cfg.vocab_size,
            num_threads=max(1, os.cpu_count() or 1),
        )
    except RuntimeError as e:
        raise InputError(
            f"SentencePiece could not train on this input: {e}",
            "use a smaller --vocab-size or more text (--train-bytes)",
        ) from None
    finally:
        progress.stop()
    return Tokenizer.from_bytes(model)


# Worker side: one SentencePiece processor per process, loaded once.
_WORKER_TOK: Tokenizer | None = None


def _init_worker(model_bytes: bytes) -> None:
    global _WORKER_TOK
    _WORKER_TOK = Tokenizer.from_bytes(model_bytes)


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    assert _WORKER_TOK is not None
    dt = token_dtype(_WORKER_TOK.vocab_size)
    return [
        np.asarray(ids, dtype=dt) for ids in _WORKER_TOK.encode_batch(texts, bos=True, eos=True)
    ]


class _Chunks:
    """Documents in chunks of CHUNK_DOCS, counting their UTF-8 bytes on the way."""

    def __init__(self, source: DocSource) -> None:
        self.source = source
        self.bytes = 0

    def __iter__(self) -> Iterator[list[str]]:
        buf: list[str] = []
        for text in self.source.texts():
            self.bytes += len(text.encode("utf-8", "surrogatepass"))
            buf.append(text)
            if len(buf) >= CHUNK_DOCS:
                yield buf
                buf = []
        if buf:
            yield buf


def _encode_all(
    source: DocSource, tok: Tokenizer, out: Path, cfg: TokenizeConfig, progress: Progress
) -> tuple[dict, dict]:
    dtype = token_dtype(tok.vocab_size)
    writers = {
        "train": IndexedWriter(out / "train", dtype),
        "val": IndexedWriter(out / "val", dtype),
    }
    counts = {
        "train": np.zeros(tok.vocab_size, dtype=np.int64),
        "val": np.zeros(tok.vocab_size, dtype=np.int64),
    }
    chunks = _Chunks(source)
    workers = cfg.workers or os.cpu_count() or 1
    n_docs = 0
    progress.start("encode", None, "docs")
    pool = None
    try:
        if workers > 1:
            ctx = mp.get_context("spawn")  # safe beside torch's threads in the parent
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tok.model_bytes,))
            # imap returns results in input order, so the output does not depend on `workers`.
            results = pool.imap(_encode_chunk, chunks, chunksize=1)
        else:
            _init_worker(tok.model_bytes)
            results = (_encode_chunk(c) for c in chunks)
        for arrays in results:
            for ids in arrays:
                split = (
                    "val"
                    if _doc_key(cfg.seed, n_docs, b"val-split") < cfg.val_fraction
                    else "train"
                )
                writers[split].add(ids)
                counts[split] += np.bincount(ids, minlength=tok.vocab_size)
                n_docs += 1
            progress.advance(len(arrays))
    finally:
        if pool is not None:
            pool.terminate()
        progress.stop()
    for w in writers.values():
        w.close()
    if n_docs == 0:
        raise InputError(
            f"{source.path} contains no non-empty documents", "check the input and --text-column"
        )
    if writers["train"].n_docs == 0:
        raise InputError(
            "every document went to the validation split", "lower --val-fraction or add documents"
        )
    result = {
        "documents": n_docs,
        "bytes": chunks.bytes,
        "tokens": writers["train"].n_tokens + writers["val"].n_tokens,
        "train_documents": writers["train"].n_docs,
        "train_tokens": writers["train"].n_tokens,
        "val_documents": writers["val"].n_docs,
        "val_tokens": writers["val"].n_tokens,
    }
    return result, _unigram(counts["train"], counts["val"])


def _unigram(train: np.ndarray, val: np.ndarray) -> dict[str, float]:
    p = (train + 1) / (train.sum() + train.size)  # add-one smoothing: no zero probabilities
    out = {"unigram_entropy_train": float(-(train / max(1, train.sum()) * np.log(p)).sum())}
    if val.sum() > 0:
        out["unigram_loss_val"] = float(-(val * np.log(p)).sum() / val.sum())
    return {k: round(v, 5) for k, v in out.items()}

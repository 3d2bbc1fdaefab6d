"""crawl-filter train-quality: docs (positive) + docs (negative) -> a fastText quality classifier.

The DCLM recipe (Li et al. 2024): reference-quality text (label `__label__hq`) against random
crawl (`__label__cc`), one normalised document per line, a supervised fastText model with word
bigrams. A seeded hash holds out `holdout` of each class; the manifest records held-out
precision, recall, F1, accuracy (at probability 0.5) and ROC AUC, so a model's worth is known
before it filters anything. `crawl-filter --quality-model DIR --min-quality X` then uses it.

Output directory (kind "classifier"), rather than a bare .bin, so the model travels with its
labels, training inputs (fingerprinted) and scores; the .bin inside is a plain fastText model.
    model.bin        fastText model (bucket=100,000: about 13 MB at dim 32 instead of 256 MB)
    manifest.json    labels, counts, held-out metrics, config

Training runs with one thread by default: fastText's multi-threaded SGD (Hogwild) is not
reproducible, one thread with a fixed seed is.
"""

from __future__ import annotations

import hashlib
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmctl.core.artifacts import Manifest, commit_output, input_record
from llmctl.core.classify import MODEL_FILE, NEGATIVE, POSITIVE, QUALITY_KIND, normalise
from llmctl.core.config import require, to_dict
from llmctl.core.docs import open_docs
from llmctl.core.errors import InputError, TrainingError
from llmctl.core.progress import SILENT, Progress


@dataclass(frozen=True, kw_only=True)
class TrainQualityConfig:
    """Settings of `llmctl crawl-filter train-quality`."""

    epoch: int = 5  # passes over the training lines
    lr: float = 0.5  # fastText learning rate (its default 0.1 underfits a few thousand documents)
    dim: int = 32  # embedding size (the model is (words + bucket) x dim floats)
    word_ngrams: int = 2  # word n-gram features (DCLM uses bigrams)
    min_count: int = 1  # ignore words seen fewer times
    bucket: int = 100_000  # hash buckets for n-grams (fastText's 2,000,000 makes a 256 MB model)
    holdout: float = 0.1  # share of each class held out for precision/recall
    max_docs: int = 0  # at most this many documents per class (0 = all)
    threads: int = 1  # fastText threads; more is faster but not reproducible
    text_column: str = "text"  # column holding the text
    seed: int = 0  # drives the hold-out split, the line shuffle and fastText

    def __post_init__(self) -> None:
        require(self.epoch >= 1, f"--epoch must be >= 1, got {self.epoch}")
        require(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        require(self.dim >= 1, f"--dim must be >= 1, got {self.dim}")
        require(self.word_ngrams >= 1, f"--word-ngrams must be >= 1, got {self.word_ngrams}")
        require(0 < self.holdout < 1, f"--holdout must be in (0, 1), got {self.holdout}")
        require(self.max_docs >= 0, f"--max-docs must be >= 0, got {self.max_docs}")
        require(self.threads >= 1, f"--threads must be >= 1, got {self.threads}")


def _texts(paths: list[str], cfg: TrainQualityConfig) -> Iterator[str]:
    n = 0
    for p in paths:
        for t in open_docs(p, cfg.text_column, "replace").texts():
            line = normalise(t)
            if not line:
                continue
            yield line
            n += 1
            if cfg.max_docs and n >= cfg.max_docs:
                return


def _fit(params: dict, model_path: str) -> str | None:
    """Child-process body: train and save; return the error text instead of raising."""
    import fasttext

    try:
        fasttext.train_supervised(**params).save_model(model_path)
    except (RuntimeError, ValueError) as e:
        return str(e)
    return None


def _train_in_child(params: dict, model_path: Path) -> str | None:
    """Train fastText in a fresh spawned process; None on success, else the error text."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_fit, params, str(model_path)).result()


def _held_out(seed: int, label: str, i: int, fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{label}:{i}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def run(
    positive: list[str],
    negative: list[str],
    dst: Path,
    cfg: TrainQualityConfig,
    *,
    force: bool = False,
    progress: Progress = SILENT,
) -> Manifest:
    """Train the quality classifier and write it with its held-out metrics to `dst`.

    Raises:
        InputError: An input is missing or empty, or a class is too small to hold out from.
    """
    import fasttext

    inputs = [{**input_record(p, "docs"), "label": POSITIVE} for p in positive]
    inputs += [{**input_record(p, "docs"), "label": NEGATIVE} for p in negative]
    with commit_output(
        dst,
        kind=QUALITY_KIND,
        stage="train-quality",
        config=to_dict(cfg),
        inputs=inputs,
        force=force,
    ) as out:
        progress.start("read training documents", None, "docs")
        train, test = [], []
        for label, paths in ((POSITIVE, positive), (NEGATIVE, negative)):
            for i, line in enumerate(_texts(paths, cfg)):
                (test if _held_out(cfg.seed, label, i, cfg.holdout) else train).append(
                    (label, line)
                )
                progress.advance(1)
        progress.stop()
        _check_classes(train, test)
        random.Random(cfg.seed).shuffle(train)  # SGD wants the classes mixed
        progress.start("train fastText", None)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "train.txt"
            path.write_text("".join(f"{lab} {line}\n" for lab, line in train), encoding="utf-8")
            # fastText's SGD can diverge ("Encountered NaN") at a high learning rate on small or
            # skewed data; halve the rate (and move the seed) and try again rather than fail, and
            # record what was used. Each attempt runs in a fresh spawned process: in a long-lived
            # process that had loaded other native libraries, fastText was seen to report NaN at
            # every rate on data it trains on cleanly in a process of its own.
            lr, seed = cfg.lr, cfg.seed
            params = {
                "input": str(path),
                "epoch": cfg.epoch,
                "dim": cfg.dim,
                "wordNgrams": cfg.word_ngrams,
                "minCount": cfg.min_count,
                "bucket": cfg.bucket,
                "thread": cfg.threads,
                "verbose": 0,
            }
            model_path = Path(tmp) / MODEL_FILE
            for attempt in range(5):
                error = _train_in_child({**params, "lr": lr, "seed": seed}, model_path)
                if error is None:
                    break
                if "NaN" not in error or attempt == 4:
                    raise TrainingError(
                        f"fastText training diverged ({error}) even at lr {lr:g}"
                        if "NaN" in error
                        else f"fastText training failed ({error})",
                        "lower --lr or add training documents",
                    )
                lr, seed = lr / 2, seed + 1
            model = fasttext.load_model(str(model_path))
        progress.stop()
        model.save_model(str(out.path / MODEL_FILE))
        scores = _scores(model, [line for _, line in test])
        truth = np.array([lab == POSITIVE for lab, _ in test])
        out.manifest.counts = {
            "train_positive": sum(lab == POSITIVE for lab, _ in train),
            "train_negative": sum(lab == NEGATIVE for lab, _ in train),
            "holdout_positive": int(truth.sum()),
            "holdout_negative": int((~truth).sum()),
        }
        out.manifest.stats = {**metrics(truth, scores), "lr_used": lr, "seed_used": seed}
        out.manifest.extra = {
            "labels": {"positive": POSITIVE, "negative": NEGATIVE},
            "normalise": "whitespace collapsed to single spaces",
            "model_bytes": (out.path / MODEL_FILE).stat().st_size,
        }
    return out.manifest


def _check_classes(train: list, test: list) -> None:
    for label in (POSITIVE, NEGATIVE):
        name = "--positive" if label == POSITIVE else "--negative"
        if not any(lab == label for lab, _ in train) or not any(lab == label for lab, _ in test):
            raise InputError(
                f"too few {name} documents to train and hold out (need some in both)",
                f"add documents to {name} or raise --holdout",
            )


def _scores(model: object, lines: list[str]) -> np.ndarray:
    labels, probs = model.predict(lines, k=-1)  # type: ignore[attr-defined]
    return np.array(
        [
            dict(zip(lab, p, strict=True)).get(POSITIVE, 0.0)
            for lab, p in zip(labels, probs, strict=True)
        ]
    )


def metrics(truth: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Precision, recall, F1 and accuracy at `threshold`, and ROC AUC (rank form, ties halved)."""
    pred = scores >= threshold
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    # AUC = P(score of a random positive > that of a random negative), from average ranks.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    avg_rank = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, ties share the mean
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    auc = (avg_rank[truth].sum() - n_pos * (n_pos + 1) / 2) / max(1, n_pos * n_neg)
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "accuracy": round(float((pred == truth).mean()), 4),
        "roc_auc": round(float(auc), 4),
        "threshold": threshold,
    }

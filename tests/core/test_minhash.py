"""Tests for llmctl.core.minhash: datasketch compatibility, shingling, banding, union-find."""

from __future__ import annotations

import unicodedata

import numpy as np
import pyarrow as pa
import pytest
from datasketch import MinHash
from datasketch.lsh import _optimal_param

from llmctl.core import minhash

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat.",
    "ＦＵＬＬ width   letters\tand\n\nTABS are  normalised   before shingling here, fine.",
    "four words only here",
    "",
    None,
    "   ",
    " ".join(f"w{i % 7}" for i in range(60)),  # repeated shingles
]


def reference_shingles(text: str | None, n: int) -> set[tuple[str, ...]]:
    """Word n-grams as the module docstring defines them, written plainly."""
    words = unicodedata.normalize("NFKC", text or "").lower().split()
    if not words:
        return set()
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_permutations_are_datasketchs() -> None:
    a, b = minhash.permutations(64, seed=7)
    ref = MinHash(num_perm=64, seed=7)
    assert ref.scheme == "affine32"
    np.testing.assert_array_equal(a, ref.permutations[0])
    np.testing.assert_array_equal(b, ref.permutations[1])


@pytest.mark.parametrize("ngram", [1, 3, 5])
def test_signatures_equal_datasketch_minhash(ngram: int) -> None:
    h = minhash.hash_texts(pa.array(TEXTS), ngram)
    sig = minhash.signatures(h.shingles, h.offsets, minhash.permutations(128, 3))
    for i, text in enumerate(TEXTS):
        mine = h.shingles[h.offsets[i] : h.offsets[i + 1]]
        assert len(set(mine.tolist())) == len(reference_shingles(text, ngram)), text
        ref = MinHash(num_perm=128, seed=3, hashfunc=int)
        ref.update_batch(mine.tolist())
        np.testing.assert_array_equal(sig[i], ref.hashvalues)


def test_signatures_do_not_depend_on_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    h = minhash.hash_texts(pa.array(TEXTS * 3), 5)
    perms = minhash.permutations(32, 0)
    whole = minhash.signatures(h.shingles, h.offsets, perms)
    monkeypatch.setattr(minhash, "CHUNK_SHINGLES", 7)
    np.testing.assert_array_equal(minhash.signatures(h.shingles, h.offsets, perms), whole)


def test_exact_key_ignores_case_width_and_whitespace() -> None:
    h = minhash.hash_texts(
        pa.array(["Hello  World\n", "hello world", "ＨＥＬＬＯ\tworld", "hello, world"]), 5
    )
    assert (h.exact[0] == h.exact[1]).all()
    assert (h.exact[0] == h.exact[2]).all()
    assert not (h.exact[0] == h.exact[3]).all()
    # Shingle hashes of a batch do not depend on what else is in the batch.
    alone = minhash.hash_texts(pa.array(["hello world"]), 5)
    np.testing.assert_array_equal(alone.shingles, h.shingles[h.offsets[1] : h.offsets[2]])


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.1, 0.9)])
def test_optimal_bands_match_datasketch(threshold: float, weights: tuple[float, float]) -> None:
    assert minhash.optimal_bands(threshold, 128, *weights) == _optimal_param(
        threshold, 128, *weights
    )


def test_band_choice_is_sane() -> None:
    b, r = minhash.optimal_bands(0.8, 128, 0.1, 0.9)
    assert (b, r) == (14, 9)

    def p(s: float) -> float:
        return 1 - (1 - s**r) ** b

    assert p(0.9) > 0.99
    assert p(0.85) > 0.95
    assert p(0.5) < 0.05  # candidates this far below are rejected by verification
    # A higher threshold gets longer bands (fewer, stricter matches).
    assert minhash.optimal_bands(0.9, 128)[1] > minhash.optimal_bands(0.5, 128)[1]


def test_bucket_pairs_group_equal_keys() -> None:
    keys = np.array([5, 1, 5, 2, 5, 1], dtype=np.uint64)
    pairs = {tuple(p) for p in minhash.bucket_pairs(keys).tolist()}
    assert pairs == {(0, 2), (0, 4), (2, 4), (1, 5)}
    assert len(minhash.bucket_pairs(np.arange(5, dtype=np.uint64))) == 0


def test_huge_bucket_costs_linear_pairs() -> None:
    pairs = minhash.bucket_pairs(np.zeros(10_000, dtype=np.uint64))
    assert len(pairs) <= 10_000 * (minhash.BUCKET_WINDOW + 1)
    roots = minhash.cluster_pairs(10_000, pairs)
    assert (roots == 0).all()  # still one connected bucket


def test_estimate_jaccard_b_bit_correction() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 1 << 16, (1, 128), dtype=np.uint16)
    b = a.copy()
    b[0, :32] += 1
    sig = np.concatenate([a, b])
    est = minhash.estimate_jaccard(sig, np.array([[0, 0], [0, 1]]))
    assert est[0] == 1.0
    assert abs(est[1] - 0.75) < 1e-4


def test_union_find_is_transitive_with_the_smallest_root() -> None:
    roots = minhash.cluster_pairs(6, np.array([[4, 5], [1, 4], [2, 3]]))
    assert roots.tolist() == [0, 1, 2, 2, 1, 1]
    uf = minhash.UnionFind(4)
    uf.union(3, 2)
    uf.union(2, 1)
    assert uf.roots().tolist() == [0, 1, 1, 1]

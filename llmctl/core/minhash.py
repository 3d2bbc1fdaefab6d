"""MinHash signatures, LSH banding and union-find for near-duplicate detection, vectorised with numpy.

Words and shingles. Text is normalised with Unicode NFKC and lowercased, then split on runs of
whitespace into words (pyarrow compute kernels, a whole record batch at a time). A document's
shingles are its word n-grams; a document shorter than n words is one shingle of all its words, an
empty one has none. The exact-duplicate key is blake2b-128 of the words joined by single spaces, so
two texts that differ only in case, Unicode compatibility forms or whitespace are exact duplicates.

Hashing. Each distinct word of a batch is hashed once (blake2b, 64 bits). A shingle's 32-bit hash is
a multiply-xor chain over its n word hashes, folded to 32 bits, computed for every window of the
batch at once; shingle strings are never built.

Signatures follow datasketch's "affine32" scheme exactly: the same permutation parameters as
`datasketch.MinHash(num_perm, seed=seed).permutations`, the same MurmurHash3 pre-mix, then
`a * h + b mod 2**32` and a minimum per document. `datasketch.MinHash(num_perm, seed=seed,
hashfunc=int)` updated with a document's `shingle_hashes` holds the same `hashvalues` (tested).
Here each permutation is applied to a chunk of shingles at once and reduced per document with
`np.minimum.reduceat`.

LSH. b bands of r rows; a pair of documents with Jaccard s shares at least one band with
probability 1 - (1 - s**r)**b. `optimal_bands` picks (b, r) with b * r <= num_perm minimising
fp_weight * (area under that curve below the threshold) + fn_weight * (area above it missed), the
criterion of datasketch's `MinHashLSH` (Leskovec, Rajaraman and Ullman, Mining of Massive Datasets,
ch. 3). Bucketing sorts each band's 64-bit keys instead of building a dict of lists.

Departures from the textbook:
- Candidates are verified: a pair counts only if its signatures agree on at least `threshold` of
  their positions (the MinHash estimate of Jaccard). Since false-positive candidates cost only a
  comparison, the band choice weights false negatives 0.9 and false positives 0.1 by default.
- Each band bucket compares each member with the bucket's first member and with the next
  `BUCKET_WINDOW` members in input order, so buckets of up to 17 documents are compared all-pairs
  and a huge bucket (a template repeated 10^5 times) costs O(size) comparisons, not O(size**2).
- Clustering keeps 16 bits of each 32-bit hash value (b-bit minwise hashing, Li and Koenig, WWW
  2010): two different minima agree on their low 16 bits with probability 2**-16, so the estimate
  is corrected as (m - c) / (1 - c) with c = 2**-16, and bands built from 16-bit values collide
  spuriously with probability about r * 2**-16 per band (then rejected by verification). This halves
  the memory of the cluster step: 2 * num_perm bytes per document.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmctl.core.progress import SILENT, Progress

BUCKET_WINDOW = 16  # members of an LSH bucket each document is compared with (besides the first)
CHUNK_SHINGLES = 1 << 15  # shingles hashed per pass (a 128 KiB vector: stays in L2 cache)
B_BITS_C = 2.0**-16  # chance that two different 32-bit minima agree on their low 16 bits

_M64 = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio) for the shingle chain
_SEED64 = np.uint64(0x243F6A8885A308D3)
_FMIX32 = (
    np.uint32(16),
    np.uint32(0x85EBCA6B),
    np.uint32(13),
    np.uint32(0xC2B2AE35),
    np.uint32(16),
)


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) parameters of datasketch's affine32 permutations for `MinHash(num_perm, seed)`.

    Returns:
        Two uint32 arrays of length num_perm; every `a` is odd, so `a * h + b` is a bijection.
    """
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (the pre-mix of datasketch's affine32 scheme)."""
    s1, m1, s2, m2, s3 = _FMIX32
    h = h ^ (h >> s1)
    h = h * m1
    h = h ^ (h >> s2)
    h = h * m2
    return h ^ (h >> s3)


@dataclass
class Hashed:
    """The hashes of a batch of documents.

    Attributes:
        exact: (D, 16) uint8, blake2b-128 of each document's normalised text.
        shingles: uint32 shingle hashes, grouped by document.
        offsets: (D + 1,) int64; document i's shingles are shingles[offsets[i]:offsets[i + 1]].
    """

    exact: np.ndarray
    shingles: np.ndarray
    offsets: np.ndarray


def _string_slices(arr: pa.Array) -> tuple[memoryview, np.ndarray]:
    """The data buffer and the (len + 1,) offsets of a string array, without copying."""
    arr = arr.cast(pa.large_string()) if pa.types.is_string(arr.type) else arr
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = memoryview(bufs[2]) if bufs[2] is not None else memoryview(b"")
    return data, offsets


def _blake2b(arr: pa.Array, size: int) -> bytes:
    """blake2b digests of `size` bytes of each string, concatenated."""
    data, o = _string_slices(arr)
    blake = hashlib.blake2b
    return b"".join(
        blake(data[s:e], digest_size=size).digest() for s, e in zip(o[:-1], o[1:], strict=True)
    )


def words(texts: pa.Array) -> pa.ListArray:
    """Normalised words per document: NFKC, lowercase, split on whitespace (nulls are empty)."""
    texts = pc.fill_null(texts, "")
    ascii_ = pc.string_is_ascii(texts)
    if not pc.all(ascii_).as_py():  # NFKC leaves ASCII as it is: normalise only the others
        other = pc.invert(ascii_)
        idx = np.flatnonzero(other.to_numpy(zero_copy_only=False))
        texts = pc.replace_with_mask(texts, other, pc.utf8_normalize(texts.take(idx), form="NFKC"))
    norm = pc.utf8_trim_whitespace(pc.utf8_lower(texts))
    lists = pc.utf8_split_whitespace(norm)
    # An empty text splits into [""]: give it no words.
    return pc.if_else(pc.equal(pc.binary_length(norm), 0), pa.scalar([], lists.type), lists)


def hash_texts(texts: pa.Array, ngram: int) -> Hashed:
    """Exact-duplicate keys and shingle hashes for a batch of texts.

    Args:
        texts: A string array (one document per entry).
        ngram: Words per shingle.

    Returns:
        The batch's Hashed.
    """
    lists = words(texts)
    n_docs = len(lists)
    exact = np.frombuffer(_blake2b(pc.binary_join(lists, " "), 16), dtype=np.uint8)
    flat = lists.flatten()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    doc_start = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(lengths, out=doc_start[1:])

    # Hash each distinct word once.
    enc = pc.dictionary_encode(flat)
    dict_hash = np.frombuffer(_blake2b(enc.dictionary, 8), dtype="<u8")
    w = dict_hash[enc.indices.to_numpy(zero_copy_only=False)] if len(flat) else dict_hash[:0]

    # Window starts: every position with n words left in its document, plus the first position
    # of each document shorter than n (one shingle of all its words).
    doc_of = np.repeat(np.arange(n_docs), lengths)
    pos = np.arange(len(w), dtype=np.int64)
    end = doc_start[1:][doc_of]
    starts = pos[
        (pos + ngram <= end) | ((pos == doc_start[:-1][doc_of]) & (lengths[doc_of] < ngram))
    ]
    end_s = end[starts]
    x = np.full(len(starts), _SEED64, dtype=np.uint64)
    for j in range(ngram):
        idx = starts + j
        ok = idx < end_s
        x = np.where(ok, (x ^ w[np.minimum(idx, len(w) - 1)]) * _M64, x) if len(w) else x
    shingles = ((x ^ (x >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    counts = np.bincount(doc_of[starts], minlength=n_docs) if len(starts) else np.zeros(n_docs, int)
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Hashed(exact.reshape(n_docs, 16), shingles, offsets)


def signatures(
    shingles: np.ndarray, offsets: np.ndarray, perms: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """MinHash signatures of documents given their shingle hashes.

    Args:
        shingles: uint32 shingle hashes, grouped by document.
        offsets: (D + 1,) document boundaries in `shingles`.
        perms: (a, b) from `permutations`.

    Returns:
        (D, num_perm) uint32; a document without shingles gets 2**32 - 1 everywhere, as an empty
        datasketch MinHash does.
    """
    a, b = perms
    out = np.full((len(a), len(offsets) - 1), np.uint32(0xFFFFFFFF), dtype=np.uint32)
    mixed = fmix32(shingles.astype(np.uint32, copy=False))
    docs = np.flatnonzero(np.diff(offsets))  # documents with shingles
    starts = offsets[docs]
    d = 0
    while d < len(docs):
        # Whole documents up to CHUNK_SHINGLES shingles (at least one), then one permutation at
        # a time: 1-D passes over a cache-sized vector are ~10x faster than a 2-D
        # (shingles, num_perm) matrix reduced along its first axis.
        e = max(d + 1, int(np.searchsorted(starts, starts[d] + CHUNK_SHINGLES, side="right")))
        e = min(e, len(docs))
        lo, hi = starts[d], offsets[docs[e - 1] + 1]
        seg = starts[d:e] - lo  # empty documents between these add nothing to a segment
        x = mixed[lo:hi]
        v = np.empty(hi - lo, dtype=np.uint32)
        for p in range(len(a)):
            np.multiply(x, a[p], out=v)  # wraps mod 2**32, as uint32 arithmetic does
            np.add(v, b[p], out=v)
            out[p, docs[d:e]] = np.minimum.reduceat(v, seg)
        d = e
    return np.ascontiguousarray(out.T)


def _integral(f: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Trapezoidal integral of f along its last axis over the points x."""
    return ((f[..., 1:] + f[..., :-1]) * np.diff(x) / 2).sum(-1)


@functools.lru_cache(maxsize=64)
def optimal_bands(
    threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
) -> tuple[int, int]:
    """LSH bands and rows minimising the weighted false positive and false negative areas.

    Same criterion as datasketch's `_optimal_param`, integrated on a fine grid rather than with
    scipy's quad (all (b, r) at once; tested to agree).

    Returns:
        (bands, rows) with bands * rows <= num_perm.
    """
    grid = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)])
    b, r = grid[:, 0], grid[:, 1]
    bb, rr = b[:, None].astype(float), r[:, None].astype(float)
    lo, hi = np.linspace(0, threshold, 1001), np.linspace(threshold, 1, 1001)
    fp = _integral(1 - (1 - lo[None] ** rr) ** bb, lo)
    fn = _integral((1 - hi[None] ** rr) ** bb, hi)
    best = int(np.argmin(fp * fp_weight + fn * fn_weight))
    return int(b[best]), int(r[best])


def band_keys(
    sig: np.ndarray, bands: int, rows: int, index: np.ndarray | None = None
) -> Iterator[np.ndarray]:
    """Yield, for each band, a uint64 key per document hashing its `rows` signature values.

    Args:
        sig: (N, num_perm) signatures (any unsigned dtype).
        bands: Number of bands.
        rows: Signature positions per band.
        index: Only these rows of `sig` (default all).
    """
    index = np.arange(len(sig)) if index is None else index
    step = 1 << 16  # rows at a time: reads each row's band as one cache line, not a column sweep
    for k in range(bands):
        key = np.empty(len(index), dtype=np.uint64)
        for s in range(0, len(index), step):
            block = sig[index[s : s + step], k * rows : (k + 1) * rows].astype(np.uint64)
            h = np.full(len(block), _SEED64 + np.uint64(k), dtype=np.uint64)
            for c in range(rows):
                h = (h ^ block[:, c]) * _M64
            key[s : s + step] = h ^ (h >> np.uint64(29))
        yield key


def bucket_pairs(keys: np.ndarray, members: np.ndarray | None = None) -> np.ndarray:
    """Candidate pairs of documents that share a band key.

    Args:
        keys: uint64 band key per document (or per member).
        members: Document index of each key (default: its position).

    Returns:
        (M, 2) int64 pairs (i, j) with i < j, possibly repeated: each member with its bucket's first
        member and with the next BUCKET_WINDOW members, ordered by document index.
    """
    members = np.arange(len(keys)) if members is None else members
    order = np.lexsort((members, keys))  # by key, then by document index
    k = keys[order]
    same = k[1:] == k[:-1]
    if not same.any():
        return np.zeros((0, 2), dtype=np.int64)
    multi = np.zeros(len(k), dtype=bool)
    multi[1:] |= same
    multi[:-1] |= same
    idx, k = members[order[multi]].astype(np.int64), k[multi]
    first = np.r_[True, k[1:] != k[:-1]]
    head = np.maximum.accumulate(np.where(first, np.arange(len(k)), 0))
    pairs = [np.stack([idx[head[~first]], idx[~first]], axis=1)]
    for d in range(1, BUCKET_WINDOW + 1):
        if d >= len(k):
            break
        ok = head[d:] == head[:-d]
        pairs.append(np.stack([idx[:-d][ok], idx[d:][ok]], axis=1))
    return np.concatenate(pairs)


def estimate_jaccard(sig16: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Jaccard estimates of pairs from 16-bit signatures (b-bit corrected, clipped to [0, 1])."""
    out = np.empty(len(pairs), dtype=np.float64)
    step = max(1, (1 << 22) // max(1, sig16.shape[1]))
    for s in range(0, len(pairs), step):
        p = pairs[s : s + step]
        out[s : s + step] = (sig16[p[:, 0]] == sig16[p[:, 1]]).mean(axis=1)
    return np.clip((out - B_BITS_C) / (1 - B_BITS_C), 0.0, 1.0)


class UnionFind:
    """Disjoint sets over 0..n-1 whose root is always the smallest member (the survivor)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        """The root of x's set (path halving)."""
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, x: int, y: int) -> None:
        """Merge the sets of x and y under the smaller root."""
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)

    def roots(self) -> np.ndarray:
        """Root of every element."""
        return np.fromiter((self.find(x) for x in range(len(self.parent))), np.int64)


def cluster_pairs(n: int, pairs: np.ndarray) -> np.ndarray:
    """Transitive clusters of 0..n-1 linked by `pairs`: each element's smallest cluster member.

    Union-find runs only over the elements that occur in a pair, so n can be 10**7 and more.
    """
    roots = np.arange(n, dtype=np.int64)
    if len(pairs) == 0:
        return roots
    nodes, local = np.unique(pairs, return_inverse=True)  # sorted: local order = global order
    local = local.reshape(-1, 2)
    uf = UnionFind(len(nodes))
    for i, j in local.tolist():
        uf.union(i, j)
    roots[nodes] = nodes[uf.roots()]
    return roots


def _exact_groups(exact: np.ndarray) -> np.ndarray:
    """For each document, the first (lowest index) document with the same exact key."""
    key = exact.view(np.uint64)  # (N, 2)
    order = np.lexsort((np.arange(len(key)), key[:, 1], key[:, 0]))
    k = key[order]
    first = np.r_[True, (k[1:] != k[:-1]).any(axis=1)] if len(k) else np.zeros(0, bool)
    head = np.maximum.accumulate(np.where(first, np.arange(len(k)), 0))
    rep = np.empty(len(key), dtype=np.int64)
    rep[order] = order[head]
    return rep


def find_clusters(
    exact: np.ndarray,
    sig16: np.ndarray,
    threshold: float,
    bands: int,
    rows: int,
    progress: Progress = SILENT,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Each document's survivor (the first member of its cluster), from exact keys and signatures.

    Args:
        exact: (N, 16) uint8 exact keys, in input order.
        sig16: (N, num_perm) uint16 low bits of the MinHash signatures, in input order.
        threshold: Estimated Jaccard at or above which a candidate pair is linked.
        bands: LSH bands.
        rows: Signature positions per band.
        progress: Reports the bands.

    Returns:
        (kept, first, counts): kept[i] <= i is the index of document i's survivor; first[i] <= i the
        first document with the same exact key; counts of candidate and verified pairs.
    """
    rep = _exact_groups(exact)
    reps = np.flatnonzero(rep == np.arange(len(rep)))
    codes = []
    progress.start(f"LSH {bands} bands x {rows} rows", bands, "bands")
    for keys in band_keys(sig16, bands, rows, reps):
        p = bucket_pairs(keys, reps)
        codes.append(np.unique(p[:, 0] * len(rep) + p[:, 1]))
        progress.advance(1)
    progress.stop()
    code = np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64)
    pairs = np.stack([code // max(1, len(rep)), code % max(1, len(rep))], axis=1)
    good = pairs[estimate_jaccard(sig16, pairs) >= threshold]
    roots = cluster_pairs(len(rep), good)
    return roots[rep], rep, {"candidate_pairs": len(pairs), "verified_pairs": len(good)}

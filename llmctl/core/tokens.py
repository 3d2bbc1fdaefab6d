"""Token files: Megatron-LM's memory-mapped indexed dataset (`PREFIX.bin` + `PREFIX.idx`).

We use Megatron's layout as is, so Megatron-LM and GPT-NeoX read llmctl's data directly
(`megatron.core.datasets.indexed_dataset.IndexedDataset(PREFIX)`), and anyone can read it with numpy:

    PREFIX.bin   all documents' token ids back to back, dtype uint16 (vocab < 65500) else int32
    PREFIX.idx   little-endian:
                 b"MMIDIDX\\x00\\x00"  magic (9 bytes)
                 u64 version = 1
                 u8  dtype code (8 = uint16, 4 = int32; Megatron's codes)
                 u64 n_sequences
                 u64 n_documents + 1
                 i32[n_sequences]  tokens per sequence
                 i64[n_sequences]  byte offset of each sequence in .bin
                 i64[n_documents + 1]  sequence index where each document starts (0, 1, ..., n)

llmctl writes one sequence per document, each `BOS ... EOS`. Megatron has no uint32 code, so vocabularies
of 65500 and more use int32 (a uint32 file would not load there). The writer streams: lengths go to a
side file while tokens are appended, and the index is assembled at the end, so memory stays flat
however large the corpus.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from llmctl.core.errors import InputError

MAGIC = b"MMIDIDX\x00\x00"
_CODES = {
    np.dtype(np.uint16): 8,
    np.dtype(np.int32): 4,
    np.dtype(np.uint8): 1,
    np.dtype(np.int64): 5,
}
_DTYPES = {v: k for k, v in _CODES.items()}
_HEADER = 34


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (Megatron's rule: vocab < 65500), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


class IndexedWriter:
    """Append documents to `PREFIX.bin`, then `close()` writes `PREFIX.idx`."""

    def __init__(self, prefix: Path, dtype: np.dtype) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self._bin = open(f"{prefix}.bin", "wb")  # noqa: SIM115 - held open across add() calls; closed in close()
        self._lens = open(f"{prefix}.lens.tmp", "wb")  # noqa: SIM115 - as above
        self.n_docs = 0
        self.n_tokens = 0

    def add(self, ids: np.ndarray | list[int]) -> None:
        """Append one document's ids."""
        arr = np.asarray(ids, dtype=self.dtype)
        self._bin.write(arr.tobytes())
        self._lens.write(np.int32(arr.size).tobytes())
        self.n_docs += 1
        self.n_tokens += int(arr.size)

    def close(self) -> None:
        """Write the index: header, lengths, byte pointers and document indices (in chunks)."""
        self._bin.close()
        self._lens.close()
        lens_path = Path(f"{self.prefix}.lens.tmp")
        n = self.n_docs
        lens = (
            np.memmap(lens_path, dtype=np.int32, mode="r", shape=(n,))
            if n
            else np.zeros(0, np.int32)
        )
        with open(f"{self.prefix}.idx", "wb") as f:
            f.write(MAGIC + struct.pack("<Q", 1) + struct.pack("<B", _CODES[self.dtype]))
            f.write(struct.pack("<Q", n) + struct.pack("<Q", n + 1))
            step = 1 << 20
            for s in range(0, n, step):
                f.write(np.asarray(lens[s : s + step], dtype=np.int32).tobytes())
            offset = 0
            for s in range(0, n, step):
                chunk = np.asarray(lens[s : s + step], dtype=np.int64) * self.dtype.itemsize
                ptr = np.cumsum(chunk) - chunk + offset
                offset += int(chunk.sum())
                f.write(ptr.astype(np.int64).tobytes())
            for s in range(0, n + 1, step):
                f.write(np.arange(s, min(s + step, n + 1), dtype=np.int64).tobytes())
        del lens
        os.remove(lens_path)


class IndexedDataset:
    """Read-only view of a `PREFIX.bin`/`.idx` pair through memory maps.

    Attributes:
        tokens: All tokens as one flat memory-mapped array (documents back to back).
        lengths: Tokens per document.
        offsets: Start of each document in `tokens` (element index, not bytes).
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        idx, binp = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for p in (idx, binp):
            if not p.is_file():
                raise InputError(f"missing token file {p}", "re-run `llmctl tokenize`")
        raw = idx.read_bytes()[:_HEADER]
        if len(raw) < _HEADER or raw[:9] != MAGIC:
            raise InputError(
                f"{idx} is not a Megatron indexed-dataset index", "re-run `llmctl tokenize`"
            )
        (version,) = struct.unpack("<Q", raw[9:17])
        code = raw[17]
        n_seq, n_doc = struct.unpack("<QQ", raw[18:34])
        if version != 1 or code not in _DTYPES:
            raise InputError(f"{idx}: unsupported version {version} or dtype code {code}")
        self.dtype = _DTYPES[code]
        expected = _HEADER + n_seq * 12 + n_doc * 8
        if idx.stat().st_size < expected:
            raise InputError(f"{idx} is truncated", "re-run `llmctl tokenize`")
        index = np.memmap(idx, mode="r", dtype=np.uint8)
        self.lengths = np.frombuffer(index, np.int32, n_seq, _HEADER)
        pointers = np.frombuffer(index, np.int64, n_seq, _HEADER + 4 * n_seq)
        self.offsets = pointers // self.dtype.itemsize
        self.doc_index = np.frombuffer(index, np.int64, n_doc, _HEADER + 12 * n_seq)
        size = binp.stat().st_size
        n_tok = int(self.lengths.sum(dtype=np.int64))
        if size != n_tok * self.dtype.itemsize:
            raise InputError(
                f"{binp} holds {size} bytes, its index says {n_tok * self.dtype.itemsize}",
                "re-run `llmctl tokenize`",
            )
        self.tokens = (
            np.memmap(binp, mode="r", dtype=self.dtype) if n_tok else np.zeros(0, self.dtype)
        )

    def __len__(self) -> int:
        return int(self.lengths.size)

    @property
    def n_tokens(self) -> int:
        """Total tokens."""
        return int(self.tokens.size)

    def __getitem__(self, i: int) -> np.ndarray:
        """Token ids of document i."""
        o = int(self.offsets[i])
        return np.asarray(self.tokens[o : o + int(self.lengths[i])])

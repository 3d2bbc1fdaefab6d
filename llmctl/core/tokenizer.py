"""The one tokenizer every stage uses: a SentencePiece BPE model plus llmctl's special tokens and
chat template.

Training choices (and why): BPE with byte fallback, so no input is ever out of vocabulary; digits
split one per token (better arithmetic, as in Llama and PaLM); identity normalisation, no dummy
prefix and no whitespace collapsing, so `decode(encode(s)) == s` for any text, code and indentation
included, with one exception: SentencePiece writes spaces as U+2581 ("▁"), so a literal U+2581 in
the input comes back as a space. Special tokens are *control* symbols: text that happens to spell
"<|user|>" is encoded as ordinary characters and can never forge a role marker.

Ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3 <pad>, then the chat markers <|system|>, <|user|>,
<|assistant|>, <|end|>. A conversation renders as
    <s><|system|>You are ...<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>...
and only assistant content plus its closing <|end|> carries loss (`render_chat`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from llmctl.core.errors import InputError

MODEL_FILE = "tokenizer.model"
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
CONTROL_TOKENS = [*ROLE_TOKENS.values(), END_OF_TURN]

# The same template in Jinja, for Hugging Face exports (`tokenizer_config.json`).
CHAT_TEMPLATE_JINJA = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(
    sentences: Iterable[str],
    vocab_size: int,
    *,
    num_threads: int = 2,
    seed_sentences: int = 2_000_000,
) -> bytes:
    """Train a SentencePiece BPE model and return its serialised bytes.

    Args:
        sentences: Training text, one line per item (lines over 16 KiB are skipped by SentencePiece).
        vocab_size: Target vocabulary size, special and byte tokens included.
        num_threads: SentencePiece trainer threads.
        seed_sentences: At most this many lines are used (sampled by SentencePiece).

    Returns:
        The model proto bytes; load with `Tokenizer.from_bytes`.
    """
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 14,
        input_sentence_size=seed_sentences,
        shuffle_input_sentence=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        pad_piece=PAD,
        control_symbols=CONTROL_TOKENS,
        hard_vocab_limit=False,
        num_threads=num_threads,
        minloglevel=2,
    )
    return buf.getvalue()


@dataclass(frozen=True)
class Turn:
    """One rendered message: its ids and whether they carry loss."""

    ids: list[int]
    loss: list[bool]


class Tokenizer:
    """SentencePiece model + special tokens + chat template. Load with `Tokenizer.load(path)`."""

    def __init__(self, model_bytes: bytes) -> None:
        if not model_bytes:
            # SentencePiece takes an empty proto as "no model" and returns an unloaded processor whose
            # lookups all answer defaults, which would slip past the special-token check below.
            raise RuntimeError("empty model (0 bytes)")
        self.model_bytes = model_bytes
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.fingerprint = hashlib.sha256(model_bytes).hexdigest()[:16]
        missing = [
            t
            for t in (BOS, EOS, PAD, *CONTROL_TOKENS)
            if self.sp.piece_to_id(t) == self.sp.unk_id()
        ]
        if missing:
            raise InputError(
                f"tokenizer lacks llmctl's special tokens ({', '.join(missing)})",
                "train one with `llmctl tokenize` (or pass a tokenizer made by it)",
            )
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()
        self.unk_id = self.sp.unk_id()
        self.role_ids = {r: self.sp.piece_to_id(t) for r, t in ROLE_TOKENS.items()}
        self.end_id = self.sp.piece_to_id(END_OF_TURN)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_bytes(cls, model_bytes: bytes) -> Tokenizer:
        """From serialised SentencePiece model bytes."""
        return cls(model_bytes)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a `tokenizer.model` file or a directory holding one (tokens dir, checkpoint).

        Raises:
            InputError: No such file, or not a SentencePiece model.
        """
        p = Path(path)
        if p.is_dir():
            p = p / MODEL_FILE
        if not p.is_file():
            raise InputError(
                f"no tokenizer at {p}", "pass a tokenizer.model, a tokens dir or a checkpoint"
            )
        data = p.read_bytes()
        try:
            return cls(data)
        except (RuntimeError, OSError) as e:
            raise InputError(
                f"{p} is not a SentencePiece model ({e})", "re-create it with `llmctl tokenize`"
            ) from None

    def save(self, directory: Path) -> Path:
        """Write `tokenizer.model` into `directory`."""
        path = Path(directory) / MODEL_FILE
        path.write_bytes(self.model_bytes)
        return path

    # -- encoding --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids (the model's embedding rows)."""
        return self.sp.get_piece_size()

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Text to ids; optional BOS/EOS around them."""
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = False, eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]:
        """Many texts at once (SentencePiece threads over the batch when num_threads > 1)."""
        out = self.sp.encode(list(texts), num_threads=num_threads)
        pre = [self.bos_id] if bos else []
        post = [self.eos_id] if eos else []
        return [pre + ids + post for ids in out]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; special tokens render as nothing."""
        return self.sp.decode([int(i) for i in ids])

    def piece(self, i: int) -> str:
        """The vocabulary entry of id `i` (for inspection)."""
        return self.sp.id_to_piece(int(i))

    def decode_stream(self, ids: Iterator[int]) -> Iterator[str]:
        """Decode ids as they arrive, yielding text pieces only once complete: multi-byte UTF-8
        characters split across byte-fallback tokens are held back until whole."""
        held: list[int] = []
        emitted = ""
        for i in ids:
            held.append(i)
            text = self.decode(held)
            if text.endswith("\ufffd"):
                continue
            if text.startswith(emitted):
                yield text[len(emitted) :]
            emitted = text
            if len(held) > 64:  # keep the window short: re-decoding is O(window)
                held, emitted = [], ""
        if held:
            text = self.decode(held)
            if text.startswith(emitted) and len(text) > len(emitted):
                yield text[len(emitted) :]

    # -- chat ------------------------------------------------------------------------------

    def render_chat(
        self, messages: Sequence[dict], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Render a conversation to ids and a loss mask (True on assistant content and its <|end|>).

        Args:
            messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
            add_generation_prompt: End with an open <|assistant|> turn for the model to complete.

        Returns:
            (ids, loss_mask), equal length.

        Raises:
            InputError: Unknown role or non-string content.
        """
        ids, mask = [self.bos_id], [False]
        for n, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in self.role_ids:
                raise InputError(
                    f"message {n} has role {role!r}; expected system, user or assistant"
                )
            if not isinstance(content, str):
                raise InputError(f"message {n} has no string 'content'")
            body = self.encode(content) + [self.end_id]
            learn = role == "assistant"
            ids += [self.role_ids[role], *body]
            mask += [False] + [learn] * len(body)
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(False)
        return ids, mask

"""Tests for llmctl.core.tokenizer: lossless round trips, special tokens, chat rendering, streaming."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmctl.core.errors import InputError
from llmctl.core.tokenizer import ROLE_TOKENS, Tokenizer, train_tokenizer

# SentencePiece writes spaces as U+2581 ("▁") internally, so a literal U+2581 in the input cannot be
# told apart from a space and decodes as " ". This is the one known exception to the round trip
# (checked by test_u2581_is_the_known_exception); the property tests leave that character out.
SPACE_MARK = "\u2581"

ROUND_TRIP_CASES = {
    "ascii": "Hello, world!",
    "cjk": "日本語のテキスト、中文文本，한국어 텍스트",
    "arabic": "مرحبا بالعالم، هذا نص عربي",
    "combining": "e\u0301 a\u0308 n\u0303 \u1e9b\u0323 Z\u0351\u0336",
    "emoji": "I \u2764\ufe0f \U0001f40d and \U0001f600",
    "zwj": "\U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 \U0001f3f3\ufe0f\u200d\U0001f308",
    "flags_and_skin": "\U0001f1fa\U0001f1f8 \U0001f44b\U0001f3fd",
    "controls": "".join(chr(c) for c in range(0x20)) + "\x7f",
    "tabs_crlf": "a\tb\r\nc\rd\n\n\t\t e  ",
    "leading_space": "   three leading spaces",
    "only_spaces": "     ",
    "code": "def f(x):\n    if x:\n\treturn {'a': [1, 2]}\n    return None  # done\n",
    "digits": "3.14159 and 1234567890",
    "specials_as_text": "<s></s><pad><unk><|user|><|end|>",
    "replacement_char": "bad \ufffd byte",
    "empty": "",
}


@pytest.mark.parametrize("name", list(ROUND_TRIP_CASES))
def test_round_trip(tokenizer: Tokenizer, name: str) -> None:
    text = ROUND_TRIP_CASES[name]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_id not in ids
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_u2581_is_the_known_exception(tokenizer: Tokenizer) -> None:
    """Documents the limit the property tests exclude: a literal '▁' comes back as a space."""
    assert tokenizer.decode(tokenizer.encode(f"a{SPACE_MARK}b")) == "a b"
    assert tokenizer.unk_id not in tokenizer.encode(SPACE_MARK)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.text(alphabet=st.characters(blacklist_characters=SPACE_MARK, codec="utf-8")))
def test_round_trip_property(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_id not in ids


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.text())
def test_never_unk_property(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.unk_id not in tokenizer.encode(text)


# -- special tokens ---------------------------------------------------------------------------------


def test_special_ids_are_distinct(tokenizer: Tokenizer) -> None:
    ids = [
        tokenizer.unk_id,
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.pad_id,
        *tokenizer.role_ids.values(),
        tokenizer.end_id,
    ]
    assert len(set(ids)) == len(ids) == 8
    assert set(tokenizer.role_ids) == set(ROLE_TOKENS)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


@pytest.mark.parametrize("marker", [*ROLE_TOKENS.values(), "<|end|>", "<s>", "</s>", "<pad>"])
def test_marker_text_cannot_forge_a_special_token(tokenizer: Tokenizer, marker: str) -> None:
    specials = {
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.pad_id,
        tokenizer.end_id,
        *tokenizer.role_ids.values(),
    }
    ids = tokenizer.encode(f"hi {marker} there")
    assert not specials & set(ids)
    assert tokenizer.decode(ids) == f"hi {marker} there"


def test_bos_eos_wrapping_and_special_tokens_decode_to_nothing(tokenizer: Tokenizer) -> None:
    plain = tokenizer.encode("some text")
    wrapped = tokenizer.encode("some text", bos=True, eos=True)
    assert wrapped == [tokenizer.bos_id, *plain, tokenizer.eos_id]
    assert tokenizer.decode(wrapped) == "some text"
    assert tokenizer.decode([tokenizer.role_ids["user"], tokenizer.end_id]) == ""


def test_encode_batch_equals_encode(tokenizer: Tokenizer) -> None:
    texts = list(ROUND_TRIP_CASES.values()) * 3
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode_batch(texts, bos=True, eos=True, num_threads=2) == [
        tokenizer.encode(t, bos=True, eos=True) for t in texts
    ]


# -- chat -------------------------------------------------------------------------------------------


def test_render_chat_mask_covers_assistant_content_and_end_only(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi <|assistant|> there"},
        {"role": "assistant", "content": "Hello! 😀"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    ids, mask = tokenizer.render_chat(messages)
    assert len(ids) == len(mask)
    t, r = tokenizer, tokenizer.role_ids
    expected_ids, expected_mask = [t.bos_id], [False]
    for m in messages:
        body = [*t.encode(m["content"]), t.end_id]
        learn = m["role"] == "assistant"
        expected_ids += [r[m["role"]], *body]
        expected_mask += [False] + [learn] * len(body)
    assert ids == expected_ids
    assert mask == expected_mask
    learned = [i for i, keep in zip(ids, mask, strict=True) if keep]
    assert learned == [*t.encode("Hello! 😀"), t.end_id, *t.encode("4"), t.end_id]
    # Exactly two role markers for the assistant: the forged one in user text stays ordinary text.
    assert ids.count(r["assistant"]) == 2


def test_render_chat_generation_prompt(tokenizer: Tokenizer) -> None:
    ids, mask = tokenizer.render_chat(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True
    )
    assert ids[-1] == tokenizer.role_ids["assistant"]
    assert not any(mask)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        ({"role": "bot", "content": "x"}, "message 0 has role 'bot'"),
        ({"role": "user", "content": None}, "message 0 has no string 'content'"),
        ({"content": "x"}, "message 0 has role None"),
    ],
)
def test_render_chat_rejects_bad_messages(tokenizer: Tokenizer, message: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        tokenizer.render_chat([message])


# -- streaming decode -------------------------------------------------------------------------------


def _is_byte_piece(tokenizer: Tokenizer, i: int) -> bool:
    p = tokenizer.piece(i)
    return p.startswith("<0x") and p.endswith(">")


@pytest.mark.parametrize(
    "text",
    [
        "Snake \U0001f40d, family \U0001f469\u200d\U0001f469\u200d\U0001f467, 漢字 and ok",
        "\U0001f600" * 40 + " tail",  # > 64 ids: crosses the stream's window reset
        "plain ascii only",
        "ends on a four-byte char \U0001f680",
    ],
)
def test_decode_stream_concatenates_to_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    pieces = list(tokenizer.decode_stream(iter(ids)))
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # never a half character


def test_decode_stream_holds_back_split_characters(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("\U0001f40d")
    assert len(ids) == 4
    assert all(_is_byte_piece(tokenizer, i) for i in ids)
    assert list(tokenizer.decode_stream(iter(ids))) == ["\U0001f40d"]


# -- loading ----------------------------------------------------------------------------------------


def test_save_load_round_trip(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tokenizer.save(tmp_path)
    for where in (path, tmp_path):
        loaded = Tokenizer.load(where)
        assert loaded.fingerprint == tokenizer.fingerprint
        assert loaded.encode("déjà vu 🙂") == tokenizer.encode("déjà vu 🙂")


@pytest.mark.parametrize(
    "content", [b"this is not a sentencepiece model\n", b"", bytes(range(256))]
)
def test_load_non_sentencepiece_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(InputError, match="is not a SentencePiece model"):
        Tokenizer.load(path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no tokenizer at"):
        Tokenizer.load(tmp_path / "nope.model")
    with pytest.raises(InputError, match="no tokenizer at"):
        Tokenizer.load(tmp_path)  # a directory without tokenizer.model


def test_load_foreign_sentencepiece_model(tmp_path: Path, corpus_lines: list[str]) -> None:
    """A valid SentencePiece model without llmctl's control tokens is refused by name."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines[:300]),
        model_writer=buf,
        vocab_size=200,
        model_type="bpe",
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    with pytest.raises(InputError, match=r"lacks llmctl's special tokens \(<pad>, <\|system\|>"):
        Tokenizer.load(tmp_path)


def test_training_respects_vocab_size(corpus_lines: list[str]) -> None:
    tok = Tokenizer.from_bytes(train_tokenizer(corpus_lines[:400], 360))
    assert tok.vocab_size == 360
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)

"""Post-training data: readers of the ecosystem's formats, label masks, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmctl.core.chatdata import (
    IGNORE,
    Conversation,
    collate,
    encode_conversations,
    encode_preferences,
    epoch_order,
    load_conversations,
    load_preferences,
    load_prompts,
    pack,
)
from llmctl.core.errors import InputError
from llmctl.core.model import ModelConfig, Transformer


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_conversations_from_messages_parquet_and_prompt_response(tmp_path: Path) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    pq.write_table(pa.table({"messages": [msgs]}), tmp_path / "c.parquet")
    convs, _ = load_conversations(tmp_path / "c.parquet")
    assert convs[0].messages == msgs
    # A JSON string of messages is accepted too (some exports store it that way).
    _jsonl(tmp_path / "s.jsonl", [{"messages": json.dumps(msgs)}])
    assert load_conversations(tmp_path / "s.jsonl")[0][0].messages == msgs
    _jsonl(tmp_path / "pr.jsonl", [{"prompt": "2+2?", "response": "4"}])
    convs, _ = load_conversations(tmp_path / "pr.jsonl")
    assert convs[0].messages == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        ([{"text": "x"}], "no 'messages'"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant turn"),
        ([{"messages": [{"role": "bot", "content": "hi"}]}], "role 'bot'"),
        ([{"messages": [{"role": "user", "content": 3}]}], "string 'content'"),
    ],
)
def test_bad_conversations_name_row_and_column(tmp_path: Path, rows: list, needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        load_conversations(_jsonl(tmp_path / "bad.jsonl", rows))


def test_preferences_in_trl_and_ultrafeedback_forms(tmp_path: Path) -> None:
    user = {"role": "user", "content": "Name a colour."}
    good, bad = {"role": "assistant", "content": "Blue."}, {"role": "assistant", "content": "Dog."}
    rows = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Dog."},  # strings
        {"prompt": [user], "chosen": [good], "rejected": [bad]},  # TRL explicit prompt
        {
            "prompt": "Name a colour.",
            "chosen": [user, good],
            "rejected": [user, bad],
        },  # UltraFeedback
        {"chosen": [user, good], "rejected": [user, bad]},  # implicit prompt
    ]
    prefs, _ = load_preferences(_jsonl(tmp_path / "p.jsonl", rows))
    for p in prefs:
        assert p.prompt == [user]
        assert p.chosen == [good]
        assert p.rejected == [bad]


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "row 0, column 'chosen' is empty"),
        ({"prompt": "q", "chosen": "a", "rejected": "  "}, "column 'rejected' is empty"),
        ({"prompt": "q", "chosen": "a"}, "no 'chosen' and 'rejected'"),
    ],
)
def test_bad_preferences(tmp_path: Path, row: dict, needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        load_preferences(_jsonl(tmp_path / "bad.jsonl", [row]))


def test_prompts_keep_extra_columns(tmp_path: Path) -> None:
    prompts, _ = load_prompts(_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "reference": "4"}]))
    assert prompts[0].messages == [{"role": "user", "content": "2+2?"}]
    assert prompts[0].extra == {"reference": "4"}
    with pytest.raises(InputError, match="is empty"):
        load_prompts(_jsonl(tmp_path / "e.jsonl", [{"prompt": ""}]))


def test_targets_only_on_assistant_tokens(tokenizer) -> None:  # noqa: ANN001
    conv = Conversation(
        [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "question"},
            {"role": "assistant", "content": "answer"},
        ],
        0,
    )
    (ex,), _ = encode_conversations(tokenizer, [conv], 512)
    b = collate([ex], [[0]], tokenizer.pad_id)
    tgt = b.targets[0][b.targets[0] != IGNORE].tolist()
    assert tgt == tokenizer.encode("answer") + [tokenizer.end_id]


def test_preference_encoding_shares_the_prompt(tokenizer) -> None:  # noqa: ANN001
    from llmctl.core.chatdata import Preference

    p = Preference(
        [{"role": "user", "content": "q"}],
        [{"role": "assistant", "content": "yes"}],
        [{"role": "assistant", "content": "no"}],
        0,
    )
    (pair,), _ = encode_preferences(tokenizer, [p], 64)
    assert pair.prompt[-1] == tokenizer.role_ids["assistant"]
    assert pair.chosen == tokenizer.encode("yes") + [tokenizer.end_id]
    assert all(pair.chosen_mask)
    assert all(pair.rejected_mask)


def _loss_sum(model: Transformer, batch) -> torch.Tensor:  # noqa: ANN001
    logits = model(batch.ids, positions=batch.positions, attn_mask=batch.attn_mask)
    return F.cross_entropy(
        logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )


_texts = st.text(alphabet="abcdefgh ijk.,?", min_size=0, max_size=12)
_turn = st.tuples(_texts, _texts)  # (user, assistant)
_conv = st.tuples(st.booleans(), st.lists(_turn, min_size=1, max_size=3))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    convs=st.lists(_conv, min_size=1, max_size=6),
    seed=st.integers(0, 3),
    seq_len=st.integers(24, 64),
)
def test_masks_survive_packing_and_batching(tokenizer, convs, seed, seq_len) -> None:  # noqa: ANN001
    """The summed loss of a packed, batched set of conversations equals the sum of each
    conversation's loss computed alone: no conversation sees another, positions restart, and no
    target leaks across a boundary or onto a non-assistant token."""
    conversations = []
    for n, (system, turns) in enumerate(convs):
        msgs = [{"role": "system", "content": "sys"}] if system else []
        for u, a in turns:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a or "ok"}]
        conversations.append(Conversation(msgs, n))
    examples, _ = encode_conversations(tokenizer, conversations, seq_len + 1)
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=tokenizer.vocab_size,
            d_model=16,
            n_layers=1,
            n_heads=2,
            n_kv_heads=1,
            d_ff=32,
            max_seq_len=128,
        )
    ).eval()
    with torch.no_grad():
        alone = sum(
            _loss_sum(model, collate(examples, [[i]], tokenizer.pad_id))
            for i in range(len(examples))
        )
        order = epoch_order(len(examples), seed, 0)
        rows = pack([len(e.ids) for e in examples], seq_len, order)
        assert sorted(i for r in rows for i in r) == list(range(len(examples)))
        packed = collate(examples, rows, tokenizer.pad_id, seq_len)
        assert packed.ids.shape == (len(rows), seq_len)
        assert packed.n_targets == sum(e.n_loss for e in examples)
        together = _loss_sum(model, packed)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_changing_non_assistant_labels_does_not_change_the_loss(tokenizer) -> None:  # noqa: ANN001
    """A trailing user turn comes after every assistant token: it can change neither the context
    of an assistant prediction (causal attention) nor, when masked right, the loss. Its labels
    differ between the two conversations, so a mask that let them through would change the loss."""
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=tokenizer.vocab_size,
            d_model=16,
            n_layers=1,
            n_heads=2,
            n_kv_heads=1,
            d_ff=32,
            max_seq_len=64,
        )
    ).eval()

    def loss(last_user: str) -> torch.Tensor:
        conv = Conversation(
            [
                {"role": "user", "content": "what is it"},
                {"role": "assistant", "content": "a test"},
                {"role": "user", "content": last_user},
            ],
            0,
        )
        (ex,), _ = encode_conversations(tokenizer, [conv], 64)
        return _loss_sum(model, collate([ex], [[0]], tokenizer.pad_id))

    with torch.no_grad():
        assert loss("thanks") == loss("no, something else entirely")
    # And the gradient reaches the logits only where the target is an assistant token.
    (ex,), _ = encode_conversations(
        tokenizer,
        [
            Conversation(
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], 0
            )
        ],
        64,
    )
    b = collate([ex], [[0]], tokenizer.pad_id)
    logits = model(b.ids).detach().requires_grad_(True)
    F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), ignore_index=IGNORE).backward()
    touched = logits.grad.abs().sum(-1)[0] > 0
    assert touched.tolist() == (b.targets[0] != IGNORE).tolist()
    assert touched.sum() == len(tokenizer.encode("a")) + 1

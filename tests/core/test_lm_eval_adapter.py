"""core/lm_eval_adapter.py: the numbers lm-eval gets are the model's own, tokenised as lm-eval's
Hugging Face model tokenises them; generation honours stop strings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmctl.core.checkpoint import load_checkpoint, save_checkpoint
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.tokenizer import Tokenizer

lm_eval_adapter = pytest.importorskip("llmctl.core.lm_eval_adapter")
TEXT = (
    "def wrap(text, width=70, **kwargs):\n    Wrap a single paragraph of text, returning a list "
    "of wrapped lines. Reformat the single paragraph in 'text' so it fits in lines of no more "
    "than 'width' columns, and return a list of wrapped lines."
)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=64,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    save_checkpoint(path, Transformer(cfg), tokenizer)
    return path


@pytest.fixture(scope="module")
def lm(ckpt_dir: Path):  # noqa: ANN201
    return lm_eval_adapter.LlmctlLM(str(ckpt_dir), device="cpu", precision="fp32", batch_size=3)


def _req(*args: object) -> SimpleNamespace:
    return SimpleNamespace(args=args)


def _direct(model: Transformer, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    ids = ctx + cont
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]])).float().log_softmax(-1)[0]
    pos = torch.arange(len(ctx) - 1, len(ids) - 1)
    tgt = torch.tensor(cont)
    return float(logp[pos, tgt].double().sum()), bool((logp[pos].argmax(-1) == tgt).all())


def test_loglikelihood_is_the_sum_of_token_logprobs(lm, tokenizer: Tokenizer) -> None:  # noqa: ANN001
    pairs = [
        ("Question: Which module defines `dedent`?\nAnswer:", " textwrap"),
        ("Question: Which module defines `dedent`?\nAnswer: ", "string"),  # space moves over
        ("", "import functools"),  # empty context: BOS alone
        ("x = 1", ""),  # nothing to score
        ("def partial(func, /, *args, **keywords):", "\n    return func"),
    ]
    got = lm.loglikelihood([_req(c, x) for c, x in pairs])
    for (c, x), (lp, greedy) in zip(pairs, got, strict=True):
        stripped = c.rstrip()
        ctx = [tokenizer.bos_id] + tokenizer.encode(stripped)
        cont = tokenizer.encode(c[len(stripped) :] + x)
        want = _direct(lm.model, ctx, cont) if cont else (0.0, True)
        assert lp == pytest.approx(want[0], abs=1e-4)
        assert greedy == want[1]
    # the moved space makes the two "textwrap"/"string" requests score " textwrap" / " string"
    assert lm.encode_pair("Answer: ", "string")[1] == tokenizer.encode(" string")


def test_loglikelihood_rolling_agrees_with_the_perplexity_path(
    lm,
    ckpt_dir: Path,
    tmp_path: Path,
    tokenizer: Tokenizer,  # noqa: ANN001
) -> None:
    from llmctl.stages import evaluate

    data = tmp_path / "held_out.txt"
    data.write_text(TEXT, encoding="utf-8")
    assert len(tokenizer.encode(TEXT)) > 64  # longer than the context: several windows
    (rolling,) = lm.loglikelihood_rolling([_req(TEXT)])
    m = evaluate.perplexity(
        ckpt_dir, data, tmp_path / "ppl", evaluate.PerplexityConfig(device="cpu", precision="fp32")
    )
    assert m.counts["tokens"] == len(tokenizer.encode(TEXT))
    assert -rolling / m.counts["tokens"] == pytest.approx(m.stats["nll_per_token"], rel=1e-6)
    c = load_checkpoint(ckpt_dir)
    assert -rolling == pytest.approx(
        evaluate.document_nll(c, tokenizer.encode(TEXT, bos=True)), rel=1e-6
    )


def test_generate_until_stops_at_the_first_stop_string(lm) -> None:  # noqa: ANN001
    ctx = "def dedent(text):\n"
    (free,) = lm.generate_until([_req(ctx, {"until": [], "max_gen_toks": 24})])
    assert len(free) > 4
    stop = free[len(free) // 2 : len(free) // 2 + 1]
    cut, same = lm.generate_until(
        [_req(ctx, {"until": [stop], "max_gen_toks": 24}), _req(ctx, {"max_gen_toks": 24})]
    )
    assert cut == free.split(stop)[0]
    assert stop not in cut
    assert same == free  # greedy by default, deterministic, batch-independent
    (short,) = lm.generate_until([_req(ctx, {"until": [], "max_gen_toks": 3})])
    assert free.startswith(short)
    assert len(short) < len(free)


def test_model_args_win_over_lm_evals_device_default(ckpt_dir: Path) -> None:
    m = lm_eval_adapter.LlmctlLM.create_from_arg_string(
        f"path={ckpt_dir},precision=fp32,batch_size=5",
        {"batch_size": 1, "device": "cuda:0" if not torch.cuda.is_available() else None},
    )
    assert m.batch_size == 5
    assert m.rt.device.type in ("cpu", "cuda", "mps")


def test_registered_under_the_name_llmctl() -> None:
    from lm_eval.api.registry import get_model

    assert get_model("llmctl") is lm_eval_adapter.LlmctlLM
    assert get_model("dummy") is not None  # lm-eval's own models stay registered

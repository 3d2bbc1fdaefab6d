"""ppo: the toy reward rises, the KL penalty holds the policy near the reference, exact resume,
reward-model and rule-reward errors (with nothing written), the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.core.artifacts import Manifest, partial_path
from llmctl.core.checkpoint import load_checkpoint, save_checkpoint
from llmctl.core.errors import ConfigError, InputError
from llmctl.core.heads import RewardModel, save_reward_model
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.progress import Silent
from llmctl.core.tokenizer import Tokenizer, train_tokenizer
from llmctl.core.train_loop import read_metrics
from llmctl.stages import _ppo_step, ppo

# A toy task with a checkable reward: the share of digits in the answer. A random-init policy
# writes ~4% digits (20 of 512 ids decode to one); PPO has to find and raise them.
REWARD_PY = """
def digits(prompt, response, row):
    return sum(c.isdigit() for c in response) / max(1, len(response))

not_a_function = 3
"""
TOY = {  # 4-token answers keep credit assignment easy and steps fast (~0.5 s on one core)
    "steps": 20,
    "batch_prompts": 32,
    "minibatch": 8,
    "ppo_epochs": 4,
    "max_new_tokens": 4,
    "lr": 3e-3,
    "device": "cpu",
    "precision": "fp32",
}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add spin-waiting on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(tok: Tokenizer, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
        max_seq_len=64,
    )  # fmt: skip
    return Transformer(cfg)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory, tokens_dir: Path) -> dict[str, Path]:
    """A random-init 2-layer policy checkpoint, 32 prompts and the digits reward file."""
    root = tmp_path_factory.mktemp("ppo")
    tok = Tokenizer.load(tokens_dir / "tokenizer.model")
    save_checkpoint(root / "init", _tiny(tok), tok)
    with open(root / "prompts.jsonl", "w", encoding="utf-8") as f:
        for i in range(32):
            row = {"prompt": f"Write some numbers, please (item {i}).", "reference": str(i)}
            f.write(json.dumps(row) + "\n")
    (root / "rewards.py").write_text(REWARD_PY)
    return {"init": root / "init", "prompts": root / "prompts.jsonl", "reward": root / "rewards.py"}


def config(toy: dict[str, Path], **over: object) -> ppo.PPOConfig:
    base = {
        "prompts": str(toy["prompts"]),
        "init": str(toy["init"]),
        "reward": f"{toy['reward']}:digits",
        **TOY,
    }
    return ppo.PPOConfig(**{**base, **over})


def records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "score" in r]


def mean(rs: list[dict], key: str) -> float:
    return sum(r[key] for r in rs) / len(rs)


@pytest.mark.slow  # two 20-step PPO runs, ~10 s each on one core
def test_ppo_raises_toy_reward_and_kl_penalty_holds_policy_near_reference(
    tmp_path: Path, toy: dict[str, Path]
) -> None:
    m = ppo.run(tmp_path / "beta", config(toy, kl_coef=0.05))
    ppo.run(tmp_path / "free", config(toy, kl_coef=0.0))
    a, b = records(tmp_path / "beta"), records(tmp_path / "free")
    first, last = mean(a[:5], "score"), mean(a[-5:], "score")
    print(f"beta=0.05: score {first:.3f} -> {last:.3f}, KL {mean(a[-5:], 'kl'):.2f}")
    print(f"beta=0:    score {mean(b[:5], 'score'):.3f} -> {mean(b[-5:], 'score'):.3f}, "
          f"KL {mean(b[-5:], 'kl'):.2f}")  # fmt: skip
    assert first < 0.1
    assert last > max(0.15, 3 * first)  # the reward rises well above the initial policy's
    assert mean(a[-5:], "kl") < 8.0  # ... while the policy stays within a few nats of the reference
    assert mean(b[-5:], "kl") > 1.5 * mean(a[-5:], "kl")  # no penalty: it wanders further
    assert mean(b[-5:], "score") > mean(b[:5], "score")
    # what each step logs, and the artifact
    for key in ("score", "kl", "kl_coef", "entropy", "clipfrac", "vf_loss", "pg_loss",
                "response_len", "time_gen", "time_score", "time_opt"):  # fmt: skip
        assert key in a[0], key
    assert a[0]["entropy"] > a[-1]["entropy"]
    assert m.kind == "checkpoint"
    assert m.stats["score_last"] > m.stats["score_first"]
    assert m.counts["steps"] == 20
    assert m.tokenizer is not None
    ck = load_checkpoint(tmp_path / "beta")  # a plain LM checkpoint: generate loads it
    assert ck.model.cfg.d_model == 32
    assert (tmp_path / "beta" / ppo.CRITIC_FILE).is_file()
    assert not partial_path(tmp_path / "beta").exists()


class CrashAt(Silent):
    """Progress that raises after `n` completed steps."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def advance(self, n: float = 1, **fields: object) -> None:
        self.seen += 1
        if self.seen == self.n:
            raise KeyboardInterrupt


def test_resume_follows_the_uninterrupted_run(tmp_path: Path, toy: dict[str, Path]) -> None:
    cfg = config(toy, steps=4, save_every=2, batch_prompts=8, minibatch=4, ppo_epochs=1,
                 target_kl=0.5, kl_coef=0.1, kl_horizon=20)  # fmt: skip
    ppo.run(tmp_path / "full", cfg)
    with pytest.raises(KeyboardInterrupt):
        ppo.run(tmp_path / "cut", cfg, progress=CrashAt(3))
    # interrupted after step 3: a checkpoint was written at the last completed step
    assert (partial_path(tmp_path / "cut") / "checkpoints" / "step-0000003").is_dir()
    ppo.run(tmp_path / "cut", cfg, resume=True)
    full, cut = records(tmp_path / "full"), records(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    for x, y in zip(full, cut, strict=True):
        for k in ("score", "kl", "kl_coef", "pg_loss", "vf_loss"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
    assert full[-1]["kl_coef"] != full[0]["kl_coef"]  # the adaptive beta moved and was restored
    assert Manifest.read(tmp_path / "cut").stats["resumed_from_step"] == 3


@pytest.fixture(scope="module")
def other_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model trained with a different tokenizer."""
    lines = [f"line {i}: some other text, with other words ({i * 7})" for i in range(400)]
    tok = Tokenizer.from_bytes(train_tokenizer(lines, 300))
    path = tmp_path_factory.mktemp("rm") / "rm"
    save_reward_model(path, RewardModel(_tiny(tok)), tok)
    return path


def test_reward_model_with_another_tokenizer_is_refused_before_writing(
    tmp_path: Path, toy: dict[str, Path], other_rm: Path
) -> None:
    cfg = config(toy, reward=None, reward_model=str(other_rm))
    with pytest.raises(InputError, match="tokenizer") as e:
        ppo.run(tmp_path / "out", cfg)
    assert "llmctl rm" in (e.value.hint or "")
    assert not (tmp_path / "out").exists()
    assert not partial_path(tmp_path / "out").exists()


def test_reward_model_scores_rollouts(tmp_path: Path, toy: dict[str, Path]) -> None:
    ck = load_checkpoint(toy["init"])
    rm_path = tmp_path / "rm"
    save_reward_model(rm_path, RewardModel(_tiny(ck.tokenizer, seed=1)), ck.tokenizer)
    cfg = config(toy, reward=None, reward_model=str(rm_path), steps=2, batch_prompts=4,
                 minibatch=2, ppo_epochs=1)  # fmt: skip
    m = ppo.run(tmp_path / "out", cfg)
    rs = records(tmp_path / "out")
    assert len(rs) == 2
    assert rs[0]["score_std"] > 0  # the reward model tells the answers apart
    assert any(i["path"] == str(rm_path.resolve()) for i in m.inputs)


def test_rule_reward_errors_name_the_problem(tmp_path: Path, toy: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="has no function 'nope'") as e:
        ppo.run(tmp_path / "o", config(toy, reward=f"{toy['reward']}:nope"))
    assert "digits" in (e.value.hint or "")
    with pytest.raises(ConfigError, match="not a function"):
        _ppo_step.load_reward_fn(f"{toy['reward']}:not_a_function")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        _ppo_step.load_reward_fn("no_such_module_xyz:fn")
    with pytest.raises(ConfigError, match="module:function"):
        _ppo_step.load_reward_fn("just_a_name")
    with pytest.raises(ConfigError, match="does not exist"):
        _ppo_step.load_reward_fn(str(tmp_path / "missing.py") + ":fn")
    assert _ppo_step.load_reward_fn("os.path:join") is not None  # an importable module works too
    assert not (tmp_path / "o").exists()
    assert not partial_path(tmp_path / "o").exists()


def test_config_requires_exactly_one_reward(toy: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        config(toy, reward=None)
    with pytest.raises(ConfigError, match="exactly one"):
        config(toy, reward_model="x")
    with pytest.raises(ConfigError, match="--minibatch"):
        config(toy, minibatch=64)


def test_prompt_choice_is_a_function_of_seed_and_step() -> None:
    a = _ppo_step.pick_prompts(10, 4, seed=0, step=3)
    assert a == _ppo_step.pick_prompts(10, 4, seed=0, step=3)
    assert a != _ppo_step.pick_prompts(10, 4, seed=0, step=4)
    assert len(set(a)) == 4
    assert sorted(_ppo_step.pick_prompts(3, 6, seed=1, step=0)) == [0, 0, 1, 1, 2, 2]


def test_response_logprobs_line_up_with_the_full_forward(toy: dict[str, Path]) -> None:
    ck = load_checkpoint(toy["init"])
    tok = ck.tokenizer
    p = [tok.render_chat([{"role": "user", "content": t}], add_generation_prompt=True)[0]
         for t in ("hi", "a longer prompt here")]  # fmt: skip
    r = [[5, 6, tok.end_id], [7]]
    ids, idx, tokens, mask = _ppo_step.layout(p, r, tok.pad_id)
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert ids[0, idx[0, 2] + 1] == tok.end_id
    with torch.no_grad():
        logp, ent = _ppo_step.response_logprobs(ck.model, ids, idx, tokens)
    for b in range(2):  # each row as if alone, unpadded
        full = torch.log_softmax(ck.model(torch.tensor([p[b] + r[b]])).detach().float(), -1)[0]
        for j, t in enumerate(r[b]):
            assert float(logp[b, j]) == pytest.approx(float(full[len(p[b]) - 1 + j, t]), abs=1e-5)
    assert (ent[mask] > 0).all()
    assert (logp[~mask] == 0).all()


runner = CliRunner()


def test_cli_missing_reward_function_is_a_one_line_error(
    tmp_path: Path, toy: dict[str, Path]
) -> None:
    out = tmp_path / "o"
    args = ["ppo", str(toy["prompts"]), "--init", str(toy["init"]), "-o", str(out)]
    r = runner.invoke(app, [*args, "--reward", f"{toy['reward']}:nope"])
    assert r.exit_code == 2
    assert "has no function 'nope'" in r.output
    assert "Traceback" not in r.output
    assert not out.exists()
    r = runner.invoke(app, [*args, "--reward", f"{toy['reward']}:digits", "--steps", "1",
                            "--batch-prompts", "4", "--minibatch", "4", "--ppo-epochs", "1",
                            "--max-new-tokens", "3", "--device", "cpu", "--precision", "fp32"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert Manifest.read(out).stage == "ppo"


def test_meta_models_fill_from_init_and_from_a_resumed_checkpoint(
    tmp_path: Path, toy: dict[str, Path]
) -> None:
    """What FSDP runs (Models.fill), in one process: the models built on the meta device hold
    --init's weights and the seeded critic head, or a checkpoint's policy and critic."""
    from safetensors.torch import load_file, save_file

    from llmctl.core.runtime import Runtime
    from llmctl.stages._ppo_step import load_models

    cfg = config(toy, steps=1, save_every=1, batch_prompts=4, minibatch=4, ppo_epochs=1)
    rt = Runtime.detect("cpu", "fp32")
    whole = load_models(cfg, rt)
    meta = load_models(cfg, rt, meta=True)
    meta.fill(Path(cfg.init), None, rt.device)
    for a, b in ((whole.policy, meta.policy), (whole.ref, meta.ref), (whole.critic, meta.critic)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ppo.run(tmp_path / "run", cfg)
    ckpt = partial_path(tmp_path / "run") / "checkpoints" / "step-0000001"
    if not ckpt.is_dir():  # the final checkpoint holds the same policy and critic files
        ckpt = tmp_path / "run"
    resumed = load_models(cfg, rt, meta=True)
    resumed.fill(Path(cfg.init), ckpt, rt.device)
    critic = load_file(str(ckpt / ppo.CRITIC_FILE))
    assert torch.equal(resumed.critic.head.proj.weight, critic["head.weight"])
    trained = load_checkpoint(ckpt).model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in resumed.policy.state_dict().items())
    critic["body.norm.weight"] = torch.zeros(3)
    save_file(critic, str(ckpt / ppo.CRITIC_FILE))
    with pytest.raises(InputError, match=r"critic\.safetensors does not fit the model: norm\.weight has shape"):
        load_models(cfg, rt, meta=True).fill(Path(cfg.init), ckpt, rt.device)

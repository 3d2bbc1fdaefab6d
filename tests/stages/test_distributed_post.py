"""sft, rm and dpo on 2 processes (torchrun, gloo on CPU): DDP and FSDP reproduce the single-process
run with the same global batch (losses, held-out metrics, final weights); a 2-rank run resumes; the
settings that cannot work are refused with the fix. ppo under DDP and FSDP (each rank samples its
own prompts, so no one-process twin): both train the same path, whose responses stop at different
steps on each rank (FSDP decodes in lockstep), resume on it, and whiten over both ranks.

One torchrun launch in all (each costs 10-20 s of start-up here): `_dist_post_worker.py` runs every
multi-process case in it while this process trains the single-process references.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from pairs_fixtures import base_checkpoint, marker_pairs
from safetensors.torch import load_file

from llmctl.core.artifacts import partial_path
from llmctl.core.checkpoint import load_checkpoint, save_checkpoint
from llmctl.core.errors import ConfigError
from llmctl.core.heads import load_reward_model
from llmctl.core.model import Transformer
from llmctl.core.runtime import Runtime
from llmctl.core.train_loop import read_metrics
from llmctl.stages import dpo, ppo, rm, sft

WORKER = Path(__file__).with_name("_dist_post_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
# Per rank: 2 rows (sft) or 2 pairs (rm, dpo) per micro-step, 2 micro-steps per 8-row step (DDP's
# no_sync); a tight clip so clipping acts on the (sharded) gradients; evaluation and checkpoints
# at steps 2 and 4.
COMMON = {
    "batch_size": 8,
    "micro_batch": 2,
    "max_steps": 4,
    "warmup_steps": 1,
    "eval_every": 2,
    "save_every": 2,
    "device": "cpu",
    "precision": "fp32",
}
SFT = {**COMMON, "seq_len": 64, "lr": 1e-2, "grad_clip": 0.5, "val_fraction": 0.1}
PAIRS = {**COMMON, "lr": 1e-3, "val_fraction": 0.2, "max_len": 64}
# 4 prompts per step, 2 on each rank, one response per optimizer step on each; checkpoints each step.
PPO = {
    "steps": 2,
    "batch_prompts": 4,
    "minibatch": 1,
    "ppo_epochs": 1,
    "max_new_tokens": 8,
    "lr": 1e-4,
    "save_every": 1,
    "device": "cpu",
    "precision": "fp32",
}
TWO_RANKS = Runtime(torch.device("cpu"), "fp32", rank=0, world_size=2)

pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun not installed")


def chat_data(path: Path) -> Path:
    """40 conversations of uneven length, so packed rows (and ranks) hold uneven target counts."""
    rows = []
    for i in range(40):
        answer = " ".join(["yes", "no", "maybe"][j % 3] for j in range(1 + i % 7))
        msgs = [
            {"role": "user", "content": f"question number {i}?"},
            {"role": "assistant", "content": answer},
        ]
        rows.append({"messages": msgs})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def untied(base: Path, out: Path) -> str:
    """`base` with an untied LM head (the critic's then goes unused: DDP must not wait for it)."""
    ck = load_checkpoint(base)
    model = Transformer(ck.model_config.replace(tie_embeddings=False))
    return str(save_checkpoint(out, model, ck.tokenizer))


def stopping(base: Path, out: Path) -> str:
    """`base` made to end its answers at random steps: the final norm keeps one feature, whose
    value (about N(0, 1) at each position) times 8 is <|end|>'s logit; every other logit is about 0.
    Responses then stop after a few tokens, at different steps on each rank."""
    ck = load_checkpoint(base)
    model, end = ck.model, ck.tokenizer.end_id
    with torch.no_grad():
        model.norm.weight.zero_()
        model.norm.weight[0] = 1.0
        model.lm_head.weight[end].zero_()
        model.lm_head.weight[end, 0] = 8.0
    return str(save_checkpoint(out, model, ck.tokenizer))


def rl_inputs(out: Path) -> tuple[str, str]:
    """A prompts file and a rule reward (answer length) for ppo."""
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {i}"}) + "\n" for i in range(8)))
    (out / "rewards.py").write_text(
        "def length(prompt, response, row):\n    return len(response) / 10\n"
    )
    return str(prompts), f"{out / 'rewards.py'}:length"


@dataclass
class Runs:
    out: Path
    cfgs: dict[str, dict]

    def __truediv__(self, name: str) -> Path:
        return self.out / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tokens_dir: Path) -> Runs:
    """OUT/{sft,lora,rm,dpo}-ref (one process, 4 rows or pairs per micro-step) and, from one torchrun
    launch with 2 on each of 2 ranks, the runs listed in _dist_post_worker.py."""
    out = tmp_path_factory.mktemp("dist-post")
    base = str(base_checkpoint(out / "base", tokens_dir))
    chat, prefs = str(chat_data(out / "chat.jsonl")), str(marker_pairs(out / "prefs.jsonl", n=48))
    prompts, reward = rl_inputs(out)
    base_untied = untied(Path(base), out / "untied")  # rm and ppo read hidden states only
    base_stopping = stopping(Path(base_untied), out / "stopping")
    cfgs = {
        "sft": {"data": chat, "init": base, **SFT},
        "rm": {"data": prefs, "init": base_untied, **PAIRS},
        "dpo": {"data": prefs, "init": base, **PAIRS},
        "ppo": {"prompts": prompts, "init": base_stopping, "reward": reward, **PPO},
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMCTL_DIST_TIMEOUT": "60"}
    launch = subprocess.Popen(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(WORKER), str(out)]
        + [json.dumps(cfgs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=Path(__file__).parents[2],
    )
    try:  # the references train while the launch runs
        one = {"micro_batch": 4}
        sft.run(out / "sft-ref", sft.SFTConfig(**{**cfgs["sft"], **one}))
        sft.run(out / "lora-ref", sft.SFTConfig(**{**cfgs["sft"], **one, "lora_rank": 4}))
        rm.run(out / "rm-ref", rm.RMConfig(**{**cfgs["rm"], **one}))
        dpo.run(out / "dpo-ref", dpo.DPOConfig(**{**cfgs["dpo"], **one}))
        report, _ = launch.communicate(timeout=300)
    finally:
        launch.kill()
    assert launch.returncode == 0, report[-4000:]
    return Runs(out, cfgs)


def records(run: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl as {step: the step's loss and evaluation metrics together}."""
    out: dict[int, dict[str, float]] = {}
    for r in read_metrics(run / "metrics.jsonl"):
        out.setdefault(r["step"], {}).update(r)
    return out


def assert_same_trace(ref: Path, par: Path, steps: list[int]) -> None:
    a, b = records(ref), records(par)
    assert sorted(b) == steps
    for s in steps:
        for k in ("loss", "grad_norm", "val_loss", "val_accuracy", "val_margin", "train_margin"):
            if k in a[s]:
                assert abs(a[s][k] - b[s][k]) < 1e-4, (s, k, a[s], b[s])


@pytest.mark.slow  # one torchrun launch: sft DDP, FSDP and LoRA, rm FSDP, dpo FSDP and DDP, a resume
@pytest.mark.parametrize(
    "run", ["sft-ddp", "sft-fsdp", "lora-ddp", "rm-fsdp", "rm-ddp", "dpo-fsdp", "dpo-ddp"]
)
def test_two_ranks_match_one_process(runs: Runs, run: str) -> None:
    ref = runs / f"{run.split('-')[0]}-ref"
    assert_same_trace(ref, runs / run, [1, 2, 3, 4])
    if run.startswith("rm"):
        (a, _), (b, _) = load_reward_model(ref), load_reward_model(runs / run)
    else:  # FSDP's weights gathered into one plain checkpoint
        a, b = load_checkpoint(ref).model, load_checkpoint(runs / run).model
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    # AdamW at lr 1e-2 turns summation-order noise in a gradient into up to ~1e-4 in a weight. The
    # pairwise loss does not depend on the reward head's bias at all: its gradient is rounding
    # noise, which AdamW scales up to full-size steps, so the bias differs between any two runs.
    same = [k for k in sa if k != "head.proj.bias"]
    assert all(torch.allclose(sa[k], sb[k], atol=3e-4) for k in same), run
    assert json.loads((runs / run / "trainer_state.json").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ref", "run", "steps"),
    [
        ("rm-ref", "rm-fsdp-resume", [3, 4]),
        ("dpo-ref", "dpo-fsdp-resume", [3, 4]),
        ("dpo-ref", "dpo-fsdp-ref", [1, 2, 3, 4]),
    ],
)
def test_pair_stages_on_the_meta_device_resume_and_take_a_reference(
    runs: Runs, ref: str, run: str, steps: list[int]
) -> None:
    """rm and dpo under FSDP fill their shards after wrapping: a resume reads the checkpoint's
    weights (and head), dpo's reference pass runs on the sharded policy or a sharded --ref."""
    assert_same_trace(runs / ref, runs / run, steps)


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_two_ranks_and_on_one(runs: Runs) -> None:
    assert_same_trace(runs / "sft-ref", runs / "sft-resume", [3, 4])
    # One process: the rows per micro-step (micro-batch x ranks) stay 4.
    step2 = runs / "sft-fsdp" / "checkpoints" / "step-0000002"
    for name in ("resume1", "resume1b"):
        shutil.copytree(step2, partial_path(runs / name) / "checkpoints" / step2.name)
    one = sft.SFTConfig(**{**runs.cfgs["sft"], "micro_batch": 4})
    assert sft.run(runs / "resume1", one, resume=True).stats["resumed_from_step"] == 2
    assert_same_trace(runs / "sft-ref", runs / "resume1", [3, 4])
    # Other rows per micro-step would weight the loss otherwise: refused, with the fix.
    with pytest.raises(ConfigError, match="saved with 2 x 2 per micro-step") as e:
        sft.run(runs / "resume1b", sft.SFTConfig(**runs.cfgs["sft"]), resume=True)
    assert e.value.hint.endswith("--micro-batch 4")


def test_several_processes_need_a_parallel_mode(tmp_path: Path) -> None:
    # Refused before anything is loaded or a process group is started.
    common = {"data": "unused", "init": "unused"}
    for run, cfg in (
        (sft.run, sft.SFTConfig(**common)),
        (rm.run, rm.RMConfig(**common)),
        (dpo.run, dpo.DPOConfig(**common)),
    ):
        with pytest.raises(ConfigError, match="2 processes but --parallel none") as e:
            run(tmp_path / "out", cfg, runtime=TWO_RANKS)
        assert "--parallel ddp" in e.value.hint


def test_a_batch_the_ranks_do_not_divide_is_refused(tmp_path: Path) -> None:
    cfg = sft.SFTConfig(data="unused", init="unused", batch_size=6, micro_batch=2, parallel="ddp")
    with pytest.raises(ConfigError, match="not a multiple of --micro-batch x ranks = 2 x 2") as e:
        sft.run(tmp_path / "out", cfg, runtime=TWO_RANKS)
    assert e.value.hint == "use --batch-size 8"
    pairs = dpo.DPOConfig(
        data="unused", init="unused", batch_size=4, micro_batch=4, parallel="fsdp"
    )
    with pytest.raises(ConfigError, match="4 x 2 = 8 pairs"):
        dpo.run(tmp_path / "out", pairs, runtime=TWO_RANKS)


def test_lora_with_fsdp_is_refused() -> None:
    with pytest.raises(ConfigError, match="--lora-rank with --parallel fsdp") as e:
        sft.SFTConfig(data="d", init="i", lora_rank=4, parallel="fsdp")
    assert "--parallel ddp" in e.value.hint


PPO_METRICS = ("score", "kl", "pg_loss", "vf_loss", "grad_norm", "response_len", "stopped")


@pytest.mark.slow
@pytest.mark.parametrize("run", ["ppo-ddp", "ppo-fsdp"])
def test_ppo_on_two_ranks_trains_and_resumes_the_same_path(runs: Runs, run: str) -> None:
    full = records(runs / run)
    resumed = records(runs / ("ppo-resume" if run == "ppo-ddp" else f"{run}-resume"))
    assert sorted(full) == [1, 2]
    assert sorted(resumed) == [2]
    for k in PPO_METRICS:
        assert abs(full[2][k] - resumed[2][k]) < 1e-4, (k, full[2], resumed[2])
    assert json.loads((runs / run / "trainer_state.json").read_text())["world_size"] == 2
    assert load_checkpoint(runs / run).model_config.n_layers == 2
    assert (runs / run / ppo.CRITIC_FILE).is_file()
    # Advantages are whitened over both ranks' responses, as one batch would be.
    assert json.loads((runs / "whiten.json").read_text())["max_diff"] < 1e-6


@pytest.mark.slow
def test_ppo_fsdp_takes_the_ddp_path_with_responses_stopping_early(runs: Runs) -> None:
    ddp, fsdp = records(runs / "ppo-ddp"), records(runs / "ppo-fsdp")
    # More than half of the 4 answers end before --max-new-tokens, but not all: both of one rank's
    # end while an answer of the other runs to the limit, so the ranks' rollouts end at different
    # steps (FSDP's lockstep decoding keeps the first rank stepping, and must not change them).
    assert 0.5 < ddp[1]["stopped"] < 1
    assert ddp[1]["response_len"] < PPO["max_new_tokens"]
    for step in (1, 2):
        for k in PPO_METRICS:
            assert abs(ddp[step][k] - fsdp[step][k]) < 1e-4, (step, k, ddp[step], fsdp[step])
    # The gathered checkpoint: the policy's weights and the critic as one process writes them.
    a, b = load_checkpoint(runs / "ppo-ddp").model, load_checkpoint(runs / "ppo-fsdp").model
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa)
    ca = load_file(str(runs / "ppo-ddp" / ppo.CRITIC_FILE))
    cb = load_file(str(runs / "ppo-fsdp" / ppo.CRITIC_FILE))
    assert ca.keys() == cb.keys()
    assert all(torch.allclose(ca[k], cb[k], atol=1e-5) for k in ca)
    # Under bf16 the sharded reference computes with the policy's gathered bf16 weights: the first
    # step's KL is 0, as in one process (with a whole reference under autocast it was not).
    assert records(runs / "ppo-fsdp-bf16")[1]["kl"] == 0.0


def test_ppo_needs_a_parallel_mode_with_several_processes(tmp_path: Path) -> None:
    cfg = ppo.PPOConfig(prompts="unused", init="unused", reward_model="unused")
    with pytest.raises(ConfigError, match="2 processes but --parallel none"):
        ppo.run(tmp_path / "out", cfg, runtime=TWO_RANKS)

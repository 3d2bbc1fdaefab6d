"""ppo: SFT checkpoint + prompts + reward -> aligned checkpoint. RLHF with PPO as in InstructGPT.

Models: the policy starts from `--init` (an SFT checkpoint); a frozen copy of it is the reference
for the KL penalty; the critic is a *separate* copy of the policy's backbone with a scalar value head
(core/heads.py's ScalarHead) read at every response position. A separate critic costs a second
backbone's memory and compute, but keeps value-loss gradients out of the policy's weights (the
choice of InstructGPT, which initialises the value function from the reward model; we initialise
it from the SFT weights, so a rule reward needs no reward model). The reward is a frozen reward
model (`--reward-model`, from `llmctl rm`) read at the last token of prompt + response, or a Python
function `fn(prompt, response, row) -> float` (`--reward module:function` or `file.py:function`),
where `prompt` is the last user message, `response` the decoded answer and `row` the prompt row's
columns (a `reference` answer, say) plus its `messages`.

One PPO step (core/ppo.py has the algorithm pieces and their references):
  1. rollout   `batch_prompts` prompts chosen by (seed, step), rendered with the chat template's
               generation prompt, sampled by the batched KV-cache generator at temperature 1 (no
               top-k/top-p: the samples must come from the policy whose log-probs we use) until
               <|end|>, EOS or `max_new_tokens`;
  2. scoring   the reward of each response; log-probs of policy and reference and the critic's values
               on every response token; per-token reward -beta * (log pi - log pi_ref) plus the
               score at the last token; GAE advantages (whitened over the batch) and returns;
  3. update    `ppo_epochs` passes over shuffled minibatches: clipped surrogate + vf_coef x clipped
               value loss, one AdamW step (policy and critic together) per minibatch, grad clipping.
beta is fixed (`--kl-coef`) or, with `--target-kl`, adapted by Ziegler et al.'s controller.

Run directory while training: `<out>.partial/` with `checkpoints/step-N/` every `save_every` steps
and `metrics.jsonl` (one record per step: score, KL, entropy, clip fraction, losses, response
length and the generation / scoring / optimisation seconds). A checkpoint is a plain LM checkpoint
of the policy (`llmctl generate` loads it) plus, as trainer state, the optimizer moments, beta and
the critic (`trainer_state.critic.safetensors`). `--resume` continues from the newest one: prompts,
sampling seeds and minibatch orders are pure functions of (seed, step), so it follows the same path.

Several processes (`torchrun ... -m llmctl ppo ... --parallel ddp|fsdp`): policy and critic are
DDP replicas, or FSDP2 shards (ZeRO-3); each rank samples and scores its own share of every step's
prompts (`--batch-prompts` global, its own sampling stream) and runs `--minibatch` of its responses
per optimizer step (so `--minibatch` is per rank), with gradients averaged over ranks. Advantages are
whitened over all ranks' responses, the KL controller sees the mean KL over all of them, and the
logged numbers are means over ranks. Rank 0 writes. Under FSDP every forward of policy or critic is
a collective, so every rank must make the same calls: decoding runs in lockstep (a rank whose
responses have all stopped keeps stepping until every rank's have, `sampling.stream`'s
`all_finished`), and scoring and the update run the same number of chunks and minibatches on every
rank (every rank holds `--batch-prompts / ranks` responses). The frozen reference is sharded too;
a reward model is not (every rank holds a whole copy). Checkpoints are gathered from the shards into
the one-process format. DDP and FSDP runs take the same path, and resume on as many processes as
they were saved on.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from llmctl.core.artifacts import Manifest, input_record, partial_path
from llmctl.core.chatdata import Prompt, load_prompts
from llmctl.core.checkpoint import (
    check_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_trainer_state,
    read_optimizer_state,
    save_checkpoint,
    write_checkpoint_files,
)
from llmctl.core.config import require, to_dict
from llmctl.core.data_parallel import (
    on_ranks,
    plan_ranks,
    reshard,
    run_output,
)
from llmctl.core.errors import ConfigError, InputError
from llmctl.core.optim import make_adamw
from llmctl.core.parallel import (
    Parallel,
    full_model_state,
    full_optimizer_state,
    load_optimizer_state,
    wrap,
)
from llmctl.core.ppo import (
    KLController,
)
from llmctl.core.progress import SILENT, Progress
from llmctl.core.runtime import Runtime
from llmctl.core.train_loop import read_metrics
from llmctl.stages._ppo_step import (
    CRITIC_FILE,
    Models,
    ResponseLogprobs,
    encode_prompts,
    load_models,
    ppo_step,
    read_critic,
)

# Fields that change the trajectory: a resumed run must agree on these.
TRAJECTORY = (
    "prompts",
    "init",
    "reward_model",
    "reward",
    "batch_prompts",
    "minibatch",
    "ppo_epochs",
    "max_new_tokens",
    "lr",
    "weight_decay",
    "grad_clip",
    "clip",
    "vf_clip",
    "vf_coef",
    "kl_coef",
    "target_kl",
    "kl_horizon",
    "gamma",
    "lam",
    "seed",
    "precision",
)


@dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """Settings of `llmctl ppo`."""

    prompts: str = ""  # RL prompts: a `prompt` column (string or messages); other columns kept
    init: str = ""  # the SFT checkpoint: initial policy, frozen reference and critic backbone
    reward_model: str | None = None  # reward-model checkpoint (`llmctl rm`); or use `reward`
    reward: str | None = None  # rule reward "module:function" or "file.py:function"
    steps: int = 100  # PPO steps (rollout + score + update)
    batch_prompts: int = 16  # prompts (one response each) per PPO step
    minibatch: int = 4  # responses per optimizer step
    ppo_epochs: int = 4  # passes over each batch of rollouts
    max_new_tokens: int = 64  # longest response; generation also stops at <|end|> or EOS
    lr: float = 1e-5  # AdamW learning rate (policy and critic), constant
    weight_decay: float = 0.0  # AdamW decay on matrices
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    clip: float = 0.2  # PPO ratio clip epsilon
    vf_clip: float = 0.2  # value clip: how far a value may move from its rollout value per batch
    vf_coef: float = 0.1  # weight of the value loss in the total loss
    kl_coef: float = 0.05  # beta: per-token KL penalty (initial value when target_kl is set)
    target_kl: float | None = None  # adapt beta toward this per-response KL (nats); None = fixed
    kl_horizon: int = 10000  # adaptive controller horizon, in responses
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    save_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # newest intermediate checkpoints kept
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 where supported
    parallel: Literal["none", "ddp", "fsdp"] = (
        "none"  # with several processes (torchrun): ddp = replicate, fsdp = shard (ZeRO-3)
    )
    seed: int = 0  # prompt choice, sampling and minibatch order

    def __post_init__(self) -> None:
        require(bool(self.prompts), "no prompts: pass a prompts file or directory")
        require(bool(self.init), "--init is required: the SFT checkpoint to start from")
        require(
            (self.reward_model is None) != (self.reward is None),
            "pass exactly one of --reward-model CKPT and --reward module:function",
        )
        require(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        require(self.batch_prompts >= 2, f"--batch-prompts must be >= 2, got {self.batch_prompts}")
        require(
            1 <= self.minibatch <= self.batch_prompts,
            f"--minibatch must be in [1, --batch-prompts={self.batch_prompts}], got {self.minibatch}",
        )
        require(self.ppo_epochs >= 1, f"--ppo-epochs must be >= 1, got {self.ppo_epochs}")
        require(
            self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"
        )
        require(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        require(self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}")
        require(0 < self.clip < 1, f"--clip must be in (0, 1), got {self.clip}")
        require(self.vf_clip > 0, f"--vf-clip must be > 0, got {self.vf_clip}")
        require(self.vf_coef >= 0, f"--vf-coef must be >= 0, got {self.vf_coef}")
        require(self.kl_coef >= 0, f"--kl-coef must be >= 0, got {self.kl_coef}")
        require(
            self.target_kl is None or self.target_kl > 0,
            f"--target-kl must be > 0, got {self.target_kl}",
        )
        require(
            self.target_kl is None or self.kl_coef > 0,
            "--target-kl adapts --kl-coef multiplicatively, so --kl-coef must be > 0",
        )
        require(self.kl_horizon >= 1, f"--kl-horizon must be >= 1, got {self.kl_horizon}")
        require(
            self.parallel in ("none", "ddp", "fsdp"),
            f"--parallel must be none, ddp or fsdp, got {self.parallel!r}",
        )
        require(0 < self.gamma <= 1, f"--gamma must be in (0, 1], got {self.gamma}")
        require(0 <= self.lam <= 1, f"--lam must be in [0, 1], got {self.lam}")
        require(self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every}")
        require(
            self.keep_checkpoints >= 1,
            f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}",
        )


# -- run ------------------------------------------------------------------------------------------


def _trainer_state(cfg: PPOConfig, step: int, kl: KLController, rt: Runtime) -> dict[str, Any]:
    return {"step": step, "kl_coef": kl.value, "config": to_dict(cfg), "world_size": rt.world_size}


def _replicate(models: Models, rt: Runtime) -> None:
    """DDP replicas of policy and critic; they start from rank 0's weights (DDP broadcasts them).
    The reference and a reward model stay whole, unwrapped copies on every rank (as under FSDP)."""
    models.train_policy = wrap(ResponseLogprobs(models.policy), "ddp", rt)
    models.train_critic = wrap(models.critic, "ddp", rt)


def _shard(models: Models, rt: Runtime) -> None:
    """FSDP2 over policy, critic and reference, in place: each block, then the model as the root.
    The policy is its own root because decoding calls it and its `logits` directly; the update
    reads its LM head after its forward, while the root's parameters are still gathered (FSDP
    keeps a root's until backward or `reshard`). The reference is sharded like the policy, so that
    under bf16 both compute with the same gathered bf16 weights (the KL starts at 0, as in one
    process) and its weights cost 1/N per rank. A reward model stays a whole copy on every rank:
    its forward is local (no collective to keep in step)."""
    wrap(models.policy, "fsdp", rt)
    wrap(models.critic, "fsdp", rt)
    wrap(models.ref, "fsdp", rt)
    models.sharded = True


def _checkpoint_state(
    models: Models, opt: torch.optim.Optimizer, rt: Runtime
) -> dict[str, Any] | None:
    """What a checkpoint stores: the policy's weights (None: the model's own), the optimizer state
    and the critic's tensors. Under FSDP gathered from the shards, a collective every rank calls.
    None on ranks other than 0, which write nothing."""
    if not models.sharded:
        if not rt.is_main:
            return None
        return {"weights": None, "optimizer": opt, "critic": models.critic.tensors()}
    for m in (models.policy, models.critic):  # the optimizer's shards, not gathered copies
        reshard(m)
    weights = full_model_state(models.policy)
    optimizer = full_optimizer_state(nn.ModuleList([models.policy, models.critic]), opt)
    critic = full_model_state(models.critic)
    if not rt.is_main:
        return None
    return {"weights": weights, "optimizer": optimizer, "critic": models.critic.tensors(critic)}


def _resume(
    run_dir: Path, cfg: PPOConfig, models: Models, rt: Runtime, *, into_models: bool = True
) -> tuple[int, float, Path]:
    """Check the run being resumed and load its weights into the unwrapped policy and critic (the
    optimizer is loaded once they are wrapped), or, for meta-device models (`into_models`
    False), only check them: `Models.fill` reads them. Returns (step, beta, checkpoint)."""
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is None:
        raise InputError(
            f"nothing to resume: no checkpoint in {run_dir / 'checkpoints'}", "run without --resume"
        )
    if not into_models:
        saved_cfg = check_checkpoint(ckpt, models.tokenizer)[1]
    else:
        loaded = load_checkpoint(ckpt, device=rt.device, tokenizer=models.tokenizer)
        saved_cfg = loaded.model.cfg
    if saved_cfg != models.policy.cfg:
        raise ConfigError(f"{ckpt} has a different model shape than --init", "resume with --init")
    state = load_trainer_state(ckpt, None)
    saved = state.get("config", {})
    names = {f.name for f in fields(PPOConfig)}
    diff = [k for k in TRAJECTORY if k in names and k in saved and to_dict(cfg)[k] != saved[k]]
    if diff:
        raise ConfigError(
            f"--resume with different settings than the run being resumed: {', '.join(diff)}",
            f"pass the original flags (they are in {ckpt / 'trainer_state.json'})",
        )
    ranks = int(state.get("world_size", 1))
    if ranks != rt.world_size:  # each rank samples its own stream: another count, another path
        raise ConfigError(
            f"--resume on {rt.world_size} process(es): the run was saved on {ranks}",
            f"resume it on {ranks} (torchrun --nproc_per_node {ranks})"
            if ranks > 1
            else "resume it in one process (without torchrun)",
        )
    critic = read_critic(ckpt, device=str(rt.device) if into_models else "cpu")
    if into_models:
        models.policy.load_state_dict(loaded.model.state_dict())
        try:
            models.critic.load_tensors(critic)
        except (KeyError, RuntimeError) as e:
            raise InputError(
                f"{ckpt / CRITIC_FILE} does not fit the model ({type(e).__name__})",
                "resume from an earlier checkpoint or start again without --resume",
            ) from None
    return int(state["step"]), float(state["kl_coef"]), ckpt


def run(
    dst: Path,
    cfg: PPOConfig,
    *,
    force: bool = False,
    resume: bool = False,
    progress: Progress = SILENT,
    runtime: Runtime | None = None,
) -> Manifest:
    """Optimise the `--init` policy against the reward with PPO; write it to `dst`.

    Raises:
        InputError: Bad prompts or checkpoints (a reward model with another tokenizer, say);
        ConfigError: bad settings or an unusable `--reward`; TrainingError: the loss became
        non-finite (the last checkpoint stays in `<dst>.partial`).
    """
    dst = Path(dst)
    rt = runtime or Runtime.detect(cfg.device, cfg.precision)
    mode: Parallel = "none"
    if rt.world_size > 1:  # --parallel given, and --batch-prompts split evenly into minibatches
        mode, _ = plan_ranks(cfg.parallel, cfg.batch_prompts, cfg.minibatch, rt, "responses")
    progress = progress if rt.is_main else SILENT
    return on_ranks(dst, rt, lambda: _run(dst, cfg, rt, mode, force, resume, progress))


def _run(
    dst: Path,
    cfg: PPOConfig,
    rt: Runtime,
    mode: Parallel,
    force: bool,
    resume: bool,
    progress: Progress,
) -> Manifest:
    torch.manual_seed(cfg.seed)
    # Every input is checked before anything is written; under FSDP the models are built on the
    # meta device and each rank fills only its shards once they are wrapped (Models.fill).
    meta = mode == "fsdp"
    models = load_models(cfg, rt, meta=meta)
    prompts, src = load_prompts(cfg.prompts)
    ctx = models.policy.cfg.max_seq_len
    if ctx - cfg.max_new_tokens < 2:
        raise ConfigError(
            f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the "
            f"{ctx}-token context of {cfg.init}",
            f"use --max-new-tokens {ctx // 2}",
        )
    enc = encode_prompts(models.tokenizer, prompts, ctx - cfg.max_new_tokens)
    inputs = [input_record(cfg.prompts, "prompts"), *models.inputs]
    kl = KLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    run_dir = partial_path(dst)
    start, ckpt = 0, None
    if resume:  # the weights go into the whole models before they are wrapped, or into shards
        start, kl.value, ckpt = _resume(run_dir, cfg, models, rt, into_models=not meta)
    both = nn.ModuleList([models.policy, models.critic])
    if mode == "fsdp":
        _shard(models, rt)
        models.fill(Path(cfg.init), ckpt, rt.device)
    opt = make_adamw(both, cfg.lr, cfg.weight_decay, (0.9, 0.95))  # FSDP: over the shards
    if mode != "none":
        # The critic reads hidden states, never its own LM head: DDP must not wait for a gradient
        # of an untied one, nor a resume look for its (never made) FSDP optimizer state. A tied
        # one is the embedding, which it uses. Frozen after the optimizer is made, which holds
        # the parameters one process's does, so checkpoints index them alike.
        models.critic.body.lm_head.requires_grad_(models.critic.body.cfg.tie_embeddings)
    if ckpt is not None and models.sharded:
        load_optimizer_state(both, opt, read_optimizer_state(ckpt) or {})
    elif ckpt is not None:
        load_trainer_state(ckpt, opt)
    if mode == "ddp":
        _replicate(models, rt)
    with run_output(
        dst, rt, "ppo", config=to_dict(cfg), inputs=inputs, force=force, resume=resume, start=start
    ) as out:
        metrics = out.path / "metrics.jsonl"

        def save(done: int) -> None:
            state = _checkpoint_state(models, opt, rt)  # under FSDP a gather on every rank
            if state is None:  # rank 0 writes
                return
            m = Manifest(
                kind="checkpoint",
                stage="ppo",
                config=to_dict(cfg),
                inputs=inputs,
                counts={"steps": done, "responses": done * cfg.batch_prompts},
            )
            save_checkpoint(
                out.path / "checkpoints" / f"step-{done:07d}",
                models.policy,
                models.tokenizer,
                optimizer=state["optimizer"],
                weights=state["weights"],
                manifest=m,
                trainer_state=_trainer_state(cfg, done, kl, rt),
                extra_files=lambda d: save_file(state["critic"], str(d / CRITIC_FILE)),
            )
            for old in sorted((out.path / "checkpoints").glob("step-*"))[: -cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

        t0 = time.perf_counter()
        last = _loop(models, prompts, enc, opt, kl, cfg, rt, start, save, metrics, progress)
        state = _checkpoint_state(models, opt, rt)
        if state is None:
            return out.manifest
        write_checkpoint_files(
            out.path,
            models.policy,
            models.tokenizer,
            optimizer=state["optimizer"],
            weights=state["weights"],
            trainer_state=_trainer_state(cfg, cfg.steps, kl, rt),
        )
        save_file(state["critic"], str(out.path / CRITIC_FILE))
        out.manifest.tokenizer = {
            "fingerprint": models.tokenizer.fingerprint,
            "vocab_size": models.tokenizer.vocab_size,
        }
        out.manifest.counts = {
            "steps": cfg.steps,
            "responses": cfg.steps * cfg.batch_prompts,
            "prompts": len(prompts),
        }
        out.manifest.stats = _stats(read_metrics(metrics), last, time.perf_counter() - t0, rt)
        out.manifest.stats["resumed_from_step"] = start if resume else None
        out.manifest.stats["reward_source"] = cfg.reward_model or cfg.reward
        out.manifest.stats["prompts_source"] = str(src.path)
    return out.manifest


def _loop(
    models: Models,
    prompts: list[Prompt],
    enc: list[list[int]],
    opt: torch.optim.Optimizer,
    kl: KLController,
    cfg: PPOConfig,
    rt: Runtime,
    start: int,
    save: Callable[[int], None],
    metrics: Path,
    progress: Progress,
) -> dict[str, Any]:
    completed = saved_at = start
    rec: dict[str, Any] = {}
    t_start = time.perf_counter()
    progress.start("ppo", cfg.steps - start, "steps")
    try:
        # Rank 0 logs; the records already hold means over ranks.
        logging = open(metrics, "a", encoding="utf-8") if rt.is_main else contextlib.nullcontext()  # noqa: SIM115
        with logging as log:
            for step in range(start, cfg.steps):
                rec = ppo_step(models, prompts, enc, opt, kl, cfg, rt, step)
                rec["time"] = round(time.perf_counter() - t_start, 3)
                completed = step + 1
                if log is not None:
                    log.write(json_line(rec))
                    log.flush()
                progress.advance(
                    1,
                    score=rec["score"],
                    kl=rec["kl"],
                    beta=rec["kl_coef"],
                    len=rec["response_len"],
                )
                if (cfg.save_every and completed % cfg.save_every == 0) or completed == cfg.steps:
                    save(completed)
                    saved_at = completed
    except KeyboardInterrupt:
        if completed > saved_at:
            save(completed)
        raise
    finally:
        progress.stop()
    return rec


def json_line(rec: dict[str, Any]) -> str:
    """One metrics.jsonl line (NaN written as null, which JSON has)."""
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()
    }
    return json.dumps(clean) + "\n"


def _stats(
    records: list[dict[str, Any]], last: dict[str, Any], seconds: float, rt: Runtime
) -> dict[str, Any]:
    """Manifest stats: first/last score and KL, where the time went."""
    recs = [r for r in records if "score" in r]
    head, tail = recs[: max(1, len(recs) // 5)], recs[-max(1, len(recs) // 5) :]

    def mean(rs: list[dict[str, Any]], k: str) -> float | None:
        vals = [r[k] for r in rs if r.get(k) is not None]
        return round(sum(vals) / len(vals), 5) if vals else None

    split = {
        k: round(sum(r.get(k, 0.0) for r in recs), 2)
        for k in ("time_gen", "time_score", "time_opt")
    }
    return {
        "score_first": mean(head, "score"),
        "score_last": mean(tail, "score"),
        "kl_last": last.get("kl"),
        "kl_coef_last": last.get("kl_coef"),
        "entropy_last": last.get("entropy"),
        "response_len_last": last.get("response_len"),
        "clipfrac_last": last.get("clipfrac"),
        "seconds_generation": split["time_gen"],
        "seconds_scoring": split["time_score"],
        "seconds_optimisation": split["time_opt"],
        "train_seconds": round(seconds, 2),
        "runtime": rt.describe(),
    }

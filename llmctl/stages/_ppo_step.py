"""The PPO step of `llmctl ppo` (stages/ppo.py runs it): reward functions, the critic, rollouts,
their scoring and the clipped-surrogate update. The algorithm's formulas are in core/ppo.py; the
run around the step (config, checkpoints, resume, several processes) is in stages/ppo.py."""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llmctl.core.artifacts import input_record
from llmctl.core.chatdata import IGNORE, Prompt
from llmctl.core.checkpoint import (
    check_checkpoint,
    check_checkpoint_dir,
    load_checkpoint,
    model_state,
)
from llmctl.core.data_parallel import (
    cat_over_ranks,
    every_rank,
    rank_share,
    reshard,
)
from llmctl.core.distributed import mean_over_ranks
from llmctl.core.errors import ConfigError, InputError, LlmctlError, TrainingError
from llmctl.core.heads import ScalarHead, load_reward_model, pad_right
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.parallel import (
    build_on_meta,
    clip_grad_norm,
)
from llmctl.core.ppo import (
    KLController,
    explained_variance,
    gae,
    masked_mean,
    policy_loss,
    token_rewards,
    value_loss,
    whiten_over_ranks,
)
from llmctl.core.runtime import Runtime
from llmctl.core.sampling import SamplingConfig, generate
from llmctl.core.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llmctl.stages.ppo import PPOConfig


# -- reward ---------------------------------------------------------------------------------------

RewardFn = Callable[[str, str, dict], float]


def load_reward_fn(spec: str) -> RewardFn:
    """Import a rule reward from "package.module:function" or "path/to/file.py:function".

    Raises:
        ConfigError: A malformed spec, a module or file that cannot be imported, or a missing or
            non-callable attribute.
    """
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise ConfigError(
            f"--reward {spec!r} is not of the form module:function",
            "e.g. --reward my_rewards:exact_match or --reward rewards.py:exact_match",
        )
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise ConfigError(f"--reward {spec!r}: file {path} does not exist")
            name = f"llmctl_reward_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"
            loader = importlib.util.spec_from_file_location(name, path)
            assert loader is not None
            assert loader.loader is not None
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ConfigError:
        raise
    except ImportError as e:
        raise ConfigError(
            f"--reward {spec!r}: cannot import module {mod_name!r} ({e})",
            "install it, run from its directory, or name the file: --reward path/to/file.py:fn",
        ) from None
    except Exception as e:  # noqa: BLE001 - user code failed at import: say where
        raise ConfigError(
            f"--reward {spec!r}: importing {mod_name} failed ({type(e).__name__}: {e})"
        ) from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        found = sorted(n for n in dir(module) if callable(getattr(module, n)) and n[0] != "_")
        raise ConfigError(
            f"--reward {spec!r}: {mod_name} has no function {fn_name!r}",
            f"functions there: {', '.join(found[:12]) or 'none'}",
        )
    if not callable(fn):
        raise ConfigError(f"--reward {spec!r}: {fn_name} is a {type(fn).__name__}, not a function")
    return fn


def _rule_scores(
    fn: RewardFn, spec: str, prompts: Sequence[Prompt], responses: Sequence[str]
) -> torch.Tensor:
    out = []
    for p, text in zip(prompts, responses, strict=True):
        user = next((m["content"] for m in reversed(p.messages) if m["role"] == "user"), "")
        try:
            r = float(fn(user, text, {**p.extra, "messages": p.messages}))
        except Exception as e:  # noqa: BLE001 - the user's reward failed: name the row
            raise LlmctlError(
                f"--reward {spec} raised {type(e).__name__} on prompt row {p.row}: {e}",
                "fix the function (it gets prompt: str, response: str, row: dict)",
            ) from None
        if not math.isfinite(r):
            raise LlmctlError(f"--reward {spec} returned {r} on prompt row {p.row}")
        out.append(r)
    return torch.tensor(out, dtype=torch.float32)


# -- models ---------------------------------------------------------------------------------------


class Critic(nn.Module):
    """Value function: a decoder backbone plus a scalar head at every position."""

    def __init__(self, body: Transformer, head: ScalarHead | None = None) -> None:
        super().__init__()
        self.body = body
        self.head = (head or ScalarHead(body.cfg.d_model)).to(body.embed.weight.device)

    @property
    def cfg(self) -> ModelConfig:
        """The backbone's architecture."""
        return self.body.cfg

    @property
    def layers(self) -> nn.ModuleList:
        """The backbone's blocks: `parallel.wrap` shards each under FSDP, then the critic (the
        embedding, final norm and both heads) as the root."""
        return self.body.layers

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T) fp32 values."""
        return self.head(self.body(ids, hidden=True))

    def tensors(self, full: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The critic as stored (a tied LM head once, as in model checkpoints); from `full`, its
        state dict gathered from FSDP shards (`parallel.full_model_state`), when given."""
        if full is None:
            sd = {f"body.{k}": v.cpu() for k, v in model_state(self.body).items()}
            return sd | {f"head.{k}": v for k, v in self.head.tensors().items()}
        tied = self.body.cfg.tie_embeddings
        sd = {k: v for k, v in full.items() if k.startswith("body.")}
        if tied:
            sd.pop("body.lm_head.weight", None)
        return sd | {"head.weight": full["head.proj.weight"], "head.bias": full["head.proj.bias"]}

    def load_tensors(self, t: dict[str, torch.Tensor]) -> None:
        """Inverse of `tensors`."""
        body = {k[5:]: v for k, v in t.items() if k.startswith("body.")}
        if self.body.cfg.tie_embeddings:
            body["lm_head.weight"] = body["embed.weight"]
        self.body.load_state_dict(body)
        self.head.proj.load_state_dict({"weight": t["head.weight"], "bias": t["head.bias"]})


@dataclass
class Models:
    policy: Transformer
    ref: Transformer
    critic: Critic
    tokenizer: Tokenizer
    score: Callable[[Sequence[Prompt], list[list[int]], list[list[int]]], torch.Tensor]
    inputs: list[dict]
    # What the update's forward passes run through: DDP wrappers under --parallel ddp.
    train_policy: nn.Module | None = None
    train_critic: nn.Module | None = None
    # Under FSDP: policy, critic and reference are sharded, and decoding steps in lockstep.
    sharded: bool = False
    # Built on the meta device (FSDP): `fill` allocates and fills the shards once they are wrapped.
    critic_head: dict[str, torch.Tensor] | None = None

    def fill(self, init: Path, resumed: Path | None, device: torch.device) -> None:
        """Meta-device models, wrapped: each rank's shards of the policy (from the checkpoint
        resumed, else `init`), the reference (`init`) and the critic (the resumed checkpoint's
        critic file, else `init`'s weights and the new head), one whole tensor at a time."""
        from llmctl.core.checkpoint import checkpoint_errors, iter_checkpoint_weights
        from llmctl.core.parallel import fill_parameters, materialize

        with checkpoint_errors(resumed or init):
            materialize(self.policy, device, state=iter_checkpoint_weights(resumed or init))
        with checkpoint_errors(init):
            materialize(self.ref, device, state=iter_checkpoint_weights(init))
        self.critic.to_empty(device=device)  # on the critic, the FSDP root
        if resumed is not None:
            saved = read_critic(resumed, device="cpu")
            body = ((k[5:], v) for k, v in saved.items() if k.startswith("body."))
            head = {"proj.weight": saved["head.weight"], "proj.bias": saved["head.bias"]}
        else:
            body, head = iter_checkpoint_weights(init), dict(self.critic_head or {})
        try:  # the values come from the resumed critic file, else from --init and the seed
            with checkpoint_errors(None if resumed is not None else init):
                materialize(self.critic.body, device, state=body, allocate=False)
            fill_parameters(self.critic.head, head)
        except ValueError as e:  # only a resumed critic file's get here
            raise InputError(
                f"{Path(resumed or init) / CRITIC_FILE} does not fit the model: {e}",
                "resume from an earlier checkpoint or start again without --resume",
            ) from None


CRITIC_FILE = "trainer_state.critic.safetensors"  # "trainer_state.*": resume state, not content


def read_critic(ckpt: Path, device: str) -> dict[str, torch.Tensor]:
    """A PPO checkpoint's critic tensors (`Critic.tensors` form).

    Raises:
        InputError: The file is missing or corrupt.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        t = load_file(str(Path(ckpt) / CRITIC_FILE), device=device)
        if "head.weight" not in t or "head.bias" not in t:
            raise KeyError("head.weight")
    except (SafetensorError, OSError, KeyError, RuntimeError) as e:
        raise InputError(
            f"{Path(ckpt) / CRITIC_FILE} is missing or corrupt ({type(e).__name__})",
            "resume from an earlier checkpoint or start again without --resume",
        ) from None
    return t


def load_models(cfg: PPOConfig, rt: Runtime, *, meta: bool = False) -> Models:
    """Policy, reference and critic from `--init`, and the reward. `meta` (FSDP): the three are
    built on the meta device and filled by `Models.fill` once wrapped. The critic's new head
    comes from the seed alone, so every layout starts from the same one."""
    critic_head = ScalarHead(
        ModelConfig.from_dict(check_checkpoint_dir(Path(cfg.init))["model"]).d_model,
        generator=torch.Generator().manual_seed(subseed(cfg.seed, "ppo/critic-head", 0)),
    )
    if meta:
        _, mcfg, tok = check_checkpoint(Path(cfg.init))
        policy = build_on_meta(mcfg).train()
        ref = build_on_meta(mcfg).eval().requires_grad_(False)
        with torch.device("meta"):
            critic = Critic(build_on_meta(mcfg), ScalarHead(mcfg.d_model)).train()
    else:
        ck = load_checkpoint(Path(cfg.init), device=rt.device)
        policy, tok = ck.model.train(), ck.tokenizer
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
        critic = Critic(copy.deepcopy(policy), critic_head).train()
    inputs = [input_record(cfg.init, "checkpoint")]
    if cfg.reward_model:
        rm, _ = load_reward_model(Path(cfg.reward_model), device=rt.device, tokenizer=tok)
        rm.requires_grad_(False)
        inputs.append(input_record(cfg.reward_model, "checkpoint"))

        @torch.no_grad()
        def score(_p: Sequence[Prompt], p_ids: list[list[int]], r_ids: list[list[int]]):
            ids, lengths = pad_right([p + r for p, r in zip(p_ids, r_ids, strict=True)], tok.pad_id)
            with rt.autocast():
                return rm(ids.to(rt.device), lengths.to(rt.device)).float().cpu()

    else:
        fn = load_reward_fn(cfg.reward or "")
        file = cfg.reward.rpartition(":")[0] if cfg.reward else ""
        if file.endswith(".py"):
            inputs.append(input_record(file, "reward"))

        def score(p: Sequence[Prompt], _p_ids: list[list[int]], r_ids: list[list[int]]):
            return _rule_scores(fn, cfg.reward or "", p, [tok.decode(r) for r in r_ids])

    head = {f"proj.{k}": v for k, v in critic_head.tensors().items()} if meta else None
    return Models(policy, ref, critic, tok, score, inputs, critic_head=head)


# -- rollouts -------------------------------------------------------------------------------------


def subseed(seed: int, name: str, step: int) -> int:
    """A 63-bit seed for one named random stream at one step."""
    h = hashlib.sha256(f"{seed}:{name}:{step}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def stream(name: str, rt: Runtime) -> str:
    """A random stream's name on this rank (rank 0's is the one-process name)."""
    return name if rt.rank == 0 else f"{name}/rank{rt.rank}"


def pick_prompts(n: int, k: int, seed: int, step: int) -> list[int]:
    """Prompt indices for one step: a pure function of (seed, step); without repeats while k <= n."""
    order = list(range(n))
    random.Random(subseed(seed, "ppo/prompts", step)).shuffle(order)
    return [order[i % n] for i in range(k)]


def encode_prompts(tok: Tokenizer, prompts: Sequence[Prompt], max_len: int) -> list[list[int]]:
    """Render with the generation prompt; keep BOS plus the last `max_len - 1` tokens."""
    out = []
    for p in prompts:
        ids, _ = tok.render_chat(p.messages, add_generation_prompt=True)
        if len(ids) > max_len:
            ids = [ids[0], *ids[len(ids) - max_len + 1 :]]
        out.append(ids)
    return out


@dataclass
class Rollout:
    """A batch of sampled responses, scored. Per-token tensors are (B, R) (see core/ppo.py)."""

    ids: torch.Tensor  # (B, L) prompt + response, right-padded
    idx: torch.Tensor  # (B, R) position in ids[:, :-1] whose output predicts response token j
    tokens: torch.Tensor  # (B, R) response tokens (IGNORE on padding)
    mask: torch.Tensor  # (B, R) real response tokens
    score: torch.Tensor  # (B,)
    logp: torch.Tensor
    ref_logp: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


def layout(
    p_ids: Sequence[Sequence[int]], r_ids: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, L), idx (B, R), tokens (B, R), mask (B, R)) for prompt + response rows."""
    ids, _ = pad_right([list(p) + list(r) for p, r in zip(p_ids, r_ids, strict=True)], pad_id)
    B, R = len(r_ids), max(len(r) for r in r_ids)
    idx = torch.zeros(B, R, dtype=torch.long)
    tokens = torch.full((B, R), IGNORE, dtype=torch.long)
    for b, (p, r) in enumerate(zip(p_ids, r_ids, strict=True)):
        idx[b, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
        tokens[b, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return ids, idx, tokens, tokens != IGNORE


def _at(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of (B, T, d) at (B, R) positions -> (B, R, d)."""
    return h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))


class ResponseLogprobs(nn.Module):
    """The policy as the update runs it: one forward reads the decoder and its LM head, which DDP
    needs to see (the head is applied to the response positions only)."""

    def __init__(self, policy: Transformer) -> None:
        super().__init__()
        self.policy = policy

    def forward(
        self, ids: torch.Tensor, idx: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See `response_logprobs`."""
        h = _at(self.policy(ids[:, :-1], hidden=True), idx)  # (B, R, d)
        logp_all = self.policy.lm_head(h).float().log_softmax(-1)  # (B, R, V)
        logp = logp_all.gather(-1, tokens.clamp(min=0)[..., None]).squeeze(-1)
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        mask = tokens != IGNORE
        return logp * mask, entropy * mask


def response_logprobs(
    model: Transformer, ids: torch.Tensor, idx: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(response token) and the policy's entropy at each response position, (B, R) fp32
    each, 0 on padding. The LM head runs on the response positions only, so the one
    vocabulary-sized tensor is (B, R, V), not (B, L, V)."""
    return ResponseLogprobs(model)(ids, idx, tokens)


@torch.no_grad()
def score_rollout(
    models: Models,
    prompts: Sequence[Prompt],
    p_ids: list[list[int]],
    r_ids: list[list[int]],
    rt: Runtime,
    chunk: int,
) -> Rollout:
    """Reward, log-probs (policy, reference), values and entropy of sampled responses."""
    score = models.score(prompts, p_ids, r_ids)
    ids, idx, tokens, mask = (
        t.to(rt.device) for t in layout(p_ids, r_ids, models.tokenizer.pad_id)
    )
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("logp", "ref", "values", "ent")}
    models.policy.eval()
    models.critic.eval()
    for s in range(0, len(r_ids), chunk):
        x, i, t = ids[s : s + chunk], idx[s : s + chunk], tokens[s : s + chunk]
        with rt.autocast():
            lp, ent = response_logprobs(models.policy, x, i, t)
            parts["logp"].append(lp)
            parts["ent"].append(ent)
            parts["ref"].append(response_logprobs(models.ref, x, i, t)[0])
            parts["values"].append(models.critic(x[:, :-1]).gather(1, i).float())
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return Rollout(
        ids,
        idx,
        tokens,
        mask,
        score.to(rt.device),
        cat["logp"],
        cat["ref"],
        cat["values"] * mask,
        cat["ent"],
    )


# -- update ---------------------------------------------------------------------------------------


def ppo_update(
    models: Models,
    roll: Rollout,
    opt: torch.optim.Optimizer,
    cfg: PPOConfig,
    rt: Runtime,
    step: int,
) -> dict[str, float]:
    """`ppo_epochs` passes of clipped-surrogate + value-loss minibatch steps; mean stats."""
    assert roll.advantages is not None
    assert roll.returns is not None
    models.policy.train()
    models.critic.train()
    params = [p for g in opt.param_groups for p in g["params"]]
    clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    acc: dict[str, list[float]] = {}
    B = roll.ids.shape[0]
    policy = models.train_policy or ResponseLogprobs(models.policy)
    critic = models.train_critic or models.critic
    for epoch in range(cfg.ppo_epochs):
        order = list(range(B))
        random.Random(subseed(cfg.seed, stream(f"ppo/minibatch/{epoch}", rt), step)).shuffle(order)
        for s in range(0, B, cfg.minibatch):
            mb = torch.tensor(order[s : s + cfg.minibatch], device=roll.ids.device)
            ids, idx, tok, mask = roll.ids[mb], roll.idx[mb], roll.tokens[mb], roll.mask[mb]
            with rt.autocast():
                logp, _ = policy(ids, idx, tok)
                values = critic(ids[:, :-1]).gather(1, idx).float()
            pg, pst = policy_loss(logp, roll.logp[mb], roll.advantages[mb], mask, cfg.clip)
            vf, vst = value_loss(values, roll.values[mb], roll.returns[mb], mask, cfg.vf_clip)
            loss = pg + cfg.vf_coef * vf
            loss.backward()
            norm = clip_grad_norm(params, clip)  # DTensor gradients under FSDP
            if not (math.isfinite(float(loss.detach())) and math.isfinite(norm)):
                raise TrainingError(
                    f"PPO loss became {float(loss.detach())} (grad norm {norm}) at step {step + 1}",
                    "lower --lr or --clip, raise --kl-coef, then --resume from the last checkpoint",
                )
            opt.step()
            opt.zero_grad(set_to_none=True)
            for k, v in {
                "pg_loss": pg,
                "vf_loss": vf,
                "grad_norm": norm,
                **pst,
                **vst,
            }.items():
                acc.setdefault(k, []).append(float(v.detach()) if torch.is_tensor(v) else v)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def ppo_step(
    models: Models,
    prompts: list[Prompt],
    enc: list[list[int]],
    opt: torch.optim.Optimizer,
    kl: KLController,
    cfg: PPOConfig,
    rt: Runtime,
    step: int,
) -> dict[str, Any]:
    """One rollout -> score -> update cycle; returns the step's metrics record."""
    tok = models.tokenizer
    rows = rank_share(pick_prompts(len(prompts), cfg.batch_prompts, cfg.seed, step), rt)
    batch, p_ids = [prompts[i] for i in rows], [enc[i] for i in rows]
    t0 = time.perf_counter()
    gen = torch.Generator(rt.device).manual_seed(subseed(cfg.seed, stream("ppo/rollout", rt), step))
    sampling = SamplingConfig(
        max_new_tokens=cfg.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0
    )
    models.policy.eval()
    with rt.autocast():
        r_ids = generate(
            models.policy,
            p_ids,
            sampling,
            stop_ids=(tok.end_id, tok.eos_id),
            generator=gen,
            pad_id=tok.pad_id,
            # FSDP: every forward is a collective, so every rank decodes until all are done.
            all_finished=(lambda done: every_rank(done, rt.device)) if models.sharded else None,
        )
    rt.synchronize()
    t1 = time.perf_counter()
    roll = score_rollout(models, batch, p_ids, r_ids, rt, cfg.minibatch)
    reshard(models.ref)  # FSDP: free the gathered root until the next step's scoring
    beta = kl.value
    rewards, kl_tok = token_rewards(roll.score, roll.logp, roll.ref_logp, roll.mask, beta)
    adv, roll.returns = gae(rewards, roll.values, roll.mask, cfg.gamma, cfg.lam)
    roll.advantages = whiten_over_ranks(adv, roll.mask)
    rt.synchronize()
    t2 = time.perf_counter()
    stats = ppo_update(models, roll, opt, cfg, rt, step)
    rt.synchronize()
    t3 = time.perf_counter()

    # Every rank holds as many responses: means of the ranks' means are means over all of them.
    def mean(v: float | torch.Tensor) -> float:
        if rt.world_size == 1:
            return float(v)
        return float(mean_over_ranks(torch.as_tensor(v, dtype=torch.float64, device=rt.device)))

    seq_kl = mean(kl_tok.sum(1).mean())
    kl.update(seq_kl, cfg.batch_prompts)
    lens = roll.mask.sum(1).float()
    stopped = [bool(r) and r[-1] in (tok.end_id, tok.eos_id) for r in r_ids]
    scores = cat_over_ranks(roll.score[None].float(), rt.device)[0]
    return {
        "step": step + 1,
        "score": round(float(scores.mean()), 5),
        "score_std": round(float(scores.std()), 5),
        "reward": round(mean(rewards.sum(1).mean()), 5),
        "kl": round(seq_kl, 5),
        "kl_coef": round(beta, 6),
        "entropy": round(mean(masked_mean(roll.entropy, roll.mask)), 5),
        "response_len": round(mean(lens.mean()), 2),
        "stopped": round(mean(sum(stopped) / len(stopped)), 3),
        "value_mean": round(mean(masked_mean(roll.values, roll.mask)), 5),
        "explained_var": round(mean(explained_variance(roll.values, roll.returns, roll.mask)), 4),
        **{k: round(mean(v), 5) for k, v in stats.items()},
        "time_gen": round(t1 - t0, 3),
        "time_score": round(t2 - t1, 3),
        "time_opt": round(t3 - t2, 3),
    }

"""The pure pieces of PPO for RLHF: per-token rewards with a KL penalty, GAE, whitening, the
adaptive KL controller and the clipped losses. No models, files or devices: tensors in, tensors out,
so each piece is unit-tested against a hand computation (tests/core/test_ppo_core.py). With several
processes (`--parallel ddp`) the advantages are whitened over every rank's responses
(`whiten_over_ranks`, two all-reduces).

Layout: every per-token tensor is (B, R), one row per sampled response, right-padded to the longest
response R; `mask` (B, R) bool marks real response tokens (the stop token included). Position t
holds the log-probability of response token t and the value of the state before it.

Following Ziegler et al. (2019, "Fine-Tuning Language Models from Human Preferences") and
InstructGPT (Ouyang et al., 2022): the reward of a response is the scalar score at its last token
minus `beta * (log pi(a_t) - log pi_ref(a_t))` at every token (the per-token KL estimate k1, whose
sum over the response is an unbiased estimate of KL(pi || pi_ref) for the sampled sequence);
advantages are GAE (Schulman et al., 2016) over the response tokens, whitened over the batch; the
policy loss is PPO's clipped surrogate and the value loss the clipped squared error of the PPO2
baselines implementation. Departure from the paper: InstructGPT mixes in pretraining gradients
("PPO-ptx"); we do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from llmctl.core.distributed import active


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` where `mask` is set (0 where nothing is)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of `x` over the masked entries (0 with fewer than two)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    ss = (((x - mean) ** 2) * mask.to(x.dtype)).sum()
    return ss / (n - 1).clamp(min=1)


def whiten(
    x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise the masked entries of `x` to unit variance (and zero mean if `shift_mean`);
    unmasked entries become 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def whiten_over_ranks(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`whiten` with the mean and variance of the masked entries of every rank's `x` together (as
    if their rows were one batch); `whiten` itself in one process. Collective: every rank calls it.
    """
    if not active():
        return whiten(x, mask, eps=eps)
    m = mask.to(x.dtype)
    sums = torch.stack([(x * m).sum(), m.sum()])
    dist.all_reduce(sums)  # sum over ranks
    mean = sums[0] / sums[1].clamp(min=1)
    ss = (((x - mean) ** 2) * m).sum()
    dist.all_reduce(ss)
    var = ss / (sums[1] - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * m


def token_rewards(
    score: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * KL estimate everywhere, plus the score at the last real token.

    Args:
        score: (B,) scalar reward of each response (reward model or rule).
        logp: (B, R) log pi(a_t) of the sampling policy.
        ref_logp: (B, R) log pi_ref(a_t) of the frozen reference.
        mask: (B, R) real response tokens.
        beta: KL penalty coefficient.

    Returns:
        (rewards (B, R), kl (B, R)), both 0 outside the mask.
    """
    m = mask.to(logp.dtype)
    kl = (logp - ref_logp) * m
    rewards = -beta * kl
    last = (mask.long().sum(1) - 1).clamp(min=0)  # (B,) index of each row's last token
    rewards[torch.arange(len(score)), last] += score.to(rewards.dtype)
    return rewards * m, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t with V = 0 after the last real token (the episode ends
    there), A_t = delta_t + gamma * lam * A_{t+1}; returns R_t = A_t + V_t (the value targets).

    Returns:
        (advantages, returns), (B, R), 0 outside the mask.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        nxt = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        # Padding has mask 0, so `running` is reset to 0 past each row's end.
        running = (delta + gamma * lam * running) * m[:, t]
        adv[:, t] = running
    return adv, (adv + values) * m


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, -E[min(rho A, clip(rho, 1-eps, 1+eps) A)], averaged over tokens.

    Returns:
        (loss, stats): clipfrac (share of tokens where the clipped term was chosen) and approx_kl
        (mean of (ratio - 1) - log ratio, Schulman's low-variance estimate of KL(old || new)).
    """
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * E[max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)].

    Returns:
        (loss, stats): vf_clipfrac (share of tokens where the clipped error was larger).
    """
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        frac = masked_mean((err_clipped > err).float(), mask)
    return loss, {"vf_clipfrac": frac}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked tokens: 1 is a perfect critic, <= 0 a useless one."""
    var_r = float(masked_var(returns, mask))
    if var_r == 0:
        return float("nan")
    return 1.0 - float(masked_var(returns - values, mask)) / var_r


@dataclass
class KLController:
    """The KL coefficient beta: fixed (`target` None) or adapted toward a target KL.

    The adaptive rule is Ziegler et al.'s proportional controller (their section 2.2):
    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon), where KL is the mean
    per-response KL of the batch just collected and n the number of responses in it. A KL above
    target raises beta, below lowers it, at most 20% per `horizon` responses.
    """

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n: int) -> float:
        """Feed one batch's mean per-response KL; return the new beta."""
        if self.target is None:
            return self.value
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon
        return self.value

"""core/ppo: GAE against a hand computation, whitening, KL-shaped rewards, clipped losses, the
adaptive KL controller."""

from __future__ import annotations

import math

import pytest
import torch

from llmctl.core.ppo import (
    KLController,
    explained_variance,
    gae,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)


def test_gae_matches_hand_computation_and_stops_at_row_end() -> None:
    r = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 9.0]])
    v = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.6, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    g, lam = 0.9, 0.5
    adv, ret = gae(r, v, mask, g, lam)
    # row 0, by hand: deltas backwards, V after the last token = 0
    d2 = 1.0 + 0 - 0.3
    d1 = 0.0 + g * 0.3 - 0.2
    d0 = 0.0 + g * 0.2 - 0.1
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    # row 1 ends at t=1: the padded reward/value (9.0) must not leak in
    e1 = 2.0 - 0.6
    e0 = 0.5 + g * 0.6 - 0.4 + g * lam * e1
    assert adv[1].tolist() == pytest.approx([e0, e1, 0.0])
    torch.testing.assert_close(ret, (adv + v) * mask)


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value() -> None:
    r = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    v = torch.tensor([[0.3, 0.1, -0.2, 0.7]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    adv, ret = gae(r, v, mask, 1.0, 1.0)
    to_go = torch.tensor([[2.5, 1.5, 3.5, 0.5]])
    torch.testing.assert_close(adv, to_go - v)
    torch.testing.assert_close(ret, to_go)


def test_whiten_uses_masked_entries_only() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    w = whiten(x, mask)
    vals = w[mask]
    assert float(vals.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(vals.std()) == pytest.approx(1.0, abs=1e-4)
    assert w[1, 1] == 0
    assert w[1, 2] == 0
    kept = whiten(x, mask, shift_mean=False)[mask]
    assert float(kept.mean()) == pytest.approx(2.5, abs=1e-5)


def test_token_rewards_put_the_score_on_the_last_real_token() -> None:
    score = torch.tensor([1.0, 2.0])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rew, kl = token_rewards(score, logp, ref, mask, beta=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -0.5], [-1.0, 0.0, 0.0]]))
    torch.testing.assert_close(rew, torch.tensor([[-0.05, 0.0, 1.05], [0.1, 2.0, 0.0]]))


def test_policy_loss_clips_in_the_direction_of_the_advantage() -> None:
    old = torch.zeros(1, 4)
    # ratios 1.5, 1.5, 0.5, 1.0 with advantages +1, -1, +1, +1
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 1.0]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, st = policy_loss(logp, old, adv, mask, clip=0.2)
    # per token: -min(rA, clip(r)A) = -1.2, +1.5, -0.5, -1.0
    assert float(loss) == pytest.approx((-1.2 + 1.5 - 0.5 - 1.0) / 4)
    assert float(st["clipfrac"]) == pytest.approx(0.25)  # only token 0 takes the clipped term
    ratio = torch.tensor([1.5, 1.5, 0.5, 1.0])
    assert float(st["approx_kl"]) == pytest.approx(float(((ratio - 1) - ratio.log()).mean()))
    # the clipped token gets no gradient, the others do
    lp = logp.clone().requires_grad_(True)
    policy_loss(lp, old, adv, mask, clip=0.2)[0].backward()
    assert lp.grad[0, 0] == 0
    assert (lp.grad[0, 1:] != 0).all()


def test_value_loss_takes_the_larger_of_clipped_and_unclipped_error() -> None:
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    ret = torch.tensor([[1.0, 1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, st = value_loss(new, old, ret, mask, clip=0.2)
    # token 0: unclipped err 0, clipped value 0.2 -> err 0.64; token 1: both 0.81
    assert float(loss) == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert float(st["vf_clipfrac"]) == pytest.approx(0.5)


def test_explained_variance() -> None:
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(ret) + 2.5, ret, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(ret, torch.ones_like(ret), mask))


def test_adaptive_kl_controller_follows_ziegler() -> None:
    fixed = KLController(0.1)
    assert fixed.update(100.0, 64) == 0.1
    ctl = KLController(0.1, target=6.0, horizon=100)
    assert ctl.update(6.0 * 1.1, 10) == pytest.approx(0.1 * (1 + 0.1 * 10 / 100))  # above: up
    b = ctl.value
    assert ctl.update(100.0, 10) == pytest.approx(b * (1 + 0.2 * 10 / 100))  # error clipped at 0.2
    b = ctl.value
    assert ctl.update(0.0, 10) == pytest.approx(b * (1 - 0.2 * 10 / 100))  # below target: down
    for _ in range(200):  # a KL that stays high drives beta up steadily
        ctl.update(12.0, 10)
    assert ctl.value > 10 * b

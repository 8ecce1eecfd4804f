"""PPO pieces against hand-computed numbers: KL estimators, token rewards, GAE, clipped losses,
entropy, group baselines (RLOO, GRPO), KL controllers, and invariance to masked positions."""

from __future__ import annotations

import math

import pytest
import torch

from cai_ray.algorithms.ppo import (
    AdaptiveKLController,
    FixedKLController,
    broadcast_sequence_advantage,
    entropy_from_logits,
    gae,
    grpo_advantages,
    kl_penalty,
    policy_loss,
    rloo_advantages,
    token_rewards,
    value_loss,
)

F64 = torch.float64


def _t(rows: list[list[float]] | list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def _m(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def _approx(x: torch.Tensor, expected: list[list[float]] | list[float], rel: float = 1e-6) -> None:
    """Element-wise approx; pytest.approx takes flat sequences only, so compare flattened."""
    want = torch.tensor(expected, dtype=F64)
    assert x.shape == want.shape
    assert x.flatten().tolist() == pytest.approx(want.flatten().tolist(), rel=rel, abs=1e-9)


# ---------------------------------------------------------------- KL estimators

def test_kl_k1_and_k3_hand_values() -> None:
    logp = _t([[-1.0, -2.0, -0.3]])
    ref = _t([[-1.5, -1.0, -0.3]])
    # k1 = logp - ref = [0.5, -1.0, 0]
    _approx(kl_penalty(logp, ref, "k1"), [[0.5, -1.0, 0.0]])
    # k3 = (r - 1) - log r, r = exp(ref - logp):
    #   log r = -0.5: exp(-0.5) - 1 + 0.5 = 0.6065307 - 0.5 = 0.1065307
    #   log r = +1.0: exp(1) - 1 - 1      = 2.7182818 - 2  = 0.7182818
    #   log r = 0:                                           0
    _approx(kl_penalty(logp, ref, "k3"), [[0.10653066, 0.71828183, 0.0]])


def test_k3_is_never_negative() -> None:
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(8, 16, generator=g, dtype=F64) * 3
    ref = torch.randn(8, 16, generator=g, dtype=F64) * 3
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert (kl_penalty(logp, ref, "k1") < 0).any()  # k1 can be, per token


def test_k1_and_k3_expectations_equal_exact_kl() -> None:
    # p = [0.5, 0.25, 0.25], q = [0.25, 0.25, 0.5]
    # KL(p||q) = 0.5 ln 2 + 0 + 0.25 ln 0.5 = 0.25 ln 2 = 0.1732868
    p, q = _t([0.5, 0.25, 0.25]), _t([0.25, 0.25, 0.5])
    kl = 0.25 * math.log(2)
    for est in ("k1", "k3"):
        per_token = kl_penalty(p.log().unsqueeze(0), q.log().unsqueeze(0), est)
        assert (p * per_token[0]).sum().item() == pytest.approx(kl, rel=1e-12)


def test_kl_unknown_estimator_lists_choices() -> None:
    with pytest.raises(ValueError, match="k1.*k3"):
        kl_penalty(_t([[0.0]]), _t([[0.0]]), "k2")  # type: ignore[arg-type]


# ---------------------------------------------------------------- token rewards

def test_token_rewards_score_on_last_valid_token() -> None:
    kl = _t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0], [1.0, 1.0, 1.0], [0.2, 7.0, 0.2]])
    mask = _m([[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 1]])
    scores = _t([1.0, 2.0, 5.0, 3.0])
    r = token_rewards(scores, kl, mask, kl_coef=0.5)
    _approx(r, [
        [-0.05, -0.10, -0.15 + 1.0],  # full row: score on t=2
        [-0.20, -0.25 + 2.0, 0.0],    # length 2: score on t=1, padding stays 0
        [0.0, 0.0, 0.0],              # empty row: nothing to reward
        [-0.10, 0.0, -0.10 + 3.0],    # hole at t=1: last true index is still t=2
    ])


# ---------------------------------------------------------------- GAE

def test_gae_gamma1_lam1_is_reward_to_go_minus_value() -> None:
    rewards = _t([[1.0, 2.0, 3.0], [1.0, 2.0, 99.0]])
    values = _t([[0.5, 1.0, 1.5], [0.5, 1.0, 77.0]])
    mask = _m([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # reward-to-go: row 0 [6, 5, 3]; row 1 [3, 2] (t=2 is padding)
    _approx(ret, [[6.0, 5.0, 3.0], [3.0, 2.0, 0.0]])
    _approx(adv, [[5.5, 4.0, 1.5], [2.5, 1.0, 0.0]])


def test_gae_gamma09_lam095_by_hand() -> None:
    rewards = _t([[1.0, 0.0, 2.0], [0.5, 1.0, 5.0]])
    values = _t([[0.5, 0.4, 0.3], [0.2, 0.6, 9.0]])
    mask = _m([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    # γλ = 0.855. Row 0:
    #   t=2: δ = 2 + 0.9·0 - 0.3 = 1.7                A2 = 1.7
    #   t=1: δ = 0 + 0.9·0.3 - 0.4 = -0.13            A1 = -0.13 + 0.855·1.7 = 1.3235
    #   t=0: δ = 1 + 0.9·0.4 - 0.5 = 0.86             A0 = 0.86 + 0.855·1.3235 = 1.9915925
    # Row 1 (t=2 is padding, so V after t=1 is 0):
    #   t=1: δ = 1 + 0 - 0.6 = 0.4                    A1 = 0.4
    #   t=0: δ = 0.5 + 0.9·0.6 - 0.2 = 0.84           A0 = 0.84 + 0.855·0.4 = 1.182
    _approx(adv, [[1.9915925, 1.3235, 1.7], [1.182, 0.4, 0.0]])
    # returns = advantages + values on valid tokens
    _approx(ret, [[2.4915925, 1.7235, 2.0], [1.382, 1.0, 0.0]])
    assert not adv.requires_grad


def test_gae_skips_holes_in_the_mask() -> None:
    # Row [1, ·, 2] with a masked middle equals the compacted row [1, 2]. γ = 0.5, λ = 1:
    #   t=2: δ = 2 - 1 = 1, A = 1;   t=0: δ = 1 + 0.5·1 - 0.5 = 1, A = 1 + 0.5·1 = 1.5
    adv, ret = gae(_t([[1.0, 7.0, 2.0]]), _t([[0.5, 9.0, 1.0]]), _m([[1, 0, 1]]), 0.5, 1.0)
    _approx(adv, [[1.5, 0.0, 1.0]])
    _approx(ret, [[2.0, 0.0, 2.0]])
    adv_c, _ = gae(_t([[1.0, 2.0]]), _t([[0.5, 1.0]]), _m([[1, 1]]), 0.5, 1.0)
    _approx(adv[:, [0, 2]], adv_c.tolist())


# ---------------------------------------------------------------- policy loss

def _policy_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # five valid tokens (ratio, advantage), ε = 0.2; the sixth slot is padding.
    ratios = [[1.1, 1.5, 0.5], [1.5, 0.5, 1.0]]
    adv = _t([[1.0, 1.0, -1.0], [-1.0, 1.0, 123.0]])
    old = torch.full((2, 3), -1.0, dtype=F64)
    logp = old + _t(ratios).log()
    return logp, old, adv, _m([[1, 1, 1], [1, 1, 0]])


def test_policy_loss_clip_inside_and_outside_both_signs() -> None:
    logp, old, adv, mask = _policy_case()
    logp.requires_grad_(True)
    loss, stats = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # per token max(-A·ρ, -A·clip(ρ, 0.8, 1.2)):
    #   A=+1 ρ=1.1 (inside):      max(-1.1, -1.1) = -1.1  unclipped
    #   A=+1 ρ=1.5 (above):       max(-1.5, -1.2) = -1.2  clipped (no gain past 1+ε)
    #   A=-1 ρ=0.5 (below):       max( 0.5,  0.8) =  0.8  clipped (no gain past 1-ε)
    #   A=-1 ρ=1.5 (above):       max( 1.5,  1.2) =  1.5  unclipped: the pessimistic side
    #   A=+1 ρ=0.5 (below):       max(-0.5, -0.8) = -0.5  unclipped: the pessimistic side
    # mean = (-1.1 - 1.2 + 0.8 + 1.5 - 0.5) / 5 = -0.1
    assert loss.item() == pytest.approx(-0.1, rel=1e-9)
    assert stats["clip_fraction"] == pytest.approx(2 / 5)
    assert stats["ratio_mean"] == pytest.approx((1.1 + 1.5 + 0.5 + 1.5 + 0.5) / 5)
    # approx_kl = ½ · mean((ln ρ)²) = ½ · (0.0090840 + 2·0.1644020 + 2·0.4804530) / 5 = 0.1298794
    expected_kl = 0.5 * (math.log(1.1) ** 2 + 2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 5
    assert stats["approx_kl"] == pytest.approx(expected_kl, rel=1e-9)
    assert expected_kl == pytest.approx(0.1298794, rel=1e-6)
    # d loss / d logp = -A·ρ / 5 where unclipped, 0 where clipped or padded
    loss.backward()
    assert logp.grad is not None
    _approx(logp.grad, [[-1.1 / 5, 0.0, 0.0], [1.5 / 5, -0.5 / 5, 0.0]])


def test_policy_loss_on_policy_is_minus_mean_advantage() -> None:
    old = _t([[-1.0, -2.0, -3.0]])
    loss, stats = policy_loss(old.clone(), old, _t([[1.0, -2.0, 4.0]]), _m([[1, 1, 1]]), 0.2)
    # ρ = 1 everywhere: loss = -(1 - 2 + 4) / 3 = -1
    assert loss.item() == pytest.approx(-1.0)
    assert stats == pytest.approx({"clip_fraction": 0.0, "approx_kl": 0.0, "ratio_mean": 1.0})


def test_single_update_gradient_equals_the_two_pass_gradient() -> None:
    """`ppo.single_update`: using the training forward's own detached log-probs as the old ones
    gives the same loss and weight gradient as a separate no-grad pass on the same weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))
    ids = torch.randint(0, 11, (3, 6))
    adv = torch.randn(3, 5)
    mask = torch.ones(3, 5, dtype=torch.bool)

    def logp() -> torch.Tensor:
        lp = torch.log_softmax(model(ids[:, :-1]), -1)
        return lp.gather(-1, ids[:, 1:, None]).squeeze(-1)

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    with torch.no_grad():
        old = logp()  # the separate "experience" pass
    two_pass, _ = policy_loss(logp(), old, adv, mask, 0.2)
    g_two = grads(two_pass)
    cur = logp()
    one_pass, stats = policy_loss(cur, cur.detach(), adv, mask, 0.2)
    g_one = grads(one_pass)
    assert one_pass.item() == pytest.approx(two_pass.item(), abs=1e-7)
    assert stats["ratio_mean"] == 1.0 and stats["clip_fraction"] == 0.0
    for a, b in zip(g_one, g_two, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- value loss

def test_value_loss_clipping_by_hand() -> None:
    # c = 0.2; per token (v, v_old, R) -> v_clipped, (v-R)², (v_c-R)², max
    #   (1.0, 0.9,  2.0) -> 1.0, 1.00, 1.00, 1.00   equal: not counted as clipped
    #   (1.5, 1.0,  2.0) -> 1.2, 0.25, 0.64, 0.64   clipped
    #   (1.5, 1.0,  1.0) -> 1.2, 0.25, 0.04, 0.25
    #   (0.0, 1.0,  0.5) -> 0.8, 0.25, 0.09, 0.25
    #   (0.0, 1.0,  2.0) -> 0.8, 4.00, 1.44, 4.00
    #   (0.0, 1.0, -0.5) -> 0.8, 0.25, 1.69, 1.69   clipped
    # loss = ½ · (1 + 0.64 + 0.25 + 0.25 + 4 + 1.69) / 6 = ½ · 7.83 / 6 = 0.6525
    values = _t([[1.0, 1.5, 1.5, 0.0], [0.0, 0.0, 5.0, 5.0]])
    old = _t([[0.9, 1.0, 1.0, 1.0], [1.0, 1.0, -5.0, 0.0]])
    returns = _t([[2.0, 2.0, 1.0, 0.5], [2.0, -0.5, 50.0, 0.0]])
    mask = _m([[1, 1, 1, 1], [1, 1, 0, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.6525, rel=1e-9)
    assert stats["value_clip_fraction"] == pytest.approx(2 / 6)


# ---------------------------------------------------------------- entropy

def test_entropy_from_logits_by_hand() -> None:
    # token 0: logits [0, 0] -> p = [½, ½], H = ln 2 = 0.6931472
    # token 1: logits [0, ln 3] -> p = [¼, ¾], H = ¼ ln 4 + ¾ ln(4/3) = 0.5623351
    # token 2: padding; mean over valid = 0.6277411
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)], [100.0, -100.0]]], dtype=F64)
    ent = entropy_from_logits(logits, _m([[1, 1, 0]]))
    assert ent.item() == pytest.approx(0.6277411, rel=1e-6)
    # bf16 logits are promoted, uniform over 4 -> ln 4
    uniform = torch.zeros(1, 2, 4, dtype=torch.bfloat16)
    assert entropy_from_logits(uniform, _m([[1, 1]])).item() == pytest.approx(math.log(4), rel=1e-6)


# ---------------------------------------------------------------- critic-free advantages

def test_rloo_two_prompts_three_samples() -> None:
    # group 1: [1, 2, 3], sum 6 -> baselines [(6-1)/2, (6-2)/2, (6-3)/2] = [2.5, 2, 1.5]
    # group 2: [0, 0, 6], sum 6 -> baselines [3, 3, 0]
    adv = rloo_advantages(_t([1.0, 2.0, 3.0, 0.0, 0.0, 6.0]), k=3)
    _approx(adv, [-1.5, 0.0, 1.5, -3.0, -3.0, 6.0])


def test_grpo_two_prompts_three_samples() -> None:
    # group 1: mean 2, population var (1 + 0 + 1)/3 = ⅔, std 0.8164966 -> ±1.2247449
    # group 2: mean 2, deviations [-2, -2, 4], var 24/3 = 8, std 2.8284271
    #          -> [-0.7071068, -0.7071068, 1.4142136]
    adv = grpo_advantages(_t([1.0, 2.0, 3.0, 0.0, 0.0, 6.0]), k=3, eps=0.0)
    _approx(adv, [-1.2247449, 0.0, 1.2247449, -0.7071068, -0.7071068, 1.4142136], rel=1e-6)
    # equal scores in a group give 0, not nan
    _approx(grpo_advantages(_t([5.0, 5.0]), k=2), [0.0, 0.0])


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
def test_group_advantages_reject_bad_k(fn: object) -> None:
    with pytest.raises(ValueError, match="k >= 2"):
        fn(_t([1.0, 2.0]), k=1)  # type: ignore[operator]
    with pytest.raises(ValueError, match="divisible"):
        fn(_t([1.0, 2.0, 3.0]), k=2)  # type: ignore[operator]


def test_broadcast_sequence_advantage() -> None:
    out = broadcast_sequence_advantage(_t([2.0, -1.0]), _m([[1, 1, 1], [1, 0, 0]]))
    _approx(out, [[2.0, 2.0, 2.0], [-1.0, 0.0, 0.0]])


# ---------------------------------------------------------------- KL controllers

def test_adaptive_kl_moves_toward_target_within_clip() -> None:
    # error = clip(kl/6 - 1, -0.2, 0.2); coef *= 1 + error·100/10000
    up = AdaptiveKLController(coef=0.1, target=6.0)
    assert up.update(9.0, 100) == pytest.approx(0.1 * 1.002)     # error 0.5 -> 0.2
    down = AdaptiveKLController(coef=0.1, target=6.0)
    assert down.update(3.0, 100) == pytest.approx(0.1 * 0.998)   # error -0.5 -> -0.2
    small = AdaptiveKLController(coef=0.1, target=6.0)
    assert small.update(6.6, 100) == pytest.approx(0.1 * 1.001)  # error 0.1, unclipped
    # bounded: an enormous or zero KL moves no further than the 0.2 clip
    assert AdaptiveKLController(0.1, 6.0).update(1e9, 100) == pytest.approx(0.1 * 1.002)
    assert AdaptiveKLController(0.1, 6.0).update(0.0, 100) == pytest.approx(0.1 * 0.998)
    # at target it stays; updates compound on the stored coef
    assert AdaptiveKLController(0.1, 6.0).update(6.0, 100) == pytest.approx(0.1)
    assert up.update(9.0, 100) == pytest.approx(0.1 * 1.002**2)
    assert up.coef == pytest.approx(0.1 * 1.002**2)


def test_adaptive_kl_rejects_bad_target() -> None:
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(coef=0.1, target=0.0)


def test_fixed_kl_controller_is_constant() -> None:
    ctl = FixedKLController(coef=0.001)
    assert ctl.update(100.0, 1000) == 0.001
    assert ctl.update(0.0, 1000) == 0.001


# ---------------------------------------------------------------- masked positions

@pytest.mark.parametrize("junk", [1e4, -1e4, float("nan"), float("inf")])
def test_masked_positions_never_change_results(junk: float) -> None:
    g = torch.Generator().manual_seed(1)
    B, T, V = 3, 5, 7
    mask = _m([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0]])

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=F64)

    def spoil(x: torch.Tensor) -> torch.Tensor:
        m = mask if x.dim() == 2 else mask.unsqueeze(-1).expand_as(x)
        return torch.where(m, x, torch.full_like(x, junk))

    logp, old, ref, adv = rnd(B, T) - 2, rnd(B, T) - 2, rnd(B, T) - 2, rnd(B, T)
    values, old_values, rets, logits = rnd(B, T), rnd(B, T), rnd(B, T), rnd(B, T, V)
    scores = rnd(B)

    def run(lp: torch.Tensor, ol: torch.Tensor, rf: torch.Tensor, ad: torch.Tensor,
            va: torch.Tensor, ov: torch.Tensor, rt: torch.Tensor, lg: torch.Tensor) -> list[object]:
        kl = kl_penalty(lp, rf, "k3")
        rewards = token_rewards(scores, kl, mask, kl_coef=0.1)
        a, r = gae(rewards, va, mask, gamma=0.9, lam=0.95)
        pl, ps = policy_loss(lp, ol, ad, mask, clip_eps=0.2)
        vl, vs = value_loss(va, ov, rt, mask, clip_range=0.2)
        return [rewards.tolist(), a.tolist(), r.tolist(), pl.item(), ps, vl.item(), vs,
                entropy_from_logits(lg, mask).item(),
                broadcast_sequence_advantage(scores, mask).tolist()]

    clean = run(logp, old, ref, adv, values, old_values, rets, logits)
    dirty = run(*(spoil(x) for x in (logp, old, ref, adv, values, old_values, rets, logits)))
    assert dirty == clean


def test_policy_loss_gradient_is_zero_at_masked_positions() -> None:
    logp, old, adv, mask = _policy_case()
    logp = torch.where(mask, logp, torch.full_like(logp, 1e4)).requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    loss.backward()
    assert logp.grad is not None and torch.isfinite(loss)
    assert logp.grad[1, 2].item() == 0.0

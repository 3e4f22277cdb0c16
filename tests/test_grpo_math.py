"""Advantages, best-of-n and the PPO-clip loss against float64 references."""

import math

import pytest
import torch

from wan_grpo.grpo.advantages import best_of_n, group_advantages, normalize_in_groups
from wan_grpo.grpo.loss import gaussian_kl, ppo_clip_loss


def test_group_normalisation_reference():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 14.0], dtype=torch.float64)
    out = normalize_in_groups(r, 4, eps=0.0)
    for g in range(2):
        x = r[4 * g : 4 * g + 4].tolist()
        m = sum(x) / 4
        s = math.sqrt(sum((v - m) ** 2 for v in x) / 4)
        assert out[4 * g : 4 * g + 4].tolist() == pytest.approx([(v - m) / s for v in x], rel=1e-12)
    glob = normalize_in_groups(r, 4, global_std=True, eps=0.0)
    assert glob[:4].tolist() == pytest.approx(((r[:4] - r[:4].mean()) / r.std(unbiased=False)).tolist())
    with pytest.raises(ValueError, match="groups of 3"):
        normalize_in_groups(r, 3)


def test_components_combine_by_coefficient_and_clip():
    g = torch.Generator().manual_seed(0)
    rewards = {"VQ": torch.randn(12, generator=g), "MQ": torch.randn(12, generator=g) * 5, "TA": torch.randn(12)}
    coefs = {"VQ": 1.0, "MQ": 0.5, "TA": 0.0}
    adv = group_advantages(rewards, coefs, group_size=4, clip_max=100.0)
    want = normalize_in_groups(rewards["VQ"], 4) + 0.5 * normalize_in_groups(rewards["MQ"], 4)
    torch.testing.assert_close(adv.values, want)
    clipped = group_advantages(rewards, coefs, group_size=4, clip_max=0.5)
    assert clipped.values.abs().max() <= 0.5 and clipped.keep.all()


def test_zero_variance_groups_are_dropped_and_counted():
    r = {"brightness": torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 5.0])}
    kept = group_advantages(r, {"brightness": 1.0}, group_size=3)
    assert kept.dropped_groups == 0 and kept.keep.all() and (kept.values[:3] == 0).all()
    dropped = group_advantages(r, {"brightness": 1.0}, group_size=3, drop_zero_std_groups=True)
    assert dropped.dropped_groups == 1 and dropped.keep.tolist() == [False] * 3 + [True] * 3


def test_best_of_n_selects_within_each_group():
    # group 0 has all the large values; a global argsort would pick only from it
    adv = torch.tensor([5.0, 4.0, 3.0, 2.0, -0.1, 0.2, 0.0, 0.1])
    keep = best_of_n(adv, 4, 2)
    assert keep.tolist() == [True, False, False, True, True, True, False, False]
    assert best_of_n(adv, 4, 0).all()
    with pytest.raises(ValueError, match="even"):
        best_of_n(adv, 4, 3)


def test_ppo_clip_loss_reference():
    lp = torch.tensor([0.0, 0.3, -0.3, 0.3, -0.3], dtype=torch.float64)
    old = torch.zeros(5, dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    eps = 0.1
    loss, stats = ppo_clip_loss(lp, old, adv, eps)
    want = []
    for logp, a in zip(lp.tolist(), adv.tolist()):
        r = math.exp(logp)
        want.append(max(-a * r, -a * min(max(r, 1 - eps), 1 + eps)))
    assert loss.tolist() == pytest.approx(want, rel=1e-12)
    assert stats["clipfrac"].tolist() == [0, 1, 1, 1, 1]
    assert stats["ratio"][0] == 1 and stats["approx_kl"][1] == pytest.approx(0.5 * 0.09)
    # gradient flows only through the unclipped branch
    lp2 = lp.clone().requires_grad_(True)
    ppo_clip_loss(lp2, old, adv, eps)[0].sum().backward()
    assert lp2.grad.tolist() == pytest.approx([-1.0, 0.0, -math.exp(-0.3), math.exp(0.3), 0.0])


def test_gaussian_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    m1 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    m2 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    std = torch.tensor([0.3, 0.7], dtype=torch.float64).view(2, 1, 1)
    kl = gaussian_kl(m1, m2, std)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, std.expand_as(m1)),
                                            torch.distributions.Normal(m2, std.expand_as(m2))).mean(dim=(1, 2))
    torch.testing.assert_close(kl, ref)


def test_groups_without_rewards_stay_out_of_the_global_std_and_the_update():
    """Unscored groups (filled with 0) get advantage 0, are not kept, not counted as zero-variance,
    and do not shrink the batch std (float64 reference over the valid groups only)."""
    r = torch.tensor([3.0, 5.0, 0.0, 0.0, 4.0, 7.0])  # group 1 has no rewards (zero-filled)
    valid = torch.tensor([True, False, True])
    adv = group_advantages({"VQ": r}, {"VQ": 1.0}, group_size=2, global_std=True, drop_zero_std_groups=True,
                           valid_groups=valid)
    pool = torch.tensor([3.0, 5.0, 4.0, 7.0], dtype=torch.float64)
    std = pool.std(unbiased=False).item()
    expected = [(3 - 4) / (std + 1e-4), (5 - 4) / (std + 1e-4), 0.0, 0.0, -1.5 / (std + 1e-4), 1.5 / (std + 1e-4)]
    assert adv.values.tolist() == pytest.approx(expected, rel=1e-6)
    assert adv.keep.tolist() == [True, True, False, False, True, True]
    assert adv.dropped_groups == 0
    # The trainer passes unscored samples as NaN: the same result, nothing non-finite leaks out.
    nan = group_advantages({"VQ": torch.where(valid.repeat_interleave(2), r, torch.tensor(float("nan")))},
                           {"VQ": 1.0}, group_size=2, global_std=True, drop_zero_std_groups=True, valid_groups=valid)
    assert torch.equal(nan.values, adv.values) and torch.equal(nan.keep, adv.keep) and nan.dropped_groups == 0


def test_gaussian_kl_mask_leaves_out_unsampled_positions():
    mean, ref = torch.zeros(2, 3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 2.0]])
    std = torch.ones(2, 3)
    mask = torch.tensor([[0.0, 1.0, 1.0]])  # position 0 is the kept (conditioned) one
    assert gaussian_kl(mean, ref, std, mask).tolist() == pytest.approx([0.0, 2.0])
    assert gaussian_kl(mean, ref, std).tolist() == pytest.approx([1 / 6, 4 / 3])

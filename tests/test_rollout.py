"""Recorded group rollouts: shapes, routing, noise sharing, and on-policy log-prob replay."""

import pytest
import torch

from wan_grpo.grpo.replay import replay_transitions
from wan_grpo.models.denoiser import MoEDenoiser
from wan_grpo.runtime import encode_all
from wan_grpo.sampling.rollout import SamplerConfig, latent_shape, rollout_groups
from wan_grpo.seeding import sample_seed

PROMPTS = ["a cat walking in snow", "a train moving through mountains"]


@pytest.fixture()
def setup(tiny_components):
    import copy

    c = copy.deepcopy(tiny_components)
    cache = encode_all(c, PROMPTS, "", device=torch.device("cpu"), dtype=torch.float32)
    den = MoEDenoiser(c, guidance_scale=4.0, guidance_scale_2=3.0)
    shape = latent_shape(c, width=64, height=48, frame_num=5)
    return c, cache, den, shape


def do_rollout(setup, *, kind="flow", storage=torch.float32, window=None, share=False, seed=0, micro=0):
    c, cache, den, shape = setup
    cfg = SamplerConfig(solver="sde", steps=8, shift=5.0, sde_type=kind, noise_level=0.7, sde_window=window)
    seeds = [sample_seed(seed, 0, g) for g in range(6)]
    traj = rollout_groups(den, cache.get(PROMPTS).repeat_interleave(3, dim=0), cache.get([""]),
                          latent_shape_one=shape, seeds=seeds,
                          noise_seeds=[seeds[g - g % 3] for g in range(6)] if share else None,
                          config=cfg, storage_dtype=storage, micro_batch=micro)
    return traj


def test_trajectory_layout(setup):
    traj = do_rollout(setup)
    assert traj.latents.shape == (6, 9, 16, 2, 6, 8)
    assert traj.log_probs.shape == (6, 8)
    assert traj.experts.tolist().count(0) > 0 and traj.experts.tolist().count(1) > 0
    # routing is by timestep against boundary_ratio * 1000, high-noise steps first
    assert all((t >= 875) == (e == 0) for t, e in zip(traj.timesteps.tolist(), traj.experts.tolist()))
    assert traj.trainable.all() and (traj.log_probs != 0).all()
    assert not torch.equal(traj.latents[0, 0], traj.latents[1, 0])


def test_share_noise_and_window(setup):
    traj = do_rollout(setup, share=True, window=(2, 5))
    assert torch.equal(traj.latents[0, 0], traj.latents[2, 0])
    assert not torch.equal(traj.latents[0, 0], traj.latents[3, 0])
    assert traj.trainable.tolist() == [False, False, True, True, True, False, False, False]
    assert (traj.log_probs[:, ~traj.trainable] == 0).all()
    # Euler steps before the window are deterministic: samples sharing noise agree there.
    assert torch.equal(traj.latents[0, 2], traj.latents[1, 2])
    assert not torch.equal(traj.latents[0, 3], traj.latents[1, 3])


def test_micro_batching_changes_nothing_but_batching(setup):
    full = do_rollout(setup, seed=3)
    again = do_rollout(setup, seed=3)
    assert torch.equal(full.latents, again.latents)
    chunked = do_rollout(setup, seed=3, micro=2)
    # per-sample generators: the same noise whatever the batching; outputs equal up to batched matmul
    assert torch.equal(chunked.latents[:, 0], full.latents[:, 0])
    torch.testing.assert_close(chunked.latents, full.latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked.log_probs, full.log_probs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,storage", [("flow", torch.float32), ("dance", torch.float32),
                                          ("cps", torch.float32), ("flow", torch.bfloat16)])
def test_replayed_log_probs_give_ratio_one(setup, kind, storage):
    c, cache, den, _ = setup
    traj = do_rollout(setup, kind=kind, storage=storage)
    cond = cache.get(PROMPTS).repeat_interleave(3, dim=0)
    uncond = cache.get([""]).expand(6, -1, -1)
    max_dev = 0.0
    for step in range(8):
        if not traj.trainable[step]:
            continue
        # replay in an order and batching different from the rollout's
        samples = torch.tensor([5, 0, 3, 1])
        steps = torch.full((4,), step)
        out = replay_transitions(den, traj, samples, steps, cond[samples], uncond[samples],
                                 expert=int(traj.experts[step]), device=torch.device("cpu"))
        ratio = torch.exp(out.log_prob - traj.log_probs[samples, step])
        max_dev = max(max_dev, (ratio - 1).abs().max().item())
    assert max_dev <= 1e-6
    assert traj.trainable.sum() >= 7


def test_replay_rejects_wrong_expert(setup):
    c, cache, den, _ = setup
    traj = do_rollout(setup)
    with pytest.raises(ValueError, match="expert"):
        replay_transitions(den, traj, torch.tensor([0]), torch.tensor([0]), cache.get(PROMPTS[:1]),
                           cache.get([""]), expert=1, device=torch.device("cpu"))

"""Every random draw of a run is derived from ``--seed`` here, by what it is for, never by rank.

- sample noise, SDE noise and the timestep subset: streams of the sample's seed, a function of its
  GLOBAL index (rollout, position in the rollout), so any world size or micro-batching draws the
  same numbers for it;
- LoRA initialisation: one stream per expert, independent of the model source and of whatever
  consumed the global RNG before (loading a checkpoint folder draws nothing, building one does);
- data order: ``PromptOrder`` seeds its per-epoch shuffle from (seed, epoch);
- everything else (reward plug-ins, libraries): the global RNGs, seeded once at start-up.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch

# Streams of one sample's seed.
INITIAL_NOISE, SDE_NOISE, TIMESTEPS, TRAIN_NOISE = 0, 1, 2, 3


def sample_seed(base_seed: int, rollout_index: int, sample_index: int) -> int:
    """Seed of one sample of one rollout, from its global index."""
    return (int(base_seed) * 1_000_003 + rollout_index) * 100_003 + sample_index


def stream(seed: int, purpose: int) -> torch.Generator:
    """A CPU generator for one purpose of one sample (``INITIAL_NOISE``, ``SDE_NOISE``, ...)."""
    return torch.Generator().manual_seed((4 * int(seed) + purpose) % 2**63)


def lora_init_seed(base_seed: int, expert: int) -> int:
    return (int(base_seed) * 7_919 + 104_729 * (expert + 1)) % 2**63


@contextmanager
def seeded_global_rng(seed: int):
    """Run a block (e.g. peft's adapter initialisation, which draws from the global CPU RNG) with
    the CPU RNG seeded to ``seed``; the caller's RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int(seed))
        yield


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (the same on every rank)."""
    random.seed(seed)
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed) % 2**63)

"""Shapes: a synthetic world of coloured shapes, a verifier reward, prompt splits and a small
pretrained Wan2.2 (``--task shapes``) on which learning can be measured on CPU in minutes."""

from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent / "base"  # the shipped diffusers-format model
# the previous base's VAE (no time compression, narrower): where make shapes-base-full warm-starts its own
VAE_WARM_START = Path(__file__).resolve().parent / "vae_warm_start"

def base_dir() -> Path:
    """BASE_DIR, where --task shapes finds its model when no --ckpt_dir is given; a one-line error naming the
    fix when the folder has lost its model."""
    from wan_grpo.errors import UserError

    if not (BASE_DIR / "model_index.json").is_file():
        raise UserError(f"the Shapes base model is missing from {BASE_DIR}; restore it (git checkout -- "
                        "src/wan_grpo/tasks/shapes/base) or build it with 'make shapes-base-full'")
    return BASE_DIR


# What `wan-grpo train --task shapes` (given explicitly) trains with unless a config file or flag says otherwise:
# DiffusionNFT on both experts, full fine-tuning, six optimizer steps per rollout of 8 prompts x 8 videos with two
# noise draws each, and a KL to the base at weight 1 (`nft-k6-d2-kl1` of benchmarks/shapes_learning.py: the only
# setting whose level-1 validation change is not negative over three seeds; on level-2 validation above nft-k3,
# below nft-k6-d2 without the KL; docs/benchmarks.md). timestep_fraction 1 is also the generic default, listed
# for the whole setting.
TRAIN_DEFAULTS = dict(algorithm="nft", train_experts="both", lora_rank=0, learning_rate=1e-4, timestep_fraction=1.0,
                      train_batch_size=32, optimizer_steps_per_rollout=6, nft_noise_draws=2, kl_coef=1.0,
                      batch_size=8, num_generations=8)


# The reward the default trains on level-2 prompts: the graded shape checks beside accuracy. Chosen per level on
# validation: on level 2 it gains where accuracy alone barely moves; on level 1 it loses the red circles the base
# draws well (docs/benchmarks.md, "Graded shape rewards on level 2"). Prompts of both levels keep accuracy alone.
LEVEL2_SHAPES_COEFS = "accuracy=1,shape=1,fill=1"


def train_defaults(given: dict) -> dict:
    """TRAIN_DEFAULTS for the values a user gave (config file and flags). With `--algorithm grpo` the NFT noise
    draws are left out (GRPO replays its recorded noise; refused as if asked for otherwise) and so is the KL
    weight (measured on NFT's velocity distance; GRPO's KL is on each step's Gaussian, another scale). With NFT
    on level-2 prompts only, the reward's default is LEVEL2_SHAPES_COEFS."""
    if given.get("algorithm", TRAIN_DEFAULTS["algorithm"]) != "nft":
        return {k: v for k, v in TRAIN_DEFAULTS.items() if k not in ("nft_noise_draws", "kl_coef")}
    defaults = dict(TRAIN_DEFAULTS)
    if _trains_shapes(given) and _levels(given.get("prompts")) == {2}:
        defaults["shapes_coefs"] = LEVEL2_SHAPES_COEFS
    return defaults


def _trains_shapes(given: dict) -> bool:
    """Whether the in-process shapes reward is trained, as the trainer decides it (--reward, else the task's)."""
    from wan_grpo.errors import UserError
    from wan_grpo.rewards import reward_names
    from wan_grpo.specs import default_reward

    if given.get("reward_url"):
        return False
    try:
        return "shapes" in reward_names(given.get("reward"), default=default_reward("shapes"))
    except UserError:  # refused later, with its own message
        return False


def _levels(prompts) -> set[int]:
    """The Shapes levels of a --prompts value; empty when it cannot be read or holds a prompt outside the
    grammar (loading it later gives the one-line error)."""
    from wan_grpo.errors import UserError
    from wan_grpo.grpo.data import load_prompt_records
    from wan_grpo.tasks.shapes.world import parse

    if not isinstance(prompts, str):
        return set()
    try:
        return {parse(p).level for p in load_prompt_records(prompts)[0]}
    except UserError:
        return set()

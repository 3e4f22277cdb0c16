"""``wan-grpo train`` settings: flags named as in the official Wan2.2 generate.py where they mean the
same (--ckpt_dir, --size, --frame_num, --offload_model, --t5_cpu, --dit_fsdp, ...) plus ours; the
policy, optimizer and checkpoint fields are shared with ``wan-grpo sft``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from wan_grpo.config import ModelConfig, check_ranges, opt
from wan_grpo.errors import UserError
from wan_grpo.rewards.config import RewardConfig
from wan_grpo.tasks.shapes import train_defaults as shapes_train_defaults

DEFAULT_EPOCHS = 5  # passes over the prompts of a run given neither --max_steps nor --num_epochs


@dataclass
class PolicyConfig(ModelConfig):
    """What trains and how, and where it is saved: shared by ``train`` (GRPO) and ``sft``."""

    train_experts: str = opt("high,low", "Experts to train: high (transformer), low (transformer_2), or both "
                                         "(also written high,low).")
    learning_rate: float = opt(8e-6, "AdamW learning rate of the high-noise expert.", gt=0)
    learning_rate_2: float | None = opt(None, "Learning rate of the low-noise expert (default: --learning_rate).", gt=0)
    weight_decay: float = opt(1e-4, "AdamW weight decay.", ge=0)
    warmup_steps: int = opt(0, "Linear warmup steps.", ge=0)
    lr_schedule: str = opt("constant", "After warmup: constant, or cosine (down to 0 at the run's last optimizer "
                                       "step).", choices=("constant", "cosine"))
    max_grad_norm: float = opt(1.0, "Clip each expert's gradient norm to this (0: off).", ge=0)
    lora_rank: int = opt(32, "LoRA rank on each trained expert; 0: full fine-tuning.", ge=0)
    lora_alpha: float = opt(64.0, "LoRA alpha.", gt=0)
    lora_target_modules: str = opt("to_q,to_k,to_v,to_out.0,ffn.net.0.proj,ffn.net.2",
                                   "Comma-separated module names that get LoRA adapters.")
    init_lora: str | None = opt(None, "Start from an existing LoRA per trained expert: PATH (one expert) or "
                                      "HIGH,LOW; a checkpoint's expert folder, a diffusers LoRA file or a ComfyUI / "
                                      "original-format Wan LoRA file.")
    init_lora_mode: str = opt("train", "train: the LoRA is the trainable adapter's initial value (same --lora_rank); "
                                       "fuse: it is fused into the frozen expert first (e.g. a distilled few-step "
                                       "LoRA for cheap rollouts). Full fine-tuning always fuses.",
                              choices=("train", "fuse"))
    offload_model: bool = opt(False, "Keep only the active expert (and its optimizer state) on the accelerator; "
                                     "the other waits on CPU.")
    gradient_checkpointing: bool | None = opt(None, "Recompute activations in backward to save memory. Default: on for "
                                                    "real checkpoints, off for the small tiny and shapes models.")
    dit_fsdp: bool = opt(False, "Shard every expert with FSDP2 per transformer block; required with more than one "
                                "process.")
    save_dir: str = opt("./grpo_checkpoints", "Run directory: metrics, samples, checkpoints, config.yaml.")
    save_interval: int = opt(0, "Checkpoint every N steps (0: only at the end).", ge=0)
    keep_checkpoints: int = opt(0, "Keep only the newest N checkpoints, deleting older ones after each save (0: "
                                   "keep all).", ge=0)
    log_interval: int = opt(1, "Print a metrics line every N steps (metrics.jsonl gets every step).", ge=0)
    resume: str | None = opt(None, "auto (newest complete checkpoint in --save_dir) or a checkpoint path.")
    tensorboard: bool = opt(True, "Also log metrics to TensorBoard under SAVE_DIR/tb (when --report_to names it).")
    report_to: str = opt("tensorboard", "Where metrics also go besides SAVE_DIR/metrics.jsonl: tensorboard, wandb, "
                                        "tensorboard,wandb or none. W&B (pip install wandb) gets the same scalars, "
                                        "the sample videos and the resolved config; WANDB_MODE=offline needs no "
                                        "network.")
    wandb_project: str = opt("wan-grpo", "W&B project.")
    wandb_run_name: str | None = opt(None, "W&B run name. Default: the --save_dir folder's name.")
    max_steps: int = opt(0, "Stop after this many optimizer steps (0: no limit).", ge=0)


@dataclass
class TrainConfig(RewardConfig, PolicyConfig):
    # defaults an explicit --task brings, below a config file and flags: a setting measured on that task
    TASK_DEFAULTS: ClassVar[dict] = {"shapes": shapes_train_defaults}
    algorithm: str = opt("grpo", "grpo (Flow-GRPO: SDE rollouts with log-probs, PPO-clip) or nft (DiffusionNFT: "
                                 "any solver, trains on the forward process of the clean samples; docs/math.md).",
                         choices=("grpo", "nft"))
    # Data
    prompts: str | None = opt(None, "Prompt file: .txt (one per line) or .jsonl with a 'prompt' field. "
                                    "Default: five built-in prompts (a cat in snow, a sunset, ...).")
    num_epochs: int | None = opt(None, "Passes over the prompt set. Default: as many as --max_steps needs, else "
                                       f"{DEFAULT_EPOCHS}. Given with --max_steps, the run ends at whichever comes "
                                       "first (a warning says when it is --num_epochs).", ge=1)
    batch_size: int = opt(1, "Prompts per rollout.", ge=1)
    num_generations: int = opt(8, "Videos sampled per prompt (the GRPO group size).", ge=2)
    # Rewards and advantages
    adv_clip_max: float = opt(5.0, "Clip advantages to +-this.", gt=0)
    global_std: bool = opt(False, "Normalise by the std of the whole batch instead of each group's.")
    drop_zero_std_groups: bool = opt(False, "Skip groups whose rewards are all equal (counted in metrics).")
    best_of_n: int = opt(0, "Train on the top n/2 and bottom n/2 of each group (DanceGRPO); 0: all.", ge=0)
    # Rollout
    sde_window: str | None = opt(None, "Steps START:END (half-open) that take SDE steps and are trained; "
                                       "Euler elsewhere (Flow-GRPO-Fast, MixGRPO). Default: all steps.")
    share_noise: bool = opt(False, "Same initial noise for every sample of a group (DanceGRPO).")
    sample_solver: str | None = opt(None, "Rollout solver: sde (GRPO's, the only one it takes); nft takes unipc, "
                                          "dpm++, euler or sde. Default: sde for grpo, unipc for nft.",
                                    choices=("sde", "unipc", "dpm++", "euler"))
    rollout_batch_size: int | None = opt(None, "Samples per model call in rollouts (0: all at once). Default: on an "
                                               "accelerator the largest that fits (wan-grpo plan's estimate), else "
                                               "0.", ge=0)
    decode_batch_size: int | None = opt(None, "Videos per VAE decode call after a rollout. Default: on an "
                                              "accelerator the largest that fits, else the preset's (1; 16 for "
                                              "shapes). A short last batch is padded, so a video's "
                                              "pixels never depend on its batch-mates (or the process count).",
                                        ge=1)
    trajectory_dtype: str = opt("fp32", "dtype of stored trajectory latents.", choices=("fp32", "bf16"))
    trajectory_on_cpu: bool = opt(False, "Keep stored trajectories in CPU memory.")
    # Policy update
    timestep_fraction: float = opt(1.0, "Fraction of each sample's trainable steps replayed per update.", gt=0, le=1)
    clip_range: float = opt(1e-4, "PPO clip range epsilon.", gt=0)
    kl_coef: float = opt(0.0, "Weight of the KL to the reference policy (LoRA: adapters disabled).", ge=0)
    ratio_norm: bool = opt(False, "grpo: GRPO-Guard's RatioNorm: the log-ratio times the step's std plus the "
                                  "mean-shift term, so it centres on 0 at every noise level; use a far smaller "
                                  "--clip_range (the paper: 2e-6). Stores each step's mean; docs/math.md.")
    reweight_steps: bool = opt(False, "grpo, with --ratio_norm: GRPO-Guard's per-step loss weight, 1 over the "
                                      "step's d mean/d v (1/abs(dt) for flow), normalised to mean 1, so every step's "
                                      "gradient has the same scale.")
    optimizer_steps_per_rollout: int = opt(1, "Optimizer steps per rollout (1: the rollout is one step).", ge=1)
    nft_beta: float = opt(1.0, "nft: strength b of the implicit positive/negative policies v+- (DiffusionNFT's "
                               "beta).", gt=0)
    nft_noise_draws: int = opt(1, "nft: fresh noise draws per (sample, noise level) in each optimizer step, averaged; "
                                  "more lowers the gradient's variance for that many times the update's passes.",
                               ge=1)
    nft_decay_type: int = opt(1, "nft: schedule of the old policy's soft update old <- d old + (1 - d) new after "
                                 "each rollout, k optimizer steps in: 0 (d = 0), 1 (min(0.001 k, 0.5)), 2 (0 until "
                                 "k = 75, then min(0.0075 (k - 75), 0.999)), as DiffusionNFT.", choices=(0, 1, 2))
    train_batch_size: int | None = opt(None, "Transitions (sample, step) per forward/backward micro-batch. Default: "
                                             "on an accelerator the largest that fits (wan-grpo plan's estimate, "
                                             "90% of its memory), else 4.", ge=1)
    # Distributed (README "Many GPUs")
    t5_fsdp: bool = opt(False, "Accepted for command lines written for Wan2.2's generate.py: the text encoder "
                               "runs once per distinct prompt and is freed, so there is nothing to shard.")
    ulysses_size: int = opt(1, "Ulysses sequence parallelism: split each video's tokens over this many ranks "
                               "(diffusers context parallelism; CUDA only, needs --dit_fsdp). Must divide the "
                               "process count, the attention heads and the tokens per video.", ge=1)
    # Output
    sample_interval: int = opt(0, "Write the first rollout video of every N-th step to samples/ (0: off).", ge=0)
    eval_interval: int = opt(0, "Every N rollouts, sample --eval_prompts deterministically (UniPC, fixed seeds) "
                                "and log eval_<component>_mean (0: off).", ge=0)
    eval_prompts: str | None = opt(None, "Held-out prompts for --eval_interval (.txt or .jsonl).")

    def __post_init__(self):
        """Cross-field checks, as TRL's GRPOConfig does: a bad combination fails where it is made, in one
        line that names the fix. Checks that read files or the checkpoint live in grpo/checks.py."""
        check_ranges(self)  # first: the checks below divide by and compare the fields
        if self.best_of_n and (self.best_of_n % 2 or self.best_of_n > self.num_generations):
            raise UserError(f"--best_of_n {self.best_of_n} must be even and <= --num_generations "
                            f"({self.num_generations})")
        if self.algorithm == "grpo" and self.sample_solver not in (None, "sde"):
            raise UserError(f"--sample_solver {self.sample_solver}: GRPO needs the log-probs of SDE steps; use sde, "
                            "or --algorithm nft for any solver")
        if self.algorithm == "nft" and self.share_noise and self.rollout_solver != "sde":
            raise UserError(f"--share_noise with the deterministic --sample_solver {self.rollout_solver} makes every "
                            "video of a group the same; drop --share_noise")
        if self.algorithm == "nft" and self.offload_model:
            raise UserError("--offload_model is not supported with --algorithm nft yet; drop it or use --dit_fsdp")
        if self.algorithm != "grpo" and (self.ratio_norm or self.reweight_steps):
            raise UserError("--ratio_norm and --reweight_steps are GRPO-Guard options for --algorithm grpo; drop them")
        if self.algorithm != "nft" and self.nft_noise_draws > 1:
            raise UserError("--nft_noise_draws is for --algorithm nft (GRPO replays its recorded noise); drop it")
        if self.reweight_steps and not self.ratio_norm:
            raise UserError("--reweight_steps evens out the steps' gradients under RatioNorm; add --ratio_norm true "
                            "or drop it")
        if self.noise_level == 0 and self.rollout_solver == "sde" and self.algorithm == "grpo":
            raise UserError("--noise_level 0 makes every step deterministic, so nothing can be trained; use e.g. "
                            "0.7 (flow) or 0.3 (dance)")
        k = self.optimizer_steps_per_rollout
        if self.max_steps % k:
            lower, upper = self.max_steps // k * k, (self.max_steps // k + 1) * k
            raise UserError(f"--max_steps {self.max_steps} is not a multiple of --optimizer_steps_per_rollout {k} "
                            f"(a rollout's optimizer steps are never split); use {lower or upper} or {upper}")
        if self.offload_model and (self.dit_fsdp or (self.kl_coef > 0 and self.lora_rank == 0)):
            raise UserError("--offload_model works without --dit_fsdp and, for KL, with LoRA; drop one of them "
                            "(for KL: --lora_rank or --kl_coef 0)")
        if self.dit_fsdp and self.kl_coef > 0 and self.lora_rank == 0:
            raise UserError("--kl_coef with full fine-tuning under --dit_fsdp is not supported; use LoRA "
                            "(--lora_rank) or --kl_coef 0")
        if self.eval_interval and not self.eval_prompts:
            raise UserError("--eval_interval needs --eval_prompts (a held-out prompt file)")

    @property
    def rollout_solver(self) -> str:
        """--sample_solver, or its default: sde for GRPO, unipc for NFT."""
        return self.sample_solver or ("sde" if self.algorithm == "grpo" else "unipc")

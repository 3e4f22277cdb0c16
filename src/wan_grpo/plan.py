"""``wan-grpo plan``: accelerator memory per process for a training configuration, loading nothing.

Parameter counts are exact: the official expert architecture is built on the ``meta`` device
with diffusers' own class (and peft's LoRA layers), so no weights are read or allocated.

Terms per process (bytes; N = processes sharding with --dit_fsdp, else 1):
- frozen weights: 2 per parameter (bf16) of every expert not fully fine-tuned, / N
- trained weights (full fine-tuning): 4 (fp32 master) + 4 (fp32 gradient) per parameter, / N
- optimizer (AdamW): 8 per trainable parameter (fp32 first and second moments), / N
- LoRA: 4 (fp32 weight) + 4 (gradient) + 8 (AdamW) per adapter parameter, / N
- --algorithm nft: 4 per trainable parameter (the old policy's fp32 copy), / N
- activations (an estimate, not exact): with gradient checkpointing, one block's input kept per
  block plus one block's working set, for the 2x batch of CFG, bf16.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from wan_grpo.config import ModelConfig, check_ranges, opt, parse_size
from wan_grpo.errors import UserError
from wan_grpo.grpo.policy import lora_targets, train_expert_indices
from wan_grpo.models.loading import checkpoint_info
from wan_grpo.specs import ARCHITECTURES, PRESETS, Expert

GIB = 2**30


@dataclass
class PlanConfig(ModelConfig):
    lora_rank: int = opt(32, "LoRA rank (0: full fine-tuning).", ge=0)
    lora_target_modules: str = opt("to_q,to_k,to_v,to_out.0,ffn.net.0.proj,ffn.net.2", "LoRA target modules.")
    train_experts: str = opt("high,low", "Experts trained: high, low, both (or high,low).")
    nproc: int = opt(1, "Processes sharding the experts with FSDP2 (--dit_fsdp); 1: no sharding.", ge=1)
    train_batch_size: int = opt(4, "Transitions per forward/backward micro-batch.", ge=1)
    algorithm: str = opt("grpo", "grpo, or nft (which keeps an fp32 copy of the trained weights: the old policy).",
                         choices=("grpo", "nft"))


def count_parameters(config: dict, *, lora_rank: int, targets: list[str]) -> tuple[int, int]:
    """(parameters of one expert, LoRA parameters of one expert) of a WanTransformer3DModel config."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
        base = sum(p.numel() for p in model.parameters())
        lora = 0
        if lora_rank > 0:
            from peft import LoraConfig

            try:
                model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=targets))
            except ValueError as exc:  # peft: no module matches a target
                raise UserError(f"--lora_target_modules {','.join(targets)!r}: {str(exc).splitlines()[0]}; name "
                                "Linear layers of WanTransformer3DModel, e.g. to_q,to_k,to_v,to_out.0") from None
            lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return base, lora


def checkpoint_architecture(ckpt_dir: str) -> tuple[str, dict, int]:
    """(task, expert config, experts) of a checkpoint folder, read from its config files only."""
    from diffusers import WanTransformer3DModel


    info = checkpoint_info(ckpt_dir)
    experts = int(info.has_high) + int(info.has_low)
    root = Path(ckpt_dir)
    sub = next((e.diffusers_dir for e in Expert if (root / e.diffusers_dir / "config.json").is_file()), None)
    if (root / "model_index.json").is_file() and sub is not None:
        config = {k: v for k, v in WanTransformer3DModel.load_config(str(root / sub)).items() if not k.startswith("_")}
        return info.task, config, experts
    if info.task not in ARCHITECTURES:
        raise UserError(f"--ckpt_dir {ckpt_dir}: plan knows the architectures of {', '.join(ARCHITECTURES)}")
    return info.task, ARCHITECTURES[info.task].dit_config(), experts


def estimate(cfg: PlanConfig) -> dict:
    check_ranges(cfg)
    if cfg.ckpt_dir:
        task, config, n_experts = checkpoint_architecture(cfg.ckpt_dir)
        if cfg.task is not None and cfg.task != task:
            raise UserError(f"--task {cfg.task} does not match --ckpt_dir {cfg.ckpt_dir} (a {task}); drop --task")
    else:
        task = cfg.task or "t2v-A14B"
        if task not in ARCHITECTURES:
            raise UserError(f"--task {task}: plan knows {', '.join(ARCHITECTURES)} (or pass --ckpt_dir)")
        config, n_experts = ARCHITECTURES[task].dit_config(), ARCHITECTURES[task].experts
    preset = PRESETS[task]
    width, height = parse_size(preset.size if cfg.size is None else cfg.size)
    frames = preset.frame_num if cfg.frame_num is None else cfg.frame_num
    n_trained = len(train_expert_indices(cfg.train_experts, (True, n_experts == 2)))
    targets = lora_targets(cfg.lora_target_modules)
    ts, hs, ws = ARCHITECTURES[task].vae_stride if task in ARCHITECTURES else (1, 8, 8)
    patch = config.get("patch_size", (1, 2, 2))
    if width < 1 or height < 1 or width % (ws * patch[2]) or height % (hs * patch[1]):
        raise UserError(f"--size {width}*{height} is not divisible by the VAE stride times patch size "
                        f"({ws * patch[2]}*{hs * patch[1]}); use e.g. {preset.size}")
    if (frames - 1) % ts:
        raise UserError(f"--frame_num {frames} is not {ts}k+1; use e.g. {(frames - 1) // ts * ts + 1}")
    per_expert, lora = count_parameters(config, lora_rank=cfg.lora_rank, targets=targets)
    n = cfg.nproc
    full = cfg.lora_rank == 0
    frozen_experts = n_experts - (n_trained if full else 0)
    terms = {
        "frozen_weights": frozen_experts * per_expert * 2 / n,
        "trained_weights_and_grads": (n_trained * per_expert * (4 + 4) / n) if full else 0.0,
        "optimizer": n_trained * (per_expert if full else lora) * 8 / n,
        "lora_weights_and_grads": 0.0 if full else n_trained * lora * (4 + 4) / n,
        "nft_old_policy": n_trained * (per_expert if full else lora) * 4 / n if cfg.algorithm == "nft" else 0.0,
    }
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    seq = ((frames - 1) // ts + 1) * (height // hs // patch[1]) * (width // ws // patch[2])
    tokens = 2 * cfg.train_batch_size * seq  # CFG doubles the batch
    per_block_working = tokens * (12 * dim + 2 * config["ffn_dim"]) * 2
    terms["activations_estimate"] = config["num_layers"] * tokens * dim * 2 + per_block_working
    return {"task": task, "size": f"{width}*{height}", "frames": frames, "tokens_per_sample": seq,
            "params_per_expert": per_expert, "lora_params_per_expert": lora, "experts_trained": n_trained,
            "nproc": n, "lora_rank": cfg.lora_rank, "bytes": terms, "total_bytes": sum(terms.values())}


def describe(est: dict) -> list[str]:
    mode = "full fine-tuning" if est["lora_rank"] == 0 else f"LoRA r{est['lora_rank']}"
    lines = [f"{est['task']}, {est['size']} x {est['frames']} frames ({est['tokens_per_sample']} tokens per sample), "
             f"{mode}, {est['experts_trained']} expert(s) trained, {est['nproc']} process(es)",
             f"parameters per expert: {est['params_per_expert']:,}; LoRA parameters per expert: "
             f"{est['lora_params_per_expert']:,}"]
    lines += [f"  {name:28s} {value / GIB:10.2f} GiB" for name, value in est["bytes"].items()]
    lines.append(f"  {'total per process':28s} {est['total_bytes'] / GIB:10.2f} GiB")
    return lines


def train_estimate(cfg, *, nproc: int) -> list[str]:
    """The plan for a resolved TrainConfig, as ``train`` prints it at start-up."""
    return describe(estimate(PlanConfig(task=cfg.task, ckpt_dir=cfg.ckpt_dir, size=cfg.size, frame_num=cfg.frame_num,
                                        lora_rank=cfg.lora_rank, lora_target_modules=cfg.lora_target_modules,
                                        train_experts=cfg.train_experts, nproc=nproc,
                                        train_batch_size=cfg.train_batch_size, algorithm=cfg.algorithm)))


def run_plan(cfg: PlanConfig) -> dict:
    est = estimate(cfg)
    print("\n".join(describe(est)))
    return est

"""``wan-grpo plan``: accelerator memory per process for a training configuration, loading nothing.

Parameter counts are exact: the official expert architecture is built on the ``meta`` device
with diffusers' own class (and peft's LoRA layers), so no weights are read or allocated.

Terms per process (bytes; N = processes sharding with --dit_fsdp, else 1):
- frozen weights: 2 per parameter (bf16) of every expert not fully fine-tuned, / N
- trained weights (full fine-tuning): 4 (fp32 master) + 4 (fp32 gradient) per parameter, / N
- optimizer (AdamW): 8 per trainable parameter (fp32 first and second moments), / N
- LoRA: 4 (fp32 weight) + 4 (gradient) + 8 (AdamW) per adapter parameter, / N
- activations (an estimate, not exact): with gradient checkpointing, one block's input kept per
  block plus one block's working set, for the 2x batch of CFG, bf16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wan_grpo.config import ModelConfig, opt, parse_size
from wan_grpo.errors import UserError
from wan_grpo.presets import PRESETS

GIB = 2**30
# Official DiT configs (Wan-Video/Wan2.2 wan/configs), in diffusers' WanTransformer3DModel terms.
ARCH = {
    "t2v-A14B": dict(num_attention_heads=40, attention_head_dim=128, in_channels=16, ffn_dim=13824, num_layers=40),
    "i2v-A14B": dict(num_attention_heads=40, attention_head_dim=128, in_channels=36, ffn_dim=13824, num_layers=40),
    "ti2v-5B": dict(num_attention_heads=24, attention_head_dim=128, in_channels=48, ffn_dim=14336, num_layers=30),
}
EXPERTS = {"t2v-A14B": 2, "i2v-A14B": 2, "ti2v-5B": 1}
VAE_STRIDE = {"t2v-A14B": (4, 8, 8), "i2v-A14B": (4, 8, 8), "ti2v-5B": (4, 16, 16)}


@dataclass
class PlanConfig(ModelConfig):
    lora_rank: int = opt(32, "LoRA rank (0: full fine-tuning).", ge=0)
    lora_target_modules: str = opt("to_q,to_k,to_v,to_out.0,ffn.net.0.proj,ffn.net.2", "LoRA target modules.")
    train_experts: str = opt("high,low", "Experts trained: high, low or both.")
    nproc: int = opt(1, "Processes sharding the experts with FSDP2 (--dit_fsdp); 1: no sharding.", ge=1)
    train_batch_size: int = opt(4, "Transitions per forward/backward micro-batch.", ge=1)


def count_parameters(task: str, *, lora_rank: int, targets: list[str]) -> tuple[int, int]:
    """(parameters of one expert, LoRA parameters of one expert) for the official architecture."""
    from diffusers import WanTransformer3DModel

    arch = ARCH[task]
    with torch.device("meta"):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), out_channels=arch["in_channels"] if task == "ti2v-5B"
                                      else 16, text_dim=4096, freq_dim=256, **arch)
        base = sum(p.numel() for p in model.parameters())
        lora = 0
        if lora_rank > 0:
            from peft import LoraConfig

            model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=targets))
            lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return base, lora


def estimate(cfg: PlanConfig) -> dict:
    task = cfg.task or "t2v-A14B"
    if task not in ARCH:
        raise UserError(f"--task {task}: plan knows {', '.join(ARCH)}")
    if cfg.nproc < 1:
        raise UserError("--nproc must be >= 1")
    preset = PRESETS[task]
    width, height = parse_size(cfg.size or preset.size)
    frames = cfg.frame_num or preset.frame_num
    trained = [e for e in cfg.train_experts.split(",") if e.strip()]
    n_trained = min(len(trained), EXPERTS[task])
    targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
    per_expert, lora = count_parameters(task, lora_rank=cfg.lora_rank, targets=targets)
    n = cfg.nproc
    full = cfg.lora_rank == 0
    frozen_experts = EXPERTS[task] - (n_trained if full else 0)
    terms = {
        "frozen_weights": frozen_experts * per_expert * 2 / n,
        "trained_weights_and_grads": (n_trained * per_expert * (4 + 4) / n) if full else 0.0,
        "optimizer": n_trained * (per_expert if full else lora) * 8 / n,
        "lora_weights_and_grads": 0.0 if full else n_trained * lora * (4 + 4) / n,
    }
    ts, hs, ws = VAE_STRIDE[task]
    arch = ARCH[task]
    dim = arch["num_attention_heads"] * arch["attention_head_dim"]
    seq = ((frames - 1) // ts + 1) * (height // hs // 2) * (width // ws // 2)
    tokens = 2 * cfg.train_batch_size * seq  # CFG doubles the batch
    per_block_working = tokens * (12 * dim + 2 * arch["ffn_dim"]) * 2
    terms["activations_estimate"] = arch["num_layers"] * tokens * dim * 2 + per_block_working
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
    return describe(estimate(PlanConfig(task=cfg.task, size=cfg.size, frame_num=cfg.frame_num,
                                        lora_rank=cfg.lora_rank, lora_target_modules=cfg.lora_target_modules,
                                        train_experts=cfg.train_experts, nproc=nproc,
                                        train_batch_size=cfg.train_batch_size)))


def run_plan(cfg: PlanConfig) -> dict:
    est = estimate(cfg)
    print("\n".join(describe(est)))
    return est

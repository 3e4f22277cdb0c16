"""``wan-grpo plan``: accelerator memory per process for a training configuration, loading nothing.

Parameter counts are exact: the official expert architecture is built on the ``meta`` device
with diffusers' own class (and peft's LoRA layers), so no weights are read or allocated.

Terms per process (bytes; N = processes sharding with --dit_fsdp, else 1; b = 2 under
--mixed_precision bf16, the default for accelerators, 4 under fp32):
- frozen weights: b per parameter of every expert not fully fine-tuned, / N (--offload_model: one expert)
- trained weights (full fine-tuning): 4 (fp32 master) + 4 (fp32 gradient) per parameter, / N
- optimizer (AdamW): 8 per trainable parameter (fp32 first and second moments), / N
- LoRA: 4 (fp32 weight) + 4 (gradient) + 8 (AdamW) per adapter parameter, / N
- --algorithm nft: 4 per trainable parameter (the old policy's fp32 copy), / N
- --kl_coef with full fine-tuning: b per trained parameter (the frozen reference copy), / N
- trajectory (GRPO): every local sample's T+1 latents in fp32, and with --ratio_norm its T step
  means (0 with --trajectory_on_cpu); under --ulysses_size K a rank holds K times the samples
- phases, of which only the largest is live at once (estimates, not exact):
  - activations (update): with gradient checkpointing, one block's input kept per block plus one
    block's working set (without it: every block's working set), for the 2x batch of CFG, b bytes;
  - rollout activations: one block's working set and the hidden states for --rollout_batch_size
    samples (0: all of the process's samples) times 2 for CFG, bf16, no gradients;
  - VAE decode: --decode_batch_size videos, each holding 3 fp32 tensors (the VAE runs in fp32) of
    the decoder's widest full-resolution activation for 4 frames at a time (its causal chunk).
Not counted: the reward model (VideoAlign) when it shares the device, and the CUDA context.

``auto_batch_sizes`` picks, for a device's memory, the largest micro-batches whose peak fits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

import torch

from wan_grpo.config import ModelConfig, check_ranges, opt, parse_size
from wan_grpo.errors import UserError
from wan_grpo.grpo.policy import lora_targets, train_expert_indices, use_gradient_checkpointing
from wan_grpo.models.files import read_json
from wan_grpo.models.loading import checkpoint_info
from wan_grpo.specs import ARCHITECTURES, PRESETS, Expert

GIB = 2**30


def _shapes_defaults(given: dict) -> dict:
    """What train --task shapes trains with (NFT, full fine-tuning, 8 x 8, ...), for the settings plan has."""
    from wan_grpo.tasks.shapes import train_defaults

    names = {f.name for f in fields(PlanConfig)}
    return {k: v for k, v in train_defaults(given).items() if k in names}


@dataclass
class PlanConfig(ModelConfig):
    TASK_DEFAULTS: ClassVar[dict] = {"shapes": _shapes_defaults}
    lora_rank: int = opt(32, "LoRA rank (0: full fine-tuning).", ge=0)
    lora_target_modules: str = opt("to_q,to_k,to_v,to_out.0,ffn.net.0.proj,ffn.net.2", "LoRA target modules.")
    train_experts: str = opt("high,low", "Experts trained: high, low, both (or high,low).")
    nproc: int = opt(1, "Processes sharding the experts with FSDP2 (--dit_fsdp); 1: no sharding.", ge=1)
    train_batch_size: int = opt(4, "Transitions per forward/backward micro-batch.", ge=1)
    algorithm: str = opt("grpo", "grpo, or nft (which keeps an fp32 copy of the trained weights: the old policy).",
                         choices=("grpo", "nft"))
    batch_size: int = opt(1, "Prompts per rollout (train --batch_size).", ge=1)
    num_generations: int = opt(8, "Videos per prompt (train --num_generations).", ge=1)
    rollout_batch_size: int = opt(0, "Samples per model call in rollouts (0: all of a process's samples).", ge=0)
    decode_batch_size: int | None = opt(None, "Videos per VAE decode call. Default: the preset's.", ge=1)
    trajectory_on_cpu: bool = opt(False, "Stored trajectories in CPU memory (not counted).")
    offload_model: bool = opt(False, "Only the active expert on the accelerator (train --offload_model).")
    gradient_checkpointing: bool = opt(True, "Activations recomputed in backward (train's default for real models).")
    ratio_norm: bool = opt(False, "GRPO-Guard's RatioNorm: the trajectory also keeps each step's mean.")
    kl_coef: float = opt(0.0, "With full fine-tuning a frozen reference copy of the trained experts is kept.", ge=0)
    ulysses_size: int = opt(1, "Ulysses sequence parallelism: ranks sharing each video's tokens.", ge=1)
    device_memory_gib: float | None = opt(None, "Also pick the largest --train_batch_size, --rollout_batch_size and "
                                                "--decode_batch_size whose peak fits this much memory per process "
                                                "(90% of it), as train does on an accelerator.", gt=0)


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


def vae_stride(ckpt_dir: str | None, task: str) -> tuple[int, int, int]:
    """(time, height, width) compression of the VAE: a diffusers-format folder's vae/config.json, a key it leaves
    out (or a folder without one) from the task's architecture, else diffusers' default (4, 8). The task alone
    cannot say: the previous Shapes VAE (vae_warm_start) did not compress time, the shipped one does."""
    known = ARCHITECTURES[task].vae_stride if task in ARCHITECTURES else (4, 8, 8)
    path = Path(ckpt_dir) / "vae" / "config.json" if ckpt_dir else None
    if path is None or not path.is_file():
        return known
    config = read_json(path)
    t, s = config.get("scale_factor_temporal") or known[0], config.get("scale_factor_spatial") or known[1]
    return int(t), int(s), int(s)


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
    if cfg.task == "shapes" and not cfg.ckpt_dir:  # the shipped base, as train and eval use it
        from wan_grpo.tasks.shapes import base_dir

        cfg = replace(cfg, ckpt_dir=str(base_dir()))
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
    ts, hs, ws = vae_stride(cfg.ckpt_dir, task)
    patch = config.get("patch_size", (1, 2, 2))
    if width % (ws * patch[2]) or height % (hs * patch[1]):  # parse_size already refused sides below 1
        raise UserError(f"--size {width}*{height} is not divisible by the VAE stride times patch size "
                        f"({ws * patch[2]}*{hs * patch[1]}); use e.g. {preset.size}")
    if (frames - 1) % ts:
        raise UserError(f"--frame_num {frames} is not {ts}k+1; use e.g. {(frames - 1) // ts * ts + 1}")
    per_expert, lora = count_parameters(config, lora_rank=cfg.lora_rank, targets=targets)
    n = cfg.nproc
    full = cfg.lora_rank == 0
    b = 4 if cfg.mixed_precision == "fp32" else 2
    frozen_experts = n_experts - (n_trained if full else 0)
    if cfg.offload_model:  # one expert (and what trains of it) on the device at a time
        frozen_experts, n_trained = min(frozen_experts, 0 if full else 1), 1
    terms = {
        "frozen_weights": frozen_experts * per_expert * b / n,
        "trained_weights_and_grads": (n_trained * per_expert * (4 + 4) / n) if full else 0.0,
        "optimizer": n_trained * (per_expert if full else lora) * 8 / n,
        "lora_weights_and_grads": 0.0 if full else n_trained * lora * (4 + 4) / n,
        "nft_old_policy": n_trained * (per_expert if full else lora) * 4 / n if cfg.algorithm == "nft" else 0.0,
        "kl_reference": n_trained * per_expert * b / n if full and cfg.kl_coef > 0 else 0.0,
    }
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    latent_frames = (frames - 1) // ts + 1
    seq = latent_frames * (height // hs // patch[1]) * (width // ws // patch[2])
    shape = Shape(seq=seq, dim=dim, ffn=config["ffn_dim"], layers=config["num_layers"],
                  latent=config["out_channels"] * latent_frames * (height // hs) * (width // ws),
                  steps=preset.sampling_steps if cfg.sampling_steps is None else cfg.sampling_steps,
                  decode=(ARCHITECTURES[task].vae_decode_features if task in ARCHITECTURES else (32, 1)),
                  frames=frames, pixels=width * height, bytes=b, checkpointing=cfg.gradient_checkpointing)
    samples = max(1, cfg.batch_size * cfg.num_generations * cfg.ulysses_size // n)  # this process's samples
    kept = shape.steps + 1 + (shape.steps if cfg.ratio_norm else 0)
    terms["trajectory"] = 0.0 if cfg.trajectory_on_cpu or cfg.algorithm == "nft" else \
        samples * kept * shape.latent * 4
    terms["activations_estimate"] = train_activations(shape, cfg.train_batch_size)
    terms["rollout_activations_estimate"] = rollout_activations(shape, cfg.rollout_batch_size or samples)
    decode = cfg.decode_batch_size or preset.decode_batch_size
    terms["vae_decode_estimate"] = vae_decode(shape, decode)
    est = {"task": task, "size": f"{width}*{height}", "frames": frames, "tokens_per_sample": seq,
           "params_per_expert": per_expert, "lora_params_per_expert": lora, "experts_trained": n_trained,
           "nproc": n, "lora_rank": cfg.lora_rank, "bytes": terms, "total_bytes": peak(terms),
           "samples_per_process": samples, "shape": shape}
    if cfg.device_memory_gib is not None:
        est["auto"] = auto_batch_sizes(est, cfg.device_memory_gib * GIB)
    return est


@dataclass(frozen=True)
class Shape:
    """What the activation estimates need: tokens per sample, model width, latent and video sizes."""

    seq: int
    dim: int
    ffn: int
    layers: int
    latent: int  # latent elements per sample
    steps: int
    decode: tuple[int, int]  # the VAE decoder's widest full-resolution activation: channels, pixels per pixel
    frames: int
    pixels: int
    bytes: int = 2  # per activation element: 2 under bf16, 4 under fp32
    checkpointing: bool = True


STATIC = ("frozen_weights", "trained_weights_and_grads", "optimizer", "lora_weights_and_grads", "nft_old_policy",
          "kl_reference", "trajectory")
PHASES = ("activations_estimate", "rollout_activations_estimate", "vae_decode_estimate")
MARGIN = 0.9  # auto batch sizes leave 10% of the device for the allocator's fragmentation and CUDA context


def train_activations(s: Shape, batch: int) -> float:
    tokens = 2 * batch * s.seq  # CFG doubles the batch
    working = tokens * (12 * s.dim + 2 * s.ffn) * s.bytes
    if not s.checkpointing:
        return s.layers * working
    return s.layers * tokens * s.dim * s.bytes + working


def rollout_activations(s: Shape, batch: int) -> float:
    tokens = 2 * batch * s.seq
    return 2 * tokens * s.dim * s.bytes + tokens * (12 * s.dim + 2 * s.ffn) * s.bytes


def vae_decode(s: Shape, batch: int) -> float:
    channels, per_pixel = s.decode
    return batch * 3 * channels * min(4, s.frames) * s.pixels / per_pixel * 4  # the VAE runs in fp32


def peak(terms: dict) -> float:
    """What is held throughout plus the largest phase: rollout, update and decode never overlap."""
    return sum(terms[k] for k in STATIC if k in terms) + max(terms.get(k, 0.0) for k in PHASES)


PHASE_OF = {"train_batch_size": train_activations, "rollout_batch_size": rollout_activations,
            "decode_batch_size": vae_decode}


def auto_batch_sizes(est: dict, memory: float, keys=tuple(PHASE_OF)) -> dict:
    """The largest micro-batches named in ``keys`` (each phase alone, since they never overlap) whose
    peak stays within MARGIN of ``memory`` bytes per process; a one-line error when not even batches
    of 1 fit."""
    s, terms = est["shape"], est["bytes"]
    budget = MARGIN * memory - sum(terms[k] for k in STATIC)
    need = {k: PHASE_OF[k](s, 1) for k in keys}
    if budget < max(need.values()):
        held = sum(terms[k] for k in STATIC)
        fixes = ["LoRA (--lora_rank 32)"] if est["lora_rank"] == 0 else []
        fixes += ["--trajectory_on_cpu"] if terms["trajectory"] > 0 else []
        fixes += ["more processes with --dit_fsdp", "a smaller --size or --frame_num",
                  f"set {' '.join('--' + k for k in keys)} yourself"]
        raise UserError(f"nothing fits in {memory / GIB:.0f} GiB per process: the weights, optimizer and trajectory "
                        f"take {held / GIB:.1f} GiB and a batch of 1 needs {max(need.values()) / GIB:.1f} GiB more; "
                        f"use {', '.join(fixes[:-1])} or {fixes[-1]}")

    def largest(cost, limit: int) -> int:
        n = 1
        while n < limit and cost(n + 1) <= budget:
            n += 1
        return n

    limits = {"train_batch_size": 1024, "rollout_batch_size": est["samples_per_process"],
              "decode_batch_size": est["samples_per_process"]}
    return {k: largest(lambda b, phase=PHASE_OF[k]: phase(s, b), limits[k]) for k in keys}


def describe(est: dict) -> list[str]:
    mode = "full fine-tuning" if est["lora_rank"] == 0 else f"LoRA r{est['lora_rank']}"
    lines = [f"{est['task']}, {est['size']} x {est['frames']} frames ({est['tokens_per_sample']} tokens per sample), "
             f"{mode}, {est['experts_trained']} expert(s) trained, {est['nproc']} process(es)",
             f"parameters per expert: {est['params_per_expert']:,}; LoRA parameters per expert: "
             f"{est['lora_params_per_expert']:,}"]
    lines += [f"  {name:28s} {value / GIB:10.2f} GiB" for name, value in est["bytes"].items()]
    lines.append(f"  {'peak per process':28s} {est['total_bytes'] / GIB:10.2f} GiB  (held terms + the largest phase)")
    if "auto" in est:
        lines.append("largest batches that fit: " + ", ".join(f"--{k} {v}" for k, v in est["auto"].items()))
    return lines


def train_plan(cfg, *, nproc: int) -> dict:
    """The plan of a resolved TrainConfig (unset batch sizes at their CPU defaults)."""
    return estimate(PlanConfig(
        task=cfg.task, ckpt_dir=cfg.ckpt_dir, size=cfg.size, frame_num=cfg.frame_num,
        sampling_steps=cfg.sampling_steps, lora_rank=cfg.lora_rank, lora_target_modules=cfg.lora_target_modules,
        train_experts=cfg.train_experts, nproc=nproc, train_batch_size=cfg.train_batch_size or CPU_TRAIN_BATCH,
        algorithm=cfg.algorithm, batch_size=cfg.batch_size, num_generations=cfg.num_generations,
        rollout_batch_size=cfg.rollout_batch_size or 0, decode_batch_size=cfg.decode_batch_size,
        trajectory_on_cpu=cfg.trajectory_on_cpu, mixed_precision=cfg.mixed_precision, offload_model=cfg.offload_model,
        gradient_checkpointing=use_gradient_checkpointing(cfg), ratio_norm=cfg.ratio_norm, kl_coef=cfg.kl_coef,
        ulysses_size=cfg.ulysses_size))


def train_estimate(cfg, *, nproc: int) -> list[str]:
    """The plan for a resolved TrainConfig, as ``train`` prints it at start-up."""
    return describe(train_plan(cfg, nproc=nproc))


CPU_TRAIN_BATCH = 4  # --train_batch_size when unset and not on an accelerator


def resolve_batch_sizes(cfg, *, nproc: int, device_memory: float | None):
    """Unset (None) --train_batch_size / --rollout_batch_size / --decode_batch_size: on an accelerator
    (``device_memory`` bytes per process) the largest that fit by plan's estimate, else the CPU
    defaults (4, all samples at once, the preset's). Returns the config and what was chosen."""
    unset = {k for k in ("train_batch_size", "rollout_batch_size", "decode_batch_size") if getattr(cfg, k) is None}
    if not unset:
        return cfg, {}
    if device_memory is None:
        chosen = {"train_batch_size": CPU_TRAIN_BATCH, "rollout_batch_size": 0,
                  "decode_batch_size": PRESETS[cfg.task].decode_batch_size}
    else:
        chosen = auto_batch_sizes(train_plan(cfg, nproc=nproc), device_memory, keys=tuple(sorted(unset)))
    chosen = {k: v for k, v in chosen.items() if k in unset}
    return replace(cfg, **chosen), chosen


def run_plan(cfg: PlanConfig) -> dict:
    est = estimate(cfg)
    print("\n".join(describe(est)))
    return est

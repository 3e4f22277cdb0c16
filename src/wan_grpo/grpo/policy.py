"""The trainable part: which experts train, LoRA or full fine-tuning, optimizer and LR schedule."""

from __future__ import annotations

import copy
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from diffusers.training_utils import cast_training_params

from wan_grpo.distributed.parallelize import shard_expert
from wan_grpo.errors import UserError
from wan_grpo.grpo.init_lora import copy_into_adapter, fuse_into, init_lora_paths
from wan_grpo.runtime import resolve_precision
from wan_grpo.seeding import lora_init_seed, seeded_global_rng
from wan_grpo.specs import EXPERT_LABELS, Expert

log = logging.getLogger("wan_grpo")


def expert_names(spec: str) -> list[str]:
    """--train_experts as expert names: high, low, both, or a comma list of them (duplicates once)."""
    wanted = [w.strip() for w in str(spec).split(",") if w.strip()]
    wanted = [n for w in wanted for n in (EXPERT_LABELS if w == "both" else (w,))]
    if not wanted or any(w not in EXPERT_LABELS for w in wanted):
        raise UserError(f"--train_experts {spec!r}: use high, low, both or high,low")
    return list(dict.fromkeys(wanted))


def train_expert_indices(spec: str, present: tuple[bool, bool]) -> list[Expert]:
    """The experts to train, given which expert slots the model has."""
    experts = [Expert.from_label(n) for n in expert_names(spec)]
    if set(experts) == set(Expert):  # "both" on a dense model (TI2V-5B): its one transformer
        experts = [e for e in experts if present[e]]
    for e in experts:
        if not present[e]:
            raise UserError(f"--train_experts {e.label}: this checkpoint has no {e.diffusers_dir}; drop {e.label!r}")
    return sorted(experts)


@dataclass
class Policy:
    experts: dict[Expert, torch.nn.Module]  # the trained experts
    params: dict[Expert, list[torch.nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    lora: bool
    references: dict[Expert, torch.nn.Module] | None = None  # frozen copies for KL with full fine-tuning
    # DiffusionNFT's old policy: a copy of every trained parameter (LoRA or full), sharded like it
    old: dict[str, torch.Tensor] | None = None

    def trained_named_parameters(self):
        """(name, parameter) of every trained parameter, named "<expert label>.<name in the expert>"."""
        for idx, expert in self.experts.items():
            for name, p in expert.named_parameters():
                if p.requires_grad:
                    yield f"{idx.label}.{name}", p

    def keep_old_copy(self) -> None:
        """Start the old policy as a copy of the current trained parameters."""
        self.old = {name: p.detach().clone() for name, p in self.trained_named_parameters()}

    @torch.no_grad()
    def soft_update_old(self, decay: float) -> None:
        """old <- decay * old + (1 - decay) * current (DiffusionNFT's update of the sampling policy)."""
        for name, p in self.trained_named_parameters():
            self.old[name].mul_(decay).add_(p.detach(), alpha=1.0 - decay)

    @contextmanager
    def old_weights(self):
        """Inside, the trained parameters hold the old policy's values (restored on exit, bit for bit)."""
        params = dict(self.trained_named_parameters())
        current = {name: p.detach().clone() for name, p in params.items()}
        try:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(self.old[name])
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(current[name])

    def modules(self) -> torch.nn.ModuleDict:
        """The trained experts under their labels ("high", "low"), for state-dict utilities."""
        return torch.nn.ModuleDict({i.label: e for i, e in self.experts.items()})

    @contextmanager
    def reference(self, denoiser):
        """Inside, ``denoiser`` predicts with the reference policy (LoRA: adapters disabled)."""
        if self.lora:
            for e in self.experts.values():
                e.disable_adapters()
            try:
                yield denoiser
            finally:
                for e in self.experts.values():
                    e.enable_adapters()
        else:
            saved = denoiser.experts
            experts = list(saved)
            for idx, ref in (self.references or {}).items():
                experts[idx] = ref
            denoiser.experts = tuple(experts)
            try:
                yield denoiser
            finally:
                denoiser.experts = saved


def lr_factor(step: int, *, warmup: int, schedule: str = "constant", total: int | None = None) -> float:
    """The multiple of the peak rate that optimizer step ``step`` (0-based) uses: linear warmup over
    ``warmup`` steps, then constant or a cosine down to 0 at step ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if not total:
        raise UserError("--lr_schedule cosine needs the run's length; set --max_steps")
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


def lora_targets(spec: str) -> list[str]:
    """--lora_target_modules as a sorted list of module names."""
    targets = sorted({t.strip() for t in str(spec).split(",") if t.strip()})
    if not targets:
        raise UserError(f"--lora_target_modules {spec!r} names no module; e.g. to_q,to_k,to_v,to_out.0")
    return targets


def use_gradient_checkpointing(cfg) -> bool:
    """--gradient_checkpointing, or by default on for real checkpoints and off for the small ones (tiny, shapes),
    whose activations fit anywhere: there recomputing them only costs time (a third of a Shapes SFT step)."""
    if cfg.gradient_checkpointing is None:
        return cfg.task not in ("tiny", "shapes")
    return bool(cfg.gradient_checkpointing)


def build_policy(components, cfg, *, device: torch.device, fsdp: bool = False, reference: bool = False,
                 total_steps: int | None = None) -> Policy:
    """``cfg`` is a PolicyConfig; ``reference`` keeps frozen copies for a KL term under full fine-tuning;
    ``total_steps`` (optimizer steps of the whole run) ends the cosine schedule."""
    from peft import LoraConfig

    indices = train_expert_indices(cfg.train_experts, components.presence)
    experts = {i: components.expert(i) for i in indices}
    for module in (components.transformer, components.transformer_2):
        if module is not None:
            module.requires_grad_(False)
    lora = cfg.lora_rank > 0
    init = init_lora_paths(cfg.init_lora, indices)
    for idx, file in init.items():
        if cfg.init_lora_mode == "fuse" or not lora:
            fuse_into(experts[idx], file)
    references = None
    for idx, expert in experts.items():
        if lora:
            # peft draws lora_A from the global RNG: seed it per expert so --seed alone decides it.
            with seeded_global_rng(lora_init_seed(cfg.seed, idx)):
                try:
                    expert.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                                  target_modules=lora_targets(cfg.lora_target_modules),
                                                  init_lora_weights=True))
                except ValueError as exc:  # peft: no module matches a target
                    raise UserError(f"--lora_target_modules {cfg.lora_target_modules!r}: {str(exc).splitlines()[0]}; "
                                    "name Linear layers of WanTransformer3DModel, e.g. to_q,to_k,to_v,to_out.0")\
                        from None
            if idx in init and cfg.init_lora_mode == "train":
                copy_into_adapter(expert, init[idx], rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        else:
            expert.requires_grad_(True)
        # Master weights of what trains are fp32; forwards run under bf16 autocast with --mixed_precision bf16.
        cast_training_params(expert, torch.float32)
        if not lora and reference:
            # copied after the cast, so the reference predicts exactly what the policy does at step 0
            references = references or {}
            references[idx] = copy.deepcopy(expert).requires_grad_(False).eval()
        if use_gradient_checkpointing(cfg):
            expert.enable_gradient_checkpointing()
        expert.train()
    if fsdp:
        # frozen experts run forward passes too (rollouts): shard every present expert
        for module in (components.transformer, components.transformer_2, *(references or {}).values()):
            if module is not None:
                shard_expert(module, bf16=resolve_precision(cfg.mixed_precision, device) == "bf16")
    params = {i: [p for p in e.parameters() if p.requires_grad] for i, e in experts.items()}
    for i, ps in params.items():
        if not ps:
            raise UserError(f"no trainable parameters in the {i.label} expert; check --lora_target_modules")
    low_lr = cfg.learning_rate if cfg.learning_rate_2 is None else cfg.learning_rate_2
    lrs = {Expert.HIGH: cfg.learning_rate, Expert.LOW: low_lr}
    groups = [{"params": params[i], "lr": lrs[i], "name": i.label} for i in indices]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, warmup=cfg.warmup_steps,
                                                                      schedule=cfg.lr_schedule, total=total_steps))
    n_params = {i.label: sum(p.numel() for p in ps) for i, ps in params.items()}
    log.info("training %s (%s), trainable parameters %s", ", ".join(i.label for i in indices),
             f"LoRA r{cfg.lora_rank}" if lora else "full fine-tuning", n_params)
    return Policy(experts=experts, params=params, optimizer=optimizer, scheduler=scheduler, lora=lora,
                  references=references)

"""Sigma/timestep schedules, taken from diffusers' schedulers so they match WanPipeline exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

SOLVERS = ("unipc", "dpm++", "euler", "sde")
MULTISTEP = ("unipc", "dpm++")  # deterministic multistep solvers, from diffusers


@dataclass(frozen=True)
class Schedule:
    sigmas: torch.Tensor  # (T + 1,) float32, last is 0
    timesteps: torch.Tensor  # (T,) float32, the t given to the model (0..num_train_timesteps)
    num_train_timesteps: int


def flow_match_schedule(num_steps: int, *, shift: float, num_train_timesteps: int = 1000) -> Schedule:
    """The sigmas and timesteps of ``FlowMatchEulerDiscreteScheduler(shift=shift)`` for N steps."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    scheduler.set_timesteps(num_steps)
    return Schedule(
        sigmas=scheduler.sigmas.float().cpu(),
        timesteps=scheduler.timesteps.float().cpu(),
        num_train_timesteps=num_train_timesteps,
    )


def unipc_scheduler(*, shift: float, base_config: dict | None = None) -> UniPCMultistepScheduler:
    """UniPC in flow-prediction mode, as the diffusers-format Wan2.2 repos configure it."""
    # Only a UniPC config carries over (solver order etc.); a FlowMatchEuler one has nothing for it.
    is_unipc = (base_config or {}).get("_class_name") == "UniPCMultistepScheduler"
    config = {k: v for k, v in (base_config or {}).items() if is_unipc and not k.startswith("_")}
    config.update(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    config.setdefault("num_train_timesteps", 1000)
    return UniPCMultistepScheduler.from_config(config)


def dpm_scheduler(*, shift: float) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2nd order, multistep) in flow-prediction mode, as diffusers configures it for Wan
    (the official code's ``--sample_solver dpm++``)."""
    return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                       num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2)


def multistep_scheduler(solver: str, *, shift: float, base_config: dict | None = None):
    """The diffusers scheduler of a deterministic multistep solver (``MULTISTEP``)."""
    if solver == "unipc":
        return unipc_scheduler(shift=shift, base_config=base_config)
    if solver == "dpm++":
        return dpm_scheduler(shift=shift)
    raise ValueError(f"{solver!r} is not a multistep solver; use one of {', '.join(MULTISTEP)}")


def sde_window_mask(num_steps: int, window: tuple[int, int] | None) -> torch.Tensor:
    """(T,) bool: which steps take an SDE step (and are trainable); the others take Euler steps.

    ``window`` is a half-open range of step indices [start, end), as in Flow-GRPO-Fast/MixGRPO.
    """
    mask = torch.zeros(num_steps, dtype=torch.bool)
    start, end = (0, num_steps) if window is None else window
    if not (0 <= start < end <= num_steps):
        raise ValueError(f"SDE window {start}:{end} must lie within 0:{num_steps} and be non-empty")
    mask[start:end] = True
    return mask

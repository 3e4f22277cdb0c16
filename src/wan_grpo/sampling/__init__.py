from wan_grpo.sampling.rollout import SamplerConfig, Trajectory, rollout, rollout_groups, sample_multistep
from wan_grpo.sampling.schedule import Schedule, flow_match_schedule
from wan_grpo.sampling.sde import SDE_KINDS, SDEStepOutput, gaussian_log_prob, sde_mean_std, sde_step

__all__ = [
    "SDE_KINDS", "SDEStepOutput", "SamplerConfig", "Schedule", "Trajectory", "flow_match_schedule",
    "gaussian_log_prob", "rollout", "rollout_groups", "sample_multistep", "sde_mean_std", "sde_step",
]

"""Run by torchrun (tests/test_mixed_precision.py): one bf16 GRPO step under --dit_fsdp on 2 gloo
processes, then the dtypes of the sharded weights, gradients and optimizer state and FSDP2's policy."""

import sys
import tempfile

import torch
import torch.distributed as dist
from torchrun_exit import exit_cleanly

from wan_grpo.grpo.config import TrainConfig
from wan_grpo.grpo.trainer import grpo_rollout_step, setup
from wan_grpo.specs import Expert

lora, checkpointing = int(sys.argv[1]), sys.argv[2] == "1"
run = setup(TrainConfig(task="tiny", num_generations=4, sampling_steps=4, tensorboard=False, log_interval=0,
                        max_steps=1, mixed_precision="bf16", dit_fsdp=True, lora_rank=lora,
                        gradient_checkpointing=checkpointing, save_dir=tempfile.mkdtemp()))
grpo_rollout_step(run, 0)
n = 0
for ps in run.policy.params.values():
    for p in ps:
        local = p.to_local() if hasattr(p, "to_local") else p
        assert local.dtype == torch.float32, local.dtype
        assert p.grad is not None and p.grad.dtype == torch.float32
        state = run.policy.optimizer.state[p]
        assert state["exp_avg"].dtype == torch.float32
        n += 1
policies = {(m._get_fsdp_state()._mp_policy.param_dtype, m._get_fsdp_state()._mp_policy.reduce_dtype)
            for e in Expert for m in run.components.expert(e).modules() if hasattr(m, "_get_fsdp_state")}
assert policies == {(torch.bfloat16, torch.float32)}, policies
if dist.get_rank() == 0:
    print(f"OK {n} trained tensors fp32; FSDP2 policy {policies}")
exit_cleanly()

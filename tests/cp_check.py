"""Run by torchrun from test_distributed.py: Ulysses on the tiny expert under FSDP2 (gloo, CPU).

Checks that each rank's feed-forward layers see 1/K of the tokens, that the output equals a
single-process forward, and that FSDP's averaged gradients times K equal the single-process ones.
"""

import cpu_context_parallel  # noqa: F401  (diffusers' Ulysses on CPU)
import torch
import torch.distributed as dist
from torchrun_exit import exit_cleanly

from wan_grpo.distributed.context_parallel import enable
from wan_grpo.distributed.parallelize import shard_expert
from wan_grpo.models.tiny import build_tiny_components

dist.init_process_group("gloo")
world = dist.get_world_size()
x = torch.randn(2, 16, 2, 8, 8, generator=torch.Generator().manual_seed(1))
ctx = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(2))
t = torch.tensor([900.0, 300.0])


def run(model):
    out = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    out.square().mean().backward()
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[n] = g
    return out.detach(), grads


ref_out, ref_grads = run(build_tiny_components(0).transformer)
model = build_tiny_components(0).transformer
shard_expert(model, bf16=False)
enable([model], cp_size=world, device_type="cpu")
seen = []
model.blocks[0].ffn.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
out, grads = run(model)
tokens = 2 * 4 * 4
assert seen and seen[0] == tokens // world, (seen, tokens)
assert torch.allclose(out, ref_out, atol=1e-6), (out - ref_out).abs().max()
worst = max(((g * world) - ref_grads[n]).abs().max().item() / (ref_grads[n].abs().max().item() + 1e-12)
            for n, g in grads.items())
assert worst < 1e-4, worst
if dist.get_rank() == 0:
    print(f"OK tokens per rank {seen[0]} of {tokens}; max relative gradient error {worst:.2e}")
exit_cleanly()

"""Test-only: let diffusers' context parallelism run on CPU over gloo, then run the wan-grpo CLI.

diffusers picks a device with ``rank % torch.accelerator.device_count()``, which is 0 without an
accelerator. Run by torchrun as a script (``cpu_context_parallel.py train ...``) or imported.
"""

import torch

if torch.accelerator.device_count() == 0:
    torch.accelerator.device_count = lambda: 1

if __name__ == "__main__":
    from wan_grpo.cli import program

    program()  # reads sys.argv[1:] as ``python -m wan_grpo`` does

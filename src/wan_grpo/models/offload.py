"""--offload_model: at most one expert on the accelerator; the other waits in CPU memory.

The resident expert is evicted before the next is loaded, so the two are never on the device
together. Anything tied to an expert's parameters (their optimizer state) moves with it through
``on_move`` callbacks.
"""

from __future__ import annotations

import torch


class ExpertPlacement:
    def __init__(self, experts, *, device: torch.device, enabled: bool, offload_device: str = "cpu"):
        self.experts = experts  # (high, low); either may be None
        self.device, self.enabled = torch.device(device), enabled
        self.offload_device = torch.device(offload_device)
        self.resident: int | None = None
        self.history: list[tuple[str, int]] = []  # ("load" | "evict", expert), for tests and logs
        self.on_move: list = []

    def _move(self, idx: int, device: torch.device) -> None:
        module = self.experts[idx]
        module.to(device)
        for callback in self.on_move:
            callback(module, device)

    def activate(self, idx: int) -> None:
        if not self.enabled or self.resident == idx:
            return
        if self.resident is not None:
            self._move(self.resident, self.offload_device)
            self.history.append(("evict", self.resident))
        self._move(idx, self.device)
        self.history.append(("load", idx))
        self.resident = idx

    def max_resident(self) -> int:
        """Most experts ever on the device at once, replayed from the history."""
        on, most = set(), 0
        for action, idx in self.history:
            (on.add if action == "load" else on.discard)(idx)
            most = max(most, len(on))
        return most


def move_optimizer_state(optimizer: torch.optim.Optimizer, module: torch.nn.Module, device: torch.device) -> None:
    for p in module.parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value) and key != "step":
                optimizer.state[p][key] = value.to(device)

"""``wan-grpo reward-server``: serve a reward over HTTP for ``train --reward_url``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from wan_grpo.config import opt
from wan_grpo.errors import UserError
from wan_grpo.rewards import build_rewards
from wan_grpo.rewards.config import RewardConfig
from wan_grpo.runtime import resolve_device

log = logging.getLogger("wan_grpo")


@dataclass
class ServerConfig(RewardConfig):
    host: str = opt("127.0.0.1", "Address to listen on (0.0.0.0 for other machines; the server has no "
                                 "authentication, keep it on a trusted network).")
    port: int = opt(8765, "Port to listen on (0: any free port, printed at start-up).", ge=0, le=65535)
    device: str = opt("auto", "Device of the reward model when --reward_device is unset: auto, cpu, cuda[:N].")


def run_server(cfg: ServerConfig) -> None:
    from wan_grpo.rewards.remote import make_server

    if cfg.reward_url:
        raise UserError("reward-server computes rewards itself; drop --reward_url")
    rewards = build_rewards(cfg, default="videoalign", device=resolve_device(cfg.device))
    server = make_server(rewards, cfg.host, cfg.port)
    host, port = server.server_address[:2]
    print(f"wan-grpo reward-server listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

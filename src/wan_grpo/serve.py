"""``wan-grpo reward-server``: serve a reward over HTTP for ``train --reward_url``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from wan_grpo.config import opt
from wan_grpo.errors import UserError
from wan_grpo.rewards import build_rewards
from wan_grpo.rewards.config import StandaloneRewardConfig
from wan_grpo.rewards.remote import RequestLimits, make_server, reward_token
from wan_grpo.runtime import resolve_device

log = logging.getLogger("wan_grpo")


@dataclass
class ServerConfig(StandaloneRewardConfig):
    host: str = opt("127.0.0.1", "Address to listen on (0.0.0.0 for other machines: then set --reward_token or "
                                 "WAN_GRPO_REWARD_TOKEN so it refuses requests without the token).")
    port: int = opt(8765, "Port to listen on (0: any free port, printed at start-up).", ge=0, le=65535)
    max_request_mb: float = opt(256.0, "Largest request body accepted (413 above it, refused before it is read).",
                                gt=0)
    max_decoded_mb: float = opt(2048.0, "Largest total size of a request's frames once decompressed, read from the "
                                        "archive's headers before any array is (413 above it).", gt=0)
    max_frames: int = opt(4096, "Most frames one request may carry, over all its videos (413 above it).", ge=1)


def run_server(cfg: ServerConfig) -> None:

    if cfg.reward_url:
        raise UserError("reward-server computes rewards itself; drop --reward_url")
    rewards = build_rewards(cfg, default="videoalign", device=resolve_device(cfg.device))
    limits = RequestLimits(body_bytes=int(cfg.max_request_mb * 2**20), decoded_bytes=int(cfg.max_decoded_mb * 2**20),
                           frames=cfg.max_frames)
    token = reward_token(cfg)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        log.warning("listening on %s without --reward_token: anyone who reaches it can use the reward", cfg.host)
    server = make_server(rewards, cfg.host, cfg.port, token=token, limits=limits)
    host, port = server.server_address[:2]
    print(f"wan-grpo reward-server listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

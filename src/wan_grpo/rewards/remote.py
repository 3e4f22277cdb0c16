"""A reward over HTTP: ``wan-grpo reward-server`` and the client that ``--reward_url`` uses.

So the reward model can live on other GPUs or another machine. One request carries a batch:
the frames as uint8 arrays in a compressed .npz plus a JSON header (prompts, fps); the answer is
JSON with every component's scores and coefficients. The server scores one request at a time.

Failures: each request gets ``--reward_timeout`` seconds and ``--reward_retries`` attempts with
backoff. When the last one fails the client either raises (score, eval) or, in training, returns
NaN for that batch so the trainer leaves those groups out of the update and counts them; a
failure never becomes a made-up score.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

log = logging.getLogger("wan_grpo")


class RewardServerError(RuntimeError):
    """The reward server could not score a batch within the allowed attempts."""


def encode_batch(videos: list[torch.Tensor], prompts: list[str], fps: float) -> bytes:
    header = json.dumps({"prompts": list(prompts), "fps": float(fps), "count": len(videos)}).encode()
    arrays = {f"video_{i}": np.ascontiguousarray(torch.as_tensor(v).cpu().numpy()) for i, v in enumerate(videos)}
    buf = io.BytesIO()
    np.savez_compressed(buf, header=np.frombuffer(header, dtype=np.uint8), **arrays)
    return buf.getvalue()


def decode_batch(body: bytes) -> tuple[list[torch.Tensor], list[str], float]:
    with np.load(io.BytesIO(body), allow_pickle=False) as data:
        header = json.loads(data["header"].tobytes())
        videos = [torch.from_numpy(data[f"video_{i}"].copy()) for i in range(header["count"])]
    for v in videos:
        if v.dtype != torch.uint8 or v.ndim != 4 or v.shape[-1] != 3:
            raise ValueError(f"a video must be uint8 (T, H, W, 3), got {v.dtype} {tuple(v.shape)}")
    if len(header["prompts"]) != len(videos):
        raise ValueError(f"{len(videos)} videos but {len(header['prompts'])} prompts")
    return videos, header["prompts"], header["fps"]


class RemoteReward:
    """Client of a reward server; ``coefs`` are the server's (its --reward weights and --*_coef)."""

    name = "remote"

    def __init__(self, url: str, *, timeout: float = 600.0, retries: int = 3, drop_on_failure: bool = False,
                 backoff: float = 1.0):
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, max(1, retries), backoff
        self.drop_on_failure = drop_on_failure
        self.coefs: dict[str, float] = {}
        self.components: tuple[str, ...] = ()
        self.failed_batches = 0

    def check(self) -> None:
        """Fail fast, with the fix, when no server answers at start-up."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=min(self.timeout, 30.0)) as response:
                self.coefs.update(json.loads(response.read()).get("coefs", {}))
            self.components = tuple(self.coefs)  # so even a failed first batch can be dropped
        except (urllib.error.URLError, OSError, ValueError) as exc:
            from wan_grpo.errors import UserError

            raise UserError(f"no reward server answers at {self.url} ({exc}); start one with 'wan-grpo "
                            "reward-server --reward ... --port P' and pass --reward_url http://HOST:P") from exc

    def _post(self, body: bytes) -> dict:
        request = urllib.request.Request(self.url + "/score", data=body, method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def __call__(self, videos, prompts, *, fps) -> dict[str, torch.Tensor]:
        body = encode_batch(videos, prompts, fps)
        error = None
        for attempt in range(1, self.retries + 1):
            try:
                answer = self._post(body)
                self.coefs.update(answer["coefs"])
                self.components = tuple(answer["components"])
                return {k: torch.tensor(v, dtype=torch.float32) for k, v in answer["components"].items()}
            except urllib.error.HTTPError as exc:  # the server answered: its reward raised
                error = f"HTTP {exc.code}: {exc.read().decode(errors='replace').strip()}"
            except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            log.warning("reward server %s, attempt %d/%d failed: %s", self.url, attempt, self.retries, error)
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** (attempt - 1))
        self.failed_batches += 1
        if not self.drop_on_failure or not self.components:
            raise RewardServerError(f"reward server {self.url} failed {self.retries} times ({error}); check it is "
                                    "running (wan-grpo reward-server) and reachable")
        nan = torch.full((len(videos),), float("nan"))
        return {k: nan.clone() for k in self.components}


def make_server(rewards, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server scoring with ``rewards`` (a RewardSet); requests are scored one at a time."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            if self.path != "/health":
                return self._reply(404, {"error": "GET /health or POST /score"})
            self._reply(200, {"status": "ok", "coefs": rewards.coefs})

        def do_POST(self):  # noqa: N802
            if self.path != "/score":
                return self._reply(404, {"error": "POST /score"})
            try:
                videos, prompts, fps = decode_batch(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with lock:
                    scores = rewards(videos, prompts, fps=fps)
            except Exception as exc:  # reported to the client, which retries or stops; never a score
                log.exception("scoring failed")
                return self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})
            self._reply(200, {"components": {k: v.tolist() for k, v in scores.items()},
                              "coefs": {k: rewards.coefs[k] for k in scores}})

        def log_message(self, fmt, *args):
            log.debug("%s %s", self.address_string(), fmt % args)

    return ThreadingHTTPServer((host, port), Handler)

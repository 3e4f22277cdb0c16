"""A reward over HTTP: ``wan-grpo reward-server`` and the client that ``--reward_url`` uses.

So the reward model can live on other GPUs or another machine. One request carries a batch:
the frames as uint8 arrays in a compressed .npz plus a JSON header (prompts, fps); the answer is
JSON with every component's scores and coefficients. The server decodes and scores one request at a
time and queues up to ``BACKLOG`` connections, so many trainer ranks can share it.

Guards on the server: a Bearer token when one is set (401 without it), a bound on the body (413
before it is read), on the frames once decompressed (413, read from the archive's headers before
any array), and on frames per request; a malformed body gets 400, a reward that raises 500, and so
does an unexpected error in decoding (an answer, so the client retries rather than meeting a closed socket).

Failures on the client: each request gets ``--reward_timeout`` seconds and ``--reward_retries``
attempts with backoff; an answer that is not JSON or has the wrong number of scores counts as a
failed attempt. When the last one fails the client either raises (score, eval) or, in training,
returns NaN for that batch so the trainer leaves those groups out of the update and counts them;
a failure never becomes a made-up score.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from wan_grpo.errors import UserError

log = logging.getLogger("wan_grpo")


TOKEN_ENV = "WAN_GRPO_REWARD_TOKEN"
BACKLOG = 256  # queued connections (socketserver's default of 5 reset clients under load)
# .npy headers are parsed with ast.literal_eval, which CPython 3.11 (and some 3.12 releases) cannot run in two
# threads at once (SystemError "AST constructor recursion depth mismatch", python/cpython#106905), so requests
# decode in turn.
_DECODE_LOCK = threading.Lock()


class RewardServerError(RuntimeError):
    """The reward server could not score a batch within the allowed attempts."""


class BadRequest(ValueError):
    """A request the server refuses: ``status`` is the HTTP code to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestLimits:
    body_bytes: int = 256 * 2**20
    decoded_bytes: int = 2048 * 2**20
    frames: int = 4096


def reward_token(cfg) -> str | None:
    """--reward_token, else the WAN_GRPO_REWARD_TOKEN environment variable, else None."""
    return cfg.reward_token or os.environ.get(TOKEN_ENV) or None


def encode_batch(videos: list[torch.Tensor], prompts: list[str], fps: float) -> bytes:
    header = json.dumps({"prompts": list(prompts), "fps": float(fps), "count": len(videos)}).encode()
    arrays = {f"video_{i}": np.ascontiguousarray(torch.as_tensor(v).cpu().numpy()) for i, v in enumerate(videos)}
    buf = io.BytesIO()
    np.savez_compressed(buf, header=np.frombuffer(header, dtype=np.uint8), **arrays)
    return buf.getvalue()


def _check_archive(body: bytes, limits: RequestLimits) -> None:
    """Sizes from the zip's and every .npy's headers, before any array is decompressed."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise BadRequest(400, f"the body is not an .npz archive ({exc})") from None
    decoded = sum(m.file_size for m in members)
    if decoded > limits.decoded_bytes:
        raise BadRequest(413, f"the frames decompress to {decoded / 2**20:.0f} MiB, over this server's "
                              f"--max_decoded_mb {limits.decoded_bytes / 2**20:.0f}")
    frames = 0
    for m in members:
        if m.filename.startswith("video_"):
            with archive.open(m) as f:
                try:
                    version = np.lib.format.read_magic(f)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        raise ValueError(f".npy format {version}")
                    shape, _, dtype = read_header(f)  # the header only: no array is read
                except ValueError as exc:
                    raise BadRequest(400, f"{m.filename} is not a .npy array ({exc})") from None
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
                raise BadRequest(400, f"a video must be uint8 (T, H, W, 3), got {dtype} {shape}")
            frames += shape[0]
    if frames > limits.frames:
        raise BadRequest(413, f"{frames} frames in one request, over this server's --max_frames {limits.frames}")


def decode_batch(body: bytes, limits: RequestLimits | None = None) -> tuple[list[torch.Tensor], list[str], float]:
    """The videos, prompts and fps of a request; BadRequest (400/413) for anything malformed or too big."""
    with _DECODE_LOCK:
        return _decode(body, limits or RequestLimits())


def _decode(body: bytes, limits: RequestLimits) -> tuple[list[torch.Tensor], list[str], float]:
    _check_archive(body, limits)
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as data:
            header = json.loads(data["header"].tobytes())
            videos = [torch.from_numpy(data[f"video_{i}"].copy()) for i in range(int(header["count"]))]
            prompts, fps = [str(p) for p in header["prompts"]], float(header["fps"])
    except (KeyError, ValueError, TypeError, OSError, zipfile.BadZipFile) as exc:
        raise BadRequest(400, f"malformed request: {type(exc).__name__}: {exc}") from None
    if len(prompts) != len(videos):
        raise BadRequest(400, f"{len(videos)} videos but {len(prompts)} prompts")
    return videos, prompts, fps


class RemoteReward:
    """Client of a reward server; ``coefs`` are the server's (its --reward weights and --*_coef)."""

    name = "remote"

    def __init__(self, url: str, *, timeout: float = 600.0, retries: int = 3, drop_on_failure: bool = False,
                 backoff: float = 1.0, token: str | None = None):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout, self.retries, self.backoff = timeout, max(1, retries), backoff
        self.drop_on_failure = drop_on_failure
        self.coefs: dict[str, float] = {}
        self.components: tuple[str, ...] = ()
        self.failed_batches = 0

    def check(self) -> None:
        """Fail fast, with the fix, when no server answers at start-up."""
        try:
            request = urllib.request.Request(self.url + "/health", headers=self.headers)
            with urllib.request.urlopen(request, timeout=min(self.timeout, 30.0)) as response:
                self.coefs.update(json.loads(response.read()).get("coefs", {}))
            self.components = tuple(self.coefs)  # so even a failed first batch can be dropped
        except (urllib.error.URLError, OSError, ValueError) as exc:

            raise UserError(f"no reward server answers at {self.url} ({exc}); start one with 'wan-grpo "
                            "reward-server --reward ... --port P' and pass --reward_url http://HOST:P") from exc

    def _post(self, body: bytes) -> dict:
        request = urllib.request.Request(self.url + "/score", data=body, method="POST",
                                         headers={"Content-Type": "application/octet-stream", **self.headers})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def __call__(self, videos, prompts, *, fps) -> dict[str, torch.Tensor]:
        body = encode_batch(videos, prompts, fps)
        error = None
        for attempt in range(1, self.retries + 1):
            try:
                answer = self._post(body)
                scores = {k: torch.tensor(v, dtype=torch.float32).flatten() for k, v in answer["components"].items()}
                wrong = {k: len(v) for k, v in scores.items() if len(v) != len(videos)}
                if wrong or not scores:
                    raise ValueError(f"the answer has {wrong or 'no'} scores for {len(videos)} videos")
                self.coefs.update(answer["coefs"])
                self.components = tuple(scores)
                return scores
            except urllib.error.HTTPError as exc:  # the server answered: its reward raised
                error = f"HTTP {exc.code}: {exc.read().decode(errors='replace').strip()}"
            except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
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


def make_server(rewards, host: str, port: int, *, token: str | None = None,
                limits: RequestLimits | None = None) -> ThreadingHTTPServer:
    """An HTTP server scoring with ``rewards`` (a RewardSet); requests are decoded and scored one at a time."""
    lock = threading.Lock()
    limits = limits or RequestLimits()

    class Handler(BaseHTTPRequestHandler):
        timeout = 120  # seconds a client may take to send its request (a stalled client frees its thread)

        def _reply(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if token is None:
                return True
            given = self.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return True
            self._reply(401, {"error": "missing or wrong token: pass --reward_token or set " + TOKEN_ENV})
            return False

        def do_GET(self):  # noqa: N802
            if self.path != "/health":
                return self._reply(404, {"error": "GET /health or POST /score"})
            if self._authorised():
                self._reply(200, {"status": "ok", "coefs": rewards.coefs})

        def do_POST(self):  # noqa: N802
            if self.path != "/score":
                return self._reply(404, {"error": "POST /score"})
            if not self._authorised():
                return None
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._reply(411, {"error": "a request needs a Content-Length"})
            if length < 0:  # read(-1) would wait for the client to close
                self.close_connection = True
                return self._reply(400, {"error": f"Content-Length {length} is negative"})
            if length > limits.body_bytes:
                self.close_connection = True  # the body is never read
                return self._reply(413, {"error": f"{length} bytes is over this server's --max_request_mb "
                                                  f"{limits.body_bytes / 2**20:.0f}"})
            body = self.rfile.read(length)  # a client stalling here meets the handler's timeout, as before
            try:
                videos, prompts, fps = decode_batch(body, limits)
                with lock:
                    scores = rewards(videos, prompts, fps=fps)
            except BadRequest as exc:
                return self._reply(exc.status, {"error": str(exc)})
            except Exception as exc:  # answered (never a score, never a closed socket): the client retries or stops
                log.exception("decoding or scoring a request failed")
                return self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})
            self._reply(200, {"components": {k: v.tolist() for k, v in scores.items()},
                              "coefs": {k: rewards.coefs[k] for k in scores}})

        def log_message(self, fmt, *args):
            log.debug("%s %s", self.address_string(), fmt % args)

    class Server(ThreadingHTTPServer):
        request_queue_size = BACKLOG
        daemon_threads = True

    return Server((host, port), Handler)

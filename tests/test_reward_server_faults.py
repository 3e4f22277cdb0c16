"""The reward server under faults: hung, garbage, short and slow servers; tokens; load; size bounds."""

import http.client
import io
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from wan_grpo.cli import main
from wan_grpo.grpo.metrics import read_metrics
from wan_grpo.rewards import RewardSet
from wan_grpo.rewards.builtin import BUILTIN, FrameStatReward
from wan_grpo.rewards.remote import RequestLimits, encode_batch, make_server

FAST = ["--task", "tiny", "--num_generations", "2", "--batch_size", "2", "--sampling_steps", "4", "--size", "32*32",
        "--lora_rank", "2", "--tensorboard", "false", "--log_interval", "0", "--reward_timeout", "1",
        "--reward_retries", "2"]


def serve(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def brightness_set():
    return RewardSet([(FrameStatReward("brightness", BUILTIN["brightness"]), 1.0, {})])


def faulty_server(kind: str):
    """A server whose /health is fine and whose /score misbehaves in one way."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code, data: bytes):
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            self._send(200, json.dumps({"status": "ok", "coefs": {"brightness": 1.0}}).encode())

        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            count = np.load(io.BytesIO(body))["header"].tobytes()
            n = json.loads(count)["count"]
            if kind == "hang":
                time.sleep(30)  # accepts and never answers in time
            elif kind == "garbage":
                self._send(200, b"<html>not json</html>")
            elif kind == "short":
                self._send(200, json.dumps({"components": {"brightness": [0.5] * (n - 1)},
                                            "coefs": {"brightness": 1.0}}).encode())
            elif kind == "slow":
                time.sleep(2.5)  # answers, but after --reward_timeout
                self._send(200, json.dumps({"components": {"brightness": [0.5] * n},
                                            "coefs": {"brightness": 1.0}}).encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    return server


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hang", "garbage", "short", "slow"])
def test_training_survives_a_faulty_server_and_counts_the_dropped_batches(tmp_path, kind):
    server = faulty_server(kind)
    url = serve(server)
    try:
        save_dir = tmp_path / kind
        assert main(["train", *FAST, "--max_steps", "2", "--reward_url", url, "--save_dir", str(save_dir)]) == 0
    finally:
        server.shutdown()
    rows = read_metrics(save_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["unscored_groups"] == 4 and rows[-1]["skipped_updates"] == 2  # every batch dropped, counted
    assert (save_dir / "checkpoint-2").is_dir()


def post(url, body: bytes, token: str | None = None, timeout=30):
    headers = {"Content-Type": "application/octet-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + "/score", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def small_batch(n=2):
    return encode_batch([torch.full((3, 8, 8, 3), 100, dtype=torch.uint8)] * n, ["a"] * n, 8.0)


def test_token_is_required_when_set(tmp_path, monkeypatch):
    server = make_server(brightness_set(), "127.0.0.1", 0, token="s3cret")
    url = serve(server)
    try:
        assert post(url, small_batch())[0] == 401
        assert post(url, small_batch(), token="wrong")[0] == 401
        status, answer = post(url, small_batch(), token="s3cret")
        assert status == 200 and len(answer["components"]["brightness"]) == 2
        # a training run passes the token from the environment
        monkeypatch.setenv("WAN_GRPO_REWARD_TOKEN", "s3cret")
        save_dir = tmp_path / "tok"
        assert main(["train", *FAST, "--max_steps", "1", "--reward_url", url, "--save_dir", str(save_dir)]) == 0
        assert read_metrics(save_dir)[0]["unscored_groups"] == 0
        monkeypatch.delenv("WAN_GRPO_REWARD_TOKEN")
        assert main(["train", *FAST, "--max_steps", "1", "--reward_url", url, "--save_dir", str(tmp_path / "no")]) == 2
    finally:
        server.shutdown()


def test_size_bounds_and_malformed_bodies_get_clear_statuses():
    limits = RequestLimits(body_bytes=4 * 2**20, decoded_bytes=16 * 2**20, frames=100)
    server = make_server(brightness_set(), "127.0.0.1", 0, limits=limits)
    url = serve(server)
    try:
        # a small archive that would decompress to 64 MiB: refused from its headers
        bomb = io.BytesIO()
        header = json.dumps({"prompts": ["a"], "fps": 8.0, "count": 1}).encode()
        np.savez_compressed(bomb, header=np.frombuffer(header, dtype=np.uint8),
                            video_0=np.zeros((1024, 128, 170, 3), dtype=np.uint8))
        assert len(bomb.getvalue()) < 1 * 2**20
        status, answer = post(url, bomb.getvalue())
        assert status == 413 and "decompress" in answer["error"]
        status, answer = post(url, small_batch(n=40))  # 120 frames > 100
        assert status == 413 and "frames" in answer["error"]
        # over the body bound: answered from the headers alone, the body is never sent or read
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        conn.putrequest("POST", "/score")
        conn.putheader("Content-Length", str(5 * 2**20))
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413 and b"max_request_mb" in response.read()
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        conn.putrequest("POST", "/score")
        conn.putheader("Content-Length", "-1")  # answered at once, not read until the client closes
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 400 and b"negative" in response.read()
        conn.close()
        status, answer = post(url, b"not an archive")
        assert status == 400 and "not an .npz" in answer["error"]
        missing_header = io.BytesIO()
        np.savez(missing_header, video_0=np.zeros((1, 4, 4, 3), dtype=np.uint8))
        assert post(url, missing_header.getvalue())[0] == 400
        wrong_dtype = io.BytesIO()
        np.savez(wrong_dtype, header=np.frombuffer(header, dtype=np.uint8), video_0=np.zeros((1, 4, 4, 3)))
        assert post(url, wrong_dtype.getvalue())[0] == 400
        assert post(url, small_batch())[0] == 200  # and it still serves
    finally:
        server.shutdown()


def test_64_concurrent_clients_get_no_transport_errors():
    server = make_server(brightness_set(), "127.0.0.1", 0)
    url = serve(server)
    body = small_batch()
    try:
        def client(_):
            return [post(url, body, timeout=120)[0] for _ in range(4)]

        with ThreadPoolExecutor(64) as pool:
            statuses = [s for batch in pool.map(client, range(64)) for s in batch]
    finally:
        server.shutdown()
    assert statuses == [200] * 256  # 18 of 256 were reset with socketserver's default backlog


def test_requests_parse_npy_headers_one_at_a_time(monkeypatch):
    """CPython 3.11's ast.literal_eval (numpy's .npy header parser) is not thread-safe (cpython#106905)."""
    import ast

    real, inside, most = ast.literal_eval, [0], [0]

    def watched(text):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.002)  # gives another request's thread the chance to enter
        try:
            return real(text)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(ast, "literal_eval", watched)
    server = make_server(brightness_set(), "127.0.0.1", 0)
    url = serve(server)
    try:
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(lambda _: post(url, small_batch(), timeout=60)[0], range(48)))
    finally:
        server.shutdown()
    assert statuses == [200] * 48 and most[0] == 1


def test_an_unexpected_decoding_error_is_answered_with_500(monkeypatch):
    import wan_grpo.rewards.remote as remote

    def broken(body, limits):
        raise SystemError("AST constructor recursion depth mismatch (before=51, after=50)")

    monkeypatch.setattr(remote, "_decode", broken)
    server = make_server(brightness_set(), "127.0.0.1", 0)
    url = serve(server)
    try:
        status, answer = post(url, small_batch())
    finally:
        server.shutdown()
    assert status == 500 and "SystemError" in answer["error"]

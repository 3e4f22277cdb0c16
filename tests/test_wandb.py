"""--report_to wandb: an offline W&B run gets every scalar of metrics.jsonl, the sample videos and the
resolved config; read back from the run's own .wandb file (W&B's record log of protobuf Records)."""

import json
import struct
import time
from pathlib import Path

import pytest

from wan_grpo.cli import main
from wan_grpo.grpo.metrics import read_metrics

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")


def records(path: Path):
    """Every Record of a .wandb file: a 7-byte header, then 32 KiB blocks of (crc32, length, type) chunks."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, payload = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a chunk the writer has not finished
            return
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_pb.Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The run's records once W&B's writer, a separate service process, has written its exit record:
    wandb.finish() can return before the file is complete on a busy machine (a truncated file read too
    early showed no history, or a half-written chunk that does not parse)."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        try:
            found = list(records(path))
            if any(r.WhichOneof("record_type") == "exit" for r in found):
                return found
        except DecodeError:
            pass
        assert time.monotonic() < deadline, f"{path} got no exit record in {timeout} s"
        time.sleep(0.2)


def test_offline_wandb_run_gets_the_scalars_videos_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    save_dir = tmp_path / "run"
    assert main(["train", "--task", "tiny", "--num_generations", "2", "--max_steps", "2", "--lora_rank", "0",
                 "--report_to", "tensorboard,wandb", "--sample_interval", "1", "--wandb_run_name", "t1",
                 "--save_dir", str(save_dir)]) == 0
    files = list((save_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history, config, videos = {}, {}, 0
    for record in finished_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            if "sample/path" in items:  # a logged video: the mp4 is copied into the run's files
                assert (files[0].parent / "files" / json.loads(items["sample/path"])).is_file()
                videos += 1
            scalars = {k: json.loads(v) for k, v in items.items() if not k.startswith(("_", "sample/"))}
            if scalars:
                history[json.loads(items["_step"])] = scalars
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    rows = read_metrics(save_dir)
    assert sorted(history) == [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "step":
                assert history[row["step"]][key] == pytest.approx(value), key
    assert videos == 2
    value = {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in config.items()}
    assert value["max_steps"] == 2 and value["report_to"] == "tensorboard,wandb" and value["algorithm"] == "grpo"
    assert (save_dir / "tb").is_dir()


def test_unknown_report_target_is_one_line(tmp_path, capsys):
    assert main(["train", "--task", "tiny", "--report_to", "mlflow", "--save_dir", str(tmp_path / "x")]) == 2
    assert "--report_to 'mlflow'" in capsys.readouterr().err

"""mp4 writing (H.264 through PyAV), written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np


def write_mp4(path: str | Path, frames, *, fps: int = 16) -> Path:
    """frames: uint8 (F, H, W, 3). Odd sizes are padded by one pixel (yuv420p needs even sizes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def read_mp4(path: str | Path) -> np.ndarray:
    """uint8 (F, H, W, 3)."""
    return read_video(path)[0]


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """uint8 (F, H, W, 3) frames and the stream's average frame rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise ValueError(f"{path} has no frame rate; re-encode it with one (e.g. ffmpeg -r 16)")
        return frames, float(rate)

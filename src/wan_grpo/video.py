"""mp4 files: writing (H.264 through PyAV, atomically), reading, and folders of captioned videos."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import av
import numpy as np

from wan_grpo.errors import UserError


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
    if path.is_dir():
        raise UserError(f"{path} is a folder; name the .mp4 file to write")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.mp4")
    try:
        _encode(tmp, frames, fps)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _encode(tmp: Path, frames: np.ndarray, fps: int) -> None:
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


def check_output_file(path: str | Path, flag: str) -> None:
    """Before any work: an output path must not be a folder, and its folder must be creatable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; name the file to write")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")


def check_image_file(path: str | Path, flag: str) -> None:
    """Before any work: ``path`` is an image PIL can read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist")
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise UserError(f"{flag} {path} is not a readable image ({exc.__class__.__name__}); pass a PNG or JPEG") \
            from None


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


def frame_count(path: str | Path) -> int:
    """Frames of a video from its header (decoding only when the container does not say)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.frames or sum(1 for _ in container.decode(stream))


CAPTION_FILES = ("captions.jsonl", "captions.csv", "captions.txt")


def mp4_files(folder: Path) -> list[Path]:
    """The folder's .mp4 files in name order, hidden ones (temporary files of a writer) left out."""
    return sorted(p for p in folder.glob("*.mp4") if not p.name.startswith("."))


def video_caption_pairs(folder: str | Path, captions: str | Path | None, *, flag: str = "--captions"
                        ) -> list[tuple[Path, str]]:
    """(video path, caption) pairs. ``captions``: .txt (one per mp4 of ``folder`` in name order),
    .jsonl (objects with ``video`` and ``prompt`` or ``caption``) or .csv (the same columns); video
    paths are relative to ``folder``. Without ``captions``, the folder's captions.{jsonl,csv,txt}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of .mp4 files")
    if captions is None:
        found = [folder / name for name in CAPTION_FILES if (folder / name).is_file()]
        if not found:
            raise UserError(f"{folder} has no {', '.join(CAPTION_FILES)}; add one or pass {flag} FILE")
        captions = found[0]
    path = Path(captions)
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path} is not UTF-8 text; save it as UTF-8") from None
    if path.suffix in (".jsonl", ".csv"):
        rows = []
        if path.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append((n, json.loads(line)))
                    except json.JSONDecodeError:
                        raise UserError(f"{path}:{n} is not a JSON object; fix that line") from None
        else:
            rows = list(enumerate(csv.DictReader(text.splitlines()), 2))
        pairs = []
        for n, row in rows:
            caption = row.get("prompt", row.get("caption")) if isinstance(row, dict) else None
            if not isinstance(row, dict) or not row.get("video") or caption is None:
                raise UserError(f"{path}:{n} needs 'video' and 'prompt' (or 'caption'); fix that line")
            pairs.append((folder / row["video"], str(caption).strip()))
    else:
        files = mp4_files(folder)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if len(lines) != len(files):
            raise UserError(f"{folder} has {len(files)} mp4 files but {path} has {len(lines)} captions; give one per "
                            "video in file-name order, or a .jsonl/.csv with 'video' and 'prompt'")
        pairs = list(zip(files, lines))
    if not pairs:
        raise UserError(f"{path} lists no videos; add one line per video")
    for video, _ in pairs:
        if not video.is_file():
            raise UserError(f"{path}: video {video} does not exist; fix the path (relative to {folder})")
    return pairs

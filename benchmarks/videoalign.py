"""VideoAlign scoring: wan-grpo's in-memory batched scorer vs the peers' path (each video written
to a temp mp4, read back and scored one at a time, as DanceGRPO and Flow-Factory call VideoAlign).

Same VideoReward model (the tiny random one in the released layout, or --reward_model_path with
--videoalign_base for the real one), same videos and prompts. Ratio = our time / the peers' path.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from _common import device_from, parser, record, timed

from wan_grpo.rewards.videoalign.loading import load_videoreward
from wan_grpo.rewards.videoalign.scorer import VideoAlignReward
from wan_grpo.video import read_video, write_mp4


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--size", default="416*240")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--reward_model_path", default=None)
    p.add_argument("--videoalign_base", default=None)
    args = p.parse_args()
    if args.smoke:
        args.videos, args.frames, args.size, args.repeats, args.batch_size = 2, 9, "64*64", 1, 2
    device = device_from(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tmp = Path(tempfile.mkdtemp(prefix="va-bench-"))
    if args.reward_model_path is None:
        from wan_grpo.rewards.videoalign.tiny import save_tiny_videoreward

        args.reward_model_path, args.videoalign_base = save_tiny_videoreward(tmp / "model")
    model = load_videoreward(args.reward_model_path, base=args.videoalign_base, device=device, dtype=dtype)
    batched = VideoAlignReward(model, batch_size=args.batch_size)
    single = VideoAlignReward(model, batch_size=1)
    w, h = (int(x) for x in args.size.split("*"))
    g = torch.Generator().manual_seed(0)
    # Smooth random videos (a moving gradient plus noise) rather than white noise, so H.264 is realistic.
    base = torch.linspace(0, 255, w).view(1, 1, w, 1).expand(args.frames, h, w, 3)
    shift = torch.arange(args.frames).view(-1, 1, 1, 1) * 4.0
    videos = [((base + shift + 40 * torch.rand(args.frames, h, w, 3, generator=g) + 30 * i) % 256).to(torch.uint8)
              for i in range(args.videos)]
    prompts = [f"a test video number {i}" for i in range(args.videos)]

    def ours():
        return batched(videos, prompts, fps=args.fps)

    def peers():
        out = []
        for i, (v, prompt) in enumerate(zip(videos, prompts)):
            path = write_mp4(tmp / f"v{i}.mp4", v.numpy(), fps=args.fps)
            frames, fps = read_video(path)
            out.append(single([torch.from_numpy(frames)], [prompt], fps=fps))
        return {k: torch.cat([o[k] for o in out]) for k in out[0]}

    a, b = ours(), peers()
    drift = max(float((a[k] - b[k]).abs().max()) for k in a)
    t_ours, t_peers = timed(ours, args.repeats), timed(peers, args.repeats)
    lines = [f"{args.videos} videos, {args.size} x {args.frames} frames at {args.fps} fps, {dtype}, "
             f"reward batch {args.batch_size}; max |score difference| from the mp4 round trip {drift:.3g}", "",
             "| | seconds | ours / peers |", "|---|---|---|",
             f"| peers: temp mp4 per video, scored one at a time | {t_peers:.3f} | 1.00 |",
             f"| wan-grpo: in memory, batched | {t_ours:.3f} | {t_ours / t_peers:.2f} |"]
    record("VideoAlign scoring vs temp-mp4 one-at-a-time", device, lines, args)


if __name__ == "__main__":
    main()

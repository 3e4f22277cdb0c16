"""Self-teaching check of a Shapes base: does fine-tuning it on its own accepted samples keep its accuracy?

RL pushes a model toward its own rewarded samples, so a base whose accepted samples teach it artefacts
cannot be lifted by RL (docs/benchmarks.md, "The base's own samples are poor teachers"). The base draws
--samples videos per training prompt (``wan-grpo eval``); those that pass --accept become an SFT set,
and the renderer's videos of the same captions a control set. Each set fine-tunes the base with the
build's SFT flags (full fine-tuning, cosine, batch 32, caption dropout 0.1; --steps, --lr, --experts),
and the base and both fine-tuned models are evaluated on the training prompts and on --split. A base
worth RL keeps its accuracy when fine-tuned on its own accepted samples, as it does on the renders.

python benchmarks/shapes_self_teach.py [--ckpt_dir DIR] --level 1 --samples 8 --steps 100 --lr 1e-4
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from pathlib import Path

import numpy as np
from _common import parser, record
from shapes_learning import _components, _cpu, evaluate, stderr, wan_grpo

from wan_grpo.tasks.shapes import BASE_DIR
from wan_grpo.tasks.shapes.splits import load_split
from wan_grpo.tasks.shapes.verifier import COMPONENTS
from wan_grpo.tasks.shapes.world import parse, render
from wan_grpo.video import write_mp4

TINY = ["--task", "tiny", "--size", "64*64", "--frame_num", "9"]


def accept_rule(rule: str) -> tuple[str, float]:
    """--accept 'accuracy>=1' -> ('accuracy', 1.0), checked before any sampling."""
    name, _, value = rule.partition(">=")
    try:
        bound = float(value)
    except ValueError:
        bound = float("nan")
    if math.isnan(bound) or name not in COMPONENTS:
        raise SystemExit(f"--accept {rule}: write COMPONENT>=VALUE with a number VALUE and COMPONENT one of "
                         f"{', '.join(COMPONENTS)}")
    return name, bound


def accepted(videos: list[dict], name: str, bound: float) -> list[dict]:
    """The sampled videos (eval.json's) whose component ``name`` is at least ``bound``, as SFT rows."""
    return [{"video": v["video"], "prompt": v["prompt"]} for v in videos if v[name] is not None and v[name] >= bound]


def write_captions(folder: Path, rows: list[dict]) -> None:
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_renders(rows: list[dict], folder: Path, seed: int) -> None:
    """The renderer's videos of the same captions, one each (seeded), as an SFT folder."""
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i, row in enumerate(rows):
        name = f"videos/r{i:04d}.mp4"
        write_mp4(folder / name, render(parse(row["prompt"]), int(rng.integers(1 << 30))), fps=8)
        out.append({"video": name, "prompt": row["prompt"]})
    write_captions(folder, out)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--ckpt_dir", default=str(BASE_DIR))
    p.add_argument("--level", type=int, default=1, choices=(1, 2))
    p.add_argument("--samples", type=int, default=8, help="videos the base draws per training prompt")
    p.add_argument("--accept", default="accuracy>=1", help="COMPONENT>=VALUE a sample needs to join the SFT set")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", default="1e-4")
    p.add_argument("--experts", default="both", choices=("high", "low", "both"))
    p.add_argument("--eval_samples", type=int, default=2, help="videos per training prompt in the evals")
    p.add_argument("--split", default="val", choices=("val", "heldout"))
    p.add_argument("--split_samples", type=int, default=16, help="videos per --split prompt in the evals")
    p.add_argument("--work", default="runs/shapes-self-teach")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shapes-self-teach-")) if args.smoke else Path(args.work)
    args.ckpt_dir = str(Path(args.ckpt_dir).resolve())
    train_prompts, split_prompts = f"shapes:{args.level}:train", f"shapes:{args.level}:{args.split}"
    batch = "32"
    if args.smoke:  # the random tiny model on four training prompts; it passes no verifier, so accept all
        args.samples, args.accept, args.steps, args.eval_samples, args.split_samples = 2, "clean>=0", 2, 1, 1
        train_prompts = str(work / "prompts.txt")
        Path(train_prompts).write_text("\n".join(load_split(args.level, "train")[:4]) + "\n")
        batch = "4"
        model, sft_model = [*TINY, "--reward", "shapes", "--sampling_steps", "4"], TINY
    else:
        model = sft_model = ["--ckpt_dir", args.ckpt_dir]
    rule = accept_rule(args.accept)

    # evals and SFT runs in --work are reused on a rerun, so one --work holds one base's check
    stamp, key = work / "check.json", {"model": model, "level": args.level, "samples": args.samples,
                                       "accept": args.accept, "steps": args.steps, "lr": args.lr,
                                       "experts": args.experts}
    if stamp.is_file() and json.loads(stamp.read_text()) != key:
        raise SystemExit(f"--work {work} holds a check with other settings ({stamp}); pass a new --work")
    samples = work / "samples"
    evaluate(model, train_prompts, samples, args.samples)
    drawn = json.loads((samples / "eval.json").read_text())["videos"]
    rows = accepted(drawn, *rule)
    if not rows:
        raise SystemExit(f"none of the base's {args.samples} samples per prompt passes --accept {args.accept}")
    stamp.write_text(json.dumps(key) + "\n")  # from here on, --work holds SFT sets and runs of these settings
    write_captions(samples, rows)
    renders = work / "renders"
    if not (renders / "captions.jsonl").is_file():
        write_renders(rows, renders, seed=3)

    evals = [(train_prompts, args.eval_samples, "train")]
    if not args.smoke:  # the split's evals are the same code again: skipped in the smoke run for time
        evals.append((split_prompts, args.split_samples, args.split))
    n_prompts = len({v["prompt"] for v in drawn})
    lines = [f"Level {args.level}: {len(rows)} of {args.samples} x {n_prompts} samples pass {args.accept}; "
             f"{args.experts} expert(s), {args.steps} steps at lr {args.lr}", "",
             f"| fine-tuned on | training prompts accuracy | components | {args.split} accuracy | components |",
             "|---|---|---|---|---|"]
    for label, data in (("nothing (the base)", None), ("renders of the same captions", renders),
                        ("its accepted samples", samples)):
        ckpt = None
        out = work / "base"
        if data is not None:
            out = work / f"sft-{data.name}"
            ckpt = out / f"checkpoint-{args.steps}"
            if not ckpt.is_dir():
                wan_grpo("sft", *sft_model, "--dataset", str(data), "--train_experts", args.experts, "--lora_rank",
                         "0", "--learning_rate", args.lr, "--weight_decay", "0", "--warmup_steps",
                         str(max(1, args.steps // 5)), "--lr_schedule", "cosine", "--max_steps", str(args.steps),
                         "--batch_size", batch, "--train_batch_size", batch, "--caption_dropout", "0.1",
                         "--save_dir", str(out), "--tensorboard", "false", "--log_interval", "0", "--seed", "0")
        cells = []
        for prompts, n, tag in evals:
            acc = evaluate(model, prompts, out / f"eval-{tag}", n, ckpt)
            cells += [f"{statistics.mean(acc):.3f} +- {stderr(acc):.3f}", _components([out / f"eval-{tag}"])]
        cells += ["not run (smoke)"] * (4 - len(cells))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    record(f"Shapes self-teaching check, level {args.level}", _cpu(), lines, args)


if __name__ == "__main__":
    main()
